// Megatron's --split over documents (the numbers Megatron's builder gives, Python's half-to-even
// rounding included) and the GPT sample construction: every sample has seq_length + 1 tokens,
// the unshuffled samples tile the concatenation of the epoch-shuffled documents with a one-token
// overlap, every epoch holds exactly the split's documents, the final-epoch rule of Megatron's
// shuffle index, seeds (same seed same samples, another seed another order), empty splits,
// documents made of several sequences or of none.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/data.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;

namespace {

using Range = std::pair<int64_t, int64_t>;
using Ranges = std::array<Range, 3>;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = "/tmp/moecore_test_gpt_dataset_XXXXXX";
    EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

// Document d holds tokens d·1000 + p, p = 0 .. length(d) − 1: every token names its document and
// position, so a sample shows exactly where it came from.
int64_t doc_token(int64_t d, int64_t p) { return d * 1000 + p; }

std::shared_ptr<const IndexedDataset> write_dataset(const std::string& prefix, const std::vector<int64_t>& lengths) {
  IndexedDatasetWriter w(prefix, TokenDType::int32);
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<int64_t> t(static_cast<size_t>(lengths[d]));
    for (int64_t p = 0; p < lengths[d]; ++p) t[static_cast<size_t>(p)] = doc_token(static_cast<int64_t>(d), p);
    w.add_document(t);
  }
  w.finalize();
  return std::make_shared<const IndexedDataset>(prefix);
}

// The checks every GPTDataset must pass, against the documents' known tokens.
void check_tiling(const GPTDataset& g, const std::vector<int64_t>& lengths, int64_t num_samples) {
  const auto [b, e] = g.document_range();
  const int64_t n = e - b, S = g.seq_length(), E = g.num_epochs();
  int64_t T = 0;
  for (int64_t d = b; d < e; ++d) T += lengths[static_cast<size_t>(d)];
  ASSERT_EQ(g.tokens_per_epoch(), T);
  // Megatron's epochs: the fewest with E·T >= num_samples·S + 1; one for num_samples 0.
  if (num_samples == 0) {
    EXPECT_EQ(E, 1);
  } else {
    EXPECT_GE(E * T, num_samples * S + 1);
    EXPECT_LT((E - 1) * T, num_samples * S + 1);
    EXPECT_GE(g.size(), num_samples);
  }
  ASSERT_EQ(g.size(), (E * T - 1) / S);  // Megatron's sample count (drop_last_partial_sequence)
  // Each epoch: a permutation of the split's documents.
  ASSERT_EQ(static_cast<int64_t>(g.document_index().size()), E * n);
  std::vector<int64_t> split_docs(static_cast<size_t>(n));
  std::iota(split_docs.begin(), split_docs.end(), b);
  for (int64_t ep = 0; ep < E; ++ep) {
    std::vector<int64_t> chunk(g.document_index().begin() + ep * n, g.document_index().begin() + (ep + 1) * n);
    std::sort(chunk.begin(), chunk.end());
    EXPECT_EQ(chunk, split_docs) << "epoch " << ep;
  }
  // The stream: the documents in document-index order.
  std::vector<int64_t> stream;
  for (int64_t d : g.document_index())
    for (int64_t p = 0; p < lengths[static_cast<size_t>(d)]; ++p) stream.push_back(doc_token(d, p));
  ASSERT_EQ(static_cast<int64_t>(stream.size()), E * T);
  // The shuffle index is a permutation; sample(i) is unshuffled sample j = shuffle_index[i], which is
  // stream[j·S, j·S + S + 1).
  std::vector<int64_t> perm = g.shuffle_index();
  std::sort(perm.begin(), perm.end());
  for (int64_t i = 0; i < g.size(); ++i) ASSERT_EQ(perm[static_cast<size_t>(i)], i);
  std::vector<std::vector<int64_t>> unshuffled(static_cast<size_t>(g.size()));
  for (int64_t i = 0; i < g.size(); ++i) {
    const std::vector<int64_t> s = g.sample(i);
    ASSERT_EQ(static_cast<int64_t>(s.size()), S + 1);
    const int64_t j = g.shuffle_index()[static_cast<size_t>(i)];
    const std::vector<int64_t> want(stream.begin() + j * S, stream.begin() + j * S + S + 1);
    ASSERT_EQ(s, want) << "sample " << i << " (unshuffled " << j << ")";
    unshuffled[static_cast<size_t>(j)] = s;
  }
  // Consecutive samples overlap by one token: the last label is the next sample's first input.
  for (int64_t j = 0; j + 1 < g.size(); ++j)
    ASSERT_EQ(unshuffled[static_cast<size_t>(j)].back(), unshuffled[static_cast<size_t>(j + 1)].front());
  EXPECT_TRUE(contains_all(error_of([&] { g.sample(g.size()); }), {"sample index", "out of range"}));
  error_of([&] { g.sample(-1); });
}

