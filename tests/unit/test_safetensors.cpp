// safetensors: byte-exact round trips of every dtype, metadata, atomic writes that leave the
// previous file intact on failure, a hand-built file in the reference (Python/Rust) layout, and a
// battery of malformed files each rejected with a clear message (plus truncation/corruption sweeps
// that must never crash).
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/backend.h"
#include "moecore/safetensors.h"

using namespace moe;
using moe::test::error_of;
using moe::test::contains_all;

namespace {

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file in the spec's layout: length prefix, header text, data buffer.
std::string file_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::string tensor_bytes(const Tensor& t) {
  std::string s(t.nbytes(), '\0');
  t.copy_to_host(s.data(), s.size());
  return s;
}



class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/moecore_test_safetensors_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::string p = path(name);
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  static std::string read(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  // Entries of the temp dir other than `keep` (to catch leftover temp files).
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
  std::string dir_;
};

// One tensor of each dtype, with values that exercise every byte (negative, NaN, subnormal, ...).
std::vector<std::pair<std::string, Tensor>> every_dtype() {
  std::vector<std::pair<std::string, Tensor>> v;
  v.emplace_back("f32", Tensor::from_vector<float>({1.5f, -0.0f, 3.4e38f, 1e-45f, NAN, -7.25f}, {2, 3}));
  v.emplace_back("f64", Tensor::from_vector<double>({0.1, -1e300, 4.9e-324}, {3}));
  v.emplace_back("bf16", Tensor::from_vector<bf16>({bf16{0x3f80}, bf16{0xc2f7}, bf16{0x7fc0}, bf16{0x0001}}, {2, 2}));
  v.emplace_back("f16", Tensor::from_vector<f16>({f16{0x3c00}, f16{0xfbff}, f16{0x0001}}, {3, 1}));
  v.emplace_back("i32", Tensor::from_vector<int32_t>({-2147483647 - 1, 2147483647, 0, -1}, {4}));
  v.emplace_back("i64", Tensor::from_vector<int64_t>({INT64_MIN, INT64_MAX}, {1, 2}));
  v.emplace_back("u8", Tensor::from_vector<uint8_t>({0, 1, 127, 128, 255}, {5}));
  v.emplace_back("scalar", Tensor::from_vector<float>({42.0f}, {}));
  v.emplace_back("empty", Tensor::zeros({0, 4}, DType::f32));
  return v;
}

}  // namespace

TEST_F(Safetensors, RoundTripEveryDtypeBitExact) {
  auto tensors = every_dtype();
  std::string p = path("all.safetensors");
  save_safetensors(p, tensors);
  SafetensorsFile f = load_safetensors(p);
  EXPECT_EQ(f.path, p);
  ASSERT_EQ(f.names.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    EXPECT_EQ(f.names[i], name) << "names keep the saved order";
    ASSERT_TRUE(f.contains(name));
    const Tensor& got = f.at(name);
    EXPECT_EQ(got.shape(), t.shape()) << name;
    EXPECT_EQ(got.dtype(), t.dtype()) << name;
    EXPECT_TRUE(got.device().is_cpu());
    EXPECT_EQ(tensor_bytes(got), tensor_bytes(t)) << name;
  }
  EXPECT_TRUE(f.metadata.empty());
  EXPECT_EQ(listing(), std::vector<std::string>{"all.safetensors"}) << "no temp file left behind";
}

TEST_F(Safetensors, ExactFileBytes) {
  // The writer's output, byte for byte: length prefix, compact header padded with spaces to a
  // multiple of 8, then the tensors back to back in the given order.
  Tensor a = Tensor::from_vector<float>({1.0f, 2.0f}, {2});
  Tensor b = Tensor::from_vector<int64_t>({-3}, {1, 1});
  std::string p = path("exact.safetensors");
  save_safetensors(p, {{"a", a}, {"b", b}}, {{"format", "pt"}});
  std::string header = R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"I64","shape":[1,1],"data_offsets":[8,16]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  EXPECT_EQ(read(p), file_bytes(header, raw<float>({1.0f, 2.0f}) + raw<int64_t>({-3})));
  EXPECT_EQ((8 + header.size()) % 8, 0u);
}

