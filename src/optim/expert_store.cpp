// optim/expert_store.cpp: the ECSS host store (see expert_store.h for the update rule).
#include "optim/expert_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/adamw.h"

namespace loom::optim {

EcssMode ecss_mode_from_name(const std::string& name) {
  if (name == "off") return EcssMode::off;
  if (name == "dense") return EcssMode::dense;
  if (name == "lazy") return EcssMode::lazy;
  LOOM_FAIL("ecss = '{}' is not an ECSS mode; use off, dense (every expert updated as plain "
            "AdamW) or lazy (only experts that received tokens)",
            name);
}

const char* ecss_mode_name(EcssMode m) {
  switch (m) {
    case EcssMode::off: return "off";
    case EcssMode::dense: return "dense";
    case EcssMode::lazy: return "lazy";
  }
  return "?";
}

ExpertStore::ExpertStore(std::vector<ParamSpec> specs, std::vector<ExpertPiece> pieces,
                         std::vector<int64_t> layers, int64_t experts, const AdamWConfig& cfg,
                         EcssMode mode, const std::string& path)
    : specs_(std::move(specs)), pieces_(std::move(pieces)), cfg_(cfg), mode_(mode), path_(path) {
  LOOM_CHECK(mode != EcssMode::off, "ExpertStore: ecss is off");
  int64_t prev = 0, longest = 0;
  for (const ExpertPiece& p : pieces_) {
    LOOM_CHECK(prev <= p.begin && p.begin <= p.end,
               "ECSS expert piece [{}, {}) of block {} expert {} is out of order", p.begin, p.end,
               p.layer, p.expert);
    prev = p.end;
    ranges_.push_back({p.begin, p.end});
    size_ += p.end - p.begin;
    longest = std::max(longest, p.end - p.begin);
  }
  for (int64_t l : layers) steps_[l].assign(size_t(experts), 0);
  staging_.resize(size_t(longest));
  // master, m, v: 3 x size floats, zero-filled (fresh anonymous pages and a truncated file both
  // read as zeros).
  map_bytes_ = size_t(std::max<int64_t>(1, 3 * size_)) * sizeof(float);
  int flags = MAP_SHARED;
  if (!path_.empty()) {
    // O_EXCL: the store is scratch, unlinked at the end; an existing file at this name is a
    // user's (or another run's) and is never truncated or removed.
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0644);
    LOOM_CHECK(fd_ >= 0 || errno != EEXIST,
               "the ECSS store file '{}' already exists; loom creates (and removes) it and will "
               "not overwrite a file: choose another parallel.ecss_store, or remove it if it is "
               "left from a crashed run",
               path_);
    LOOM_CHECK(fd_ >= 0,
               "cannot create the ECSS store file '{}' ({}): set parallel.ecss_store to a file in "
               "a writable directory with {} bytes free, or leave it unset for anonymous host "
               "memory",
               path_, std::strerror(errno), map_bytes_);
    if (::ftruncate(fd_, off_t(map_bytes_)) != 0) {
      const int err = errno;
      ::close(fd_);
      ::unlink(path_.c_str());
      LOOM_FAIL("cannot size the ECSS store file '{}' to {} bytes ({}): free space there, or "
                "leave parallel.ecss_store unset for anonymous host memory",
                path_, map_bytes_, std::strerror(err));
    }
  } else {
    flags = MAP_PRIVATE | MAP_ANONYMOUS;
  }
  map_ = ::mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, flags, fd_, 0);
  if (map_ == MAP_FAILED) {
    const int err = errno;
    map_ = nullptr;
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(path_.c_str());
    }
    LOOM_FAIL("cannot map {} bytes for the ECSS expert store{} ({})", map_bytes_,
              path_.empty() ? std::string() : " file '" + path_ + "'", std::strerror(err));
  }
  master_ = static_cast<float*>(map_);
  m_ = master_ + size_;
  v_ = m_ + size_;
}

