// Checkpoint building blocks: boxes, copies, CRC-32, the index and shard files, CheckpointReader.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/json_strict.h"
#include "moecore/error.h"
#include "train/checkpoint_internal.h"

namespace moe::ckpt {

namespace {
std::string sys_error() { return std::strerror(errno); }
}  // namespace

// ---- boxes ------------------------------------------------------------------------------------------

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t l : len) n *= l;
  return n;
}

std::string Box::str() const {
  std::ostringstream os;
  os << "[";
  for (size_t d = 0; d < off.size(); ++d) {
    int64_t end = 0;  // a box read from a corrupt index may not have an end that fits
    os << (d ? ", " : "") << off[d] << ":";
    if (d < len.size() && !__builtin_add_overflow(off[d], len[d], &end))
      os << end;
    else
      os << "(+" << (d < len.size() ? std::to_string(len[d]) : std::string("?")) << ")";
  }
  os << "]";
  return os.str();
}

bool intersect(const Box& a, const Box& b, Box* out) {
  const size_t n = a.off.size();
  if (b.off.size() != n) return false;
  Box r;
  r.off.resize(n);
  r.len.resize(n);
  for (size_t d = 0; d < n; ++d) {
    const int64_t lo = std::max(a.off[d], b.off[d]), hi = std::min(a.off[d] + a.len[d], b.off[d] + b.len[d]);
    if (hi <= lo) return false;
    r.off[d] = lo;
    r.len[d] = hi - lo;
  }
  if (a.empty() || b.empty()) return false;
  if (out) *out = std::move(r);
  return true;
}

void subtract(const Box& a, const Box& b, std::vector<Box>& out) {
  Box I;
  if (!intersect(a, b, &I)) {
    if (!a.empty()) out.push_back(a);
    return;
  }
  Box rest = a;
  for (size_t d = 0; d < a.off.size(); ++d) {
    const int64_t rend = rest.off[d] + rest.len[d], iend = I.off[d] + I.len[d];
    if (rest.off[d] < I.off[d]) {
      Box p = rest;
      p.len[d] = I.off[d] - rest.off[d];
      out.push_back(std::move(p));
    }
    if (rend > iend) {
      Box p = rest;
      p.off[d] = iend;
      p.len[d] = rend - iend;
      out.push_back(std::move(p));
    }
    rest.off[d] = I.off[d];
    rest.len[d] = I.len[d];
  }
}

Box full_box(const Shape& shape) {
  Box b;
  b.off.assign(shape.size(), 0);
  b.len = shape;
  return b;
}

namespace {
// Contiguous boxes (local coordinates) covering flat elements [a, b) of `shape`, row-major.
void decompose(const Shape& shape, size_t dim, int64_t a, int64_t b, std::vector<int64_t>& prefix_off,
               std::vector<Box>& out) {
  if (a >= b) return;
  const size_t n = shape.size();
  if (dim == n) {  // a == 0, b == 1
    Box box;
    box.off = prefix_off;
    box.len.assign(n, 1);
    out.push_back(std::move(box));
    return;
  }
  int64_t inner = 1;
  for (size_t d = dim + 1; d < n; ++d) inner *= shape[d];
  auto emit = [&](int64_t row0, int64_t rows) {  // rows [row0, row0+rows) of dim, everything inside
    Box box;
    box.off = prefix_off;
    box.off.push_back(row0);
    box.len.assign(dim, 1);
    box.len.push_back(rows);
    for (size_t d = dim + 1; d < n; ++d) {
      box.off.push_back(0);
      box.len.push_back(shape[d]);
    }
    out.push_back(std::move(box));
  };
  auto recurse = [&](int64_t row, int64_t lo, int64_t hi) {
    prefix_off.push_back(row);
    decompose(shape, dim + 1, lo, hi, prefix_off, out);
    prefix_off.pop_back();
  };
  int64_t i0 = a / inner, r0 = a % inner;
  const int64_t i1 = b / inner, r1 = b % inner;
  if (i0 == i1) {
    recurse(i0, r0, r1);
    return;
  }
  if (r0 != 0) {
    recurse(i0, r0, inner);
    ++i0;
  }
  if (i1 > i0) emit(i0, i1 - i0);
  if (r1 != 0) recurse(i1, 0, r1);
}
}  // namespace

