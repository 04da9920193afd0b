// train/zero.h: ZeRO stages 2 and 3 over the data-parallel group, as a model::ParamStore.
//
// Glossary: P dp size, r this rank's dp index, unit u = [begin, end) of the flat buffer (the
// whole model's: the embeddings, one block, the head (model/gpt.h); or one pipeline chunk's
// (model/stage.h)), n_u = ceil(len_u / P), piece(u, r) = elements
// [begin + r*n_u, begin + (r+1)*n_u) clipped to the unit. Each rank owns piece(u, r) of every
// unit: its AdamW moments, its gradient accumulator and (stage 3) its master weights, packed in
// unit order ("packed" buffers, shard_size() floats).
//
// Stage 2 (optimizer state and gradients sharded): full f32 weights on every rank. During each
// micro-batch's backward, as soon as unit u's gradient is complete, a non-blocking
// reduce-scatter of the (P*n_u, zero-padded) unit gradient starts; the oldest is retired (waited,
// its result, the sum over dp of this rank's piece, added to the accumulator, and the unit buffer
// freed) whenever more than two are pending, and the rest at finish_micro_batch(). After the step
// each rank's updated pieces are all-gathered into the full weights.
// Stage 3 (also weights): only the pieces persist; weights(u) all-gathers the unit just in time
// (before its forward, again before its backward) and release(u) frees it.
// Memory (measured by the pool): optimizer 8*shard bytes; grads 4*shard persistent plus the
// unit buffers being filled or pending (at most two pending between calls, three inside
// grads_done), freed at points the step defines, never when MPI happens to finish; weights
// 4*total (stage 2) or 4*shard plus the gathered units live (stage 3). bf16 mode adds a bf16
// copy of the full weights (stage 2) or of each gathered unit. model/memory.h replays exactly
// this.
//
// Determinism: fixed unit order and a deterministic reduce-scatter, so two runs are
// bit-identical. Summation order differs from dp all-reduce (ZeRO-0/1) by rounding only.
//
// Expert parallelism (`ep`, train::Executor): the ranks of dp hold different experts, so the
// store shards over the ranks holding the same experts (`dp` is then the ep_dp group, dp/ep x
// cp ranks) and every rank's space holds the dense tensors plus its own experts. A unit's dense
// ranges (everything outside ZeroSpace::experts) are replicated over all of dp: their gradient is
// first summed over the ep group (in place, blocking, before the unit's reduce-scatter), which
// with the reduce-scatter over ep_dp sums it over dp x cp; the expert ranges reduce over ep_dp
// only, as they must. Each ep rank then holds and updates the same dense pieces (replicated ep
// times: ZeRO under ep shards dense state over dp/ep x cp ranks, not dp x cp, the price of one
// uniform unit split; experts are sharded over all ranks that hold them). Dense elements count
// in the gradient norm on ep rank 0 only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "model/stage.h"
#include "model/geometry.h"
#include "model/params.h"
#include "optim/optimizer.h"

namespace loom::train {

// The flat parameter buffer a ZeroStore shards: its tensors and its units.
struct ZeroSpace {
  std::vector<model::ParamSpec> specs;  // ParamSpec::offset = position in this buffer
  std::vector<bool> counted;            // per spec: counts in the gradient norm (a pipeline
                                        // head's copy of the tied embedding does not)
  std::vector<model::UnitRange> units;  // tile [0, total) in order
  int64_t total = 0;
  // Expert ranges (ascending, disjoint; model::StageGeometry::expert_ranges): under ep they are
  // this rank's experts, everything else is dense (see "Expert parallelism" above).
  std::vector<model::UnitRange> experts;
  // Writes the initial values of elements [begin, end) of the buffer into dst.
  std::function<void(float* dst, int64_t begin, int64_t end, uint64_t seed)> init;
};
// The buffer of one stage (the whole model is the one-stage case): its tensors (the head's tied
// copy not counted in norms) and units, initialised as the stage would be.
ZeroSpace stage_zero_space(std::shared_ptr<const model::StageGeometry> geometry);

class ZeroStore final : public model::ParamStore {
 public:
  // `tp` (optional): the model is tensor parallel; the space then holds this tp rank's shards
  // (ParamLayout with TpShard): the store sums the replicated tensors' gradients over tp before
  // each unit's reduce-scatter, and counts them once (on tp rank 0) in the gradient norm.
  // `ep` (optional, size > 1): expert parallel; `dp` must then be the group of ranks holding the
  // same experts (ep_dp), see "Expert parallelism" above.
  ZeroStore(int stage, ZeroSpace space, model::Precision precision, MemoryPool& pool,
            const comm::ProcessGroup& dp, const comm::ProcessGroup* tp = nullptr,
            const comm::ProcessGroup* ep = nullptr);