TEST_F(Safetensors, Metadata) {
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "100"}, {"note", "ünïcode \"quoted\"\n"}};
  std::string p = path("meta.safetensors");
  save_safetensors(p, {{"w", Tensor::from_vector<float>({1, 2, 3}, {3})}}, meta);
  SafetensorsFile f = load_safetensors(p);
  EXPECT_EQ(f.metadata, meta);
  // Metadata alone, no tensors, is a valid file.
  save_safetensors(p, {}, meta);
  f = load_safetensors(p);
  EXPECT_TRUE(f.names.empty());
  EXPECT_EQ(f.metadata, meta);
}

TEST_F(Safetensors, HostCopiesOfViewsAndPinnedMemory) {
  // A row slice (storage offset), a reshaped view and a pinned-host tensor all save their own bytes.
  Tensor base = test::randn({4, 3}, DType::f32, 7);
  Tensor rows = base.narrow(1, 2);
  Tensor pinned = Tensor::empty({3}, DType::f64, Device::cpu(), MemoryKind::pinned_host);
  pinned.copy_from_host(raw<double>({1, 2, 3}).data(), 24);
  std::vector<std::pair<std::string, Tensor>> ts = {{"rows", rows}, {"flat", base.view({12})}, {"pinned", pinned}};
  for (Device d : available_devices())  // on a GPU build the device copies are staged through the host
    if (!d.is_cpu()) ts.emplace_back("on_" + d.str(), base.to(d));
  std::string p = path("views.safetensors");
  save_safetensors(p, ts);
  SafetensorsFile f = load_safetensors(p);
  EXPECT_TRUE(test::bit_equal(f.at("rows"), rows.clone()));
  EXPECT_EQ(f.at("rows").shape(), (Shape{2, 3}));
  EXPECT_TRUE(test::bit_equal(f.at("flat"), base.view({12})));
  EXPECT_EQ(f.at("pinned").to_vector<double>(), (std::vector<double>{1, 2, 3}));
  for (Device d : available_devices()) {
    if (!d.is_cpu()) {
      EXPECT_TRUE(test::bit_equal(f.at("on_" + d.str()), base));
    }
  }
}

TEST_F(Safetensors, ReadsTheReferenceLayout) {
  // What Python's safetensors writes: tensors laid out by alignment (8-byte types first) then name,
  // the header's keys in another order, "__metadata__" anywhere, space padding, BOOL for bool.
  std::vector<double> d = {1.0, -2.5};
  std::vector<float> w = {0.5f, 1.5f, -2.0f, 3.0f, 4.0f, -5.5f};
  std::vector<uint16_t> h = {0x3f80, 0x4000};  // bf16 1, 2
  std::vector<uint8_t> m = {1, 0, 1};
  std::string data = raw(d) + raw(w) + raw(h) + raw(m);
  std::string header =
      R"({"mask":{"dtype":"BOOL","shape":[3],"data_offsets":[44,47]},)"
      R"("__metadata__":{"format":"pt"},)"
      R"("weight":{"dtype":"F32","shape":[2,3],"data_offsets":[16,40]},)"
      R"("bias":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},)"
      R"("half":{"dtype":"BF16","shape":[2],"data_offsets":[40,44]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string p = write("ref.safetensors", file_bytes(header, data));
  SafetensorsFile f = load_safetensors(p);
  EXPECT_EQ(f.names, (std::vector<std::string>{"bias", "weight", "half", "mask"})) << "file order";
  EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(f.at("bias").to_vector<double>(), d);
  EXPECT_EQ(f.at("weight").shape(), (Shape{2, 3}));
  EXPECT_EQ(f.at("weight").to_vector<float>(), w);
  EXPECT_EQ(f.at("half").dtype(), DType::bf16);
  EXPECT_EQ(bf16_to_float(f.at("half").to_vector<bf16>()[1]), 2.0f);
  EXPECT_EQ(f.at("mask").dtype(), DType::u8) << "BOOL loads as u8";
  EXPECT_EQ(f.at("mask").to_vector<uint8_t>(), m);
}

