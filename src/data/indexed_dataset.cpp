// Megatron's indexed dataset (MMIDIDX .idx + raw .bin): the memory-mapped reader that validates
// every field against the file sizes before trusting it, and the writer that lays the files out
// byte for byte as Megatron's IndexedDatasetBuilder / _IndexWriter do, publishing them through
// temp files + fsync + rename. Format: include/moecore/data.h.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "moecore/data.h"
#include "moecore/error.h"

namespace moe {

static_assert(std::endian::native == std::endian::little,
              "the MMIDIDX format is little-endian; a big-endian host needs byte swaps here");

namespace {

constexpr unsigned char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
constexpr uint64_t kVersion = 1;
constexpr int64_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype code, S, D + 1 = 34

std::string sys_error() { return std::strerror(errno); }

template <class T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string parent_dir(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string hex_bytes(const unsigned char* p, int n) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) {
    if (i) s += ' ';
    s += hex[p[i] >> 4];
    s += hex[p[i] & 15];
  }
  return s;
}

bool write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

// ---- dtypes ---------------------------------------------------------------------------------------

size_t token_dtype_size(TokenDType dt) {
  switch (dt) {
    case TokenDType::uint8: case TokenDType::int8: return 1;
    case TokenDType::int16: case TokenDType::uint16: return 2;
    case TokenDType::int32: case TokenDType::float32: return 4;
    case TokenDType::int64: case TokenDType::float64: return 8;
  }
  MOE_THROW(ErrorCode::invalid_argument, "token_dtype_size: unknown TokenDType code ", int(dt),
            " (expected Megatron's DType codes 1..8)");
}

const char* token_dtype_name(TokenDType dt) {
  switch (dt) {
    case TokenDType::uint8: return "uint8";
    case TokenDType::int8: return "int8";
    case TokenDType::int16: return "int16";
    case TokenDType::int32: return "int32";
    case TokenDType::int64: return "int64";
    case TokenDType::float64: return "float64";
    case TokenDType::float32: return "float32";
    case TokenDType::uint16: return "uint16";
  }
  return "unknown";
}

TokenDType token_dtype_from_code(int code) {
  MOE_CHECK(code >= 1 && code <= 8, "unknown token dtype code ", code,
            ": expected Megatron's DType codes 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, "
            "7 float32, 8 uint16");
  return static_cast<TokenDType>(code);
}

TokenDType token_dtype_for_vocab(int64_t vocab_size) {
  MOE_CHECK(vocab_size > 0, "token_dtype_for_vocab: vocab_size must be > 0, got ", vocab_size);
  return vocab_size < 65500 ? TokenDType::uint16 : TokenDType::int32;
}

int64_t token_dtype_min(TokenDType dt) {
  switch (dt) {
    case TokenDType::uint8: case TokenDType::uint16: return 0;
    case TokenDType::int8: return std::numeric_limits<int8_t>::min();
    case TokenDType::int16: return std::numeric_limits<int16_t>::min();
    case TokenDType::int32: return std::numeric_limits<int32_t>::min();
    case TokenDType::int64: return std::numeric_limits<int64_t>::min();
    case TokenDType::float32: return -(int64_t(1) << 24);  // every integer in [-2^24, 2^24] is exact
    case TokenDType::float64: return -(int64_t(1) << 53);
  }
  MOE_THROW(ErrorCode::invalid_argument, "token_dtype_min: unknown TokenDType code ", int(dt));
}

int64_t token_dtype_max(TokenDType dt) {
  switch (dt) {
    case TokenDType::uint8: return std::numeric_limits<uint8_t>::max();
    case TokenDType::uint16: return std::numeric_limits<uint16_t>::max();
    case TokenDType::int8: return std::numeric_limits<int8_t>::max();
    case TokenDType::int16: return std::numeric_limits<int16_t>::max();
    case TokenDType::int32: return std::numeric_limits<int32_t>::max();
    case TokenDType::int64: return std::numeric_limits<int64_t>::max();
    case TokenDType::float32: return int64_t(1) << 24;
    case TokenDType::float64: return int64_t(1) << 53;
  }
  MOE_THROW(ErrorCode::invalid_argument, "token_dtype_max: unknown TokenDType code ", int(dt));
}

std::string indexed_dataset_bin_path(const std::string& path_prefix) { return path_prefix + ".bin"; }
std::string indexed_dataset_idx_path(const std::string& path_prefix) { return path_prefix + ".idx"; }

// ---- reader ---------------------------------------------------------------------------------------

// One read-only file mapping (nothing mapped for an empty file).
struct IndexedDataset::Mapping {
  const unsigned char* data = nullptr;
  int64_t size = 0;
  Mapping(const std::string& path, const char* what) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MOE_CHECK_CODE(fd >= 0, ErrorCode::io, "IndexedDataset: cannot open the ", what, " file '", path,
                   "': ", sys_error());
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      std::string err = sys_error();
      ::close(fd);
      MOE_THROW(ErrorCode::io, "IndexedDataset: cannot stat '", path, "': ", err);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      MOE_THROW(ErrorCode::io, "IndexedDataset: the ", what, " file '", path, "' is not a regular file");
    }
    size = static_cast<int64_t>(st.st_size);
    if (size > 0) {
      void* p = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        std::string err = sys_error();
        ::close(fd);
        MOE_THROW(ErrorCode::io, "IndexedDataset: cannot mmap '", path, "' (", size, " bytes): ", err);
      }
      data = static_cast<const unsigned char*>(p);
    }
    ::close(fd);  // the mapping keeps the file
  }
  ~Mapping() {
    if (data) ::munmap(const_cast<unsigned char*>(data), static_cast<size_t>(size));
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

IndexedDataset::IndexedDataset(const std::string& path_prefix) : prefix_(path_prefix) {
  const std::string idx_path = indexed_dataset_idx_path(path_prefix);
  const std::string bin_path = indexed_dataset_bin_path(path_prefix);
  idx_ = std::make_unique<Mapping>(idx_path, ".idx");
  const unsigned char* p = idx_->data;
  const int64_t n = idx_->size;
  auto where = [&](const char* field) { return "IndexedDataset '" + idx_path + "': " + field; };

  MOE_CHECK(n >= kHeaderBytes, where("header"), ": truncated, expected at least ", kHeaderBytes,
            " bytes (magic, version, dtype code, sequence count, document count), the file has ", n);
  MOE_CHECK(std::memcmp(p, kMagic, 9) == 0, where("magic"),
            ": expected \"MMIDIDX\\x00\\x00\" (Megatron's indexed dataset), got bytes ", hex_bytes(p, 9));
  const uint64_t version = load<uint64_t>(p + 9);
  MOE_CHECK(version == kVersion, where("version"), ": expected ", kVersion, ", got ", version);
  const int code = p[17];
  MOE_CHECK(code >= 1 && code <= 8, where("dtype code"), ": expected one of Megatron's DType codes 1..8 "
            "(1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), got ", code);
  dtype_ = static_cast<TokenDType>(code);
  const int64_t itemsize = static_cast<int64_t>(token_dtype_size(dtype_));
  const uint64_t seq_count = load<uint64_t>(p + 18);
  const uint64_t doc_count = load<uint64_t>(p + 26);

  // Counts against the file size, without overflow: each sequence needs 12 bytes (int32 length,
  // int64 pointer), each document-index entry 8.
  const uint64_t body = static_cast<uint64_t>(n - kHeaderBytes);
  MOE_CHECK(seq_count <= body / 12, where("sequence count"), ": ", seq_count, " sequences need at least ",
            seq_count > body ? std::string("more") : std::to_string(kHeaderBytes + 12 * seq_count),
            " bytes of index, the file has ", n);
  MOE_CHECK(doc_count >= 1, where("document count"),
            ": expected >= 1 (Megatron stores len(document_indices), which starts with a 0), got 0");
  const uint64_t after_seq = body - 12 * seq_count;
  MOE_CHECK(doc_count <= after_seq / 8, where("document count"), ": ", doc_count,
            " document-index entries after ", seq_count, " sequences need ",
            doc_count > after_seq ? std::string("more") : std::to_string(kHeaderBytes + 12 * seq_count + 8 * doc_count),
            " bytes, the file has ", n);
  const uint64_t expected = static_cast<uint64_t>(kHeaderBytes) + 12 * seq_count + 8 * doc_count;
  if (seq_count > 0 && static_cast<uint64_t>(n) == expected + seq_count)
    MOE_THROW(ErrorCode::not_supported, where("sequence modes"), ": the file has ", seq_count,
              " trailing bytes, one int8 mode per sequence: a multimodal index, which is not supported "
              "(expected ", expected, " bytes for a text dataset)");
  MOE_CHECK(static_cast<uint64_t>(n) == expected, where("size"), ": expected ", expected, " bytes for ",
            seq_count, " sequences and ", doc_count, " document-index entries, got ", n);
  num_sequences_ = static_cast<int64_t>(seq_count);
  const int64_t S = num_sequences_;
  lengths_ = p + kHeaderBytes;
  pointers_ = lengths_ + 4 * S;
  const unsigned char* docs = pointers_ + 8 * S;

  // Lengths >= 0 and pointers exactly where Megatron's writer puts them: contiguous from 0.
  int64_t offset = 0;  // bytes
  for (int64_t i = 0; i < S; ++i) {
    const int32_t len = load<int32_t>(lengths_ + 4 * i);
    MOE_CHECK(len >= 0, where("sequence lengths"), "[", i, "]: expected >= 0, got ", len);
    const int64_t ptr = load<int64_t>(pointers_ + 8 * i);
    MOE_CHECK(ptr == offset, where("sequence pointers"), "[", i, "]: expected ", offset,
              " (sequences are contiguous from byte 0 of the .bin, each pointer = the previous pointer + ",
              "length·", itemsize, "), got ", ptr);
    offset += int64_t(len) * itemsize;  // < 2^31 · 8 per sequence, < 2^32 sequences: no overflow
  }
  num_tokens_ = offset / itemsize;

  document_indices_.resize(doc_count);
  for (uint64_t d = 0; d < doc_count; ++d) {
    const int64_t v = load<int64_t>(docs + 8 * d);
    if (d == 0)
      MOE_CHECK(v == 0, where("document indices"), "[0]: expected 0 (the start of the first document), got ", v);
    else
      MOE_CHECK(v >= document_indices_[d - 1] && v <= S, where("document indices"), "[", d, "]: expected ",
                "a sequence index in [", document_indices_[d - 1], ", ", S, "] (non-decreasing, at most the ",
                "sequence count), got ", v);
    document_indices_[d] = v;
  }
  MOE_CHECK(document_indices_.back() == S, where("document indices"), "[", doc_count - 1,
            "]: expected the sequence count ", S, " (the end of the last document), got ", document_indices_.back());

  bin_ = std::make_unique<Mapping>(bin_path, ".bin");
  MOE_CHECK(bin_->size >= offset, "IndexedDataset '", bin_path, "': truncated: the index describes ", num_tokens_,
            " ", token_dtype_name(dtype_), " tokens = ", offset, " bytes, the file has ", bin_->size);
  MOE_CHECK(bin_->size == offset, "IndexedDataset '", bin_path, "': size: expected ", offset, " bytes (",
            num_tokens_, " ", token_dtype_name(dtype_), " tokens as the index describes), got ", bin_->size,
            " (trailing bytes)");
}

IndexedDataset::~IndexedDataset() = default;

int64_t IndexedDataset::sequence_length(int64_t i) const {
  MOE_CHECK(i >= 0 && i < num_sequences_, "IndexedDataset '", prefix_, "': sequence index ", i,
            " out of range [0, ", num_sequences_, ")");
  return load<int32_t>(lengths_ + 4 * i);
}

int64_t IndexedDataset::document_length(int64_t d) const {
  MOE_CHECK(d >= 0 && d < num_documents(), "IndexedDataset '", prefix_, "': document index ", d,
            " out of range [0, ", num_documents(), ")");
  int64_t total = 0;
  for (int64_t s = document_indices_[d]; s < document_indices_[d + 1]; ++s) total += load<int32_t>(lengths_ + 4 * s);
  return total;
}

namespace {
template <class T>
void widen_int(const unsigned char* src, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(load<T>(src + i * int64_t(sizeof(T))));
}
template <class T>
void widen_float(const unsigned char* src, int64_t n, int64_t* out, const std::string& prefix, int64_t seq,
                 int64_t offset) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(load<T>(src + i * int64_t(sizeof(T))));
    MOE_CHECK(std::isfinite(v) && v == std::trunc(v) && std::fabs(v) <= 9007199254740992.0, "IndexedDataset '",
              prefix, "': sequence ", seq, " token ", offset + i, ": expected an integral token id, got ", v);
    out[i] = static_cast<int64_t>(v);
  }
}
}  // namespace

