#include "checkpoint/safetensors.h"

#include "checkpoint/pieces.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "checkpoint/commit.h"
#include "core/error.h"

namespace loom::checkpoint {

namespace {

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    LOOM_CHECK(w > 0, "writing '{}' failed: {}", path, std::strerror(errno));
    p += w;
    n -= size_t(w);
  }
}


}  // namespace

std::string safetensors_header(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t bytes = uint64_t(shape_numel(t.shape)) * dtype_size(t.dtype);
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h += ' ';  // keep the data section 8-byte aligned
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((uint64_t(h.size()) >> (8 * i)) & 0xff);
  return out + h;
}

FileDigest write_safetensors(ProtocolSteps& steps, const std::string& path,
                             const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata,
                             uint64_t block_bytes) {
  FileWriter w(steps, path, size_t(4) << 20, block_bytes);
  std::string h = safetensors_header(tensors, metadata);
  w.write(h.data(), h.size());
  std::vector<char> produced;
  for (const auto& t : tensors) {
    const size_t bytes = size_t(shape_numel(t.shape)) * dtype_size(t.dtype);
    if (t.data == nullptr && t.produce && bytes > 0) {
      produced.assign(bytes, 0);
      t.produce(produced.data());
      w.write(produced.data(), bytes);
      std::vector<char>().swap(produced);  // hold one produced tensor at a time
    } else {
      w.write(t.data, bytes);
    }
  }
  return w.finish();
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string h = safetensors_header(tensors, metadata);  // length prefix + JSON
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  LOOM_CHECK(fd >= 0, "cannot create '{}': {}", path, std::strerror(errno));
  try {
    write_all(fd, h.data(), h.size(), path);
    for (const auto& t : tensors) {
      LOOM_CHECK(t.data != nullptr || shape_numel(t.shape) == 0,
                 "write_safetensors('{}'): tensor '{}' has no data (produced tensors need the "
                 "ProtocolSteps overload)", path, t.name);
      write_all(fd, t.data, size_t(shape_numel(t.shape)) * dtype_size(t.dtype), path);
    }
    LOOM_CHECK(::fsync(fd) == 0, "fsync of '{}' failed: {}", path, std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd_ >= 0, "cannot open '{}': {}", path, std::strerror(errno));
  struct stat st;
  LOOM_CHECK(::fstat(fd_, &st) == 0, "cannot stat '{}': {}", path, std::strerror(errno));
  file_size_ = uint64_t(st.st_size);
  try {
    LOOM_CHECK(file_size_ >= 8, "'{}' is not a safetensors file: {} bytes, shorter than the "
               "8-byte header length", path, file_size_);
    unsigned char len[8];
    detail::pread_exact(fd_, len, 8, 0, path);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(len[i]) << (8 * i);
    LOOM_CHECK(n <= file_size_ - 8 && n <= (uint64_t(100) << 20),
               "'{}': header length {} does not fit the file of {} bytes (truncated or not a "
               "safetensors file)", path, n, file_size_);
    std::string h(size_t(n), '\0');
    detail::pread_exact(fd_, h.data(), size_t(n), 8, path);
    data_start_ = 8 + n;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(h);
    } catch (const nlohmann::json::exception& e) {
      LOOM_FAIL("'{}': the safetensors header is not valid JSON ({})", path, e.what());
    }
    LOOM_CHECK(j.is_object(), "'{}': the safetensors header is not a JSON object", path);
    const uint64_t data_size = file_size_ - data_start_;
    for (auto& [name, v] : j.items()) {
      if (name == "__metadata__") {
        for (auto& [k, mv] : v.items())
          if (mv.is_string()) metadata_[k] = mv.get<std::string>();
        continue;
      }
      LOOM_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") &&
                     v.contains("data_offsets"),
                 "'{}': entry '{}' lacks dtype, shape or data_offsets", path, name);
      LOOM_CHECK(v["dtype"].is_string(), "'{}': tensor '{}': key 'dtype' must be a string, found {}",
                 path, name, v["dtype"].dump());
      LOOM_CHECK(v["shape"].is_array(), "'{}': tensor '{}': key 'shape' must be an array, found {}",
                 path, name, v["shape"].dump());
      const auto& off = v["data_offsets"];
      LOOM_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
                     off[1].is_number_unsigned(),
                 "'{}': tensor '{}': key 'data_offsets' must be [begin, end], found {}", path, name,
                 off.dump());
      TensorInfo info;
      try {
        info.dtype = dtype_from_name(v["dtype"].get<std::string>());
      } catch (const Error& e) {
        LOOM_FAIL("'{}': tensor '{}': {}", path, name, e.what());
      }
      uint64_t expect = dtype_size(info.dtype);
      for (auto& d : v["shape"]) {
        LOOM_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= (uint64_t(1) << 40),
                   "'{}': tensor '{}': shape entry {} must be an integer in [0, 2^40]", path, name,
                   d.dump());
        info.shape.push_back(d.get<int64_t>());
        LOOM_CHECK(d.get<uint64_t>() == 0 || expect <= data_size / d.get<uint64_t>() + 1,
                   "'{}': tensor '{}': shape {} is larger than the file's {} data bytes", path,
                   name, v["shape"].dump(), data_size);
        expect *= d.get<uint64_t>();
      }
      info.begin = off[0].get<uint64_t>();
      info.end = off[1].get<uint64_t>();
      LOOM_CHECK(info.begin <= info.end && info.end <= data_size,
                 "'{}': tensor '{}' spans bytes [{}, {}) but the data section has {} bytes "
                 "(truncated file?)", path, name, info.begin, info.end, data_size);
      LOOM_CHECK(info.end - info.begin == expect,
                 "'{}': tensor '{}' has {} bytes but dtype {} and shape {} need {}", path, name,
                 info.end - info.begin, dtype_name(info.dtype), shape_str(info.shape), expect);
      tensors_[name] = info;
    }
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  LOOM_CHECK(it != tensors_.end(), "'{}' has no tensor named '{}'", path_, name);
  return it->second;
}

void SafetensorsFile::read(const std::string& name, DType dtype, const Shape& shape,
                           void* dst) const {
  const TensorInfo& i = info(name);
  LOOM_CHECK(i.dtype == dtype && i.shape == shape,
             "'{}': tensor '{}' is {} {} but this model expects {} {}", path_, name,
             dtype_name(i.dtype), shape_str(i.shape), dtype_name(dtype), shape_str(shape));
  detail::pread_exact(fd_, dst, size_t(i.end - i.begin), data_start_ + i.begin, path_);
}

void SafetensorsFile::read_range(const std::string& name, DType dtype, int64_t first,
                                 int64_t count, void* dst) const {
  const TensorInfo& i = info(name);
  LOOM_CHECK(i.dtype == dtype, "'{}': tensor '{}' is {} but {} was requested", path_, name,
             dtype_name(i.dtype), dtype_name(dtype));
  int64_t n = shape_numel(i.shape);
  LOOM_CHECK(first >= 0 && count >= 0 && first + count <= n,
             "'{}': range [{}, {}) outside tensor '{}' of {} elements", path_, first,
             first + count, name, n);
  size_t es = dtype_size(dtype);
  detail::pread_exact(fd_, dst, size_t(count) * es, data_start_ + i.begin + uint64_t(first) * es, path_);
}

}  // namespace loom::checkpoint