// As the reference reader (huggingface/safetensors Metadata::validate): in offset order the tensors
// tile the data buffer exactly, from byte 0 to the end of the file. Empty tensors sit at a boundary.
TEST_F(Safetensors, TensorsTileTheBufferExactly) {
  std::string header = R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},)"
                       R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                       R"("z":{"dtype":"I32","shape":[0],"data_offsets":[4,4]},)"
                       R"("e":{"dtype":"F64","shape":[0,3],"data_offsets":[6,6]}})";
  std::string data = raw<float>({9.0f}) + "\x01\x02";
  SafetensorsFile f = load_safetensors(write("tiled.safetensors", file_bytes(header, data)));
  EXPECT_EQ(f.names, (std::vector<std::string>{"a", "z", "b", "e"}));
  EXPECT_EQ(f.at("a").to_vector<float>(), std::vector<float>{9.0f});
  EXPECT_EQ(f.at("b").to_vector<uint8_t>(), (std::vector<uint8_t>{1, 2}));
  EXPECT_EQ(f.at("z").numel(), 0);
  EXPECT_EQ(f.at("e").numel(), 0);
}

TEST_F(Safetensors, GapsAndTrailingBytesAreRefused) {
  struct Case {
    const char* what;
    std::string header, data;
    std::vector<std::string> parts;
  };
  const std::string a04 = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  const std::vector<Case> cases = {
      {"gap before the first tensor", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, 'x'),
       {"tensor 'a'", "[4, 8]", "gap", "begin at byte 0", "at the start of the data buffer", "got 4"}},
      {"gap between tensors", "{" + a04 + R"(,"b":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}})",
       std::string(10, 'x'), {"tensor 'b'", "[8, 10]", "gap", "begin at byte 4", "after tensor 'a' [0, 4]", "got 8"}},
      {"empty tensor inside a gap", "{" + a04 + R"(,"z":{"dtype":"I32","shape":[0],"data_offsets":[6,6]}})",
       std::string(6, 'x'), {"tensor 'z'", "[6, 6]", "begin at byte 4"}},
      {"trailing bytes", "{" + a04 + "}", std::string(4, 'x') + "tail",
       {"trailing bytes", "end at byte 4", "holds 8 data bytes", "4 bytes after tensor 'a'"}},
      {"bytes and no tensor", "{}", "tail", {"trailing bytes", "end at byte 0", "holds 4 data bytes"}},
  };
  int i = 0;
  for (const Case& c : cases) {
    const std::string p = write("gap" + std::to_string(i++) + ".safetensors", file_bytes(c.header, c.data));
    const std::string m = error_of([&] { load_safetensors(p); }, ErrorCode::invalid_argument);
    EXPECT_TRUE(contains_all(m, c.parts)) << c.what << ": " << m;
    EXPECT_NE(m.find(p), std::string::npos) << c.what << ": the message must name the file: " << m;
  }
}

// Found by tests/fuzz/fuzz_safetensors: a number too large for a double in the header escaped as
// nlohmann's out_of_range exception instead of a moe::Error naming the file.
TEST_F(Safetensors, HeaderNumberOverflowAndDeepNestingAreRefused) {
  const std::string p1 = write("overflow.safetensors",
                               file_bytes(R"({"t":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}})", ""));
  EXPECT_TRUE(contains_all(error_of([&] { load_safetensors(p1); }), {p1, "not valid JSON", "1e400"}));
  const std::string p2 = write("deep.safetensors", file_bytes("{\"t\":" + std::string(5000, '[') + "}", ""));
  EXPECT_TRUE(contains_all(error_of([&] { load_safetensors(p2); }), {p2, "nested deeper than 512"}));
}

