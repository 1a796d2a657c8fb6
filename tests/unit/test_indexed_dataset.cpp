// Megatron's indexed dataset (.bin/.idx): the committed fixture written by an independent Python
// script (tests/data/make_tiny_fixture.py) read back field by field against values computed by
// hand; our writer reproducing it byte for byte; round trips of every token dtype; the writer's
// range checks and atomic publication; every corrupt or truncated file refused with an error that
// names the field (and a seeded mutation sweep that must load-and-read-in-bounds or throw
// moe::Error, never crash); the byte tokenizer; and the preprocess_data tool's output (the CTest
// pair tools_preprocess_data_smoke / tools_preprocess_data_check).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/data.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;

namespace {

const std::string kFixture = std::string(MOE_SOURCE_DIR) + "/tests/data/tiny_uint16_text_document";

std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  EXPECT_TRUE(in.is_open()) << p;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void write_file(const std::string& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
  ASSERT_TRUE(out.good()) << p;
}
template <class T>
T field(const std::string& bytes, size_t offset) {
  T v;
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  return v;
}
template <class T>
void set_field(std::string& bytes, size_t offset, T v) {
  std::memcpy(bytes.data() + offset, &v, sizeof(T));
}

std::vector<int64_t> ids(const std::string& text, bool eod = true) {
  std::vector<int64_t> v = ByteTokenizer{}.encode(text);
  if (eod) v.push_back(ByteTokenizer::eod);
  return v;
}

class IndexedDatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/moecore_test_indexed_dataset_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
  // A copy of the fixture under `name` with the given .idx / .bin bytes.
  std::string variant(const std::string& name, const std::string& idx, const std::string& bin) const {
    const std::string prefix = path(name);
    write_file(prefix + ".idx", idx);
    write_file(prefix + ".bin", bin);
    return prefix;
  }
  std::string dir_;
};

// ---- dtypes -----------------------------------------------------------------------------------------

TEST(TokenDType, MegatronCodesSizesAndNames) {
  struct Row {
    int code;
    size_t size;
    const char* name;
  };
  const Row rows[] = {{1, 1, "uint8"}, {2, 1, "int8"},    {3, 2, "int16"},   {4, 4, "int32"},
                      {5, 8, "int64"}, {6, 8, "float64"}, {7, 4, "float32"}, {8, 2, "uint16"}};
  for (const Row& r : rows) {
    TokenDType dt = token_dtype_from_code(r.code);
    EXPECT_EQ(static_cast<int>(dt), r.code);
    EXPECT_EQ(token_dtype_size(dt), r.size) << r.name;
    EXPECT_STREQ(token_dtype_name(dt), r.name);
  }
  for (int bad : {0, 9, 255, -1})
    EXPECT_TRUE(contains_all(error_of([&] { token_dtype_from_code(bad); }), {"token dtype code", std::to_string(bad)}));
  // Megatron's DType.optimal_dtype: uint16 below 65500, else int32.
  EXPECT_EQ(token_dtype_for_vocab(257), TokenDType::uint16);
  EXPECT_EQ(token_dtype_for_vocab(65499), TokenDType::uint16);
  EXPECT_EQ(token_dtype_for_vocab(65500), TokenDType::int32);
  EXPECT_EQ(token_dtype_for_vocab(128256), TokenDType::int32);
  error_of([] { token_dtype_for_vocab(0); });
  EXPECT_EQ(token_dtype_max(TokenDType::uint16), 65535);
  EXPECT_EQ(token_dtype_min(TokenDType::int8), -128);
  EXPECT_EQ(token_dtype_max(TokenDType::float32), int64_t(1) << 24);
}

// ---- the committed fixture ----------------------------------------------------------------------------

