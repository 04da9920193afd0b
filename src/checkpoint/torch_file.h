// checkpoint/torch_file.h: reading torch.save files (PyTorch >= 1.6 zip format) without Python.
//
// A torch.save file is a zip archive (entries stored, not compressed) holding
//   <top>/data.pkl    the object, pickled (protocol 2)
//   <top>/data/<key>  the raw bytes of each storage (little-endian unless <top>/byteorder says)
// data.pkl is NOT executed: a small interpreter evaluates it symbolically and accepts a fixed
// allowlist of content (what a state dict needs):
//   - dicts and collections.OrderedDict (their `_metadata` BUILD state is ignored), lists, tuples,
//     strings, bytes, ints, floats, bools, None;
//   - torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state) with persistent storage
//     records ('storage', torch.<T>Storage, key, location, numel), also wrapped in
//     torch._tensor._rebuild_from_type_v2 for torch.Tensor / Parameter;
//   - torch dtypes as plain values;
//   - argparse.Namespace (Megatron's `args`): kept as an inert object, so a caller can skip it
//     with a warning that names it.
// Any other global (os.system, builtins.eval, numpy reconstructors, ...), a REDUCE/NEWOBJ of
// anything but the above, or an opcode outside protocol 2's data opcodes is refused with an
// error naming what was found and its byte offset; nothing is ever called. Every size read from
// the file (entry sizes, string lengths, memo indices, nesting depth, tensor extents) is checked
// before it is used, so truncated or hostile files give loom::Error, never a crash.
// Legacy (pre-1.6, non-zip) files get an error saying how to re-save them.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/dtype.h"  // f16_to_f32

namespace loom::checkpoint {

// Element types of torch storages loom reads (others are refused by name).
enum class TorchDType { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };
const char* torch_dtype_name(TorchDType t);
size_t torch_dtype_size(TorchDType t);

struct TorchTensorRef {
  TorchDType dtype = TorchDType::f32;
  std::string storage_key;      // entry "<top>/data/<storage_key>"
  int64_t storage_numel = 0;    // elements in the storage
  int64_t storage_offset = 0;   // elements
  std::vector<int64_t> shape, stride;
  int64_t numel() const;
};

// A symbolic Python value produced by the restricted unpickler.
struct PyValue;
using PyRef = std::shared_ptr<PyValue>;
struct PyValue {
  enum class Kind { none, boolean, integer, floating, string, bytes, tuple, list, dict, global,
                    storage, tensor, object, dtype };
  Kind kind = Kind::none;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // string/bytes; "module.name" of a global; class of an object; dtype name
  std::vector<PyRef> items;                        // tuple, list
  std::vector<std::pair<PyRef, PyRef>> entries;    // dict, in insertion order
  TorchTensorRef tensor;                           // tensor, storage (key, dtype, numel)
  PyRef state;                                     // object: its BUILD state (inert)
};
const char* py_kind_name(PyValue::Kind k);

// Evaluates a protocol-2 pickle under the allowlist above. `source` names the file in errors.
PyRef unpickle_restricted(std::string_view bytes, const std::string& source);

// An opened torch.save zip: the unpickled object and a reader of its storages.
class TorchFile {
 public:
  // Opens and parses the zip directory and data.pkl. Throws loom::Error naming the file and the
  // problem (legacy format, not a zip, truncated, compressed entry, refused pickle content).
  explicit TorchFile(const std::string& path);
  ~TorchFile();
  TorchFile(const TorchFile&) = delete;
  TorchFile& operator=(const TorchFile&) = delete;

  const std::string& path() const { return path_; }
  const PyRef& root() const { return root_; }

  // Reads tensor t (any strides inside its storage) converted to f32: numel floats into dst.
  // Floating dtypes only (f64, f32, f16, bf16); others throw naming the dtype.
  void read_f32(const TorchTensorRef& t, float* dst) const;

 private:
  struct Entry {
    uint64_t data_offset = 0, size = 0;
  };
  const Entry& entry(const std::string& name) const;

  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  std::string top_;  // "<top>/"
  std::map<std::string, Entry> entries_;
  PyRef root_;
};

// The tensors of a (possibly nested) state dict, flattened with "." between keys: a dict value
// that is itself a dict recurses. Non-tensor leaves (ints, strings, lists, Megatron's `args`
// Namespace, ...) are skipped and their dotted names appended to `skipped` (with what they are).
void flatten_state_dict(const PyRef& dict, const std::string& prefix,
                        std::map<std::string, TorchTensorRef>& tensors,
                        std::vector<std::string>& skipped);

}  // namespace loom::checkpoint