TEST_F(Safetensors, AtNamesTheFileAndListsNames) {
  std::string p = path("names.safetensors");
  save_safetensors(p, {{"router.weight", Tensor::zeros({2, 2}, DType::f32)},
                       {"router.expert_bias", Tensor::zeros({2}, DType::f32)}});
  SafetensorsFile f = load_safetensors(p);
  EXPECT_FALSE(f.contains("router.bias"));
  EXPECT_TRUE(contains_all(error_of([&] { f.at("router.bias"); }, ErrorCode::invalid_argument),
                           {p, "'router.bias'", "'router.weight'", "'router.expert_bias'"}));
}

TEST_F(Safetensors, OverwriteReplacesAtomically) {
  std::string p = path("ckpt.safetensors");
  save_safetensors(p, {{"x", Tensor::from_vector<float>({1}, {1})}});
  save_safetensors(p, {{"y", Tensor::from_vector<float>({2, 3}, {2})}});
  SafetensorsFile f = load_safetensors(p);
  EXPECT_EQ(f.names, std::vector<std::string>{"y"});
  EXPECT_EQ(listing(), std::vector<std::string>{"ckpt.safetensors"});
}

TEST_F(Safetensors, FailedWritesLeaveThePreviousFileIntact) {
  std::string p = path("ckpt.safetensors");
  save_safetensors(p, {{"x", Tensor::from_vector<float>({1, 2}, {2})}}, {{"v", "1"}});
  const std::string before = read(p);
  Tensor t = Tensor::from_vector<float>({5}, {1});

  // Invalid requests are refused before anything is written.
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(p, {{"a", t}, {"a", t}}); }, ErrorCode::invalid_argument),
                           {p, "duplicate tensor name 'a'"}));
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(p, {{"__metadata__", t}}); }, ErrorCode::invalid_argument),
                           {"reserved"}));
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(p, {{"", t}}); }, ErrorCode::invalid_argument), {"empty"}));
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(p, {{"u", Tensor()}}); }, ErrorCode::invalid_argument),
                           {"'u'", "undefined"}));
  EXPECT_EQ(read(p), before);

  // The temp file's path is blocked by a directory (forces a failure even as root): io error, the
  // blocking directory is not ours and stays, the previous file is untouched.
  std::string tmp = p + ".tmp." + std::to_string(getpid());
  ASSERT_TRUE(std::filesystem::create_directory(tmp));
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(p, {{"y", t}}); }, ErrorCode::io), {p, tmp, "untouched"}));
  EXPECT_EQ(read(p), before);
  EXPECT_TRUE(std::filesystem::is_directory(tmp));
  std::filesystem::remove(tmp);

  // The rename fails (the target is a non-empty directory): the written temp file is removed.
  std::string dir_target = path("target_dir");
  std::filesystem::create_directory(dir_target);
  write("target_dir/keep", "k");
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(dir_target, {{"y", t}}); }, ErrorCode::io),
                           {dir_target, "renaming"}));
  EXPECT_TRUE(std::filesystem::is_directory(dir_target));
  EXPECT_EQ(read(dir_target + "/keep"), "k");

  // A directory that does not exist.
  EXPECT_TRUE(contains_all(error_of([&] { save_safetensors(path("no/such/dir/x.safetensors"), {{"y", t}}); },
                                    ErrorCode::io),
                           {"no/such/dir/x.safetensors"}));

  EXPECT_EQ(read(p), before);
  EXPECT_EQ(load_safetensors(p).metadata.at("v"), "1");
  EXPECT_EQ(listing(), (std::vector<std::string>{"ckpt.safetensors", "target_dir"})) << "no temp file left behind";
}

TEST_F(Safetensors, UnreadableFilesAreIoErrors) {
  std::string p = path("missing.safetensors");
  EXPECT_TRUE(contains_all(error_of([&] { load_safetensors(p); }, ErrorCode::io), {p, "No such file"}));
  EXPECT_TRUE(contains_all(error_of([&] { load_safetensors(dir_); }, ErrorCode::io), {dir_}));
}