std::vector<Mapped> local_regions(const Shape& canonical, const std::vector<DimShard>& shard, int64_t begin,
                                  int64_t end) {
  const Shape local = shard_shape(canonical, shard);
  const size_t n = canonical.size();
  std::vector<Box> local_boxes;
  std::vector<int64_t> prefix;
  if (n == 0) {
    if (begin < end) local_boxes.push_back(Box{});
  } else {
    decompose(local, 0, begin, end, prefix, local_boxes);
  }
  std::vector<const DimShard*> by_dim(n, nullptr);
  for (const DimShard& d : shard) by_dim[static_cast<size_t>(d.dim)] = &d;
  std::vector<Mapped> out;
  for (const Box& lb : local_boxes) {
    // Per dimension: the local interval cut into pieces, each with its canonical shift.
    struct Piece {
      int64_t lo, len, shift;
    };
    std::vector<std::vector<Piece>> per(n);
    for (size_t d = 0; d < n; ++d) {
      const DimShard* s = by_dim[d];
      const int64_t lo = lb.off[d], hi = lb.off[d] + lb.len[d];
      if (!s) {
        per[d].push_back({lo, hi - lo, 0});
      } else if (!s->glu_halves) {
        per[d].push_back({lo, hi - lo, s->start});
      } else {
        const int64_t half = s->length / 2, cn = canonical[d];
        if (lo < half) per[d].push_back({lo, std::min(hi, half) - lo, s->start});
        if (hi > half) {
          const int64_t l2 = std::max(lo, half);
          per[d].push_back({l2, hi - l2, cn / 2 + s->start - half});
        }
      }
    }
    std::vector<size_t> pick(n, 0);
    while (true) {
      Mapped m;
      for (size_t d = 0; d < n; ++d) {
        const Piece& p = per[d][pick[d]];
        m.box.off.push_back(p.lo + p.shift);
        m.box.len.push_back(p.len);
        m.shift.push_back(p.shift);
      }
      out.push_back(std::move(m));
      bool done = true;
      for (size_t d = n; d-- > 0;) {
        if (++pick[d] < per[d].size()) {
          done = false;
          break;
        }
        pick[d] = 0;
      }
      if (done) break;
    }
  }
  return out;
}

// ---- copies ----------------------------------------------------------------------------------------

namespace {
double load_elem(const char* p, DType dt) {
  switch (dt) {
    case DType::f32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DType::f64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case DType::bf16: {
      bf16 v;
      std::memcpy(&v, p, 2);
      return bf16_to_float(v);
    }
    case DType::f16: {
      f16 v;
      std::memcpy(&v, p, 2);
      return f16_to_float(v);
    }
    default: MOE_THROW(ErrorCode::internal, "checkpoint: no conversion from ", dtype_name(dt));
  }
}
void store_elem(char* p, DType dt, double v) {
  switch (dt) {
    case DType::f32: {
      float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
      return;
    }
    case DType::f64: std::memcpy(p, &v, 8); return;
    case DType::bf16: {
      bf16 b = float_to_bf16(static_cast<float>(v));
      std::memcpy(p, &b, 2);
      return;
    }
    case DType::f16: {
      f16 h = float_to_f16(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      return;
    }
    default: MOE_THROW(ErrorCode::internal, "checkpoint: no conversion to ", dtype_name(dt));
  }
}
void convert_run(const char* src, DType sdt, char* dst, DType ddt, int64_t n) {
  if (sdt == ddt) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(sdt));
    return;
  }
  const size_t ss = dtype_size(sdt), ds = dtype_size(ddt);
  for (int64_t i = 0; i < n; ++i) store_elem(dst + i * ds, ddt, load_elem(src + i * ss, sdt));
}
std::vector<int64_t> strides_of(const Shape& s) {
  std::vector<int64_t> st(s.size(), 1);
  for (size_t d = s.size(); d-- > 1;) st[d - 1] = st[d] * s[d];
  return st;
}
}  // namespace

