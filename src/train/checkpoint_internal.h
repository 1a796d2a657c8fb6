// Internals shared by the checkpoint files (checkpoint.cpp, checkpoint_io.cpp, checkpoint_hf.cpp):
// boxes in canonical coordinates, copies between row-major host arrays, CRC-32, the index and the
// shard files. docs/checkpoints.md describes the format.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/checkpoint.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe::ckpt {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

inline constexpr const char* kTracker = "latest_checkpointed_iteration.txt";
inline constexpr const char* kIndex = "index.json";
inline constexpr const char* kFormat = "moecore-checkpoint";
inline constexpr int kVersion = 1;

// Index names of the tensor kinds.
inline constexpr const char* kMasterPrefix = "optimizer.state.fp32_param.";
inline constexpr const char* kExpAvgPrefix = "optimizer.state.exp_avg.";
inline constexpr const char* kExpAvgSqPrefix = "optimizer.state.exp_avg_sq.";
inline constexpr const char* kMomentumPrefix = "optimizer.state.momentum_buffer.";

// ---- boxes --------------------------------------------------------------------------------------
// Offsets and lengths per dimension (a 0-d box is one element).
struct Box {
  std::vector<int64_t> off, len;
  int64_t numel() const;
  bool empty() const { return numel() == 0; }
  std::string str() const;  // "[0:4, 8:16]"
};
bool intersect(const Box& a, const Box& b, Box* out);  // false when they share no element
// Appends a \ b as disjoint boxes (a itself when they do not intersect).
void subtract(const Box& a, const Box& b, std::vector<Box>& out);
Box full_box(const Shape& shape);

// A canonical box held in a row-major host array: canonical coordinate c sits at array
// coordinate c − shift.
struct Mapped {
  Box box;
  std::vector<int64_t> shift;
};

// The canonical boxes that elements [begin, end) (flat, row-major) of a parameter's local shard
// cover, each mapping affinely onto the local array (GLU-halves shards give two boxes per piece).
std::vector<Mapped> local_regions(const Shape& canonical, const std::vector<DimShard>& shard, int64_t begin,
                                  int64_t end);

// A row-major host array of `shape` of which flat elements [base, base + count) are present at data.
struct HostView {
  char* data = nullptr;
  DType dtype = DType::f32;
  Shape shape;
  int64_t base = 0, count = 0;
};
// Copies canonical box `box` from src to dst (converting between float dtypes).
void copy_box(const Box& box, const HostView& src, const std::vector<int64_t>& src_shift, const HostView& dst,
              const std::vector<int64_t>& dst_shift);

uint32_t crc32(const void* data, size_t bytes, uint32_t crc = 0);

// ---- dtypes and files -----------------------------------------------------------------------------
const char* st_dtype_name(DType dt);            // "F32", "BF16", ...
DType st_dtype_from_name(const std::string& s, const std::string& where);
std::string path_join(const std::string& a, const std::string& b);
void fsync_dir(const std::string& dir);  // best effort
// Writes all bytes or throws io naming the file.
void write_fully(int fd, const void* data, size_t bytes, const std::string& path);
// Writes a small file atomically enough for the index: direct write + fsync (the directory it is in
// is published by rename afterwards).
void write_file_synced(const std::string& path, const std::string& text);
std::string read_text_file(const std::string& path, const std::string& what);

// ---- the index ----------------------------------------------------------------------------------
struct SliceRec {
  std::string file, key;
  Box box;
  uint64_t data_begin = 0, data_end = 0;  // within the file's data buffer (safetensors data_offsets)
  uint32_t crc = 0;
};
struct TensorRec {
  std::string name, kind, param;  // kind: param | fp32_param | exp_avg | exp_avg_sq | momentum_buffer
  Shape shape;
  DType dtype = DType::f32;
  std::vector<SliceRec> slices;
};
struct Index {
  std::string dir;  // DIR/iter_NNNNNNN
  int64_t iteration = 0;
  uint64_t index_bytes = 0;
  std::map<std::string, uint64_t> file_bytes;
  std::map<std::string, TensorRec> tensors;
  json training_state, rng, optimizer, config, layout;
};
// Reads and validates DIR/iter_N/index.json (iteration none: the tracker's).
Index read_index(const std::string& dir, std::optional<int64_t> iteration);
TrainingState state_from_json(const json& ts, const json& rng, int rank);
ordered_json state_to_json(const TrainingState& s);

// One shard file opened for reading: size checked against the index, header parsed.
class ShardFile {
 public:
  ShardFile(const std::string& path, uint64_t expected_bytes);
  ~ShardFile();
  ShardFile(const ShardFile&) = delete;
  ShardFile& operator=(const ShardFile&) = delete;
  // The slice's payload, after checking the header entry against the index (dtype, shape, offsets)
  // and the bytes against the CRC. `tensor` names it in errors.
  std::vector<char> read(const SliceRec& slice, const TensorRec& tensor);
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0, bytes_read_ = 0;
  json header_;
};

// Assembles a whole canonical tensor from its slices (one process).
Tensor read_whole_tensor(const Index& index, const TensorRec& t, int64_t* bytes_read = nullptr);

}  // namespace moe::ckpt