TEST_F(Safetensors, MalformedFilesAreRejectedClearly) {
  const std::string ok_entry = R"("dtype":"F32","shape":[2],"data_offsets":[0,8])";
  const std::string data8(8, '\0');
  auto one = [&](const std::string& entry) { return file_bytes("{\"t\":{" + entry + "}}", data8); };
  struct Case {
    const char* what;
    std::string bytes;
    std::vector<std::string> parts;
    ErrorCode code = ErrorCode::invalid_argument;
  };
  std::vector<Case> cases = {
      {"empty file", "", {"0 bytes", "shorter than the 8-byte header length"}},
      {"short file", std::string("\x05\0\0", 3), {"3 bytes", "shorter than"}},
      {"header longer than file", le64(100) + "{}", {"header length 100", "exceeds the 2 bytes"}},
      {"absurd header length", le64(1ull << 40) + "{}", {"header length 1099511627776", "limit"}},
      {"max header length", le64(~0ull) + "{}", {"limit"}},
      {"zero header length", le64(0), {"header length 0"}},
      {"header not JSON", file_bytes("{\"t\": [1, 2", ""), {"not valid JSON"}},
      {"header not UTF-8", file_bytes("{\"\xff\":1}", ""), {"not valid JSON"}},
      {"header is a list", file_bytes("[1, 2, 3]", ""), {"JSON object", "array"}},
      {"entry not an object", file_bytes(R"({"t": 3})", ""), {"tensor 't'", "expected an object", "3"}},
      {"missing dtype", one(R"("shape":[2],"data_offsets":[0,8])"), {"tensor 't'", "missing field 'dtype'"}},
      {"missing shape", one(R"("dtype":"F32","data_offsets":[0,8])"), {"tensor 't'", "missing field 'shape'"}},
      {"missing offsets", one(R"("dtype":"F32","shape":[2])"), {"tensor 't'", "missing field 'data_offsets'"}},
      {"extra field", one(ok_entry + R"(,"stride":[1])"), {"tensor 't'", "unexpected field 'stride'"}},
      {"dtype not a string", one(R"("dtype":4,"shape":[2],"data_offsets":[0,8])"), {"tensor 't'", "dtype", "4"}},
      {"unknown dtype", one(R"("dtype":"F33","shape":[2],"data_offsets":[0,8])"), {"unknown dtype 'F33'", "BF16"}},
      {"unsupported dtype", one(R"("dtype":"I16","shape":[4],"data_offsets":[0,8])"),
       {"tensor 't'", "'I16'", "not supported"}, ErrorCode::not_supported},
      {"shape not a list", one(R"("dtype":"F32","shape":2,"data_offsets":[0,8])"), {"tensor 't'", "shape", "2"}},
      {"negative dim", one(R"("dtype":"F32","shape":[-2],"data_offsets":[0,8])"), {"shape[0]", "non-negative", "-2"}},
      {"fractional dim", one(R"("dtype":"F32","shape":[2.5],"data_offsets":[0,8])"), {"shape[0]", "2.5"}},
      {"string dim", one(R"("dtype":"F32","shape":[1,"2"],"data_offsets":[0,8])"), {"shape[1]", "\"2\""}},
      {"huge shape", one(R"("dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,8])"),
       {"tensor 't'", "more elements than the 8-byte data buffer"}},
      {"one offset", one(R"("dtype":"F32","shape":[2],"data_offsets":[8])"), {"data_offsets", "two non-negative", "[8]"}},
      {"three offsets", one(R"("dtype":"F32","shape":[2],"data_offsets":[0,8,8])"), {"data_offsets", "[0,8,8]"}},
      {"negative offset", one(R"("dtype":"F32","shape":[2],"data_offsets":[-8,0])"), {"data_offsets", "[-8,0]"}},
      {"float offset", one(R"("dtype":"F32","shape":[2],"data_offsets":[0,8.0])"), {"data_offsets", "[0,8.0]"}},
      {"offsets not a list", one(R"("dtype":"F32","shape":[2],"data_offsets":"0-8")"), {"data_offsets", "0-8"}},
      {"begin > end", one(R"("dtype":"F32","shape":[0],"data_offsets":[8,0])"), {"tensor 't'", "[8, 0]", "begin > end"}},
      {"end beyond buffer", one(R"("dtype":"F32","shape":[4],"data_offsets":[0,16])"),
       {"tensor 't'", "[0, 16]", "beyond the data buffer (8 bytes)"}},
      {"byte length mismatch", one(R"("dtype":"F64","shape":[2],"data_offsets":[0,8])"),
       {"tensor 't'", "span 8 bytes, expected 16", "F64"}},
      {"overlap",
       file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                  data8),
       {"tensor 'b'", "[4, 8]", "overlap tensor 'a'", "[0, 8]"}},
      {"contained overlap",
       file_bytes(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                  R"("c":{"dtype":"U8","shape":[2],"data_offsets":[5,7]}})",
                  data8),
       {"tensor 'b'", "overlap tensor 'a'"}},
      {"duplicate name",
       file_bytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                  R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                  data8),
       {"'a' twice"}},
      {"metadata not an object", file_bytes(R"({"__metadata__":["x"]})", ""), {"__metadata__", "object"}},
      {"metadata value not a string", file_bytes(R"({"__metadata__":{"step":100}})", ""),
       {"__metadata__", "'step'", "string", "100"}},
  };
  int i = 0;
  for (const Case& c : cases) {
    std::string p = write("bad" + std::to_string(i++) + ".safetensors", c.bytes);
    std::string m = error_of([&] { load_safetensors(p); }, c.code);
    EXPECT_TRUE(contains_all(m, c.parts)) << c.what;
    EXPECT_NE(m.find(p), std::string::npos) << c.what << ": the message must name the file: " << m;
  }
}