void copy_box(const Box& box, const HostView& src, const std::vector<int64_t>& src_shift, const HostView& dst,
              const std::vector<int64_t>& dst_shift) {
  const size_t n = box.off.size();
  const size_t ss = dtype_size(src.dtype), ds = dtype_size(dst.dtype);
  if (box.empty()) return;
  if (n == 0) {
    convert_run(src.data - src.base * static_cast<int64_t>(ss), src.dtype, dst.data - dst.base * static_cast<int64_t>(ds),
                dst.dtype, 1);
    return;
  }
  // Trailing dimensions the box spans fully in both arrays merge into one contiguous run.
  size_t k = n - 1;
  while (k > 0 && box.len[k] == src.shape[k] && box.len[k] == dst.shape[k]) --k;
  int64_t run = 1;
  for (size_t d = k; d < n; ++d) run *= box.len[d];
  const std::vector<int64_t> sst = strides_of(src.shape), dst_st = strides_of(dst.shape);
  std::vector<int64_t> idx(k, 0);
  while (true) {
    int64_t sf = 0, df = 0;
    for (size_t d = 0; d < k; ++d) {
      sf += (box.off[d] + idx[d] - src_shift[d]) * sst[d];
      df += (box.off[d] + idx[d] - dst_shift[d]) * dst_st[d];
    }
    sf += (box.off[k] - src_shift[k]) * sst[k];
    df += (box.off[k] - dst_shift[k]) * dst_st[k];
    MOE_CHECK_CODE(sf >= src.base && sf + run <= src.base + src.count && df >= dst.base &&
                       df + run <= dst.base + dst.count,
                   ErrorCode::internal, "checkpoint copy: box ", box.str(), " leaves its arrays");
    convert_run(src.data + (sf - src.base) * static_cast<int64_t>(ss), src.dtype,
                dst.data + (df - dst.base) * static_cast<int64_t>(ds), dst.dtype, run);
    bool done = true;
    for (size_t d = k; d-- > 0;) {
      if (++idx[d] < box.len[d]) {
        done = false;
        break;
      }
      idx[d] = 0;
    }
    if (done) break;
  }
}

// ---- CRC-32 (IEEE 802.3, zlib's crc32), slicing by 8 ---------------------------------------------

namespace {
struct CrcTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}
}  // namespace

uint32_t crc32(const void* data, size_t bytes, uint32_t crc) {
  const auto& t = crc_tables().t;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  while (bytes >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][hi & 0xff] ^
        t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
    p += 8;
    bytes -= 8;
  }
  while (bytes-- > 0) c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return ~c;
}

// ---- dtypes and files ----------------------------------------------------------------------------------

const char* st_dtype_name(DType dt) {
  switch (dt) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
  }
  MOE_THROW(ErrorCode::internal, "checkpoint: no name for dtype ", static_cast<int>(dt));
}

DType st_dtype_from_name(const std::string& s, const std::string& where) {
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8})
    if (s == st_dtype_name(dt)) return dt;
  MOE_THROW(ErrorCode::invalid_argument, where, ": unknown dtype '", s, "' (expected F32, F64, BF16, F16, I32, I64, U8)");
}

std::string path_join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
}

