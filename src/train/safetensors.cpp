// safetensors reader and writer (format in include/moecore/safetensors.h).
// The reader trusts nothing: every length, offset and field is checked against the file before any
// allocation or read. The writer goes through a temp file + fsync + rename so a crash or an error
// never leaves a half-written file at the target path.
#include "moecore/safetensors.h"

#include "core/json_strict.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>

#include "moecore/error.h"

namespace moe {

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;  // 100 MB, as the reference implementation
constexpr const char* kMetadataKey = "__metadata__";

void check_little_endian() {
  MOE_CHECK_CODE(std::endian::native == std::endian::little, ErrorCode::not_supported,
                 "safetensors: data is little-endian and libmoecore only runs on little-endian hosts");
}

std::string sys_error() { return std::strerror(errno); }

// ---- dtype names ---------------------------------------------------------------------------------

const char* safetensors_dtype(DType dt) {
  switch (dt) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
  }
  MOE_THROW(ErrorCode::internal, "safetensors: no name for dtype ", static_cast<int>(dt));
}

// Returns false for names outside the set we read; `spec_only` says the name is a valid
// safetensors dtype that libmoecore has no storage type for.
bool dtype_from_safetensors(const std::string& name, DType& out, bool& spec_only) {
  static const std::pair<const char*, DType> ours[] = {
      {"F32", DType::f32}, {"F64", DType::f64}, {"BF16", DType::bf16}, {"F16", DType::f16},
      {"I32", DType::i32}, {"I64", DType::i64}, {"U8", DType::u8},     {"BOOL", DType::u8}};
  for (const auto& [n, dt] : ours)
    if (name == n) {
      out = dt;
      spec_only = false;
      return true;
    }
  static const char* spec[] = {"I8", "I16", "U16", "U32", "U64", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                               "F6_E2M3", "F6_E3M2", "F4", "C64"};
  spec_only = std::find_if(std::begin(spec), std::end(spec), [&](const char* s) { return name == s; }) != std::end(spec);
  return false;
}

// ---- reading ---------------------------------------------------------------------------------------

// A read-only file descriptor closed on scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads exactly `bytes` at `offset`, or throws io naming the file.
void read_exact(int fd, void* dst, uint64_t bytes, uint64_t offset, const std::string& path, const char* what) {
  char* p = static_cast<char*>(dst);
  while (bytes > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(bytes, 1ull << 30));
    ssize_t n = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    MOE_CHECK_CODE(n > 0, ErrorCode::io, "safetensors file '", path, "': reading ", what, " failed at byte ", offset,
                   ": ", n < 0 ? sys_error() : std::string("unexpected end of file"));
    p += n;
    offset += static_cast<uint64_t>(n);
    bytes -= static_cast<uint64_t>(n);
  }
}

// Parses the header JSON; a repeated tensor name is an error (nlohmann would keep the last one).
json parse_header(const std::string& text, const std::string& path) {
  std::string duplicate;
  json header = parse_json_strict(text, "safetensors file '" + path + "': header", &duplicate);
  MOE_CHECK(duplicate.empty(), "safetensors file '", path, "': header has the key '", duplicate,
            "' twice (tensor names must be unique)");
  MOE_CHECK(header.is_object(), "safetensors file '", path, "': header must be a JSON object, got ",
            header.type_name());
  return header;
}

// A JSON value that is an integer >= 0 (nlohmann stores those as unsigned).
bool as_non_negative(const json& j, uint64_t& out) {
  if (!j.is_number_unsigned()) return false;
  out = j.get<uint64_t>();
  return true;
}

struct Entry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t begin = 0, end = 0;
};

