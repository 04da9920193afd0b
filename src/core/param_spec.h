// core/param_spec.h: one named parameter tensor's place in a flat f32 buffer, and its tensor-
// parallel slice of the logical tensor. Below the model so that optim/ and checkpoint/ can walk
// parameters without knowing the model (model/params.h builds them).
//
// Glossary: tp tensor-parallel size; a "logical" tensor is the unsharded one a checkpoint names.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace loom {

// rre_uniform: a frozen routing table (model/moe.h) of expert indices in [0, G), drawn uniformly
// per element from the seed (G = the model's experts per domain).
enum class InitKind { normal, normal_residual, zeros, ones, rre_uniform };

// Tensor parallelism (Megatron-style) splits some tensors over the tp ranks: this rank holds
// the slice [shard_start, shard_start + shape[shard_dim]) of dimension shard_dim of the logical
// tensor `global_shape`. shard_dim = -1: the tensor is replicated (whole on every tp rank).
struct TpShard {
  int rank = 0;
  int size = 1;
};

// Expert parallelism (Megatron / DeepSpeed): the E experts of every sparse (MoE) block are split
// over `size` ep ranks; rank r holds experts [r*E/size, (r+1)*E/size), whole tensors (the
// checkpoint names each expert's tensors, so an ep split is a subset of the logical tensors).
struct EpShard {
  int rank = 0;
  int size = 1;
};

struct ParamSpec {
  std::string name;
  Shape shape;         // this rank's (local) shape
  int64_t offset = 0;  // elements into the flat buffer
  int64_t numel = 0;
  InitKind init = InitKind::normal;
  bool weight_decay = false;  // AdamW decay only on matrices (ndim >= 2), never biases or norms
  // False for buffers that live among the parameters but are not learned (the rre routing
  // tables, model/moe.h): their gradient stays exactly 0, optimizers skip them, checkpoints
  // save them like weights.
  bool trainable = true;
  Shape global_shape;         // the logical tensor (the checkpoint's shape)
  int shard_dim = -1;         // -1 replicated, 0 rows, 1 columns
  int64_t shard_start = 0;    // first index along shard_dim held here
  bool replicated() const { return shard_dim < 0; }
};

// Calls f(local, global, len) for the maximal runs of elements [lo, hi) (local element indices
// within the spec) that are contiguous both here and in the logical tensor: one run for
// replicated and row-sharded tensors, one per row for column-sharded ones.
template <class F>
void for_each_global_run(const ParamSpec& s, int64_t lo, int64_t hi, F&& f) {
  if (s.shard_dim < 0) {
    f(lo, lo, hi - lo);
    return;
  }
  const int64_t gcols = s.global_shape.size() > 1 ? s.global_shape[1] : 1;
  if (s.shard_dim == 0) {
    f(lo, s.shard_start * gcols + lo, hi - lo);
    return;
  }
  const int64_t lcols = s.shape[1];
  for (int64_t i = lo; i < hi;) {
    const int64_t row = i / lcols, col = i % lcols, len = std::min(hi - i, lcols - col);
    f(i, row * gcols + s.shard_start + col, len);
    i += len;
  }
}

}  // namespace loom