// The raw bytes, field by field, as make_tiny_fixture.py documents them (computed by hand).
TEST(IndexedDatasetFixture, RawBytesAreMegatronsLayout) {
  const std::string idx = read_file(kFixture + ".idx"), bin = read_file(kFixture + ".bin");
  ASSERT_EQ(idx.size(), 110u);  // 34 + 3·4 + 3·8 + 5·8
  ASSERT_EQ(bin.size(), 26u);   // 13 uint16 tokens
  EXPECT_EQ(idx.substr(0, 9), std::string("MMIDIDX\0\0", 9));
  EXPECT_EQ(field<uint64_t>(idx, 9), 1u);   // version
  EXPECT_EQ(field<uint8_t>(idx, 17), 8u);   // uint16
  EXPECT_EQ(field<uint64_t>(idx, 18), 3u);  // sequences
  EXPECT_EQ(field<uint64_t>(idx, 26), 5u);  // len(document_indices)
  const int32_t lengths[] = {6, 5, 2};
  const int64_t pointers[] = {0, 12, 22};
  const int64_t docs[] = {0, 1, 1, 2, 3};
  for (int i = 0; i < 3; ++i) EXPECT_EQ(field<int32_t>(idx, 34 + 4 * i), lengths[i]) << i;
  for (int i = 0; i < 3; ++i) EXPECT_EQ(field<int64_t>(idx, 46 + 8 * i), pointers[i]) << i;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(field<int64_t>(idx, 70 + 8 * i), docs[i]) << i;
  EXPECT_EQ(field<uint16_t>(bin, 0), 'H');
  EXPECT_EQ(field<uint16_t>(bin, 10), 256);  // eod after "Hello"
  EXPECT_EQ(field<uint16_t>(bin, 12), 'M');  // sequence 1 starts at byte 12
  EXPECT_EQ(field<uint16_t>(bin, 22), 'x');  // sequence 2 starts at byte 22
}

TEST(IndexedDatasetFixture, ReaderGivesTheHandComputedValues) {
  IndexedDataset ds(kFixture);
  EXPECT_EQ(ds.path_prefix(), kFixture);
  EXPECT_EQ(ds.dtype(), TokenDType::uint16);
  EXPECT_EQ(ds.num_sequences(), 3);
  EXPECT_EQ(ds.num_documents(), 4);
  EXPECT_EQ(ds.num_tokens(), 13);
  EXPECT_EQ(ds.document_indices(), (std::vector<int64_t>{0, 1, 1, 2, 3}));
  EXPECT_EQ(ds.sequence_length(0), 6);
  EXPECT_EQ(ds.sequence_length(1), 5);
  EXPECT_EQ(ds.sequence_length(2), 2);
  EXPECT_EQ(ds.document_length(0), 6);
  EXPECT_EQ(ds.document_length(1), 0);  // the empty document: no sequence
  EXPECT_EQ(ds.document_length(2), 5);
  EXPECT_EQ(ds.document_length(3), 2);
  EXPECT_EQ(ds.get(0), (std::vector<int64_t>{'H', 'e', 'l', 'l', 'o', 256}));
  EXPECT_EQ(ds.get(1), (std::vector<int64_t>{'M', 'o', 'E', '!', 256}));
  EXPECT_EQ(ds.get(2), (std::vector<int64_t>{'x', 256}));
  EXPECT_EQ(ds.get(1, 1, 2), (std::vector<int64_t>{'o', 'E'}));
  EXPECT_EQ(ds.get(1, 3), (std::vector<int64_t>{'!', 256}));  // to the end
  EXPECT_EQ(ds.get(0, 6), std::vector<int64_t>{});
  EXPECT_EQ(ds.get(0, 2, 0), std::vector<int64_t>{});
  EXPECT_EQ(ByteTokenizer{}.decode(ds.get(0)), "Hello");
  // Bounds.
  EXPECT_TRUE(contains_all(error_of([&] { ds.get(3); }), {"sequence index 3", "[0, 3)"}));
  error_of([&] { ds.get(-1); });
  EXPECT_TRUE(contains_all(error_of([&] { ds.get(0, 7); }), {"sequence 0 has 6 tokens", "offset 7"}));
  EXPECT_TRUE(contains_all(error_of([&] { ds.get(0, 2, 5); }), {"sequence 0 has 6 tokens", "offset 2 length 5"}));
  error_of([&] { ds.get(0, -1, 2); });
  error_of([&] { ds.get(0, 0, -2); });
  error_of([&] { ds.sequence_length(3); });
  error_of([&] { ds.document_length(4); });
  std::vector<int64_t> buf(6, -7);
  ds.read(2, 0, 2, buf.data());
  EXPECT_EQ(buf, (std::vector<int64_t>{'x', 256, -7, -7, -7, -7}));
  error_of([&] { ds.read(2, 1, 2, buf.data()); });
}