  // ParamStore
  const float* weights(int u) override;
  const bf16* weights_lp(int u) override;
  void release(int u) override;
  float* grads(int u) override;
  void grads_done(int u) override;

  int stage() const { return stage_; }
  const ZeroSpace& space() const { return space_; }
  // This rank's pieces, ascending (the optimizer's ranges), and their packed size.
  const std::vector<optim::Range>& pieces() const { return pieces_; }
  int64_t shard_size() const { return shard_; }
  // Where unit u's piece starts in packed buffers.
  int64_t packed_offset(int u) const { return packed_off_[size_t(u)]; }

  void init(uint64_t seed);
  // Weights from a full buffer of the space (stage 3 keeps its pieces).
  void import_full(const float* full);
  // Step lifecycle: zero_grads() before the first micro-batch; finish_micro_batch() after each
  // forward_backward (waits for its reduce-scatters and accumulates them; a pipeline may call
  // it once after all its micro-batches); then grad_sum_squares() (collective) and step().
  void zero_grads();
  void finish_micro_batch();
  double grad_sum_squares() const;
  // This rank's part of it, without collectives: counted tensors of its pieces (replicated
  // ones on tp rank 0 only; under ep dense ones on ep rank 0 only). Summed over dp (all of it,
  // not ep_dp) and tp it is the whole sum.
  double local_grad_sum_squares() const;
  // The packed gradient accumulator (shard_size()), e.g. to sum a tied tensor's pieces.
  float* packed_grads() const { return gshard_.data<float>(); }
  void step(optim::AdamW& opt, float grad_scale);
  // The whole flat buffer (this tp rank's layout) from every dp rank's packed pieces
  // (collective over dp; everyone receives it).
  std::vector<float> gather_packed(const float* packed) const;
  std::vector<float> full_weights() const;
  // The f32 weights this rank holds, for checkpoints: stage 2 the whole buffer (indexed like the
  // space), stage 3 its pieces packed (indexed like pieces()). After writing them, call
  // weights_loaded() (refreshes stage 2's bf16 copy).
  float* weights_buffer() { return stage_ == 2 ? wfull_.data<float>() : wshard_.data<float>(); }
  const float* weights_buffer() const {
    return stage_ == 2 ? wfull_.data<float>() : wshard_.data<float>();
  }
  void weights_loaded();

 private:
  struct Live {
    Tensor w;       // stage 3: gathered unit (P*n_u) f32
    Tensor wl;      // stage 3, bf16: its bf16 copy (len_u)
    int refs = 0;
    Tensor g;       // this micro-batch's unit gradient (P*n_u), until grads_done
  };
  struct Pending {
    comm::Work work;
    int unit;
    Tensor in;   // (P*n_u) the unit gradient being reduced, freed when this entry retires
    Tensor out;  // (n_u) this rank's reduced piece
  };
  static constexpr int kMaxInFlight = 2;  // unit reduce-scatters pending at once
  int64_t piece_len(size_t u) const { return pieces_[u].end - pieces_[u].begin; }
  void accumulate(const Pending& p);  // adds a finished reduce-scatter into the accumulator
  // All-gathers unit u from the packed pieces into `out` (P*n_u floats).
  void gather_unit(size_t u, const float* packed, float* out) const;

  int stage_;
  ZeroSpace space_;
  bool bf_;
  MemoryPool& pool_;
  comm::ProcessGroup dp_, tp_, ep_;
  // Under ep: the dense ranges of [begin, end) (complement of space_.experts), in place summed
  // over ep.
  void sum_dense_over_ep(float* g, int64_t begin, int64_t end) const;
  std::vector<int64_t> n_;          // per unit: piece stride n_u
  std::vector<optim::Range> pieces_;
  std::vector<int64_t> packed_off_;  // per unit: offset of its piece in packed buffers
  int64_t shard_ = 0;
  Tensor wfull_, wfull_lp_;  // stage 2
  Tensor wshard_;            // stage 3 (packed)
  Tensor gshard_;            // packed gradient accumulator
  std::vector<Live> live_;
  std::vector<Pending> pending_;
};

}  // namespace loom::train
