// kernels/cpu/embedding.h: token + position embedding lookup and its gradient (f32, OpenMP).
//
// Glossary: B batch, T sequence, C model width, V vocabulary size, pos_offset the position of the
// first token (non-zero during incremental decoding or for a context-parallel shard).
// Shapes: tokens (B,T) int32; wte, dwte (V,C); wpe, dwpe, table, dtable (P,C) with
//   P >= pos_offset + T (the caller's responsibility: P is not passed); out, dout (B,T,C).
//
// embedding_forward:  out[b,t] = wte[tokens[b,t]] + wpe[pos_offset + t].
// embedding_backward: dwte[tokens[b,t]] += dout[b,t]; dwpe[pos_offset + t] += sum_b dout[b,t]
//                     (dwpe may be null). ACCUMULATES.
// position_forward / position_backward: the same for a position table alone (query layer).
// Failure: every token id is checked before anything is written; an id outside [0, V) throws
// loom::Error naming the id, its (b, t) position and V, and leaves the outputs untouched.
// pos_offset < 0 is an error too.
// Deterministic and independent of the thread count: the backward scatter gives each thread
// whole column blocks of C and visits tokens in (b, t) order, so no two threads touch one
// element and no atomics are used.
#pragma once

#include <cstdint>

namespace loom::kernels {

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, int64_t pos_offset);
void position_forward(float* out, const float* table, int64_t B, int64_t T, int64_t C,
                      int64_t pos_offset);
void position_backward(float* dtable, const float* dout, int64_t B, int64_t T, int64_t C,
                       int64_t pos_offset);

// Throws loom::Error if any of the n ids is outside [0, V) (the first such id, with its index
// written as (b, t) for row length T). Exposed for callers that validate a batch once.
void check_token_ids(const int32_t* tokens, int64_t B, int64_t T, int64_t V);

}  // namespace loom::kernels
