// Fuzz target: the indexed-dataset reader (Megatron's MMIDIDX .idx + .bin). The input's first byte
// picks how the .bin is made: odd: the .bin is the rest of the input after the .idx length given
// by the next 4 bytes (little-endian); even: the rest of the input is the .idx and the .bin has the
// size the index describes when it can be computed (so the reader gets past the size check and
// reads every sequence), filled with bytes from the input. Every sequence and document is read.
#include <cstring>

#include "fuzz/fuzz.h"
#include "moecore/data.h"
#include "moecore/error.h"

namespace {

// The .bin size the index describes (Σ lengths · itemsize), or -1 when the header does not parse.
int64_t described_bin_bytes(const uint8_t* p, size_t n) {
  if (n < 34) return -1;
  const int code = p[17];
  if (code < 1 || code > 8) return -1;
  const int64_t item = static_cast<int64_t>(moe::token_dtype_size(static_cast<moe::TokenDType>(code)));
  uint64_t seqs = 0;
  std::memcpy(&seqs, p + 18, 8);
  if (seqs > (n - 34) / 4) return -1;
  int64_t total = 0;
  for (uint64_t i = 0; i < seqs; ++i) {
    int32_t len = 0;
    std::memcpy(&len, p + 34 + 4 * i, 4);
    if (len < 0) return -1;
    total += int64_t(len) * item;
    if (total > (int64_t(1) << 22)) return -1;  // 4 MiB: keep every input fast
  }
  return total;
}

void one(const uint8_t* data, size_t size) {
  if (size < 1) return;
  const std::string prefix = moe::fuzz::scratch_dir() + "/ds";
  const uint8_t mode = data[0];
  const uint8_t* p = data + 1;
  size_t n = size - 1;
  if (mode & 1) {
    if (n < 4) return;
    uint32_t idx_len = 0;
    std::memcpy(&idx_len, p, 4);
    p += 4;
    n -= 4;
    if (idx_len > n) idx_len = static_cast<uint32_t>(n);
    moe::fuzz::write_file(prefix + ".idx", p, idx_len);
    moe::fuzz::write_file(prefix + ".bin", p + idx_len, n - idx_len);
  } else {
    moe::fuzz::write_file(prefix + ".idx", p, n);
    const int64_t bin = described_bin_bytes(p, n);
    std::vector<uint8_t> bytes(static_cast<size_t>(bin < 0 ? 0 : bin));
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = n ? p[i % n] : 0;
    moe::fuzz::write_file(prefix + ".bin", bytes.data(), bytes.size());
  }
  try {
    moe::IndexedDataset ds(prefix);
    int64_t tokens = 0;
    for (int64_t s = 0; s < ds.num_sequences(); ++s) {
      const std::vector<int64_t> v = ds.get(s);
      tokens += static_cast<int64_t>(v.size());
      if (static_cast<int64_t>(v.size()) != ds.sequence_length(s)) moe::fuzz::finding("get() length != sequence_length");
    }
    if (tokens != ds.num_tokens()) moe::fuzz::finding("Σ sequence lengths != num_tokens()");
    int64_t doc_tokens = 0;
    for (int64_t d = 0; d < ds.num_documents(); ++d) doc_tokens += ds.document_length(d);
    if (doc_tokens != ds.num_tokens()) moe::fuzz::finding("Σ document lengths != num_tokens()");
  } catch (const moe::Error&) {
  }
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  std::vector<uint8_t> v;
  if (!f) return v;
  int c;
  while ((c = std::fgetc(f)) != EOF) v.push_back(static_cast<uint8_t>(c));
  std::fclose(f);
  return v;
}

// A seed in both modes from a dataset the writer produced.
void seed_pair(const std::string& dir, const std::string& name, const std::string& prefix) {
  const std::vector<uint8_t> idx = read_all(moe::indexed_dataset_idx_path(prefix));
  const std::vector<uint8_t> bin = read_all(moe::indexed_dataset_bin_path(prefix));
  std::vector<uint8_t> even{0};
  even.insert(even.end(), idx.begin(), idx.end());
  moe::fuzz::write_file(dir + "/" + name + "_derived.bin", even.data(), even.size());
  std::vector<uint8_t> odd{1};
  const uint32_t len = static_cast<uint32_t>(idx.size());
  odd.insert(odd.end(), reinterpret_cast<const uint8_t*>(&len), reinterpret_cast<const uint8_t*>(&len) + 4);
  odd.insert(odd.end(), idx.begin(), idx.end());
  odd.insert(odd.end(), bin.begin(), bin.end());
  moe::fuzz::write_file(dir + "/" + name + "_explicit.bin", odd.data(), odd.size());
}

void write_seeds(const std::string& dir) {
  const std::string tmp = moe::fuzz::scratch_dir() + "/seed";
  const std::vector<std::vector<int64_t>> docs = {{1, 2, 3}, {}, {200, 0, 17, 65535}, {9}};
  for (moe::TokenDType dt : {moe::TokenDType::uint16, moe::TokenDType::int32, moe::TokenDType::uint8,
                             moe::TokenDType::float32, moe::TokenDType::int64}) {
    moe::IndexedDatasetWriter w(tmp, dt);
    for (const auto& d : docs) {
      std::vector<int64_t> clipped = d;
      for (int64_t& t : clipped) t = std::min<int64_t>(t, moe::token_dtype_max(dt));
      w.add_document(clipped);
    }
    w.finalize();
    seed_pair(dir, moe::token_dtype_name(dt), tmp);
  }
  // The committed fixture (tests/data), made by Megatron's writer layout.
  seed_pair(dir, "fixture", std::string(MOE_SOURCE_DIR) + "/tests/data/tiny_uint16_text_document");
}

}  // namespace

moe::fuzz::Target moe::fuzz::fuzz_target() {
  return {"indexed_dataset", one,
          {std::string("MMIDIDX\0\0", 9), std::string("\1\0\0\0\0\0\0\0", 8), std::string("\xff\xff\xff\x7f", 4),
           std::string("\0\0\0\x80", 4), std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8)},
          write_seeds};
}