void IndexedDataset::read(int64_t seq, int64_t offset, int64_t length, int64_t* out) const {
  const int64_t len = sequence_length(seq);
  MOE_CHECK(offset >= 0 && length >= 0 && offset <= len && length <= len - offset, "IndexedDataset '", prefix_,
            "': sequence ", seq, " has ", len, " tokens; requested offset ", offset, " length ", length);
  if (length == 0) return;
  const int64_t itemsize = static_cast<int64_t>(token_dtype_size(dtype_));
  const unsigned char* src = bin_->data + load<int64_t>(pointers_ + 8 * seq) + offset * itemsize;
  switch (dtype_) {
    case TokenDType::uint8: widen_int<uint8_t>(src, length, out); break;
    case TokenDType::int8: widen_int<int8_t>(src, length, out); break;
    case TokenDType::int16: widen_int<int16_t>(src, length, out); break;
    case TokenDType::uint16: widen_int<uint16_t>(src, length, out); break;
    case TokenDType::int32: widen_int<int32_t>(src, length, out); break;
    case TokenDType::int64: widen_int<int64_t>(src, length, out); break;
    case TokenDType::float32: widen_float<float>(src, length, out, prefix_, seq, offset); break;
    case TokenDType::float64: widen_float<double>(src, length, out, prefix_, seq, offset); break;
  }
}