std::vector<int64_t> varied_lengths(int n) {
  std::vector<int64_t> lengths;
  for (int d = 0; d < n; ++d) lengths.push_back(1 + (d * 7) % 40);  // 1 .. 40 tokens
  return lengths;
}

// ---- the split --------------------------------------------------------------------------------------

TEST(SplitDocumentRanges, MegatronsNumbers) {
  // Megatron Core (blended_megatron_dataset_builder + convert_split_vector_to_split_matrix):
  // [round(c_i·N), round(c_{i+1}·N)) with Python's round; a zero-weight split is empty.
  struct Case {
    const char* split;
    int64_t n;
    Ranges want;
  };
  const Case cases[] = {
      {"949,50,1", 1000, {{{0, 949}, {949, 999}, {999, 1000}}}},
      {"98,2,0", 1000, {{{0, 980}, {980, 1000}, {1000, 1000}}}},
      {"100", 7, {{{0, 7}, {7, 7}, {7, 7}}}},
      {"1,1,1", 10, {{{0, 3}, {3, 7}, {7, 10}}}},
      {"1,1", 5, {{{0, 2}, {2, 5}, {5, 5}}}},  // 2.5 rounds to 2 (half to even, as Python)
      {"1,1", 7, {{{0, 4}, {4, 7}, {7, 7}}}},  // 3.5 rounds to 4
      {"949,50,1", 10, {{{0, 9}, {9, 10}, {10, 10}}}},
      {"949,50,1", 100000, {{{0, 94900}, {94900, 99900}, {99900, 100000}}}},
      {"969,30,1", 12345, {{{0, 11962}, {11962, 12333}, {12333, 12345}}}},
      {"0,1,0", 9, {{{0, 0}, {0, 9}, {9, 9}}}},
      {"1,1,1", 0, {{{0, 0}, {0, 0}, {0, 0}}}},
      {" 98 , 2 ", 50, {{{0, 49}, {49, 50}, {50, 50}}}},
      {"0.9,0.1", 10, {{{0, 9}, {9, 10}, {10, 10}}}},
  };
  for (const Case& c : cases) EXPECT_EQ(split_document_ranges(c.split, c.n), c.want) << c.split << " on " << c.n;
}

TEST(SplitDocumentRanges, BadStringsAreRefused) {
  for (const char* bad : {"", "a,b", "1,2,3,4", "-1,2", "0,0,0", "1,,2", "1e3", "nan", "1;2", ",", "98,2,", "."}) {
    const std::string msg = error_of([&] { split_document_ranges(bad, 100); });
    EXPECT_TRUE(contains_all(msg, {"split '" + std::string(bad) + "'", "949,50,1"})) << msg;
  }
  error_of([] { split_document_ranges("1", -1); });
}

// ---- samples --------------------------------------------------------------------------------------------

TEST(GPTDataset, SamplesTileTheEpochShuffledDocuments) {
  TempDir tmp;
  const std::vector<int64_t> lengths = varied_lengths(23);
  auto ds = write_dataset(tmp.path("docs"), lengths);
  for (int64_t S : {1, 2, 16, 100})
    for (int64_t num_samples : {0, 7, 100, 1000}) {
      SCOPED_TRACE("seq_length " + std::to_string(S) + " num_samples " + std::to_string(num_samples));
      GPTDataset g(ds, 3, 20, S, num_samples, 1234);
      check_tiling(g, lengths, num_samples);
    }
  // The whole corpus and a one-document split.
  check_tiling(GPTDataset(ds, 0, 23, 8, 0, 1), lengths, 0);
  check_tiling(GPTDataset(ds, 22, 23, 4, 50, 1), lengths, 50);
  // Splits from the --split string use only their documents.
  const Ranges r = split_document_ranges("949,50,1", 23);
  for (const Range& range : r) {
    if (range.first == range.second) continue;
    GPTDataset g(ds, range.first, range.second, 8, 20, 5);
    check_tiling(g, lengths, 20);
    for (int64_t d : g.document_index()) {
      EXPECT_GE(d, range.first);
      EXPECT_LT(d, range.second);
    }
  }
}

