// Single-precision GEMM, the engine behind pointwise convolution, the linear layer and im2col
// convolution. No BLAS: a cache-blocked, packed GEMM with a register-tiled inner kernel.
#pragma once
#include <cstdint>
#include <functional>

namespace mbnet {

// C[M, N] = A[M, K] * B[K, N]  (or C += A * B when accumulate is true).
// A's element (i, k) is A[i * rsa + k * csa]; B's element (k, j) is B[k * rsb + j * csb], so a
// transposed operand is only a swap of its strides. C is row-major with leading dimension ldc.
// Threads: OpenMP inside, over blocks of C. Call it from outside any parallel region.
void sgemm(std::int64_t M, std::int64_t N, std::int64_t K,
           const float* A, std::int64_t rsa, std::int64_t csa,
           const float* B, std::int64_t rsb, std::int64_t csb,
           float* C, std::int64_t ldc, bool accumulate);

// sgemm on the calling thread alone, whatever the OpenMP state (C is left as it is unless M, N
// and K are all >= 1): for callers that split the work themselves (the inference plan). Each element of C is summed in the same order as sgemm
// without a K split, whatever part of C a call covers.
void sgemm_single_thread(std::int64_t M, std::int64_t N, std::int64_t K,
                         const float* A, std::int64_t rsa, std::int64_t csa,
                         const float* B, std::int64_t rsb, std::int64_t csb,
                         float* C, std::int64_t ldc, bool accumulate);

// Called as epilogue(row, rows, column, columns) on each block of C once it is final.
using GemmEpilogue = std::function<void(std::int64_t, std::int64_t, std::int64_t, std::int64_t)>;

// sgemm (C = A * B, no accumulate) that hands every block of C to `epilogue` (rows and columns
// of C) once it is final, while it is still in cache. Threads split C's columns, or its rows on
// the blocks of kStatsRows rows of a larger matrix whose row row0 is C's first: each element of C
// is summed in the same order as sgemm without a K split, and per column the rows of such a
// block reach the epilogue in order, from one thread (what ChannelStats needs).
void sgemm_epilogue(std::int64_t M, std::int64_t N, std::int64_t K,
                    const float* A, std::int64_t rsa, std::int64_t csa,
                    const float* B, std::int64_t rsb, std::int64_t csb,
                    float* C, std::int64_t ldc, std::int64_t row0, const GemmEpilogue& epilogue);

}  // namespace mbnet