void write_fully(int fd, const void* data, size_t bytes, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    MOE_CHECK_CODE(n > 0, ErrorCode::io, "checkpoint: writing '", path, "' failed: ", sys_error());
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void write_file_synced(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOE_CHECK_CODE(fd >= 0, ErrorCode::io, "checkpoint: cannot create '", path, "': ", sys_error());
  try {
    write_fully(fd, text.data(), text.size(), path);
    MOE_CHECK_CODE(::fsync(fd) == 0, ErrorCode::io, "checkpoint: fsync of '", path, "' failed: ", sys_error());
  } catch (...) {
    ::close(fd);
    throw;
  }
  MOE_CHECK_CODE(::close(fd) == 0, ErrorCode::io, "checkpoint: closing '", path, "' failed: ", sys_error());
}

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  MOE_CHECK_CODE(f.good(), ErrorCode::io, "checkpoint: cannot open ", what, " '", path, "': ", sys_error());
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// ---- the index -------------------------------------------------------------------------------------

namespace {
int64_t get_int(const json& j, const char* key, const std::string& where) {
  MOE_CHECK(j.is_object() && j.contains(key) && j.at(key).is_number_integer(), where, ": '", key,
            "' must be an integer, got ", j.is_object() && j.contains(key) ? j.at(key).dump() : std::string("nothing"));
  return j.at(key).get<int64_t>();
}
std::vector<int64_t> get_ints(const json& j, const char* key, const std::string& where) {
  MOE_CHECK(j.is_object() && j.contains(key) && j.at(key).is_array(), where, ": '", key, "' must be a list of integers");
  std::vector<int64_t> v;
  for (const json& e : j.at(key)) {
    MOE_CHECK(e.is_number_integer() && e.get<int64_t>() >= 0, where, ": '", key,
              "' must hold non-negative integers, got ", j.at(key).dump());
    v.push_back(e.get<int64_t>());
  }
  return v;
}
std::string get_str(const json& j, const char* key, const std::string& where) {
  MOE_CHECK(j.is_object() && j.contains(key) && j.at(key).is_string(), where, ": '", key, "' must be a string");
  return j.at(key).get<std::string>();
}
}  // namespace

Index read_index(const std::string& dir, std::optional<int64_t> iteration) {
  Index ix;
  if (!iteration) {
    iteration = read_latest_iteration(dir);
    MOE_CHECK(iteration.has_value(), "load checkpoint: no checkpoint in '", dir, "': ", path_join(dir, kTracker),
              " does not exist");
  }
  ix.iteration = *iteration;
  ix.dir = checkpoint_iteration_dir(dir, *iteration);
  const std::string path = path_join(ix.dir, kIndex);
  struct stat st {};
  MOE_CHECK(::stat(ix.dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "load checkpoint: '", ix.dir,
            "' does not exist (iteration ", *iteration, " of '", dir, "')");
  const std::string text = read_text_file(path, "checkpoint index");
  ix.index_bytes = text.size();
  std::string dup;
  json j = parse_json_strict(text, "checkpoint index '" + path + "'", &dup);
  MOE_CHECK(dup.empty(), "checkpoint index '", path, "': key '", dup, "' appears twice");
  MOE_CHECK(j.is_object(), "checkpoint index '", path, "' must be a JSON object");
  MOE_CHECK(j.contains("format") && j.at("format").is_string() && j.at("format").get<std::string>() == kFormat,
            "checkpoint index '", path, "': format must be '", kFormat,
            "', got ", j.contains("format") ? j.at("format").dump() : std::string("nothing"));
  const int64_t version = get_int(j, "version", path);
  MOE_CHECK(version == kVersion, "checkpoint index '", path, "': version ", version, " is not supported (expected ",
            kVersion, ")");
  const int64_t it = get_int(j, "iteration", path);
  MOE_CHECK(it == ix.iteration, "checkpoint index '", path, "': iteration ", it, " does not match its directory (",
            ix.iteration, ")");
  MOE_CHECK(j.contains("files") && j.at("files").is_object(), "checkpoint index '", path, "': 'files' must be an object");
  for (const auto& [name, info] : j.at("files").items()) {
    MOE_CHECK(name.find('/') == std::string::npos && name != "." && name != "..", "checkpoint index '", path,
              "': file name '", name, "' must be a plain file name");
    ix.file_bytes[name] = static_cast<uint64_t>(get_int(info, "bytes", path + ", file '" + name + "'"));
  }
  MOE_CHECK(j.contains("tensors") && j.at("tensors").is_object(), "checkpoint index '", path,
            "': 'tensors' must be an object");
  for (const auto& [name, info] : j.at("tensors").items()) {
    const std::string where = "checkpoint index '" + path + "', tensor '" + name + "'";
    TensorRec t;
    t.name = name;
    t.kind = get_str(info, "kind", where);
    t.param = get_str(info, "param", where);
    t.shape = get_ints(info, "shape", where);
    t.dtype = st_dtype_from_name(get_str(info, "dtype", where), where);
    // Every element count and byte count below fits an int64 once the whole tensor's does.
    int64_t tensor_bytes = static_cast<int64_t>(dtype_size(t.dtype));
    for (int64_t d : t.shape)
      MOE_CHECK(!__builtin_mul_overflow(tensor_bytes, d, &tensor_bytes), where, ": shape ", shape_str(t.shape),
                " has more bytes than a 64-bit count holds");
    MOE_CHECK(info.contains("slices") && info.at("slices").is_array(), where, ": 'slices' must be a list");
    int64_t covered = 0;
    for (const json& s : info.at("slices")) {
      SliceRec r;
      r.file = get_str(s, "file", where);
      r.key = get_str(s, "key", where);
      r.box.off = get_ints(s, "offsets", where);
      r.box.len = get_ints(s, "lengths", where);
      const std::vector<int64_t> db = get_ints(s, "data_offsets", where);
      MOE_CHECK(db.size() == 2 && db[0] <= db[1], where, ": slice '", r.key, "' data_offsets must be [begin, end]");
      r.data_begin = static_cast<uint64_t>(db[0]);
      r.data_end = static_cast<uint64_t>(db[1]);
      r.crc = static_cast<uint32_t>(get_int(s, "crc32", where));
      MOE_CHECK(r.box.off.size() == t.shape.size() && r.box.len.size() == t.shape.size(), where, ": slice '", r.key,
                "' has ", r.box.off.size(), " offsets and ", r.box.len.size(), " lengths for shape ", shape_str(t.shape));
      for (size_t d = 0; d < t.shape.size(); ++d)
        MOE_CHECK(r.box.off[d] <= t.shape[d] && r.box.len[d] <= t.shape[d] - r.box.off[d], where, ": slice ",
                  r.box.str(), " leaves shape ",
                  shape_str(t.shape));
      MOE_CHECK(r.data_end - r.data_begin == static_cast<uint64_t>(r.box.numel()) * dtype_size(t.dtype), where,
                ": slice ", r.box.str(), " spans ", r.data_end - r.data_begin, " bytes, expected ",
                r.box.numel() * static_cast<int64_t>(dtype_size(t.dtype)));
      MOE_CHECK(ix.file_bytes.count(r.file), where, ": slice ", r.box.str(), " names file '", r.file,
                "', which 'files' does not list");
      for (const SliceRec& o : t.slices)
        MOE_CHECK(!intersect(o.box, r.box, nullptr), where, ": slices ", o.box.str(), " and ", r.box.str(), " overlap");
      covered += r.box.numel();
      t.slices.push_back(std::move(r));
    }
    // Slices are disjoint, so covering every element is a count.
    MOE_CHECK(covered == shape_numel(t.shape), where, ": the index does not cover the tensor: its slices hold ",
              covered, " of ", shape_numel(t.shape), " elements of shape ", shape_str(t.shape));
    ix.tensors.emplace(name, std::move(t));
  }
  for (const char* k : {"training_state", "optimizer", "config", "layout"})
    MOE_CHECK(j.contains(k) && j.at(k).is_object(), "checkpoint index '", path, "': '", k, "' must be an object");
  // The fields the loader reads with defaults must have their type when present (nlohmann's value()
  // would throw its own type_error instead of an error naming the index and the field).
  auto field = [&](const char* obj, const char* key, bool ok, const char* expected) {
    MOE_CHECK(ok, "checkpoint index '", path, "': '", obj, ".", key, "' must be ", expected, ", got ",
              j.at(obj).at(key).dump());
  };
  auto typed = [&](const char* obj, const char* key, auto is) {
    const json& o = j.at(obj);
    return !o.contains(key) || is(o.at(key));
  };
  const auto is_bool = [](const json& v) { return v.is_boolean(); };
  const auto is_int = [](const json& v) { return v.is_number_integer(); };
  const auto is_str = [](const json& v) { return v.is_string(); };
  field("optimizer", "state_saved", typed("optimizer", "state_saved", is_bool), "true or false");
  field("optimizer", "optimizer", typed("optimizer", "optimizer", is_str), "a string");
  field("optimizer", "iteration", typed("optimizer", "iteration", is_int), "an integer");
  field("optimizer", "skipped_iterations", typed("optimizer", "skipped_iterations", is_int), "an integer");
  field("layout", "world_size", typed("layout", "world_size", is_int), "an integer");
  if (j.contains("rng")) {
    MOE_CHECK(j.at("rng").is_object(), "checkpoint index '", path, "': 'rng' must be an object");
    field("rng", "saved", typed("rng", "saved", is_bool), "true or false");
  }
  ix.training_state = j.at("training_state");
  ix.optimizer = j.at("optimizer");
  ix.config = j.at("config");
  ix.layout = j.at("layout");
  ix.rng = j.contains("rng") ? j.at("rng") : json::object();
  return ix;
}

ordered_json state_to_json(const TrainingState& s) {
  ordered_json j = ordered_json::object();
  j["iteration"] = s.iteration;
  j["consumed_train_samples"] = s.consumed_train_samples;
  j["consumed_valid_samples"] = s.consumed_valid_samples;
  j["global_batch_size"] = s.global_batch_size;
  j["train_data_position"] = s.train_data_position;
  j["valid_data_position"] = s.valid_data_position;
  j["data_seed"] = s.data_seed;
  j["seed"] = s.seed;
  ordered_json sc = ordered_json::object();
  sc["num_steps"] = s.scheduler.num_steps;
  sc["max_lr"] = s.scheduler.max_lr;
  sc["min_lr"] = s.scheduler.min_lr;
  sc["warmup_steps"] = s.scheduler.warmup_steps;
  sc["decay_steps"] = s.scheduler.decay_steps;
  sc["decay_style"] = s.scheduler.decay_style;
  j["scheduler"] = sc;
  std::string dup;
  json extra = parse_json_strict(s.extra_json.empty() ? "{}" : s.extra_json, "TrainingState::extra_json", &dup);
  MOE_CHECK(extra.is_object() && dup.empty(), "TrainingState::extra_json must be a JSON object without repeated keys, got ",
            s.extra_json);
  j["extra"] = ordered_json::parse(extra.dump());
  return j;
}

TrainingState state_from_json(const json& ts, const json& rng, int rank) {
  const std::string where = "checkpoint training_state";
  TrainingState s;
  s.iteration = get_int(ts, "iteration", where);
  s.consumed_train_samples = get_int(ts, "consumed_train_samples", where);
  s.consumed_valid_samples = get_int(ts, "consumed_valid_samples", where);
  s.global_batch_size = get_int(ts, "global_batch_size", where);
  s.train_data_position = get_int(ts, "train_data_position", where);
  s.valid_data_position = get_int(ts, "valid_data_position", where);
  MOE_CHECK(ts.contains("data_seed") && ts.at("data_seed").is_number_unsigned() && ts.contains("seed") &&
                ts.at("seed").is_number_unsigned(),
            where, ": seed and data_seed must be non-negative integers");
  s.data_seed = ts.at("data_seed").get<uint64_t>();
  s.seed = ts.at("seed").get<uint64_t>();
  if (ts.contains("scheduler") && ts.at("scheduler").is_object()) {
    const json& sc = ts.at("scheduler");
    // Absent fields default; present ones must have their type (nlohmann's value() would throw its
    // own type_error, not a moe::Error naming the field).
    auto number = [&](const char* key) {
      MOE_CHECK(!sc.contains(key) || sc.at(key).is_number(), where, ": scheduler '", key, "' must be a number, got ",
                sc.contains(key) ? sc.at(key).dump() : std::string());
      return sc.value(key, 0.0);
    };
    s.scheduler.num_steps = number("num_steps");
    s.scheduler.max_lr = number("max_lr");
    s.scheduler.min_lr = number("min_lr");
    s.scheduler.warmup_steps = number("warmup_steps");
    s.scheduler.decay_steps = number("decay_steps");
    MOE_CHECK(!sc.contains("decay_style") || sc.at("decay_style").is_string(), where,
              ": scheduler 'decay_style' must be a string, got ", sc.value("decay_style", json()).dump());
    s.scheduler.decay_style = sc.value("decay_style", std::string());
  }
  s.extra_json = ts.contains("extra") ? ts.at("extra").dump() : "{}";
  if (rng.is_object() && rng.contains("per_rank") && rng.at("per_rank").is_array() && !rng.at("per_rank").empty()) {
    const json& all = rng.at("per_rank");
    const json& mine = all.at(rank >= 0 && static_cast<size_t>(rank) < all.size() ? static_cast<size_t>(rank) : 0);
    if (mine.is_object())
      for (const auto& [k, v] : mine.items())
        if (v.is_string()) s.rng_states[k] = v.get<std::string>();
  }
  return s;
}

// ---- shard files -------------------------------------------------------------------------------------

ShardFile::ShardFile(const std::string& path, uint64_t expected_bytes) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOE_CHECK(fd_ >= 0, "load checkpoint: shard file '", path, "' is missing or unreadable: ", sys_error());
  struct stat st {};
  MOE_CHECK_CODE(::fstat(fd_, &st) == 0, ErrorCode::io, "load checkpoint: cannot stat '", path, "': ", sys_error());
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  MOE_CHECK(size == expected_bytes, "load checkpoint: shard file '", path, "' is ", size, " bytes, the index says ",
            expected_bytes, size < expected_bytes ? " (truncated)" : " (grown: not the file the index describes)");
  MOE_CHECK(size >= 8, "load checkpoint: shard file '", path, "' is shorter than a safetensors header");
  unsigned char lb[8];
  MOE_CHECK_CODE(::pread(fd_, lb, 8, 0) == 8, ErrorCode::io, "load checkpoint: reading '", path, "' failed: ",
                 sys_error());
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | lb[i];
  MOE_CHECK(hlen <= size - 8 && hlen <= 100000000ull, "load checkpoint: shard file '", path, "': header length ", hlen,
            " does not fit the ", size, "-byte file");
  std::string text(static_cast<size_t>(hlen), '\0');
  uint64_t got = 0;
  while (got < hlen) {
    ssize_t n = ::pread(fd_, text.data() + got, hlen - got, static_cast<off_t>(8 + got));
    if (n < 0 && errno == EINTR) continue;
    MOE_CHECK_CODE(n > 0, ErrorCode::io, "load checkpoint: reading the header of '", path, "' failed");
    got += static_cast<uint64_t>(n);
  }
  std::string dup;
  header_ = parse_json_strict(text, "shard file '" + path + "' header", &dup);
  MOE_CHECK(dup.empty() && header_.is_object(), "load checkpoint: shard file '", path, "': malformed header");
  data_start_ = 8 + hlen;
  bytes_read_ = 8 + hlen;
}

ShardFile::~ShardFile() {
  if (fd_ >= 0) ::close(fd_);
}

std::vector<char> ShardFile::read(const SliceRec& s, const TensorRec& t) {
  const std::string where = "load checkpoint: shard file '" + path_ + "', tensor '" + t.name + "', slice " + s.box.str();
  MOE_CHECK(header_.contains(s.key) && header_.at(s.key).is_object(), where, ": the file has no entry '", s.key,
            "' (the index and the file disagree)");
  const json& e = header_.at(s.key);
  const std::string dt = e.contains("dtype") && e.at("dtype").is_string() ? e.at("dtype").get<std::string>() : "?";
  MOE_CHECK(dt == st_dtype_name(t.dtype), where, ": dtype ", dt, " in the file, ", st_dtype_name(t.dtype),
            " in the index");
  std::vector<int64_t> shape;
  if (e.contains("shape") && e.at("shape").is_array())
    for (const json& d : e.at("shape")) shape.push_back(d.is_number_integer() ? d.get<int64_t>() : -1);
  MOE_CHECK(shape == s.box.len, where, ": shape ", shape_str(shape), " in the file, ", shape_str(s.box.len),
            " in the index");
  std::vector<uint64_t> off;
  if (e.contains("data_offsets") && e.at("data_offsets").is_array())
    for (const json& d : e.at("data_offsets")) off.push_back(d.is_number_unsigned() ? d.get<uint64_t>() : ~0ull);
  MOE_CHECK(off.size() == 2 && off[0] == s.data_begin && off[1] == s.data_end, where, ": data_offsets ",
            e.contains("data_offsets") ? e.at("data_offsets").dump() : std::string("none"), " in the file, [",
            s.data_begin, ", ", s.data_end, "] in the index");
  const uint64_t n = s.data_end - s.data_begin;
  std::vector<char> buf(static_cast<size_t>(n));
  uint64_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd_, buf.data() + got, std::min<uint64_t>(n - got, 1ull << 30),
                        static_cast<off_t>(data_start_ + s.data_begin + got));
    if (r < 0 && errno == EINTR) continue;
    MOE_CHECK(r > 0, where, ": reading ", n, " bytes at ", data_start_ + s.data_begin, " failed: ",
              r < 0 ? sys_error() : std::string("unexpected end of file (truncated)"));
    got += static_cast<uint64_t>(r);
  }
  bytes_read_ += n;
  const uint32_t c = crc32(buf.data(), buf.size());
  MOE_CHECK(c == s.crc, where, ": the bytes do not match the index: CRC-32 ", c, ", expected ", s.crc,
            " (the file is corrupt)");
  return buf;
}

