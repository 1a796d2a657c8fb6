// libmoecore — safetensors files (checkpoints and tensor dumps, docs/moe.md).
// Layout: 8-byte little-endian header length N, N bytes of JSON header
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<value>", ...}}   (metadata optional)
// then the data buffer; offsets are relative to the buffer start, data is little-endian, row-major.
// dtypes: F32 F64 BF16 F16 I32 I64 U8 BOOL (BOOL loads as u8; u8 saves as U8).
// Reading validates every field and never trusts the file: a malformed file is an
// Error(invalid_argument) naming the file, the tensor and expected vs got; an unreadable one is an
// Error(io). Writing is atomic: a temp file next to `path` is written, fsync'ed and renamed over it.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moecore/tensor.h"

namespace moe {

struct SafetensorsFile {
  std::string path;
  std::vector<std::string> names;               // in file order (by data offset, then name)
  std::map<std::string, Tensor> tensors;        // CPU tensors, shapes as stored
  std::map<std::string, std::string> metadata;  // "__metadata__" (empty when absent)

  // The tensor called `name`; an error naming the file and listing the available names otherwise.
  const Tensor& at(const std::string& name) const;
  bool contains(const std::string& name) const { return tensors.count(name) != 0; }
};

// Reads and validates a whole file into CPU tensors.
SafetensorsFile load_safetensors(const std::string& path);

// Writes `tensors` (any device; copied to the host) in the given order with optional metadata.
// Names must be unique, non-empty and not "__metadata__". Atomic: on any failure the temp file is
// removed, an Error(io) is thrown and a previous file at `path` is left untouched.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace moe