std::vector<int64_t> IndexedDataset::get(int64_t seq, int64_t offset, int64_t length) const {
  const int64_t len = sequence_length(seq);
  if (length == -1) {
    MOE_CHECK(offset >= 0 && offset <= len, "IndexedDataset '", prefix_, "': sequence ", seq, " has ", len,
              " tokens; requested offset ", offset, " to the end");
    length = len - offset;
  }
  MOE_CHECK(length >= 0, "IndexedDataset '", prefix_, "': sequence ", seq,
            ": length must be >= 0 or -1 (to the end), got ", length);
  MOE_CHECK(offset >= 0 && offset <= len && length <= len - offset, "IndexedDataset '", prefix_, "': sequence ", seq,
            " has ", len, " tokens; requested offset ", offset, " length ", length);
  std::vector<int64_t> out(static_cast<size_t>(length));
  read(seq, offset, length, out.data());
  return out;
}

// ---- writer ---------------------------------------------------------------------------------------

namespace {
std::atomic<uint64_t> g_writer_counter{0};
constexpr size_t kFlushBytes = size_t(1) << 20;

template <class T>
void append_as(std::vector<unsigned char>& buf, T v) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  buf.insert(buf.end(), b, b + sizeof(T));
}
}  // namespace

IndexedDatasetWriter::IndexedDatasetWriter(const std::string& path_prefix, TokenDType dtype)
    : prefix_(path_prefix), dtype_(dtype) {
  MOE_CHECK(!path_prefix.empty(), "IndexedDatasetWriter: empty path prefix");
  (void)token_dtype_size(dtype);  // rejects codes outside 1..8
  const std::string tag = ".tmp." + std::to_string(::getpid()) + "." + std::to_string(g_writer_counter++);
  bin_tmp_ = indexed_dataset_bin_path(prefix_) + tag;
  idx_tmp_ = indexed_dataset_idx_path(prefix_) + tag;
  bin_fd_ = ::open(bin_tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  MOE_CHECK_CODE(bin_fd_ >= 0, ErrorCode::io, "IndexedDatasetWriter '", prefix_, "': cannot create the temp file '",
                 bin_tmp_, "': ", sys_error());
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (!finalized_) abandon();
}

void IndexedDatasetWriter::abandon() noexcept {
  if (bin_fd_ >= 0) ::close(bin_fd_);
  bin_fd_ = -1;
  ::unlink(bin_tmp_.c_str());
  ::unlink(idx_tmp_.c_str());
}

void IndexedDatasetWriter::add_document(const std::vector<int64_t>& tokens) {
  MOE_CHECK(!finalized_, "IndexedDatasetWriter '", prefix_, "': add_document after finalize()");
  MOE_CHECK_CODE(bin_fd_ >= 0, ErrorCode::io, "IndexedDatasetWriter '", prefix_,
                 "': the writer failed earlier and was abandoned (temp files removed)");
  const int64_t doc = num_documents();
  MOE_CHECK(tokens.size() <= size_t(std::numeric_limits<int32_t>::max()), "IndexedDatasetWriter '", prefix_,
            "': document ", doc, " has ", tokens.size(), " tokens; a sequence holds at most 2^31 - 1 (int32 length)");
  const int64_t lo = token_dtype_min(dtype_), hi = token_dtype_max(dtype_);
  for (size_t i = 0; i < tokens.size(); ++i)
    MOE_CHECK(tokens[i] >= lo && tokens[i] <= hi, "IndexedDatasetWriter '", prefix_, "': document ", doc, " token ", i,
              " = ", tokens[i], " does not fit the ", token_dtype_name(dtype_), " dtype: expected a value in [", lo,
              ", ", hi, "]");
  if (!tokens.empty()) {
    for (int64_t t : tokens) {
      switch (dtype_) {
        case TokenDType::uint8: append_as(buffer_, static_cast<uint8_t>(t)); break;
        case TokenDType::int8: append_as(buffer_, static_cast<int8_t>(t)); break;
        case TokenDType::int16: append_as(buffer_, static_cast<int16_t>(t)); break;
        case TokenDType::uint16: append_as(buffer_, static_cast<uint16_t>(t)); break;
        case TokenDType::int32: append_as(buffer_, static_cast<int32_t>(t)); break;
        case TokenDType::int64: append_as(buffer_, t); break;
        case TokenDType::float32: append_as(buffer_, static_cast<float>(t)); break;
        case TokenDType::float64: append_as(buffer_, static_cast<double>(t)); break;
      }
    }
    lengths_.push_back(static_cast<int32_t>(tokens.size()));
    num_tokens_ += static_cast<int64_t>(tokens.size());
  }
  document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
  if (buffer_.size() >= kFlushBytes) {
    if (!write_all(bin_fd_, buffer_.data(), buffer_.size())) {
      std::string err = sys_error();
      abandon();
      MOE_THROW(ErrorCode::io, "IndexedDatasetWriter '", prefix_, "': writing '", bin_tmp_, "': ", err,
                " (temp files removed; previous files untouched)");
    }
    buffer_.clear();
  }
}

void IndexedDatasetWriter::finalize() {
  MOE_CHECK(!finalized_, "IndexedDatasetWriter '", prefix_, "': finalize() called twice");
  MOE_CHECK_CODE(bin_fd_ >= 0, ErrorCode::io, "IndexedDatasetWriter '", prefix_,
                 "': the writer failed earlier and was abandoned (temp files removed)");
  std::string failure;
  auto step = [&](bool ok, const std::string& what) {
    if (!ok && failure.empty()) failure = what + ": " + sys_error();
    return ok;
  };
  // The index, laid out as Megatron's _IndexWriter writes it.
  std::vector<unsigned char> idx;
  const int64_t S = num_sequences();
  idx.reserve(size_t(kHeaderBytes) + 12 * size_t(S) + 8 * document_indices_.size());
  idx.insert(idx.end(), kMagic, kMagic + 9);
  append_as(idx, kVersion);
  append_as(idx, static_cast<uint8_t>(dtype_));
  append_as(idx, static_cast<uint64_t>(S));
  append_as(idx, static_cast<uint64_t>(document_indices_.size()));
  for (int32_t len : lengths_) append_as(idx, len);
  const int64_t itemsize = static_cast<int64_t>(token_dtype_size(dtype_));
  int64_t ptr = 0;
  for (int32_t len : lengths_) {
    append_as(idx, ptr);
    ptr += int64_t(len) * itemsize;
  }
  for (int64_t d : document_indices_) append_as(idx, d);

  const std::string bin_path = indexed_dataset_bin_path(prefix_), idx_path = indexed_dataset_idx_path(prefix_);
  bool ok = step(write_all(bin_fd_, buffer_.data(), buffer_.size()), "writing '" + bin_tmp_ + "'");
  ok = ok && step(::fsync(bin_fd_) == 0, "fsync '" + bin_tmp_ + "'");
  int rc = ::close(bin_fd_);
  bin_fd_ = -1;
  ok = ok && step(rc == 0, "close '" + bin_tmp_ + "'");
  if (ok) {
    int fd = ::open(idx_tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    ok = step(fd >= 0, "creating '" + idx_tmp_ + "'");
    if (ok) {
      ok = step(write_all(fd, idx.data(), idx.size()), "writing '" + idx_tmp_ + "'");
      ok = ok && step(::fsync(fd) == 0, "fsync '" + idx_tmp_ + "'");
      rc = ::close(fd);
      ok = ok && step(rc == 0, "close '" + idx_tmp_ + "'");
    }
  }
  ok = ok && step(::rename(bin_tmp_.c_str(), bin_path.c_str()) == 0,
                  "renaming '" + bin_tmp_ + "' to '" + bin_path + "'");
  const bool bin_replaced = ok;
  ok = ok && step(::rename(idx_tmp_.c_str(), idx_path.c_str()) == 0,
                  "renaming '" + idx_tmp_ + "' to '" + idx_path + "'");
  if (!ok) {
    abandon();
    MOE_THROW(ErrorCode::io, "IndexedDatasetWriter '", prefix_, "': ", failure,
              bin_replaced ? " (the new .bin is in place but the .idx is not: the pair is inconsistent and "
                             "the reader will refuse it; write it again)"
                           : " (temp files removed; the previous files, if any, are untouched)");
  }
  finalized_ = true;
  buffer_.clear();
  buffer_.shrink_to_fit();
  // Make the renames durable (best effort: some file systems refuse fsync on directories).
  int dir = ::open(parent_dir(prefix_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
}

}  // namespace moe