Tensor read_whole_tensor(const Index& ix, const TensorRec& t, int64_t* bytes_read) {
  Tensor out = Tensor::empty(t.shape, t.dtype);
  HostView dst{static_cast<char*>(out.data()), t.dtype, t.shape, 0, out.numel()};
  const std::vector<int64_t> zero(t.shape.size(), 0);
  std::map<std::string, std::vector<const SliceRec*>> by_file;
  for (const SliceRec& s : t.slices) by_file[s.file].push_back(&s);
  for (const auto& [file, slices] : by_file) {
    ShardFile f(path_join(ix.dir, file), ix.file_bytes.at(file));
    for (const SliceRec* s : slices) {
      std::vector<char> buf = f.read(*s, t);
      HostView src{buf.data(), t.dtype, s->box.len, 0, s->box.numel()};
      copy_box(s->box, src, s->box.off, dst, zero);
    }
    if (bytes_read) *bytes_read += static_cast<int64_t>(f.bytes_read());
  }
  return out;
}

}  // namespace moe::ckpt

namespace moe {

using namespace ckpt;

std::string checkpoint_iteration_dir(const std::string& dir, int64_t iteration) {
  MOE_CHECK(iteration >= 0 && iteration <= 9999999, "checkpoint: iteration must be in [0, 9999999], got ", iteration);
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07lld", static_cast<long long>(iteration));
  return path_join(dir, name);
}

std::optional<int64_t> read_latest_iteration(const std::string& dir) {
  const std::string path = path_join(dir, kTracker);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  std::string text = read_text_file(path, "tracker file");
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r')) text.pop_back();
  MOE_CHECK(text != "release", "checkpoint tracker '", path,
            "' says 'release' (a Megatron release checkpoint): not a libmoecore checkpoint");
  bool ok = !text.empty() && text.size() <= 7;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  MOE_CHECK(ok, "checkpoint tracker '", path, "' must hold an iteration number, got '", text, "'");
  return std::stoll(text);
}

struct CheckpointReader::Impl {
  Index ix;
};

CheckpointReader::CheckpointReader(const std::string& dir, std::optional<int64_t> iteration)
    : impl_(std::make_unique<Impl>()) {
  impl_->ix = read_index(dir, iteration);
}
CheckpointReader::~CheckpointReader() = default;

int64_t CheckpointReader::iteration() const { return impl_->ix.iteration; }
const std::string& CheckpointReader::path() const { return impl_->ix.dir; }

std::vector<std::string> CheckpointReader::tensor_names() const {
  std::vector<std::string> params = parameter_names(), rest;
  for (const auto& [n, t] : impl_->ix.tensors)
    if (t.kind != "param") rest.push_back(n);
  params.insert(params.end(), rest.begin(), rest.end());
  return params;
}

std::vector<std::string> CheckpointReader::parameter_names() const {
  std::vector<std::string> out;
  for (const auto& [n, t] : impl_->ix.tensors)
    if (t.kind == "param") out.push_back(n);
  return out;
}

bool CheckpointReader::contains(const std::string& name) const { return impl_->ix.tensors.count(name) != 0; }

namespace {
const TensorRec& tensor_of(const Index& ix, const std::string& name) {
  auto it = ix.tensors.find(name);
  MOE_CHECK(it != ix.tensors.end(), "checkpoint '", ix.dir, "' has no tensor '", name, "'");
  return it->second;
}
}  // namespace

Shape CheckpointReader::shape(const std::string& name) const { return tensor_of(impl_->ix, name).shape; }
DType CheckpointReader::dtype(const std::string& name) const { return tensor_of(impl_->ix, name).dtype; }
int64_t CheckpointReader::num_slices(const std::string& name) const {
  return static_cast<int64_t>(tensor_of(impl_->ix, name).slices.size());
}
Tensor CheckpointReader::read(const std::string& name) const {
  return read_whole_tensor(impl_->ix, tensor_of(impl_->ix, name));
}
MoEConfig CheckpointReader::config() const {
  return config_from_json(impl_->ix.config.dump(), path_join(impl_->ix.dir, kIndex) + " (config)");
}
std::string CheckpointReader::config_json() const { return impl_->ix.config.dump(2); }
std::string CheckpointReader::layout_json() const { return impl_->ix.layout.dump(); }
TrainingState CheckpointReader::training_state() const {
  return state_from_json(impl_->ix.training_state, impl_->ix.rng, 0);
}

}  // namespace moe