TEST_F(Safetensors, TruncationAndCorruptionNeverCrash) {
  // Every prefix of a valid file, and every single-byte corruption of its header and length, either
  // loads or throws a moe::Error: no crash, no other exception, no huge allocation.
  std::string good = path("good.safetensors");
  save_safetensors(good, {{"a", Tensor::from_vector<float>({1, 2, 3}, {3})},
                          {"b", Tensor::from_vector<int64_t>({4, 5}, {2, 1})}},
                   {{"k", "v"}});
  const std::string bytes = read(good);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  ASSERT_LT(header_len, bytes.size());
  const size_t header_end = 8 + static_cast<size_t>(header_len);
  std::string p = path("mut.safetensors");
  int loaded = 0, rejected = 0;
  auto attempt = [&](const std::string& b, const std::string& what) {
    write("mut.safetensors", b);
    try {
      load_safetensors(p);
      ++loaded;
    } catch (const Error& e) {
      ++rejected;
      EXPECT_TRUE(e.code() == ErrorCode::invalid_argument || e.code() == ErrorCode::not_supported) << what << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << ": non-moe exception " << e.what();
    }
  };
  for (size_t n = 0; n < bytes.size(); ++n) attempt(bytes.substr(0, n), "prefix " + std::to_string(n));
  EXPECT_EQ(loaded, 0) << "every strict prefix cuts a tensor or the header";
  for (size_t pos = 0; pos < header_end; ++pos)
    for (unsigned char v : {0x00, 0x01, 0x22, 0x2c, 0x2d, 0x30, 0x39, 0x5b, 0x7b, 0x7d, 0x80, 0xff}) {
      std::string b = bytes;
      b[pos] = static_cast<char>(v);
      attempt(b, "byte " + std::to_string(pos) + " = " + std::to_string(v));
    }
  EXPECT_GT(rejected, 0);
}