// ---- the writer -----------------------------------------------------------------------------------------

TEST_F(IndexedDatasetTest, WriterReproducesTheFixtureByteForByte) {
  const std::string prefix = path("tiny_uint16_text_document");
  IndexedDatasetWriter w(prefix, token_dtype_for_vocab(ByteTokenizer::vocab_size));
  w.add_document(ids("Hello"));
  w.add_document({});  // an empty text: a document with no sequence, as Megatron records it
  w.add_document(ids("MoE!"));
  w.add_document(ids("x"));
  EXPECT_EQ(w.num_documents(), 4);
  EXPECT_EQ(w.num_sequences(), 3);
  EXPECT_EQ(w.num_tokens(), 13);
  w.finalize();
  EXPECT_EQ(read_file(prefix + ".idx"), read_file(kFixture + ".idx"));
  EXPECT_EQ(read_file(prefix + ".bin"), read_file(kFixture + ".bin"));
  EXPECT_EQ(listing(), (std::vector<std::string>{"tiny_uint16_text_document.bin", "tiny_uint16_text_document.idx"}));
}

TEST_F(IndexedDatasetTest, RoundTripEveryDType) {
  for (int code = 1; code <= 8; ++code) {
    const TokenDType dt = token_dtype_from_code(code);
    const int64_t lo = token_dtype_min(dt), hi = token_dtype_max(dt);
    std::vector<std::vector<int64_t>> docs = {
        {lo, hi, 0, 1},
        {},
        {std::max<int64_t>(lo, -3), 7, hi - 1, lo + 1, 42},
        {hi},
    };
    std::mt19937_64 rng(static_cast<uint64_t>(code));
    std::vector<int64_t> big(1000);
    const int64_t rlo = std::max<int64_t>(lo, -(1 << 20)), rhi = std::min<int64_t>(hi, 1 << 20);
    for (auto& t : big) t = rlo + static_cast<int64_t>(rng() % static_cast<uint64_t>(rhi - rlo + 1));
    docs.push_back(big);
    const std::string prefix = path(std::string("rt_") + token_dtype_name(dt));
    {
      IndexedDatasetWriter w(prefix, dt);
      for (const auto& d : docs) w.add_document(d);
      w.finalize();
    }
    const std::string idx = read_file(prefix + ".idx");
    EXPECT_EQ(field<uint8_t>(idx, 17), code);
    EXPECT_EQ(read_file(prefix + ".bin").size(), (4 + 5 + 1 + 1000) * token_dtype_size(dt));
    IndexedDataset ds(prefix);
    EXPECT_EQ(ds.dtype(), dt);
    ASSERT_EQ(ds.num_documents(), 5) << token_dtype_name(dt);
    ASSERT_EQ(ds.num_sequences(), 4);
    EXPECT_EQ(ds.document_indices(), (std::vector<int64_t>{0, 1, 1, 2, 3, 4}));
    int64_t seq = 0;
    for (const auto& d : docs) {
      if (d.empty()) continue;
      EXPECT_EQ(ds.get(seq), d) << token_dtype_name(dt) << " sequence " << seq;
      ++seq;
    }
  }
}

TEST_F(IndexedDatasetTest, WriterRefusesTokensOutsideTheDType) {
  struct Case {
    TokenDType dt;
    int64_t bad;
  };
  const Case cases[] = {{TokenDType::uint8, 256},   {TokenDType::uint8, -1},       {TokenDType::int8, -129},
                        {TokenDType::int8, 128},    {TokenDType::uint16, 65536},   {TokenDType::uint16, -1},
                        {TokenDType::int16, 32768}, {TokenDType::int32, int64_t(1) << 31},
                        {TokenDType::float32, (int64_t(1) << 24) + 1}, {TokenDType::float64, (int64_t(1) << 53) + 1}};
  for (const Case& c : cases) {
    const std::string prefix = path(std::string("refuse_") + token_dtype_name(c.dt));
    IndexedDatasetWriter w(prefix, c.dt);
    w.add_document({1, 2});
    const std::string msg = error_of([&] { w.add_document({3, c.bad, 4}); });
    EXPECT_TRUE(contains_all(msg, {"document 1 token 1", std::to_string(c.bad), token_dtype_name(c.dt),
                                   std::to_string(token_dtype_max(c.dt))}));
    // The refused document left no trace: the next one is document 1.
    w.add_document({5});
    w.finalize();
    IndexedDataset ds(prefix);
    EXPECT_EQ(ds.num_documents(), 2);
    EXPECT_EQ(ds.get(1), std::vector<int64_t>{5});
  }
}

