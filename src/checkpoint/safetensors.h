// checkpoint/safetensors.h: reading and writing the safetensors format.
//
// Format: 8-byte little-endian header length n, n bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw little-endian data; offsets are relative to the end of the header.
// The reader validates everything before trusting it (header length against the file size,
// JSON syntax, dtype names, offsets inside the file and consistent with dtype x shape) and names
// the file and the problem in its errors. Tensors can be read whole or as element ranges (so a
// rank reads only its shard).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace loom::checkpoint {

struct TensorToWrite {
  std::string name;
  DType dtype;
  Shape shape;
  const void* data;  // numel(shape) * dtype_size(dtype) bytes, or null: see `produce`
  // With data null: called once, when the tensor's turn to be written comes, to fill a buffer of
  // numel(shape) * dtype_size(dtype) bytes that is freed right after. A file of such tensors is
  // written holding one tensor in memory at a time (conversion of models larger than memory).
  std::function<void(void* dst)> produce = {};
};

// Writes `path` (overwriting) and fsyncs it. Tensors are written in the order given.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

class ProtocolSteps;
struct FileDigest;
// The same through the checkpoint commit protocol (commit.h: each write a counted step),
// streamed from the tensors' memory; returns the file's SHA-256 and size (and, with
// block_bytes > 0, the SHA-256 of each block).
FileDigest write_safetensors(ProtocolSteps& steps, const std::string& path,
                             const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata = {},
                             uint64_t block_bytes = 0);
// The header (8-byte length + JSON, padded so the data section is 8-byte aligned) the writers
// put before the tensors' data, with offsets in the order given.
std::string safetensors_header(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata);

struct TensorInfo {
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets in the data section
};

class SafetensorsFile {
 public:
  // Opens and validates the header; throws loom::Error naming the file and the problem.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;  // throws if absent
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }
  uint64_t data_start() const { return data_start_; }  // byte offset of the data section

  // Reads the whole tensor into dst after checking its dtype and shape are the expected ones.
  void read(const std::string& name, DType dtype, const Shape& shape, void* dst) const;
  // Reads elements [first, first+count) of the flattened tensor.
  void read_range(const std::string& name, DType dtype, int64_t first, int64_t count,
                  void* dst) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace loom::checkpoint
