// Single-precision GEMM, the engine behind pointwise convolution, the linear layer and im2col
// convolution. No BLAS: a cache-blocked, packed GEMM with a register-tiled inner kernel.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <new>

namespace mbnet {

// C[M, N] = A[M, K] * B[K, N]  (or C += A * B when accumulate is true).
// A's element (i, k) is A[i * rsa + k * csa]; B's element (k, j) is B[k * rsb + j * csb], so a
// transposed operand is only a swap of its strides. C is row-major with leading dimension ldc.
// Threads: OpenMP inside, over blocks of C, or, when K is long against C, over chunks of K fixed
// by the shape (partial products added in order): C does not depend on the thread count. Call
// it from outside any parallel region.
void sgemm(std::int64_t M, std::int64_t N, std::int64_t K,
           const float* A, std::int64_t rsa, std::int64_t csa,
           const float* B, std::int64_t rsb, std::int64_t csb,
           float* C, std::int64_t ldc, bool accumulate);

// 64-byte aligned floats (the GEMM's packed operands), left uninitialized: sgemm allocates its
// packing buffers on every call, where common.h's Floats (a std::vector) would zero them first.
// gemm.h does not include common.h (pybind11), so the alignment is spelled here too.
struct AlignedDelete {
    void operator()(float* p) const { ::operator delete(p, std::align_val_t(64)); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedDelete>;
AlignedFloats aligned_floats(std::int64_t n);

// B (K x N) packed once, for a B that many products share (the inference plan's weights): the
// layout sgemm packs each block of B into per call, KC-deep slices of `panel`-wide column panels
// (k-major within a panel, the last one zero-padded). panel is the register tile's width, or a
// narrower tile's when N is so small that the full width would be mostly padding (N = 8 or 16 on
// AVX-512): the product then does a fraction of the work, each element summed the same way.
struct PackedB {
    std::int64_t K = 0, N = 0;
    int panel = 0;
    AlignedFloats data;
    PackedB() = default;
    PackedB(std::int64_t K, std::int64_t N, const float* B, std::int64_t rsb, std::int64_t csb);
};

// Called as epilogue(row, rows, column, columns) on each block of C once it is final.
using GemmEpilogue = std::function<void(std::int64_t, std::int64_t, std::int64_t, std::int64_t)>;

// Floats of scratch sgemm_packed_b needs for an A of M x K: callers allocate it once.
std::int64_t sgemm_packed_b_scratch(std::int64_t M, std::int64_t K);

// Columns [n0, n1) of C = A * B (or C += A * B) on the calling thread alone, B packed: sgemm's
// blocking and microkernel without packing B. n0 must be a multiple of B.panel; C points at
// column n0; a_scratch holds sgemm_packed_b_scratch(M, B.K) floats. Each element of C is summed in
// the same order as sgemm without a K split, whatever columns or rows a call covers. C is left as
// it is unless M, n1 - n0 and K are all >= 1. With an epilogue, each block of C is handed to it
// once final, while it is still in cache, as (*epilogue)(row of A, rows, column of B, columns):
// every element of [0, M) x [n0, n1) exactly once (the inference plan's bias and act). With koff,
// A is gathered: A(i, k) = A[i * rsa + koff[k]] (csa unused; a convolution's taps read in place of
// an im2col copy), each element of C summed as for the same A copied out.
void sgemm_packed_b(std::int64_t M, std::int64_t n0, std::int64_t n1,
                    const float* A, std::int64_t rsa, std::int64_t csa, const PackedB& B,
                    float* C, std::int64_t ldc, bool accumulate, float* a_scratch,
                    const GemmEpilogue* epilogue = nullptr, const std::int64_t* koff = nullptr);

struct ATransform;  // common.h: BatchNorm's apply + act on A's elements as A is packed

// sgemm (C = A * B, no accumulate) that hands every block of C to `epilogue` (rows and columns
// of C) once it is final, while it is still in cache. Threads split C's columns, or its rows on
// the blocks of kStatsRows rows of a larger matrix whose row row0 is C's first: each element of C
// is summed in the same order as sgemm without a K split, and per column the rows of such a
// block reach the epilogue in order, from one thread (what ChannelStats needs). An empty epilogue
// is not called; without one, a long K is cut into chunks as in sgemm. With a transform,
// C = transform(A) * B. C does not depend on the thread count.
void sgemm_epilogue(std::int64_t M, std::int64_t N, std::int64_t K,
                    const float* A, std::int64_t rsa, std::int64_t csa,
                    const float* B, std::int64_t rsb, std::int64_t csb,
                    float* C, std::int64_t ldc, std::int64_t row0, const GemmEpilogue& epilogue,
                    const ATransform* transform = nullptr);

}  // namespace mbnet