TEST_F(IndexedDatasetTest, WriterIsAtomic) {
  const std::string prefix = path("data");
  {
    IndexedDatasetWriter w(prefix, TokenDType::uint16);
    w.add_document({1, 2, 3});
    w.finalize();
  }
  const std::string idx0 = read_file(prefix + ".idx"), bin0 = read_file(prefix + ".bin");
  // Abandoned without finalize: the previous pair is untouched and no temp file is left.
  {
    IndexedDatasetWriter w(prefix, TokenDType::uint16);
    w.add_document({9, 9, 9, 9});
    EXPECT_EQ(listing().size(), 3u);  // data.bin, data.idx, the temp .bin
  }
  EXPECT_EQ(read_file(prefix + ".idx"), idx0);
  EXPECT_EQ(read_file(prefix + ".bin"), bin0);
  EXPECT_EQ(listing(), (std::vector<std::string>{"data.bin", "data.idx"}));
  // A failed publication (the .bin target is a non-empty directory, so the rename fails): an I/O
  // error, the previous .idx intact, temp files removed.
  const std::string other = path("other");
  std::filesystem::create_directories(other + ".bin/blocker");
  write_file(other + ".idx", idx0);
  {
    IndexedDatasetWriter w(other, TokenDType::uint16);
    w.add_document({4, 5});
    EXPECT_TRUE(contains_all(error_of([&] { w.finalize(); }, ErrorCode::io),
                             {"other", "renaming", "previous files", "untouched"}));
    error_of([&] { w.add_document({1}); }, ErrorCode::io);
  }
  EXPECT_EQ(read_file(other + ".idx"), idx0);
  EXPECT_EQ(listing(), (std::vector<std::string>{"data.bin", "data.idx", "other.bin", "other.idx"}));
  // An output directory that does not exist: refused at construction.
  error_of([&] { IndexedDatasetWriter w(path("no/such/dir/x"), TokenDType::uint16); }, ErrorCode::io);
  // finalize once; nothing after it.
  IndexedDatasetWriter w(path("once"), TokenDType::int32);
  w.add_document({1});
  w.finalize();
  EXPECT_TRUE(contains_all(error_of([&] { w.finalize(); }), {"finalize() called twice"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.add_document({2}); }), {"after finalize"}));
}

// ---- corrupt and truncated files --------------------------------------------------------------------------