TEST(GPTDataset, SeedsDecideTheOrder) {
  TempDir tmp;
  const std::vector<int64_t> lengths = varied_lengths(40);
  auto ds = write_dataset(tmp.path("docs"), lengths);
  GPTDataset a(ds, 0, 40, 32, 200, 42), b(ds, 0, 40, 32, 200, 42), c(ds, 0, 40, 32, 200, 43);
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(a.size(), c.size());
  for (int64_t i = 0; i < a.size(); ++i) ASSERT_EQ(a.sample(i), b.sample(i)) << i;
  EXPECT_EQ(a.document_index(), b.document_index());
  EXPECT_EQ(a.shuffle_index(), b.shuffle_index());
  EXPECT_NE(a.document_index(), c.document_index());
  EXPECT_NE(a.shuffle_index(), c.shuffle_index());
  int64_t differ = 0;
  for (int64_t i = 0; i < a.size(); ++i) differ += a.sample(i) != c.sample(i);
  EXPECT_GT(differ, a.size() / 2);
  // Epochs are shuffled independently: the second epoch's order is not the first one's.
  ASSERT_GE(a.num_epochs(), 2);
  const auto& order = a.document_index();
  EXPECT_FALSE(std::equal(order.begin(), order.begin() + 40, order.begin() + 40));
  // Pinned: mt19937_64 and our Fisher–Yates (i from n−1 down to 1, j uniform in [0, i] by
  // rejection of draws below 2^64 mod (i+1), then x mod (i+1)) are fully specified, so this order is
  // the same with every toolchain. The value comes from an independent Python model of both (its
  // mt19937_64 checked against the standard's 10000th output of the default seed, 9981545732273789042).
  GPTDataset small(ds, 0, 8, 4, 0, 1234);
  EXPECT_EQ(small.document_index(), (std::vector<int64_t>{6, 1, 7, 3, 4, 2, 5, 0}));
}

TEST(GPTDataset, FinalEpochShuffledSeparatelyAsMegatron) {
  TempDir tmp;
  const std::vector<int64_t> lengths(10, 10);  // T = 100 tokens per epoch
  auto ds = write_dataset(tmp.path("docs"), lengths);
  // num_samples 10, S 10: E = 2 (10·10 + 1 > 100); 9 samples end in the first epoch, so the final
  // epoch contributes 1 < int(0.8 · 9) = 7: samples [0, 9) are shuffled first, [9, 19) after.
  GPTDataset sep(ds, 0, 10, 10, 10, 7);
  check_tiling(sep, lengths, 10);
  ASSERT_EQ(sep.num_epochs(), 2);
  ASSERT_EQ(sep.size(), 19);
  std::vector<int64_t> first(sep.shuffle_index().begin(), sep.shuffle_index().begin() + 9);
  std::sort(first.begin(), first.end());
  EXPECT_EQ(first, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8}));
  // num_samples 17: the final epoch contributes 8 >= 7: one shuffle over all 19.
  GPTDataset one(ds, 0, 10, 10, 17, 7);
  check_tiling(one, lengths, 17);
  ASSERT_EQ(one.size(), 19);
  bool mixed = false;
  for (int i = 0; i < 9; ++i) mixed = mixed || one.shuffle_index()[static_cast<size_t>(i)] >= 9;
  EXPECT_TRUE(mixed);
}

TEST(GPTDataset, EmptySplitsAndBadArguments) {
  TempDir tmp;
  const std::vector<int64_t> lengths = varied_lengths(5);
  auto ds = write_dataset(tmp.path("docs"), lengths);
  const Ranges r = split_document_ranges("100", 5);
  GPTDataset valid(ds, r[1].first, r[1].second, 8, 0, 1);
  EXPECT_EQ(valid.size(), 0);
  EXPECT_EQ(valid.num_epochs(), 0);
  EXPECT_TRUE(contains_all(error_of([&] { valid.sample(0); }), {"out of range [0, 0)", "empty"}));
  EXPECT_TRUE(contains_all(error_of([&] { GPTDataset g(ds, r[1].first, r[1].second, 8, 10, 1); }),
                           {"10 samples requested from an empty split", "[5, 5)"}));
  EXPECT_TRUE(contains_all(error_of([&] { GPTDataset g(ds, 2, 6, 8, 0, 1); }), {"[2, 6)", "[0, 5)"}));
  error_of([&] { GPTDataset g(ds, 3, 2, 8, 0, 1); });
  error_of([&] { GPTDataset g(ds, -1, 2, 8, 0, 1); });
  EXPECT_TRUE(contains_all(error_of([&] { GPTDataset g(ds, 0, 5, 0, 0, 1); }), {"seq_length must be >= 1, got 0"}));
  error_of([&] { GPTDataset g(ds, 0, 5, 8, -1, 1); });
  error_of([&] { GPTDataset g(nullptr, 0, 0, 8, 0, 1); });
  error_of([&] { GPTDataset g(ds, 0, 5, int64_t(1) << 40, int64_t(1) << 40, 1); });  // overflow / too large
}

