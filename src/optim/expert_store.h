// optim/expert_store.h: PanGu-Σ's Expert Computation and Storage Separation (ECSS) host store.
//
// With ECSS on (parallel.ecss = "dense" | "lazy", docs/moe.md) the experts' compute copies stay
// in the working pool (the stage's flat weight buffer), while their f32 master weights and AdamW
// moments m, v live here: in host memory outside the MemoryPool (anonymous mmap) or, with
// parallel.ecss_store, in a memory-mapped file. The chunk's optim::AdamW then manages only the
// dense ranges of the buffer.
//
// One step (ExpertStore::step): for every expert piece to update, its gradient is copied from
// the pool into the store (pool -> store bytes), the master and moments are updated there with
// the same AdamW kernel plain AdamW uses, and the master is copied back to the pool's compute
// copy (store -> pool bytes). Both byte counts are reported per step. In f32 the compute copy is
// the pool's f32 buffer; in bf16 the pool holds no f32 copy of the experts' weight
// matrices, only their bf16 copies (GptStage's expert_masters_outside).
//
// The update rule (exact; docs/moe.md "ECSS"):
// - dense: every expert piece is updated every step exactly as optim::AdamW would (global step
//   t for the bias correction, lr_at(t), decoupled weight decay lr_t * wd on decayed tensors),
//   so ECSS dense and ECSS off give bit-identical parameters.
// - lazy: expert e of sparse block l is updated at step t iff at least one token of the global
//   batch was routed to it during step t's forwards (its summed load over every micro-batch and
//   every rank of the gradient-reduction group is > 0). Each expert keeps its own update count
//   k_e (the steps in which it got tokens): an updated expert has k_e += 1 and takes the AdamW
//   update with bias corrections 1 - beta^k_e, the schedule's lr_t of the global step t, and
//   weight decay lr_t * wd. An expert without tokens keeps its master, m, v and k_e unchanged
//   (no moment decay, no weight decay) and nothing is transferred for it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/param_spec.h"
#include "optim/optimizer.h"

namespace loom::optim {

enum class EcssMode { off, dense, lazy };
// "off" | "dense" | "lazy"; throws naming the value and the modes.
EcssMode ecss_mode_from_name(const std::string& name);
const char* ecss_mode_name(EcssMode m);

// A contiguous part of one expert's tensors in a chunk's flat buffer (the whole expert, or
// under ZeRO-1 this rank's share of it).
struct ExpertPiece {
  int64_t layer = 0;   // model block index
  int64_t expert = 0;  // global expert index in [0, E)
  int64_t begin = 0, end = 0;
};

// Bytes moved between the store and the working pool during the last step.
struct EcssTransfers {
  int64_t to_store_bytes = 0;   // gradients pool -> store (4 B per element of updated pieces)
  // updated masters store -> pool compute copy: 4 B per element, or with the experts' f32
  // masters outside the pool (bf16) 2 B per element of their weight matrices' bf16 copies
  // (4 B on the emulated path, whose copies are rounded f32)
  int64_t to_pool_bytes = 0;
  int64_t pieces_updated = 0;   // expert pieces updated
  int64_t elements_updated = 0;
};

class ExpertStore {
 public:
  // specs: the chunk buffer's tensors (offset = position in the buffer; weight decay and
  // trainability per tensor). pieces: ascending, disjoint. layers: the chunk's sparse blocks
  // (their model indices), each with `experts` global experts (step counts are kept for all of
  // them, held or not, so every rank agrees). path empty: anonymous host memory; else that file
  // is created (truncated) and mapped; throws naming the path and the fix if it cannot be.
  ExpertStore(std::vector<ParamSpec> specs, std::vector<ExpertPiece> pieces,
              std::vector<int64_t> layers, int64_t experts, const AdamWConfig& cfg,
              EcssMode mode, const std::string& path);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Copies every piece of `weights` (a buffer in the chunk's layout) into the masters (after
  // init, import or load), and back.
  void load_masters(const float* weights);
  void save_masters(float* weights) const;
  // store -> pool: writes an updated piece [begin, end) (its f32 masters `master`) to the pool's
  // compute copy and returns the bytes written (GptStage::write_compute).
  using ToPool = std::function<int64_t(int64_t begin, int64_t end, const float* master)>;
  // One update at global step `step` (1-based; the executor's). grads is the chunk's flat
  // gradient buffer; grad_scale the clipping factor. touched(layer, expert): whether that
  // expert got tokens this step (read in lazy mode only).
  void step(const ToPool& to_pool, const float* grads, float grad_scale, int64_t step,
            const std::function<bool(int64_t, int64_t)>& touched);

  EcssMode mode() const { return mode_; }
  const std::vector<ExpertPiece>& pieces() const { return pieces_; }
  // The pieces as ranges (ascending), and each piece's position in the packed arrays.
  const std::vector<Range>& ranges() const { return ranges_; }
  int64_t size() const { return size_; }  // elements held (every piece)
  float* master() const { return master_; }
  float* m() const { return m_; }
  float* v() const { return v_; }
  int64_t host_bytes() const { return 3 * size_ * int64_t(sizeof(float)); }
  const std::string& path() const { return path_; }

  // Update count k_e of an expert (dense: the global step); set on resume.
  int64_t expert_steps(int64_t layer, int64_t expert) const;
  void set_expert_steps(int64_t layer, int64_t expert, int64_t n);
  // Every count reset to n (resume from a checkpoint without per-expert counts).
  void set_all_expert_steps(int64_t n);
  const std::map<int64_t, std::vector<int64_t>>& all_expert_steps() const { return steps_; }

  const EcssTransfers& last_step() const { return last_; }

 private:
  std::vector<ParamSpec> specs_;
  std::vector<ExpertPiece> pieces_;
  std::vector<Range> ranges_;
  AdamWConfig cfg_;
  EcssMode mode_;
  std::string path_;
  int64_t size_ = 0;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  int fd_ = -1;
  float *master_ = nullptr, *m_ = nullptr, *v_ = nullptr;
  std::map<int64_t, std::vector<int64_t>> steps_;  // layer -> (E) update counts
  std::vector<float> staging_;                       // one piece's gradient, in the store
  EcssTransfers last_;
};

}  // namespace loom::optim
