// core/tensor.h: a contiguous, typed, shaped buffer owned through a MemoryPool.
//
// A Tensor shares its storage (copies are cheap and alias); `view(offset, shape)` is a sub-range
// of the same storage. Storage returns its bytes to the pool when the last Tensor referring to it
// goes away, so the pool's counters always reflect live buffers. Kernels take raw pointers and
// sizes; Tensor is how layers own and name their buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/memory_pool.h"

namespace loom {

enum class Device : uint8_t { cpu };

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "(4, 256, 768)"

class Storage {
 public:
  Storage(MemoryPool* pool, size_t bytes, MemCategory cat);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  MemCategory category() const { return cat_; }

 private:
  MemoryPool* pool_;
  void* data_;
  size_t bytes_;
  MemCategory cat_;
};

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised tensor from `pool`, counted under `cat`.
  static Tensor empty(const Shape& shape, DType dtype, MemoryPool& pool, MemCategory cat);
  static Tensor zeros(const Shape& shape, DType dtype, MemoryPool& pool, MemCategory cat);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t ndim() const { return shape_.size(); }
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return Device::cpu; }
  size_t nbytes() const { return size_t(numel_) * dtype_size(dtype_); }
  MemCategory category() const { return storage_->category(); }

  void* raw() const {
    return static_cast<char*>(storage_->data()) + offset_ * int64_t(dtype_size(dtype_));
  }
  // Typed pointer; checks that T matches the dtype's size.
  template <typename T>
  T* data() const {
    LOOM_ASSERT(storage_ != nullptr, "data() on an undefined tensor");
    LOOM_ASSERT(sizeof(T) == dtype_size(dtype_), "data<T>() with sizeof(T)={} on dtype {}",
                sizeof(T), dtype_name(dtype_));
    return static_cast<T*>(raw());
  }

  // Elements [offset, offset + numel(shape)) of this tensor, as `shape`, sharing storage.
  Tensor view(int64_t offset, const Shape& shape) const;
  // Same elements, new shape (numel must match).
  Tensor reshape(const Shape& shape) const;
  void fill_zero();
  // Deep copy into a new buffer from `pool`.
  Tensor clone(MemoryPool& pool, MemCategory cat) const;

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  int64_t numel_ = 0;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::f32;
};

}  // namespace loom