TEST_F(IndexedDatasetTest, CorruptIndexRefusedWithTheField) {
  const std::string idx = read_file(kFixture + ".idx"), bin = read_file(kFixture + ".bin");
  auto refuse = [&](const std::string& name, const std::string& i, const std::string& b,
                    const std::vector<std::string>& parts, ErrorCode code = ErrorCode::invalid_argument) {
    const std::string prefix = variant(name, i, b);
    const std::string msg = error_of([&] { IndexedDataset ds(prefix); }, code);
    EXPECT_TRUE(contains_all(msg, parts)) << name;
  };
  {
    std::string m = idx;
    m[0] = 'X';
    refuse("magic", m, bin, {"magic.idx", "magic", "MMIDIDX", "58 4d 49"});
  }
  {
    std::string m = idx;
    set_field<uint64_t>(m, 9, 2);
    refuse("version", m, bin, {"version.idx", "version", "expected 1, got 2"});
  }
  for (uint8_t code : {uint8_t(0), uint8_t(9), uint8_t(200)}) {
    std::string m = idx;
    m[17] = static_cast<char>(code);
    refuse("dtype" + std::to_string(code), m, bin, {"dtype code", "got " + std::to_string(code)});
  }
  {
    std::string m = idx;
    set_field<uint64_t>(m, 18, uint64_t(1) << 60);
    refuse("seqcount", m, bin, {"sequence count", "1152921504606846976", "the file has 110"});
    set_field<uint64_t>(m, 18, 4);  // one more sequence than there is room for with 5 doc entries
    refuse("seqcount4", m, bin, {"document count", "the file has 110"});
  }
  {
    std::string m = idx;
    set_field<uint64_t>(m, 26, 1000);
    refuse("doccount", m, bin, {"document count", "1000", "the file has 110"});
    set_field<uint64_t>(m, 26, 0);
    refuse("doccount0", m, bin, {"document count", "expected >= 1"});
    set_field<uint64_t>(m, 26, 4);  // the file then has 8 trailing bytes
    refuse("doccount4", m, bin, {"size", "expected 102 bytes", "got 110"});
  }
  {
    std::string m = idx;
    set_field<int32_t>(m, 34 + 4, -5);
    refuse("neglen", m, bin, {"sequence lengths[1]", "expected >= 0, got -5"});
  }
  {
    std::string m = idx;
    set_field<int64_t>(m, 46 + 16, 1000);  // pointer of sequence 2 past the end of the .bin
    refuse("ptr", m, bin, {"sequence pointers[2]", "expected 22", "got 1000"});
    set_field<int64_t>(m, 46 + 16, -2);
    refuse("negptr", m, bin, {"sequence pointers[2]", "got -2"});
  }
  {
    std::string m = idx;
    set_field<int32_t>(m, 34 + 8, 100);  // sequence 2 claims 100 tokens: the .bin is too short
    refuse("longseq", m, bin, {"longseq.bin", "truncated", "111", "222 bytes", "the file has 26"});
  }
  {
    std::string m = idx;
    set_field<int64_t>(m, 70, 1);
    refuse("doc0", m, bin, {"document indices[0]", "expected 0", "got 1"});
    m = idx;
    set_field<int64_t>(m, 70 + 16, 0);  // 0 1 0 2 3: decreasing
    refuse("docdec", m, bin, {"document indices[2]", "non-decreasing", "got 0"});
    m = idx;
    set_field<int64_t>(m, 70 + 32, 2);  // ends before the last sequence
    refuse("doclast", m, bin, {"document indices[4]", "expected the sequence count 3", "got 2"});
    m = idx;
    set_field<int64_t>(m, 70 + 24, 7);
    refuse("docbig", m, bin, {"document indices[3]", "got 7"});
  }
  // A multimodal index (one int8 mode per sequence appended) is refused as such.
  refuse("modes", idx + std::string(3, '\0'), bin, {"multimodal", "not supported"}, ErrorCode::not_supported);
  refuse("trailing", idx + std::string(1, '\0'), bin, {"size", "expected 110 bytes", "got 111"});
  // Truncated .idx at every length (header, lengths, pointers, document indices).
  for (size_t n = 0; n < idx.size(); ++n) {
    const std::string prefix = variant("cut", idx.substr(0, n), bin);
    const std::string msg = error_of([&] { IndexedDataset ds(prefix); });
    EXPECT_TRUE(contains_all(msg, {"cut.idx"})) << n << ": " << msg;
  }
  // Truncated or padded .bin.
  refuse("shortbin", idx, bin.substr(0, 24), {"shortbin.bin", "truncated", "26 bytes", "the file has 24"});
  refuse("emptybin", idx, "", {"emptybin.bin", "truncated", "the file has 0"});
  refuse("longbin", idx, bin + "xx", {"longbin.bin", "expected 26 bytes", "got 28", "trailing"});
  // Missing files and a directory in place of the .idx: I/O errors naming the path.
  write_file(path("nobin.idx"), idx);
  auto open_error = [&](const std::string& name) {
    return error_of([&] { IndexedDataset ds(path(name)); }, ErrorCode::io);
  };
  EXPECT_TRUE(contains_all(open_error("nobin"), {"nobin.bin", "cannot open"}));
  EXPECT_TRUE(contains_all(open_error("nothing"), {"nothing.idx"}));
  std::filesystem::create_directories(path("isdir.idx"));
  EXPECT_TRUE(contains_all(open_error("isdir"), {"isdir.idx", "not a regular file"}));
}

