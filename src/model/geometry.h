// model/geometry.h: the geometry of the part of the model one (virtual) pipeline stage holds, as
// a value: its tensors, their shapes and tp slices, where each lives in the stage's own flat
// buffer, and the units that tile that buffer. Computed from (ModelConfig, StageSpan, TpShard)
// without allocating anything, so the executor (model/stage.h), ZeRO (train/zero.h), the memory
// model and the planner all read the same numbers. The whole model is the one-stage case.
//
// Glossary: L blocks, C d_model, V vocab, pp pipeline stages, VS virtual stages per rank, unit a
// contiguous range of the stage's flat buffer that ZeRO shards and gathers as one piece and that
// data parallelism reduces as one bucket contribution.
//
// Units, in buffer order: the token embedding (on the embedding stage, or the head stage's tied
// copy), the position embedding (embedding stage), one per block, and the head (final norm and
// the query layer).
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace loom::model {

// The part of the model one (virtual) stage holds.
struct StageSpan {
  int64_t first_layer = 0;  // blocks [first_layer, last_layer)
  int64_t last_layer = 0;
  bool has_embedding = false;  // token + position embedding (the first virtual stage)
  bool has_head = false;       // final norm, query layer, tied head + loss (the last one)
  bool operator==(const StageSpan&) const = default;
};

// The whole model as one stage.
StageSpan whole_model_span(const ModelConfig& cfg);

// Splits the L blocks into `n_stages` spans in order. `stage_layers` (size n_stages, each >= 1,
// summing to L) gives uneven splits; empty means an even split, which needs n_stages | L.
// Throws loom::Error naming the bad entry and the valid values.
std::vector<StageSpan> split_stages(const ModelConfig& cfg, int64_t n_stages,
                                    const std::vector<int64_t>& stage_layers = {});

struct UnitRange {
  int64_t begin = 0, end = 0;  // [begin, end) of the flat buffer
};

// ZeRO arithmetic over a data-parallel group of D ranks, in one place: the engine
// (train/executor.cpp, train/zero.cpp) shards with it and the memory model (model/memory.h)
// prices it.
// ZeRO-1: dp rank r's equal share of an n-element buffer: ceil(n/D) elements from r*ceil(n/D),
// clipped to n (the last shares may be short or empty).
UnitRange zero1_share(int64_t n, int D, int r);
// ZeRO-2/3: a unit is cut into D pieces of stride n_u = ceil(len/D) (the unit's reduce-scatter
// and all-gather buffers hold D*n_u elements); rank r owns [begin + r*n_u, begin + (r+1)*n_u)
// clipped to the unit.
int64_t zero_piece_stride(const UnitRange& unit, int D);
UnitRange zero_piece(const UnitRange& unit, int D, int r);

// ZeRO-1 of one stage's buffer: the ranges [begin, end) (ascending) whose AdamW state dp rank r
// of D keeps and updates. Without expert parallelism (geo.ep().size == 1) that is
// zero1_share(total, D, r). Under ep the experts differ between ep ranks, so the dense elements
// are still rank r's share of the buffer (minus the expert ranges), while each expert range is
// split over the De ranks holding the same experts: rank re of them keeps zero1_share(len, De,
// re) of it.
class StageGeometry;
std::vector<UnitRange> zero1_ranges(const StageGeometry& geo, int D, int r, int De, int re);
// The dense part alone (zero1_share(total, D, r) minus the expert ranges), and one expert
// range's share: what train::Executor broadcasts over dp and over the same-experts group.
std::vector<UnitRange> zero1_dense_ranges(const StageGeometry& geo, int D, int r);

// ECSS (optim/expert_store.h): `owned` (ascending ranges of a stage's buffer whose optimizer
// state this rank keeps) split into what stays with AdamW in the pool (`dense`: owned minus
// every expert's tensors) and one piece per held expert overlapping it (layer, global expert,
// [begin, end) = owned intersected with that expert's tensors), ascending. The engine builds its
// optimizer and store from it and the memory model prices the optimizer from it.
struct EcssSplit {
  struct Piece {
    int64_t layer, expert, begin, end;
  };
  std::vector<UnitRange> dense;
  std::vector<Piece> experts;
};
EcssSplit ecss_split(const StageGeometry& geo, const std::vector<UnitRange>& owned);

// ECSS in bf16 (train/executor.h): the experts' f32 masters live in the host store only, so the
// stage's f32 weight buffer has a hole at every held expert's weight matrix (up.weight,
// down.weight). The experts' biases keep an f32 copy in the pool: the bias adds run in f32 from
// the f32 values (as without ECSS), and they are (Fe + C) of the expert's 2 Fe C + Fe + C
// elements. Ascending; empty for a stage without experts.
std::vector<UnitRange> ecss_master_holes(const StageGeometry& geo);

// ZeRO-1 under ECSS: the expert pieces whose masters rank q of the S ranks sharing the stage's
// experts keeps in its store, ascending (the expert part of zero1_ranges: under ep each expert
// range's share, otherwise the experts within zero1_share(total, S, q)), cut per expert.
std::vector<UnitRange> zero1_expert_pieces(const StageGeometry& geo, int S, int q);

// A buffer of `total` elements stored without `holes` (ascending, disjoint): the elements
// outside them, packed in order. Maps an element to its packed position.
class HoleyLayout {
 public:
  struct Kept {
    int64_t begin, end, packed;  // [begin, end) of the full buffer, stored from `packed`
  };
  HoleyLayout(int64_t total, std::vector<UnitRange> holes);
  int64_t total() const { return total_; }
  int64_t size() const { return size_; }  // packed elements
  const std::vector<UnitRange>& holes() const { return holes_; }
  const std::vector<Kept>& kept() const { return kept_; }
  // Packed position of element x (LOOM_ASSERTs it is outside every hole).
  int64_t at(int64_t x) const;
  bool in_hole(int64_t x) const;

 private:
  int64_t total_, size_ = 0;
  std::vector<UnitRange> holes_;
  std::vector<Kept> kept_;
};

// One parameter tensor of a stage: its global spec (name, shape, offset in this tp rank's
// ParamLayout, init, decay) and where it lives in the stage's own flat buffer.
struct StageParam {
  ParamSpec global;
  int64_t local_offset = 0;
  // True for the last stage's copy of embed.token.weight when another stage holds the
  // embedding: its gradient is summed across the two, and it is counted once in norms and
  // checkpoints (the first stage's copy is the one that counts).
  bool tied_copy = false;
  // An expert's tensor of a sparse block (moe.experts.e.*): split over ep (each ep rank holds
  // its experts' tensors whole), so its gradient reduces over the ranks holding the same experts.
  bool expert = false;
};

class StageGeometry {
 public:
  // Throws loom::Error for a span outside [0, L), or an embedding / head on a span that does not
  // start at 0 / end at L; ParamLayout's errors for a tp size the model does not admit.
  // `ep` (size > 1): expert parallel; the stage holds only ep rank ep.rank's experts of each
  // sparse block (EpShard), so the global ranges it holds have a hole per sparse block. Throws
  // naming the valid sizes unless ep.size divides the experts.
  StageGeometry(const ModelConfig& cfg, const StageSpan& span, TpShard tp = {}, EpShard ep = {});
  // The same on a given layout of the whole model, ParamLayout(cfg, its tp shard), which stages
  // may share (laying out a large model is the costly part; the memory model builds thousands).
  StageGeometry(const ModelConfig& cfg, const StageSpan& span,
                std::shared_ptr<const ParamLayout> layout, EpShard ep = {});

  const ModelConfig& config() const { return cfg_; }
  const StageSpan& span() const { return span_; }
  // This tp rank's layout of the whole model (the "global" offsets below).
  const ParamLayout& global() const { return *global_; }
  const std::vector<StageParam>& params() const { return params_; }
  // The tensors as specs of the stage's own buffer (offset = local offset).
  std::vector<ParamSpec> local_specs() const;
  const StageParam& find(const std::string& name) const;  // throws naming the span
  int64_t total() const { return total_; }                // elements of the stage's buffer
  // The ascending ranges [begin, end) of the global flat buffer this stage holds.
  std::vector<std::pair<int64_t, int64_t>> held_ranges() const;
  const std::vector<UnitRange>& units() const { return units_; }
  const EpShard& ep() const { return ep_; }
  // Local ranges [begin, end) of the expert tensors of each sparse block held (ascending, one per
  // sparse block): under ep, what reduces over the ranks holding the same experts.
  const std::vector<UnitRange>& expert_ranges() const { return expert_ranges_; }
  // Unit indices (-1 where not held) and local offsets (-1 where not held).
  int token_unit() const { return u_tok_; }
  int position_unit() const { return u_pos_; }
  int first_block_unit() const { return u_block0_; }
  int head_unit() const { return u_head_; }
  int64_t token_embedding() const { return tok_; }     // (V/tp, C)
  int64_t position_embedding() const { return pos_; }  // (S, C)
  int64_t final_norm_w() const { return fnw_; }
  int64_t final_norm_b() const { return fnb_; }
  int64_t query_position() const { return qpos_; }
  const BlockOffsets& query_block() const { return qblock_; }
  // Local offsets of block first_layer + i.
  const std::vector<BlockOffsets>& blocks() const { return blocks_; }

  // Local offset of a global offset the stage holds (LOOM_ASSERTs it is held).
  int64_t local(int64_t global_offset) const;
  // Initial values of elements [begin, end) of the stage's buffer into dst: each tensor by its
  // global name and logical offsets, so every layout initialises the same logical weights.
  void init_range(float* dst, int64_t begin, int64_t end, uint64_t seed) const;
  // Between a full buffer in global() layout and a buffer in this stage's layout. to_global
  // skips the tied copy unless `include_tied_copy`.
  void to_local(const float* global_buffer, float* local_buffer) const;
  void to_global(const float* local_buffer, float* global_buffer, bool include_tied_copy) const;

 private:
  struct Segment {
    int64_t global_begin, global_end, local_begin;
  };
  ModelConfig cfg_;
  StageSpan span_;
  std::shared_ptr<const ParamLayout> global_;
  std::vector<Segment> segments_;  // ascending global ranges held, packed in order
  std::vector<StageParam> params_;
  int64_t total_ = 0;
  int64_t tok_ = -1, pos_ = -1, fnw_ = -1, fnb_ = -1, qpos_ = -1;
  std::vector<BlockOffsets> blocks_;
  BlockOffsets qblock_{};
  std::vector<UnitRange> units_;
  EpShard ep_;
  std::vector<UnitRange> expert_ranges_;
  int u_tok_ = -1, u_pos_ = -1, u_block0_ = 0, u_head_ = -1;
};

}  // namespace loom::model