// Documents of several sequences (as Megatron's --split-sentences writes) and of none (an empty
// text): written here byte by byte in Megatron's layout.
TEST(GPTDataset, DocumentsOfSeveralSequencesOrNone) {
  TempDir tmp;
  const std::string prefix = tmp.path("multi");
  // Sequences: s0 = [0,1,2], s1 = [3,4], s2 = [5], s3 = [6,7,8,9]; documents: {s0, s1}, {}, {s2, s3}.
  const std::vector<std::vector<int16_t>> seqs = {{0, 1, 2}, {3, 4}, {5}, {6, 7, 8, 9}};
  const std::vector<int64_t> doc_idx = {0, 2, 2, 4};
  std::string idx("MMIDIDX\0\0", 9), bin;
  auto put = [&](std::string& s, const void* p, size_t n) { s.append(static_cast<const char*>(p), n); };
  const uint64_t version = 1, nseq = seqs.size(), ndoc = doc_idx.size();
  const uint8_t code = 3;  // int16
  put(idx, &version, 8);
  put(idx, &code, 1);
  put(idx, &nseq, 8);
  put(idx, &ndoc, 8);
  for (const auto& s : seqs) {
    const int32_t len = static_cast<int32_t>(s.size());
    put(idx, &len, 4);
  }
  int64_t ptr = 0;
  for (const auto& s : seqs) {
    put(idx, &ptr, 8);
    ptr += static_cast<int64_t>(s.size()) * 2;
    put(bin, s.data(), s.size() * 2);
  }
  for (int64_t d : doc_idx) put(idx, &d, 8);
  std::ofstream(prefix + ".idx", std::ios::binary) << idx;
  std::ofstream(prefix + ".bin", std::ios::binary) << bin;
  auto ds = std::make_shared<const IndexedDataset>(prefix);
  ASSERT_EQ(ds->num_documents(), 3);
  EXPECT_EQ(ds->document_length(0), 5);
  EXPECT_EQ(ds->document_length(1), 0);
  EXPECT_EQ(ds->document_length(2), 5);
  const std::vector<std::vector<int64_t>> doc_tokens = {{0, 1, 2, 3, 4}, {}, {5, 6, 7, 8, 9}};
  for (int64_t S : {1, 2, 3, 4, 7}) {
    GPTDataset g(ds, 0, 3, S, 9, 11);
    std::vector<int64_t> stream;
    for (int64_t d : g.document_index()) stream.insert(stream.end(), doc_tokens[d].begin(), doc_tokens[d].end());
    ASSERT_EQ(g.size(), (static_cast<int64_t>(stream.size()) - 1) / S);
    for (int64_t i = 0; i < g.size(); ++i) {
      const int64_t j = g.shuffle_index()[static_cast<size_t>(i)];
      const std::vector<int64_t> want(stream.begin() + j * S, stream.begin() + j * S + S + 1);
      EXPECT_EQ(g.sample(i), want) << "seq_length " << S << " sample " << i;
    }
  }
  // A split made only of the empty document: no tokens, so no samples can be drawn.
  EXPECT_EQ(GPTDataset(ds, 1, 2, 4, 0, 1).size(), 0);
  EXPECT_TRUE(contains_all(error_of([&] { GPTDataset g(ds, 1, 2, 4, 3, 1); }), {"hold no tokens"}));
}

// The committed fixture: 13 tokens in 4 documents (one empty); seq_length 3 gives (13 − 1) / 3 = 4
// samples per epoch.
TEST(GPTDataset, OnTheFixture) {
  const std::string fixture = std::string(MOE_SOURCE_DIR) + "/tests/data/tiny_uint16_text_document";
  auto ds = std::make_shared<const IndexedDataset>(fixture);
  GPTDataset g(ds, 0, 4, 3, 0, 99);
  EXPECT_EQ(g.tokens_per_epoch(), 13);
  EXPECT_EQ(g.size(), 4);
  std::vector<int64_t> all;
  for (int64_t i = 0; i < g.size(); ++i) {
    auto s = g.sample(i);
    EXPECT_EQ(s.size(), 4u);
    all.insert(all.end(), s.begin(), s.end());
  }
  // 4 samples · 4 tokens = the epoch's 13 tokens + 3 overlaps: every token of the epoch appears.
  EXPECT_EQ(all.size(), 16u);
  EXPECT_GE(std::count(all.begin(), all.end(), 256), 3);  // the three eods
  for (int64_t t : {'H', 'e', 'o', 'M', 'E', '!', 'x'}) EXPECT_GE(std::count(all.begin(), all.end(), t), 1) << t;
  EXPECT_GE(std::count(all.begin(), all.end(), 'l'), 2);
}

}  // namespace