ExpertStore::~ExpertStore() {
  if (map_) ::munmap(map_, map_bytes_);
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(path_.c_str());  // scratch: the checkpoint holds the state
  }
}

void ExpertStore::load_masters(const float* weights) {
  int64_t packed = 0;
  for (const ExpertPiece& p : pieces_) {
    std::memcpy(master_ + packed, weights + p.begin, size_t(p.end - p.begin) * sizeof(float));
    packed += p.end - p.begin;
  }
}

void ExpertStore::save_masters(float* weights) const {
  int64_t packed = 0;
  for (const ExpertPiece& p : pieces_) {
    std::memcpy(weights + p.begin, master_ + packed, size_t(p.end - p.begin) * sizeof(float));
    packed += p.end - p.begin;
  }
}

int64_t ExpertStore::expert_steps(int64_t layer, int64_t expert) const {
  auto it = steps_.find(layer);
  LOOM_CHECK(it != steps_.end() && expert >= 0 && expert < int64_t(it->second.size()),
             "ECSS store: no expert {} in block {}", expert, layer);
  return it->second[size_t(expert)];
}

void ExpertStore::set_expert_steps(int64_t layer, int64_t expert, int64_t n) {
  auto it = steps_.find(layer);
  LOOM_CHECK(it != steps_.end() && expert >= 0 && expert < int64_t(it->second.size()),
             "ECSS store: no expert {} in block {}", expert, layer);
  LOOM_CHECK(n >= 0, "ECSS store: expert step count {} must be >= 0", n);
  it->second[size_t(expert)] = n;
}

void ExpertStore::set_all_expert_steps(int64_t n) {
  for (auto& [l, v] : steps_) std::fill(v.begin(), v.end(), n);
}

void ExpertStore::step(const ToPool& to_pool, const float* grads, float grad_scale, int64_t step,
                       const std::function<bool(int64_t, int64_t)>& touched) {
  LOOM_CHECK(step >= 1, "ECSS store step {} must be >= 1", step);
  last_ = EcssTransfers{};
  const bool lazy = mode_ == EcssMode::lazy;
  // Update counts first (once per expert, whatever number of pieces it has here).
  std::map<int64_t, std::vector<char>> update;
  for (auto& [l, counts] : steps_) {
    std::vector<char>& u = update[l];
    u.resize(counts.size());
    for (size_t e = 0; e < counts.size(); ++e) {
      u[e] = !lazy || touched(l, int64_t(e));
      if (u[e]) counts[e] = lazy ? counts[e] + 1 : step;
    }
  }
  const float lr = lr_at(cfg_, step);
  int64_t packed = 0;
  for (const ExpertPiece& p : pieces_) {
    const int64_t n = p.end - p.begin, at = packed;
    packed += n;
    if (n == 0 || !update.at(p.layer)[size_t(p.expert)]) continue;
    const int64_t k = steps_.at(p.layer)[size_t(p.expert)];
    // pool -> store: the piece's gradient.
    std::memcpy(staging_.data(), grads + p.begin, size_t(n) * sizeof(float));
    last_.to_store_bytes += n * int64_t(sizeof(float));
    for (const ParamSpec& s : specs_) {
      const int64_t lo = std::max(s.offset, p.begin), hi = std::min(s.offset + s.numel, p.end);
      if (lo >= hi || !s.trainable) continue;
      const int64_t q = at + (lo - p.begin);
      kernels::adamw_step(master_ + q, staging_.data() + (lo - p.begin), m_ + q, v_ + q, hi - lo,
                          lr, cfg_.beta1, cfg_.beta2, cfg_.eps,
                          s.weight_decay ? cfg_.weight_decay : 0.f, k, grad_scale);
    }
    // store -> pool: the updated compute copy.
    last_.to_pool_bytes += to_pool(p.begin, p.end, master_ + at);
    last_.pieces_updated += 1;
    last_.elements_updated += n;
  }
}

}  // namespace loom::optim
