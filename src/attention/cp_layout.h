// attention/cp_layout.h: how a sequence of T tokens is split over the G ranks of a cp group.
//
// Glossary: T global sequence length, G cp group size (ranks r = 0..G-1, the group rank), Tl = T/G
// tokens per rank, c = T/(2G) zigzag chunk length, B batch, "row" one token's elements of a
// (B, T, row) buffer.
//
// Layouts (rank r holds Tl = T/G rows, in increasing global position):
//   contiguous  rows [r*Tl, (r+1)*Tl)                       (no causal balance; for reference)
//   zigzag      chunks r and 2G-1-r of the 2G chunks of c   (Megatron / ring-flash-attn / Burst)
//   striped     positions t with t mod G == r               (Striped Attention)
// Under causal masking zigzag and striped give every rank the same amount of work.
//
// Contract: every function checks T and G first and throws loom::Error naming T, G and the
// divisor that would work (T % G for contiguous/striped, T % 2G for zigzag). The caller owns every
// buffer; gather/scatter overwrite exactly the rows they name and nothing else.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace loom::attention {

enum class CpLayout : uint8_t { contiguous, zigzag, striped };
std::string_view cp_layout_name(CpLayout l);  // "contiguous", "zigzag", "striped"
// Parses the names above; throws loom::Error listing them otherwise.
CpLayout cp_layout_from_name(std::string_view name);

// Throws loom::Error unless G >= 1 and T splits over G ranks in layout `l`
// ("cp=3 with zigzag needs T divisible by 2*cp=6, got T=100; use T=96 or T=102").
void check_cp_layout(CpLayout l, int64_t T, int G);

// A run of a rank's local rows whose global positions are pos_start + i*pos_stride
// (i = 0..len-1) and which sit at local rows local_start + i.
struct CpSegment {
  int64_t local_start, len, pos_start, pos_stride;
};
// Rank r's rows as segments: 1 for contiguous and striped (stride G), 2 for zigzag.
std::vector<CpSegment> cp_segments(CpLayout l, int64_t T, int G, int r);

// Global position of rank r's local row i (0 <= i < T/G).
int64_t cp_global_position(CpLayout l, int64_t T, int G, int r, int64_t i);
// Position ids of rank r's T/G local rows, for the position embedding / RoPE.  (Tl)
std::vector<int64_t> cp_position_ids(CpLayout l, int64_t T, int G, int r);

// full (outer, T, inner) -> local (outer, T/G, inner): rank r's rows, elem_size bytes per
// element (any dtype). For q/k/v (B, T, NH*HD) use outer = B, inner = NH*HD; for lse (B, NH, T)
// use outer = B*NH, inner = 1.
void cp_scatter_rows(void* local, const void* full, int64_t outer, int64_t inner,
                     size_t elem_size, CpLayout l, int64_t T, int G, int r);
// local (outer, T/G, inner) of rank r -> its rows of full (outer, T, inner). Calling it for every
// rank's local buffer (e.g. after an all_gather) rebuilds the full sequence.
void cp_gather_rows(void* full, const void* local, int64_t outer, int64_t inner,
                    size_t elem_size, CpLayout l, int64_t T, int G, int r);

// Next-token inputs and targets for rank r from the global token sequence tokens (B, T+1):
// inputs[b, i] = tokens[b, p] and targets[b, i] = tokens[b, p+1] with p the global position of
// local row i. The target of a chunk's last token is the first token of the next chunk, even
// when that chunk lives on another rank. inputs, targets (B, T/G); either may be null.
void cp_next_token_split(int32_t* inputs, int32_t* targets, const int32_t* tokens, int64_t B,
                         CpLayout l, int64_t T, int G, int r);

}  // namespace loom::attention
