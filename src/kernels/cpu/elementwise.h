// kernels/cpu/elementwise.h: bias add / bias gradient / in-place add and scale (f32, OpenMP).
//
// Glossary: rows = number of rows (e.g. B*T), n = row length (e.g. C).
// All buffers are dense row-major f32; outputs may not alias inputs unless stated.
// Deterministic and independent of the thread count: bias_backward gives each thread whole
// columns and sums rows in order.
#pragma once

#include <cstdint>

namespace loom::kernels {

void bias_add_rows(float* y, const float* bias, int64_t rows, int64_t n);    // y(rows,n) += bias(n)
void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t n);  // dbias(n) += colsum(dy)
void add_inplace(float* y, const float* x, int64_t n);                       // y += x
void scale_inplace(float* y, float s, int64_t n);                            // y *= s
// The index of the first largest element of x (n) that is above -inf, NaN ignored; -1 when
// there is none. What `for i: if (x[i] > best) best = x[i], arg = i` from best = -inf gives
// (greedy decoding's choice), vectorised. One thread; n < 2^31.
int64_t argmax_first(const float* x, int64_t n);

}  // namespace loom::kernels