Entry parse_entry(const std::string& name, const json& info, uint64_t buffer_bytes, const std::string& path) {
  const std::string where = "safetensors file '" + path + "', tensor '" + name + "'";
  MOE_CHECK(info.is_object(), where, ": expected an object {\"dtype\", \"shape\", \"data_offsets\"}, got ",
            info.dump());
  for (const auto& [field, value] : info.items())
    MOE_CHECK(field == "dtype" || field == "shape" || field == "data_offsets", where, ": unexpected field '", field,
              "' (expected only dtype, shape, data_offsets)");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    MOE_CHECK(info.contains(field), where, ": missing field '", field, "'");

  Entry e;
  e.name = name;
  const json& dt = info.at("dtype");
  MOE_CHECK(dt.is_string(), where, ": dtype must be a string, got ", dt.dump());
  bool spec_only = false;
  if (!dtype_from_safetensors(dt.get<std::string>(), e.dtype, spec_only)) {
    MOE_CHECK_CODE(!spec_only, ErrorCode::not_supported, where, ": dtype '", dt.get<std::string>(),
                   "' is not supported by libmoecore (F32, F64, BF16, F16, I32, I64, U8, BOOL)");
    MOE_THROW(ErrorCode::invalid_argument, where, ": unknown dtype '", dt.get<std::string>(),
              "' (expected one of F32, F64, BF16, F16, I32, I64, U8, BOOL)");
  }

  const json& shape = info.at("shape");
  MOE_CHECK(shape.is_array(), where, ": shape must be a list of non-negative integers, got ", shape.dump());
  // numel must fit in the data buffer; guard the product against overflow before multiplying.
  uint64_t numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    uint64_t d = 0;
    MOE_CHECK(as_non_negative(shape[i], d), where, ": shape[", i, "] must be a non-negative integer, got ",
              shape[i].dump(), " in shape ", shape.dump());
    MOE_CHECK(d <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where, ": shape[", i, "] = ", d,
              " is too large");
    e.shape.push_back(static_cast<int64_t>(d));
    if (numel != 0 && d != 0)
      MOE_CHECK(numel <= buffer_bytes / d, where, ": shape ", shape.dump(), " has more elements than the ",
                buffer_bytes, "-byte data buffer can hold");
    numel *= d;
  }

  const json& off = info.at("data_offsets");
  MOE_CHECK(off.is_array() && off.size() == 2 && as_non_negative(off[0], e.begin) && as_non_negative(off[1], e.end),
            where, ": data_offsets must be two non-negative integers [begin, end], got ", off.dump());
  MOE_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] have begin > end");
  MOE_CHECK(e.end <= buffer_bytes, where, ": data_offsets [", e.begin, ", ", e.end, "] end beyond the data buffer (",
            buffer_bytes, " bytes)");
  const uint64_t expected = numel * dtype_size(e.dtype);
  MOE_CHECK(e.end - e.begin == expected, where, ": data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin,
            " bytes, expected ", expected, " = ", numel, " elements of ", dt.get<std::string>(), " (",
            dtype_size(e.dtype), " bytes) for shape ", shape_str(e.shape));
  return e;
}

// ---- writing ---------------------------------------------------------------------------------------