// Random damage to the fixture's index: each variant loads and then reads every sequence and
// document within bounds, or throws moe::Error. Never a crash, never another exception.
TEST_F(IndexedDatasetTest, MutationSweepNeverCrashes) {
  const std::string idx = read_file(kFixture + ".idx"), bin = read_file(kFixture + ".bin");
  std::mt19937_64 rng(20240611);
  const int64_t interesting[] = {0, 1, 2, 3, 5, 12, 13, 22, 26, -1, -2, 255, 256, 65535, 1 << 30,
                                 std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
                                 std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
  int loaded = 0, refused = 0;
  for (int iter = 0; iter < 600; ++iter) {
    std::string m = idx, b = bin;
    const int kind = static_cast<int>(rng() % 8);
    const size_t pos = static_cast<size_t>(rng() % m.size());
    switch (kind) {
      case 0: m[pos] = static_cast<char>(rng() & 0xff); break;                   // one random byte
      case 1: m[pos] = static_cast<char>(m[pos] ^ (1 << (rng() % 8))); break;    // one bit
      case 2: m.resize(pos); break;                                              // truncation
      case 3: m += std::string(1 + rng() % 16, static_cast<char>(rng() & 0xff)); break;  // extension
      case 4: {  // an interesting value over one whole field
        struct Field {
          size_t offset, size;
        };
        static const Field fields[] = {{17, 1}, {18, 8}, {26, 8}, {34, 4}, {38, 4}, {42, 4}, {46, 8},
                                       {54, 8}, {62, 8}, {70, 8}, {78, 8}, {86, 8}, {94, 8}, {102, 8}};
        const Field f = fields[rng() % std::size(fields)];
        const int64_t v = interesting[rng() % std::size(interesting)];
        if (f.size == 1) m[f.offset] = static_cast<char>(v);
        else if (f.size == 4) set_field<int32_t>(m, f.offset, static_cast<int32_t>(v));
        else set_field<int64_t>(m, f.offset, v);
        break;
      }
      case 5:  // several random bytes
        for (int k = 0; k < 4; ++k) m[static_cast<size_t>(rng() % m.size())] = static_cast<char>(rng() & 0xff);
        break;
      case 7:  // a document index within [0, 3]: often a different but valid grouping
        set_field<int64_t>(m, 70 + 8 * (1 + rng() % 3), static_cast<int64_t>(rng() % 4));
        break;
      case 6:  // damage to the .bin size as well
        b.resize(static_cast<size_t>(rng() % (bin.size() + 4)), 'z');
        m[pos] = static_cast<char>(rng() & 0xff);
        break;
    }
    const std::string prefix = variant("mut", m, b);
    try {
      IndexedDataset ds(prefix);
      int64_t total = 0;
      for (int64_t s = 0; s < ds.num_sequences(); ++s) {
        std::vector<int64_t> t = ds.get(s);
        ASSERT_EQ(static_cast<int64_t>(t.size()), ds.sequence_length(s));
        for (int64_t v : t) {
          ASSERT_GE(v, token_dtype_min(ds.dtype()));
          ASSERT_LE(v, token_dtype_max(ds.dtype()));
        }
        total += static_cast<int64_t>(t.size());
      }
      ASSERT_EQ(total, ds.num_tokens());
      ASSERT_EQ(total * static_cast<int64_t>(token_dtype_size(ds.dtype())), static_cast<int64_t>(b.size()));
      int64_t doc_total = 0;
      for (int64_t d = 0; d < ds.num_documents(); ++d) doc_total += ds.document_length(d);
      ASSERT_EQ(doc_total, total);
      ++loaded;
    } catch (const Error&) {
      ++refused;  // a float dtype code with non-integral bytes also lands here, from get()
    } catch (const std::exception& e) {
      FAIL() << "mutation " << iter << " (kind " << kind << ") threw a non-moe exception: " << e.what();
    }
  }
  EXPECT_GT(loaded, 0);  // valid variants exist (e.g. dtype code 3 for 8: both 2-byte types)
  EXPECT_GT(refused, 300);
  std::printf("mutation sweep: %d loaded and read in bounds, %d refused with moe::Error\n", loaded, refused);
}

// ---- the byte tokenizer --------------------------------------------------------------------------------

TEST(ByteTokenizer, RoundTripAndPadding) {
  ByteTokenizer tok;
  EXPECT_EQ(ByteTokenizer::eod, 256);
  EXPECT_EQ(ByteTokenizer::vocab_size, 257);
  std::string all;
  for (int c = 0; c < 256; ++c) all.push_back(static_cast<char>(c));
  const std::vector<int64_t> ids_all = tok.encode(all);
  ASSERT_EQ(ids_all.size(), 256u);
  for (int c = 0; c < 256; ++c) EXPECT_EQ(ids_all[static_cast<size_t>(c)], c);
  EXPECT_EQ(tok.decode(ids_all), all);
  const std::string utf8 = "naïve café — ½";
  EXPECT_EQ(tok.decode(tok.encode(utf8)), utf8);
  EXPECT_EQ(tok.encode("é"), (std::vector<int64_t>{0xc3, 0xa9}));
  EXPECT_TRUE(tok.encode("").empty());
  // eod and any id outside [0, 255] (padding ids of a padded vocabulary) render as nothing.
  EXPECT_EQ(tok.decode({'a', 256, 'b', 300, -1, 383, 'c'}), "abc");
  // Megatron's _vocab_size_with_padding.
  EXPECT_EQ(padded_vocab_size(257, 128, 1), 384);
  EXPECT_EQ(padded_vocab_size(257), 384);
  EXPECT_EQ(padded_vocab_size(257, 128, 2), 512);
  EXPECT_EQ(padded_vocab_size(256, 128, 1), 256);
  EXPECT_EQ(padded_vocab_size(50257, 128, 8), 51200);
  EXPECT_EQ(padded_vocab_size(1, 1, 1), 1);
  error_of([] { padded_vocab_size(0, 128, 1); });
  error_of([] { padded_vocab_size(257, 0, 1); });
  error_of([] { padded_vocab_size(257, 128, 0); });
}

// ---- the preprocess_data tool ----------------------------------------------------------------------------

// Run by CTest's tools_preprocess_data_check after tools_preprocess_data_smoke has run
// preprocess_data --append-eod on tests/data/tiny_corpus.{txt,fortune,jsonl}; skipped otherwise.
TEST(PreprocessDataSmoke, OutputReadsBackAsTheDocuments) {
  const char* prefix = std::getenv("MOE_PREPROCESS_SMOKE_PREFIX");
  if (!prefix) GTEST_SKIP() << "run through CTest: tools_preprocess_data_check";
  const std::vector<std::string> expected = {
      // tiny_corpus.txt: paragraphs (a whitespace-only line separates too; "\r\n" loses its "\r")
      "The quick brown fox\njumps over the lazy dog.",
      "Second paragraph, one line.",
      "Third paragraph\nwith a CRLF line ending.",
      // tiny_corpus.fortune: "%" lines separate; blank lines inside a fortune stay; "%\n%" is empty
      "A day for firm decisions!!!!!  Or is it?",
      "Two line\nfortune.\n\nWith a blank line inside.",
      "Last one.",
      // tiny_corpus.jsonl: the "text" key; a blank line and an empty text skipped; a list joined
      "JSON document one.",
      "\xc3\x9cn\xc3\xaf\x63\xc3\xb6\x64\xc3\xa9: na\xc3\xafve caf\xc3\xa9",
      "first sentence. second sentence.",
  };
  IndexedDataset ds(prefix);
  EXPECT_EQ(ds.dtype(), TokenDType::uint16);
  ASSERT_EQ(ds.num_documents(), static_cast<int64_t>(expected.size()));
  ASSERT_EQ(ds.num_sequences(), static_cast<int64_t>(expected.size()));
  int64_t tokens = 0;
  for (size_t d = 0; d < expected.size(); ++d) {
    EXPECT_EQ(ds.document_indices()[d + 1], static_cast<int64_t>(d + 1));
    EXPECT_EQ(ds.get(static_cast<int64_t>(d)), ids(expected[d])) << "document " << d;
    tokens += static_cast<int64_t>(expected[d].size()) + 1;
  }
  EXPECT_EQ(ds.num_tokens(), tokens);
}

}  // namespace