// Writes all of `bytes`; false with errno set on failure.
bool write_all(int fd, const void* src, size_t bytes) {
  const char* p = static_cast<const char*>(src);
  while (bytes > 0) {
    ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

const Tensor& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors.find(name);
  if (it != tensors.end()) return it->second;
  constexpr size_t kShown = 32;
  std::ostringstream os;
  for (size_t i = 0; i < names.size() && i < kShown; ++i) os << (i ? ", " : "") << "'" << names[i] << "'";
  if (names.size() > kShown) os << ", ... (" << names.size() - kShown << " more)";
  MOE_THROW(ErrorCode::invalid_argument, "safetensors file '", path, "' has no tensor '", name, "'; it has ",
            names.size(), " tensors: ", names.empty() ? std::string("(none)") : os.str());
}

SafetensorsFile load_safetensors(const std::string& path) {
  check_little_endian();
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOE_CHECK_CODE(f.fd >= 0, ErrorCode::io, "cannot open safetensors file '", path, "': ", sys_error());
  struct stat st {};
  MOE_CHECK_CODE(::fstat(f.fd, &st) == 0, ErrorCode::io, "cannot stat safetensors file '", path, "': ", sys_error());
  MOE_CHECK_CODE(S_ISREG(st.st_mode), ErrorCode::io, "safetensors file '", path, "' is not a regular file");
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);

  MOE_CHECK(file_bytes >= 8, "safetensors file '", path, "' is ", file_bytes,
            " bytes, shorter than the 8-byte header length");
  unsigned char len_bytes[8];
  read_exact(f.fd, len_bytes, 8, 0, path, "the header length");
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | len_bytes[i];
  MOE_CHECK(header_bytes <= kMaxHeaderBytes, "safetensors file '", path, "': header length ", header_bytes,
            " bytes exceeds the ", kMaxHeaderBytes, "-byte limit (not a safetensors file?)");
  MOE_CHECK(header_bytes <= file_bytes - 8, "safetensors file '", path, "': header length ", header_bytes,
            " bytes exceeds the ", file_bytes - 8, " bytes that follow it");
  MOE_CHECK(header_bytes >= 2, "safetensors file '", path, "': header length ", header_bytes,
            " bytes is too short for a JSON object");

  std::string text(static_cast<size_t>(header_bytes), '\0');
  read_exact(f.fd, text.data(), header_bytes, 8, path, "the header");
  json header = parse_header(text, path);

  const uint64_t data_start = 8 + header_bytes, buffer_bytes = file_bytes - data_start;
  SafetensorsFile out;
  out.path = path;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == kMetadataKey) {
      MOE_CHECK(info.is_object(), "safetensors file '", path, "': __metadata__ must be an object of strings, got ",
                info.dump());
      for (const auto& [k, v] : info.items()) {
        MOE_CHECK(v.is_string(), "safetensors file '", path, "': __metadata__ value for '", k,
                  "' must be a string, got ", v.dump());
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, info, buffer_bytes, path));
  }

  // As the reference implementation (huggingface/safetensors, Metadata::validate): in offset order
  // the tensors tile the data buffer exactly, each starting where the previous one ended, the first
  // at byte 0 and the last ending at the end of the file: no overlap, no gap, no trailing bytes.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.name < b.name;
  });
  uint64_t expected = 0;
  const Entry* prev = nullptr;  // the tensor that ends at `expected`
  for (const Entry& e : entries) {
    const std::string after =
        prev ? "right after tensor '" + prev->name + "' [" + std::to_string(prev->begin) + ", " +
                   std::to_string(prev->end) + "]"
             : std::string("at the start of the data buffer");
    MOE_CHECK(e.begin >= expected, "safetensors file '", path, "': tensor '", e.name, "' data_offsets [", e.begin,
              ", ", e.end, "] overlap tensor '", prev ? prev->name : std::string(), "' [", prev ? prev->begin : 0,
              ", ", expected, "]: tensors must tile the data buffer without overlap");
    MOE_CHECK(e.begin == expected, "safetensors file '", path, "': tensor '", e.name, "' data_offsets [", e.begin,
              ", ", e.end, "] leave a gap: expected it to begin at byte ", expected, " (", after,
              "), got ", e.begin, " (tensors must tile the data buffer without holes, as the reference reader "
              "requires)");
    expected = e.end;
    prev = &e;
  }
  MOE_CHECK(expected == buffer_bytes, "safetensors file '", path, "': trailing bytes: the tensors end at byte ",
            expected, " of the data buffer, the file holds ", buffer_bytes, " data bytes (", buffer_bytes - expected,
            " bytes after ", prev ? "tensor '" + prev->name + "'" : std::string("the header"),
            "; the reference reader refuses a buffer its tensors do not cover exactly)");

  for (const Entry& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype, Device::cpu());
    if (e.end > e.begin) read_exact(f.fd, t.data(), e.end - e.begin, data_start + e.begin, path, e.name.c_str());
    out.names.push_back(e.name);
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  check_little_endian();
  // Validate everything before touching the file system.
  std::set<std::string> seen;
  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header[kMetadataKey] = std::move(m);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MOE_CHECK(!name.empty(), "save_safetensors '", path, "': empty tensor name");
    MOE_CHECK(name != kMetadataKey, "save_safetensors '", path, "': '", kMetadataKey,
              "' is reserved and cannot name a tensor");
    MOE_CHECK(seen.insert(name).second, "save_safetensors '", path, "': duplicate tensor name '", name, "'");
    MOE_CHECK(t.defined(), "save_safetensors '", path, "': tensor '", name, "' is undefined");
    ordered_json entry = ordered_json::object();
    entry["dtype"] = safetensors_dtype(t.dtype());
    entry["shape"] = t.shape();
    entry["data_offsets"] = {offset, offset + t.nbytes()};
    header[name] = std::move(entry);
    offset += t.nbytes();
  }
  std::string text = header.dump();
  // Pad with spaces so the data buffer starts 8-byte aligned (as the reference writer does).
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>((uint64_t(text.size()) >> (8 * i)) & 0xff);

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOE_CHECK_CODE(fd >= 0, ErrorCode::io, "save_safetensors '", path, "': cannot create temp file '", tmp,
                 "': ", sys_error(), "; the previous file, if any, is untouched");
  // From here on the temp file is ours: on any failure close and remove it, leaving `path` as it was.
  std::string failure;
  auto step = [&](bool ok, const std::string& what) {
    if (!ok && failure.empty()) failure = what + ": " + sys_error();
    return ok;
  };
  try {
    bool ok = step(write_all(fd, len_bytes, 8) && write_all(fd, text.data(), text.size()), "writing the header");
    std::vector<char> host;
    for (size_t i = 0; ok && i < tensors.size(); ++i) {
      const auto& [name, t] = tensors[i];
      if (t.nbytes() == 0) continue;
      const void* src = t.device().is_cpu() ? t.data() : nullptr;
      if (!src) {  // any device: stage through the host
        host.resize(t.nbytes());
        t.copy_to_host(host.data(), host.size());
        src = host.data();
      }
      ok = step(write_all(fd, src, t.nbytes()), "writing tensor '" + name + "'");
    }
    ok = ok && step(::fsync(fd) == 0, "fsync");
    int rc = ::close(fd);
    fd = -1;
    ok = ok && step(rc == 0, "close");
    ok = ok && step(::rename(tmp.c_str(), path.c_str()) == 0, "renaming the temp file over the target");
  } catch (const std::exception& e) {
    if (failure.empty()) failure = e.what();
  }
  if (!failure.empty()) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    MOE_THROW(ErrorCode::io, "save_safetensors '", path, "': ", failure, " (temp file '", tmp,
              "' removed; the previous file, if any, is untouched)");
  }
  // Make the rename itself durable (best effort: some file systems refuse fsync on directories).
  int dir = ::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
}

}  // namespace moe
