// Single-precision GEMM (packed, cache-blocked, register-tiled) and the ops built on it: matmul,
// pointwise convolution and the linear layer, forward and backward.
//
// Layout of the computation (Goto/BLIS): for each NC-wide column block of C and each KC-deep slice
// of K, B's block is packed into NR-column panels (k-major within a panel, zero-padded to NR);
// for each MC-high row block, A's block is packed into MR-row panels (zero-padded to MR) unless A
// is row-major, which the microkernel reads in place (and B likewise in a weight gradient's depth
// chunks, when A is packed and B row-major); then the microkernel computes one MR x NR
// tile of C per (A panel, B panel) pair, keeping the tile in registers for the whole KC loop (a
// short last A panel on a tile of fewer rows). Packing reads through arbitrary strides, so
// transposed operands cost nothing extra. Threads split C's rows or columns, or, when K is long
// against C, K in chunks fixed by the shape (partial products added in order): C does not depend
// on the thread count. A B shared by many products (the inference
// plan's weights) can be packed once (PackedB) and multiplied by sgemm_packed_b. sgemm_epilogue
// hands each block of C to a callback once final (the BatchNorm statistics of pwconv2d_fwd_stats
// and conv2d_fwd_stats).
#include "gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "common.h"
#include "kernels.h"

namespace mbnet {
namespace {

// Register tile: MR x NR accumulators, MR * NR / lanes vector registers, plus NR / lanes B vectors
// and one broadcast, within the register file (32 zmm; 16 ymm). AVX2 uses 4 x 24, not the classic
// 6 x 16: GCC 12 vectorizes a two-vector-wide j loop across k with permutes and spills.
#if defined(__AVX512F__)
constexpr int MR = 8, NR = 32;
// NR = 32 is two zmm wide; make sure GCC uses zmm whatever the tuning's preferred width (GCC 12
// tunes -march=native on Zen 4/5 as znver3).
#define MBNET_KERNEL_TARGET __attribute__((target("prefer-vector-width=512")))
#elif defined(__AVX2__)
constexpr int MR = 4, NR = 24;
#else
constexpr int MR = 4, NR = 8;
#endif
// The narrow tile of a PackedB whose N would be mostly padding at NR: one vector wide.
#if defined(__AVX512F__)
constexpr int NR_NARROW = 16;
#elif defined(__AVX2__)
constexpr int NR_NARROW = 8;
#else
constexpr int NR_NARROW = 4;
#endif
#ifndef MBNET_KERNEL_TARGET
#define MBNET_KERNEL_TARGET
#endif
// Cache blocks: a KC x NR panel of B (32 KB for AVX-512) stays in L1, an MC x KC block of A
// (128 KB) in L2, the KC x NC block of B in L2/L3.
constexpr index_t KC = 256;
constexpr index_t MC = 16 * MR;
constexpr index_t NC = 64 * NR;

// C[0:mr, 0:nr] (+)= sum_k A(i, k) * b[k*kNR + j] over a kc x kNR panel b of B, mr <= kMR.
// Written for GCC's vectorizer: i is unrolled, the j loop is left to the loop vectorizer, which
// turns acc into kMR x kNR/lanes registers fed by kNR/lanes loads of b and one broadcast of a[i].
// Unrolling j by pragma instead makes GCC 12 vectorize across k with permutes: 30% slower.
// kPackedA: a is a packed panel, a[k*MR + i]; otherwise a points into row-major A, a[i*lda + k].
// kNR: NR, or NR_NARROW for a narrow PackedB; kMR: MR, or fewer rows for a short last panel (the
// same sums, on a smaller tile). For kNR = 16 GCC 12 unrolls j whole and then vectorizes without
// FMA (other sums, 3x slower) unless told not to unroll it; the full-width tile must not get that
// pragma (with it, the AVX2 4 x 24 tile's j loop stays a loop, acc lives on the stack, and the
// GEMM runs 3x slower). noinline keeps MBNET_KERNEL_TARGET's vector width wherever it is called.
// kPrefetchB: the call is the first to read its B panel (the first A panel of a block), which then
// comes from L2 or beyond (an inference plan's weights come from L3: each layer's are read once);
// it asks for B kPrefetchK steps ahead (__builtin_prefetch: a GCC builtin, no ISA intrinsic), the
// kNR columns of its panel, or prefetch_cols of them from the panel's first (B read in place: the
// whole row of the block, for the next panels too). The later calls find B in L1 or L2, where the
// prefetches would only take load slots. kInPlaceB: b is B itself, row k at b + k*ldb (a full
// panel of a row-major B); otherwise a packed panel, row k at b + k*kNR.
constexpr int kPrefetchK = 16;
// kGatherA: a row-major A whose column k is at a + koff[k] (a convolution's taps read in place,
// no im2col), A(i, k) = a[i*lda + koff[k]].
template <bool kPackedA, int kNR, int kMR = MR, bool kPrefetchB = false, bool kInPlaceB = false,
          bool kGatherA = false>
MBNET_KERNEL_TARGET __attribute__((noinline)) void micro_kernel(
    index_t kc, const float* __restrict__ a, index_t lda, const float* __restrict__ b,
    float* __restrict__ c, index_t ldc, int mr, int nr, bool add, index_t ldb = kNR,
    int prefetch_cols = kNR, const index_t* __restrict__ koff = nullptr) {
    const index_t step_b = kInPlaceB ? ldb : kNR;
    float acc[kMR][kNR];
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 64
        for (int j = 0; j < kNR; ++j) acc[i][j] = 0.f;
    for (index_t k = 0; k < kc; ++k, b += step_b) {
        if constexpr (kPrefetchB)
            for (int j = 0; j < (kInPlaceB ? prefetch_cols : kNR); j += 16)
                __builtin_prefetch(b + kPrefetchK * step_b + j);
#pragma GCC unroll 16
        for (int i = 0; i < kMR; ++i) {
            const float ai = kPackedA    ? a[k * MR + i]
                             : kGatherA ? a[i * lda + koff[k]]
                                        : a[i * lda + k];
            if constexpr (kNR == NR) {
                for (int j = 0; j < kNR; ++j) acc[i][j] += ai * b[j];
            } else {
#pragma GCC unroll 1
                for (int j = 0; j < kNR; ++j) acc[i][j] += ai * b[j];
            }
        }
    }
    if (mr == kMR && nr == kNR) {
        if (add) {
#pragma GCC unroll 16
            for (int i = 0; i < kMR; ++i)
                for (int j = 0; j < kNR; ++j) c[i * ldc + j] += acc[i][j];
        } else {
#pragma GCC unroll 16
            for (int i = 0; i < kMR; ++i)
                for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
        }
        return;
    }
    // Edge tile: only the mr x nr corner exists in C.
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) c[i * ldc + j] = (add ? c[i * ldc + j] : 0.f) + acc[i][j];
}

// micro_kernel on a packed panel of mr rows, with the fewest rows (MR, MR/2, ..., 2) that cover
// them: a short last panel (a 2x2 late layer, a batch-1 classifier) costs its rows' work, not MR's.
// Not 1: GCC 12 keeps a one-row tile's accumulators on the stack across the k loop (two rows
// stay in registers).
template <int kNR, bool kPrefetchB, bool kInPlaceB = false, int kMR = MR>
void packed_micro_kernel(index_t kc, const float* a, const float* b, float* c, index_t ldc, int mr,
                         int nr, bool add, index_t ldb = kNR, int prefetch_cols = kNR) {
    if constexpr (kMR > 2)
        if (mr <= kMR / 2)
            return packed_micro_kernel<kNR, kPrefetchB, kInPlaceB, kMR / 2>(kc, a, b, c, ldc, mr, nr,
                                                                           add, ldb, prefetch_cols);
    micro_kernel<true, kNR, kMR, kPrefetchB, kInPlaceB>(kc, a, 0, b, c, ldc, mr, nr, add, ldb,
                                                        prefetch_cols);
}

// The element transforms pack_a applies as it copies A(i, k) (i, k counted from the block's
// corner): none, or BatchNorm's apply + act (ATransform) with the channel on k or, per_row, on i.
// Templates, so that each of pack_a's loops vectorizes with its transform inlined.
struct NoTransform {
    float operator()(float v, index_t, index_t) const { return v; }
};
template <Act kAct, bool kPerRow>
struct BnTransform {
    const float *mean, *scale, *shift;  // at the block's first channel
    float operator()(float v, index_t i, index_t k) const {
        const index_t c = kPerRow ? i : k;
        return act<kAct>(preact(v, mean[c], scale[c], shift[c]));
    }
};

// Asks for rows [r0, r1) of a row-major A (csa == 1), the kc floats of each from column 0: the
// next panel's rows, while this one's are read (see kPrefetchFloats, common.h).
inline void prefetch_rows(const float* A, index_t rsa, index_t r0, index_t r1, index_t kc) {
    for (index_t i = r0; i < r1; ++i) prefetch_floats(A + i * rsa, kc);
}

// dst[p*kc*MR + k*MR + i] = f(A(p*MR + i, k), p*MR + i, k) for the mc x kc block at A, rows past
// mc zero (not transformed).
template <class F>
void pack_a(index_t mc, index_t kc, const float* A, index_t rsa, index_t csa,
            float* __restrict__ dst, const F& f) {
    for (index_t ir = 0; ir < mc; ir += MR, dst += kc * MR) {
        const float* a = A + ir * rsa;
        const index_t mr = std::min<index_t>(MR, mc - ir);
        if (csa == 1) prefetch_rows(A, rsa, std::min(mc, ir + MR), std::min(mc, ir + 2 * MR), kc);
        // Full panels k outer, i unrolled: one MR-wide store per k. (i outer, the stores MR apart,
        // made the transformed pack of a row-major A 2.5x slower.)
        if (mr == MR && rsa == 1) {
            for (index_t k = 0; k < kc; ++k)
#pragma GCC unroll 16
                for (int i = 0; i < MR; ++i) dst[k * MR + i] = f(a[k * csa + i], ir + i, k);
        } else if (mr == MR) {
            for (index_t k = 0; k < kc; ++k)
#pragma GCC unroll 16
                for (int i = 0; i < MR; ++i) dst[k * MR + i] = f(a[i * rsa + k * csa], ir + i, k);
        } else {
            for (index_t i = 0; i < mr; ++i)
                for (index_t k = 0; k < kc; ++k) dst[k * MR + i] = f(a[i * rsa + k * csa], ir + i, k);
            for (index_t i = mr; i < MR; ++i)
                for (index_t k = 0; k < kc; ++k) dst[k * MR + i] = 0.f;
        }
    }
}

// pack_a through the transform t when there is one (A's row 0 is row i0 of t's rows, column 0
// column k0 of its columns), in the same pass as the copy.
void pack_a(index_t mc, index_t kc, const float* A, index_t rsa, index_t csa, float* dst,
            const ATransform* t, index_t i0, index_t k0) {
    if (!t) return pack_a(mc, kc, A, rsa, csa, dst, NoTransform{});
    const index_t c0 = t->per_row ? i0 : k0;
    const float *mean = t->mean + c0, *scale = t->scale + c0, *shift = t->shift + c0;
    auto with = [&](auto f) { pack_a(mc, kc, A, rsa, csa, dst, f); };
    switch (t->act) {
        case Act::None:
            return t->per_row ? with(BnTransform<Act::None, true>{mean, scale, shift})
                              : with(BnTransform<Act::None, false>{mean, scale, shift});
        case Act::ReLU:
            return t->per_row ? with(BnTransform<Act::ReLU, true>{mean, scale, shift})
                              : with(BnTransform<Act::ReLU, false>{mean, scale, shift});
        case Act::ReLU6:
            return t->per_row ? with(BnTransform<Act::ReLU6, true>{mean, scale, shift})
                              : with(BnTransform<Act::ReLU6, false>{mean, scale, shift});
    }
}

// dst[p*kc*kNR + k*kNR + j] = B(k, p*kNR + j) for the kc x nc block at B, columns past nc zero.
template <int kNR>
void pack_b(index_t kc, index_t nc, const float* B, index_t rsb, index_t csb,
            float* __restrict__ dst) {
    for (index_t jr = 0; jr < nc; jr += kNR, dst += kc * kNR) {
        const float* b = B + jr * csb;
        const index_t nr = std::min<index_t>(kNR, nc - jr);
        if (nr == kNR && csb == 1) {
            for (index_t k = 0; k < kc; ++k)
#pragma GCC unroll 64
                for (int j = 0; j < kNR; ++j) dst[k * kNR + j] = b[k * rsb + j];
        } else {
            for (index_t j = 0; j < nr; ++j)
                for (index_t k = 0; k < kc; ++k) dst[k * kNR + j] = b[k * rsb + j * csb];
            for (index_t j = nr; j < kNR; ++j)
                for (index_t k = 0; k < kc; ++k) dst[k * kNR + j] = 0.f;
        }
    }
}

// pack_a of a gathered A (A(i, k) = A[i*rsa + koff[k]]), rows past mc zero.
void pack_a_gather(index_t mc, index_t kc, const float* A, index_t rsa, const index_t* koff,
                   float* __restrict__ dst) {
    for (index_t ir = 0; ir < mc; ir += MR, dst += kc * MR)
        for (index_t k = 0; k < kc; ++k)
            for (index_t i = 0; i < MR; ++i)
                dst[k * MR + i] = ir + i < mc ? A[(ir + i) * rsa + koff[k]] : 0.f;
}

// Floats of A's packing buffer for a GEMM of at most M x K (at most MC x KC).
inline index_t a_buffer_floats(index_t M, index_t K) {
    return std::min<index_t>(MC, (M + MR - 1) / MR * MR) * std::min<index_t>(KC, K);
}

// One thread's packing buffers for a GEMM of at most M x N x K (at most MC x KC and KC x NC),
// allocated before the parallel region.
struct PackBuffers {
    AlignedFloats a, b;
    PackBuffers(index_t M, index_t N, index_t K)
        : a(aligned_floats(a_buffer_floats(M, K))),
          b(aligned_floats(std::min<index_t>(KC, K) * std::min<index_t>(NC, (N + NR - 1) / NR * NR))) {}
};

// Columns of an nc-wide block that sgemm packs into NR-wide panels. The rest goes into
// NR_NARROW-wide panels when they pad it less (AVX2: 32 columns as 24 + 8, not 24 + 24, whose
// second panel would be two thirds zeros; AVX-512: 48 as 32 + 16).
inline index_t wide_columns(index_t nc) {
    const index_t rem = nc % NR;
    return rem > 0 && (rem + NR_NARROW - 1) / NR_NARROW * NR_NARROW < NR ? nc - rem : nc;
}

// Whether every panel sgemm_blocks makes of N columns (wide_columns' NR-wide ones, the rest's
// NR_NARROW-wide ones) is full: then a row-major B can be read in place, no panel reading past the
// end of a row.
inline bool full_panels(index_t N) {
    for (index_t jc = 0; jc < N; jc += NC) {
        const index_t nc = std::min(NC, N - jc), wide = wide_columns(nc);
        if (wide % NR != 0 || (nc - wide) % NR_NARROW != 0) return false;
    }
    return true;
}

// One thread's GEMM over its part of C, B's blocks in kNR-wide panels: for each NC x KC block,
// b_block(jc, nc, pc, kc) gives the packed block of columns [jc, jc + nc) and depth [pc, pc + kc)
// (packed there and then, or packed once beforehand), or with ldb > 0 the block's corner in B
// itself (row-major, rows ldb apart; full_panels(N), A packed); abuf holds a_buffer_floats(M, K).
// With an epilogue, each MC-high block of C is handed to it, as (*epilogue)(i_off + row, rows,
// j_off + column, columns), once final and still in cache. With a transform, A is transform(A)
// (its rows counted from i_off), always packed. Before each tile, the next row panel's tile of C
// is prefetched for writing: C comes from memory when K is short (a pointwise layer over a large
// map writes 16-32 MB), and its lines would otherwise arrive only when the tile is stored (Zen 4:
// the 32x32 and 16x16 layers' forward 1.2-1.3x faster, a training step 3% (AVX-512 build); the
// inference plan, whose C stays in cache, unchanged). kNarrowTail: b_block packs each block's
// columns past wide_columns(nc) into NR_NARROW-wide panels (sgemm's own packing; a PackedB's are
// all alike).
template <int kNR, bool kNarrowTail = false, class BlockOfB>
void sgemm_blocks(index_t M, index_t N, index_t K, const float* A, index_t rsa, index_t csa,
                  BlockOfB&& b_block, float* C, index_t ldc, bool accumulate, float* abuf,
                  const GemmEpilogue* epilogue = nullptr, index_t i_off = 0, index_t j_off = 0,
                  const ATransform* transform = nullptr, index_t ldb = 0,
                  const index_t* koff = nullptr) {
    // Row-major A is read in place by the microkernel (MR rows, unit stride along k): packing it
    // would cost as much as the multiply when N is small, and gains nothing measurable when large.
    // So is a gathered A (koff: column k at A + koff[k], csa unused).
    const bool direct_a = (csa == 1 || koff) && !transform;
    for (index_t jc = 0; jc < N; jc += NC) {
        const index_t nc = std::min(NC, N - jc);
        for (index_t pc = 0; pc < K; pc += KC) {
            const index_t kc = std::min(KC, K - pc);
            const bool add = accumulate || pc > 0;
            const float* bp = b_block(jc, nc, pc, kc);
            for (index_t ic = 0; ic < M; ic += MC) {
                const index_t mc = std::min(MC, M - ic);
                // Unpacked A: only a last, partial panel is packed (reading past row M is out
                // of bounds), to the start of abuf.
                const index_t packed_from = direct_a ? mc / MR * MR : 0;
                if (packed_from < mc && koff)
                    pack_a_gather(mc - packed_from, kc, A + (ic + packed_from) * rsa, rsa,
                                  koff + pc, abuf);
                else if (packed_from < mc)
                    pack_a(mc - packed_from, kc, A + (ic + packed_from) * rsa + pc * csa, rsa, csa,
                           abuf, transform, i_off + ic + packed_from, pc);
                // The panels of columns [j0, j1), each W wide.
                auto panels = [&](auto width, index_t j0, index_t j1) {
                    constexpr int kW = decltype(width)::value;
                    for (index_t jr = j0; jr < j1; jr += kW) {
                        const int nr = static_cast<int>(std::min<index_t>(kW, nc - jr));
                        for (index_t ir = 0; ir < mc; ir += MR) {
                            const int mr = static_cast<int>(std::min<index_t>(MR, mc - ir));
                            float* c = C + (ic + ir) * ldc + jc + jr;
                            const float* b = bp + jr * kc;
                            // The next row panel's tile of C, to be written: its lines come in
                            // while this tile computes (see sgemm_blocks' comment).
                            for (index_t i = ir + MR; i < std::min(mc, ir + 2 * MR); ++i)
                                prefetch_floats_for_write(c + (i - ir) * ldc, nr);
                            if (ir < packed_from && koff) {
                                micro_kernel<false, kW, MR, false, false, true>(
                                    kc, A + (ic + ir) * rsa, rsa, b, c, ldc, mr, nr, add, kW, kW,
                                    koff + pc);
                            } else if (ir < packed_from) {
                                const float* a = A + (ic + ir) * rsa + pc;
                                if (jr == 0)  // the first pass over A's block reads it from memory
                                    prefetch_rows(A + ic * rsa + pc, rsa, std::min(packed_from, ir + MR),
                                                  std::min(packed_from, ir + 2 * MR), kc);
                                if (ir == 0)
                                    micro_kernel<false, kW, MR, true>(kc, a, rsa, b, c, ldc, mr, nr, add);
                                else
                                    micro_kernel<false, kW>(kc, a, rsa, b, c, ldc, mr, nr, add);
                            } else if (ldb > 0) {  // B in place: see sgemm_serial
                                const float* a = abuf + (ir - packed_from) * kc;
                                const float* bb = bp + jr;
                                if (ir == 0 && jr == 0)
                                    packed_micro_kernel<kW, true, true>(kc, a, bb, c, ldc, mr, nr, add,
                                                                        ldb, int(std::min<index_t>(nc, 256)));
                                else
                                    packed_micro_kernel<kW, false, true>(kc, a, bb, c, ldc, mr, nr, add,
                                                                         ldb);
                            } else {
                                const float* a = abuf + (ir - packed_from) * kc;
                                if (ir == 0)
                                    packed_micro_kernel<kW, true>(kc, a, b, c, ldc, mr, nr, add);
                                else
                                    packed_micro_kernel<kW, false>(kc, a, b, c, ldc, mr, nr, add);
                            }
                        }
                    }
                };
                const index_t wide = kNarrowTail ? wide_columns(nc) : nc;
                panels(std::integral_constant<int, kNR>{}, 0, wide);
                if constexpr (kNarrowTail && kNR != NR_NARROW)
                    if (wide < nc) panels(std::integral_constant<int, NR_NARROW>{}, wide, nc);
                if (epilogue && pc + kc == K) (*epilogue)(i_off + ic, mc, j_off + jc, nc);
            }
        }
    }
}

// One thread's GEMM over its part of C, with its own packing buffers (epilogue: as sgemm_blocks).
// b_in_place: a row-major B may be read in place where A is packed and full_panels(N) (a depth
// chunk of a weight gradient: dy, read by the few row panels of a short A; packing it cost 10-20%
// of the 32x32 and 16x16 layers' weight gradients on Zen 4).
void sgemm_serial(index_t M, index_t N, index_t K, const float* A, index_t rsa, index_t csa,
                  const float* B, index_t rsb, index_t csb, float* C, index_t ldc,
                  bool accumulate, PackBuffers& buf, const GemmEpilogue* epilogue = nullptr,
                  index_t i_off = 0, index_t j_off = 0, const ATransform* transform = nullptr,
                  bool b_in_place = false) {
    if (b_in_place && csb == 1 && (csa != 1 || transform) && full_panels(N)) {
        auto in_place = [&](index_t jc, index_t, index_t pc, index_t) { return B + pc * rsb + jc; };
        return sgemm_blocks<NR, true>(M, N, K, A, rsa, csa, in_place, C, ldc, accumulate,
                                      buf.a.get(), epilogue, i_off, j_off, transform, rsb);
    }
    float* bbuf = buf.b.get();
    auto pack = [&](index_t jc, index_t nc, index_t pc, index_t kc) {
        const index_t wide = wide_columns(nc);
        const float* b = B + pc * rsb + jc * csb;
        pack_b<NR>(kc, wide, b, rsb, csb, bbuf);
        if (wide < nc) pack_b<NR_NARROW>(kc, nc - wide, b + wide * csb, rsb, csb, bbuf + wide * kc);
        return bbuf;
    };
    sgemm_blocks<NR, true>(M, N, K, A, rsa, csa, pack, C, ldc, accumulate, buf.a.get(), epilogue,
                           i_off, j_off, transform);
}

// Row i of C += row i of each of `parts` partial products (M x N each, one after the other), in
// their order.
inline void add_partials(index_t i, index_t M, index_t N, const float* partial, index_t parts,
                         float* C, index_t ldc) {
    float* __restrict__ c = C + i * ldc;
    for (index_t p = 0; p < parts; ++p) {
        const float* __restrict__ q = partial + p * M * N + i * N;
        for (index_t j = 0; j < N; ++j) c[j] += q[j];
    }
}

// [begin, end) of part t of n items split into `parts` pieces on multiples of `grain`.
inline void split_range(index_t n, index_t grain, int parts, int t, index_t& begin, index_t& end) {
    const index_t units = (n + grain - 1) / grain;
    begin = std::min(n, units * t / parts * grain);
    end = std::min(n, units * (t + 1) / parts * grain);
}

// Depth chunks of a product with a long K (a weight gradient over many pixels): K / kDepthRows
// of them, fewer if their partial products would pass kDepthFloats. On Zen 4 this made the
// pointwise weight gradients of a 32 px MobileNet at batch 128 1.0-1.3x faster (AVX2 build:
// 1.1-1.9x) than splitting C across the threads; 8192 or 16384 rows a chunk did no better.
constexpr index_t kDepthRows = 4096;
constexpr index_t kDepthFloats = index_t(1) << 22;

// 1 unless K is long against C's sides (K > 3 max(M, N): splitting C's rows or columns would make
// every thread pack at least 3x C's size of A or B, more than a partial product costs).
index_t depth_chunks(index_t M, index_t N, index_t K) {
    if (K <= 3 * std::max(M, N)) return 1;
    return std::max<index_t>(1, std::min(K / kDepthRows, kDepthFloats / (M * N)));
}

// C = transform(A) * B over `chunks` fixed ranges of K, each multiplied by one thread (its own
// packing, of its range of A and B only), then added in range order: the sums depend on the
// shape, never on the thread count.
void sgemm_depth_chunks(index_t M, index_t N, index_t K, index_t chunks, const float* A,
                        index_t rsa, index_t csa, const float* B, index_t rsb, index_t csb,
                        float* C, index_t ldc, bool accumulate, int threads,
                        const ATransform* transform = nullptr) {
    std::unique_ptr<float[]> partial(new float[(chunks - 1) * M * N]);  // chunk 0 goes to C
    std::vector<std::unique_ptr<PackBuffers>> bufs;
    for (int t = 0; t < threads; ++t)
        bufs.emplace_back(new PackBuffers(M, N, (K + chunks - 1) / chunks));
#pragma omp parallel num_threads(threads)
    {
        PackBuffers& buf = *bufs[omp_get_thread_num()];
#pragma omp for schedule(static)
        for (index_t c = 0; c < chunks; ++c) {
            const index_t k0 = K * c / chunks, k1 = K * (c + 1) / chunks;
            float* out = c == 0 ? C : partial.get() + (c - 1) * M * N;
            sgemm_serial(M, N, k1 - k0, A + k0 * csa, rsa, csa, B + k0 * rsb, rsb, csb, out,
                         c == 0 ? ldc : N, c == 0 && accumulate, buf, nullptr, 0, 0, transform, true);
        }
#pragma omp for schedule(static)
        for (index_t i = 0; i < M; ++i) add_partials(i, M, N, partial.get(), chunks - 1, C, ldc);
    }
}

}  // namespace

void sgemm(index_t M, index_t N, index_t K, const float* A, index_t rsa, index_t csa,
           const float* B, index_t rsb, index_t csb, float* C, index_t ldc, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
        return;
    }
    int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (static_cast<double>(M) * N * K < kParallelMinGemm) threads = 1;
    if (const index_t chunks = depth_chunks(M, N, K); chunks >= 2)
        return sgemm_depth_chunks(M, N, K, chunks, A, rsa, csa, B, rsb, csb, C, ldc, accumulate,
                                  threads);
    // Splitting rows makes every thread pack all of B (K*N extra copies), splitting columns all
    // of A (K*M): the cheaper, where there is a panel per thread. Either way each element of C is
    // summed as on one thread.
    bool by_rows = true;
    if (threads > 1) {
        const double inf = 1e300;
        const double rows = (M + MR - 1) / MR >= threads ? double(K) * N : inf;
        const double cols = (N + NR - 1) / NR >= threads ? double(K) * M : inf;
        if (std::min(rows, cols) == inf) threads = 1;
        else by_rows = rows <= cols;
    }
    if (threads == 1) {
        PackBuffers buf(M, N, K);
        sgemm_serial(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, buf);
        return;
    }
    std::vector<std::unique_ptr<PackBuffers>> bufs;
    for (int t = 0; t < threads; ++t) bufs.emplace_back(new PackBuffers(M, N, K));
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        PackBuffers& buf = *bufs[t];
        index_t b0, b1;
        if (by_rows) {
            split_range(M, MR, nt, t, b0, b1);
            if (b1 > b0)
                sgemm_serial(b1 - b0, N, K, A + b0 * rsa, rsa, csa, B, rsb, csb, C + b0 * ldc,
                             ldc, accumulate, buf);
        } else {
            split_range(N, NR, nt, t, b0, b1);
            if (b1 > b0)
                sgemm_serial(M, b1 - b0, K, A, rsa, csa, B + b0 * csb, rsb, csb, C + b0, ldc,
                             accumulate, buf);
        }
    }
}

AlignedFloats aligned_floats(index_t n) {
    return AlignedFloats(static_cast<float*>(
        ::operator new(sizeof(float) * std::max<index_t>(n, 1), std::align_val_t(64))));
}

PackedB::PackedB(index_t K_, index_t N_, const float* B, index_t rsb, index_t csb)
    : K(K_), N(N_) {
    const index_t wide = (N + NR - 1) / NR * NR, narrow = (N + NR_NARROW - 1) / NR_NARROW * NR_NARROW;
    panel = 2 * narrow <= wide ? NR_NARROW : NR;
    const index_t padded = panel == NR ? wide : narrow;
    data = aligned_floats(K * padded);
    // Slice pc holds rows [pc, pc + KC) of every panel: it starts at pc * padded.
    for (index_t pc = 0; pc < K; pc += KC) {
        const index_t kc = std::min(KC, K - pc);
        if (panel == NR) pack_b<NR>(kc, N, B + pc * rsb, rsb, csb, data.get() + pc * padded);
        else pack_b<NR_NARROW>(kc, N, B + pc * rsb, rsb, csb, data.get() + pc * padded);
    }
}

void sgemm_epilogue(index_t M, index_t N, index_t K, const float* A, index_t rsa, index_t csa,
                    const float* B, index_t rsb, index_t csb, float* C, index_t ldc, index_t row0,
                    const GemmEpilogue& epilogue, const ATransform* transform) {
    static_assert(kStatsRows % MC == 0, "a block of statistics rows holds whole MC blocks");
    if (M <= 0 || N <= 0 || K <= 0) return;
    const GemmEpilogue* ep = epilogue ? &epilogue : nullptr;
    int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (static_cast<double>(M) * N * K < kParallelMinGemm) threads = 1;
    // No epilogue and a long K: depth chunks. Splitting C instead makes every thread pack (and
    // transform) all of A or all of B, and splits a C of few columns unevenly (64 columns in
    // panels of 24 on AVX2: 24 and 40).
    if (const index_t chunks = ep ? 1 : depth_chunks(M, N, K); chunks >= 2)
        return sgemm_depth_chunks(M, N, K, chunks, A, rsa, csa, B, rsb, csb, C, ldc, false, threads,
                                  transform);
    // Threads split C's rows on the blocks of kStatsRows rows (counted from row0), or its columns:
    // rows make every thread pack all of B, columns read all of A.
    const index_t off = row0 % kStatsRows, blocks = (off + M + kStatsRows - 1) / kStatsRows;
    const index_t panels = (N + NR - 1) / NR;
    const bool by_rows = blocks >= threads && (panels < threads || N <= M);
    if (!by_rows && panels < threads) threads = 1;
    if (threads == 1) {
        PackBuffers buf(M, N, K);
        sgemm_serial(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, false, buf, ep, 0, 0, transform);
        return;
    }
    std::vector<std::unique_ptr<PackBuffers>> bufs;
    for (int t = 0; t < threads; ++t) bufs.emplace_back(new PackBuffers(M, N, K));
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        PackBuffers& buf = *bufs[t];
        if (by_rows) {
            const index_t b0 = std::max<index_t>(0, blocks * t / nt * kStatsRows - off);
            const index_t b1 = std::min<index_t>(M, blocks * (t + 1) / nt * kStatsRows - off);
            if (b1 > b0)
                sgemm_serial(b1 - b0, N, K, A + b0 * rsa, rsa, csa, B, rsb, csb, C + b0 * ldc, ldc,
                             false, buf, ep, b0, 0, transform);
        } else {
            index_t b0, b1;
            split_range(N, NR, nt, t, b0, b1);
            if (b1 > b0)
                sgemm_serial(M, b1 - b0, K, A, rsa, csa, B + b0 * csb, rsb, csb, C + b0, ldc, false,
                             buf, ep, 0, b0, transform);
        }
    }
}

index_t sgemm_packed_b_scratch(index_t M, index_t K) { return a_buffer_floats(M, K); }

void sgemm_packed_b(index_t M, index_t n0, index_t n1, const float* A, index_t rsa, index_t csa,
                    const PackedB& B, float* C, index_t ldc, bool accumulate, float* a_scratch,
                    const GemmEpilogue* epilogue, const index_t* koff) {
    if (M <= 0 || n1 <= n0 || B.K <= 0) return;
    const index_t padded = (B.N + B.panel - 1) / B.panel * B.panel;
    auto packed = [&](index_t jc, index_t nc, index_t pc, index_t kc) {
        return B.data.get() + pc * padded + (n0 + jc) * kc;
    };
    if (B.panel == NR)
        sgemm_blocks<NR>(M, n1 - n0, B.K, A, rsa, csa, packed, C, ldc, accumulate, a_scratch,
                         epilogue, 0, n0, nullptr, 0, koff);
    else
        sgemm_blocks<NR_NARROW>(M, n1 - n0, B.K, A, rsa, csa, packed, C, ldc, accumulate,
                                a_scratch, epilogue, 0, n0, nullptr, 0, koff);
}

// --- bindings -------------------------------------------------------------------------------

namespace {

// op(a) @ op(b): a (M, K) or, with trans_a, (K, M); b (K, N) or, with trans_b, (N, K).
py::array_t<float> matmul(const py::object& a_obj, const py::object& b_obj, bool trans_a,
                          bool trans_b) {
    F32 a = check_f32(a_obj, "a", 2), b = check_f32(b_obj, "b", 2);
    check_same_dim(a, trans_a ? 0 : 1, trans_a ? "a (transposed)" : "a", b, trans_b ? 1 : 0,
                   trans_b ? "b (transposed)" : "b");
    const index_t M = trans_a ? a[1] : a[0], K = trans_a ? a[0] : a[1];
    const index_t N = trans_b ? b[0] : b[1];
    return compute_f32({M, N}, [&](float* y) {
        sgemm(M, N, K, a.ptr, trans_a ? 1 : a[1], trans_a ? a[1] : 1, b.ptr, trans_b ? 1 : b[1],
              trans_b ? b[1] : 1, y, N, false);
    });
}

// x (n, h, w, ci), w (ci, co) -> y (n, h, w, co)
py::array_t<float> pwconv2d_fwd(const py::object& x_obj, const py::object& w_obj) {
    F32 x = check_f32(x_obj, "x", 4), w = check_f32(w_obj, "w", 2);
    check_same_dim(x, 3, "x", w, 0, "w");
    const index_t rows = x[0] * x[1] * x[2], ci = w[0], co = w[1];
    return compute_f32({x[0], x[1], x[2], co}, [&](float* y) {
        sgemm(rows, co, ci, x.ptr, ci, 1, w.ptr, co, 1, y, co, false);
    });
}

// pwconv2d_fwd, and the per-channel mean and biased variance of y (ChannelStats).
py::tuple pwconv2d_fwd_stats(const py::object& x_obj, const py::object& w_obj) {
    F32 x = check_f32(x_obj, "x", 4), w = check_f32(w_obj, "w", 2);
    check_same_dim(x, 3, "x", w, 0, "w");
    const index_t rows = x[0] * x[1] * x[2], ci = w[0], co = w[1];
    return compute_f32_stats({x[0], x[1], x[2], co}, kStatsRows, [&](float* y, ChannelStats& stats) {
        sgemm_epilogue(rows, co, ci, x.ptr, ci, 1, w.ptr, co, 1, y, co, 0,
                       [&](index_t i0, index_t mc, index_t j0, index_t nc) {
                           stats.add(i0, mc, j0, nc, y + i0 * co + j0, co);
                       });
    });
}

// dy (n, h, w, co), w (ci, co) -> dx (n, h, w, ci) = dy @ w.T
py::array_t<float> pwconv2d_bwd_input(const py::object& dy_obj, const py::object& w_obj) {
    F32 dy = check_f32(dy_obj, "dy", 4), w = check_f32(w_obj, "w", 2);
    check_same_dim(dy, 3, "dy", w, 1, "w");
    const index_t rows = dy[0] * dy[1] * dy[2], ci = w[0], co = w[1];
    return compute_f32({dy[0], dy[1], dy[2], ci}, [&](float* dx) {
        sgemm(rows, ci, co, dy.ptr, co, 1, w.ptr, 1, co, dx, ci, false);
    });
}

// dy (n, h, w, co), w (ci, co), x (n, h, w, ci) the input of a training BatchNorm + act whose
// output the convolution read -> (dx, dgamma, dbeta): dz = dy @ w.T, BatchNorm's two backward
// sums gathered from each block of dz as the GEMM finishes it (GradStats), then BatchNorm's apply
// in place (one pass over dz and x fewer than pwconv2d_bwd_input + batchnorm_act_train_bwd).
py::tuple pwconv2d_bwd_input_bn(const py::object& dy_obj, const py::object& w_obj, const py::object& x_obj,
                                const py::object& gamma, const py::object& beta, const py::object& mean,
                                const py::object& invstd, const std::string& act) {
    F32 dy = check_f32(dy_obj, "dy", 4), w = check_f32(w_obj, "w", 2), x = check_f32(x_obj, "x", 4);
    check_same_dim(dy, 3, "dy", w, 1, "w");
    check_same_dim(x, 3, "x", w, 0, "w");
    for (int d = 0; d < 3; ++d) check_same_dim(x, d, "x", dy, d, "dy");
    const BnActArgs bn(gamma, beta, mean, invstd, act, x);
    const index_t rows = dy[0] * dy[1] * dy[2], ci = w[0], co = w[1];
    return compute_bn_bwd(x.shape, bn, x, kStatsRows, [&](float* dx, GradStats& stats) {
        sgemm_epilogue(rows, ci, co, dy.ptr, co, 1, w.ptr, 1, co, dx, ci, 0,
                       [&](index_t i0, index_t mc, index_t j0, index_t nc) {
                           stats.add(i0, mc, j0, nc, dx + i0 * ci + j0, x.ptr + i0 * ci + j0, ci);
                       });
    });
}

// x (n, h, w, ci), dy (n, h, w, co) -> dw (ci, co) = x.T @ dy over the n*h*w rows
py::array_t<float> pwconv2d_bwd_weight(const py::object& x_obj, const py::object& dy_obj) {
    F32 x = check_f32(x_obj, "x", 4), dy = check_f32(dy_obj, "dy", 4);
    for (int d = 0; d < 3; ++d) check_same_dim(x, d, "x", dy, d, "dy");
    const index_t rows = x[0] * x[1] * x[2], ci = x[3], co = dy[3];
    return compute_f32({ci, co}, [&](float* dw) {
        sgemm(ci, co, rows, x.ptr, 1, ci, dy.ptr, co, 1, dw, co, false);
    });
}

// The checked arguments of pwconv2d_bn_act_fwd(_stats): x (n, h, w, ci), w (ci, co) and the
// BatchNorm + act applied to x as it is packed.
struct PwBnActArgs {
    F32 x, w;
    BnActArgs bn;
    ATransform t;
    index_t rows, ci, co;
    PwBnActArgs(const py::object& x_obj, const py::object& w_obj, const py::object& gamma,
                const py::object& beta, const py::object& mean, const py::object& invstd,
                const std::string& act)
        : x(check_f32(x_obj, "x", 4)), w(check_f32(w_obj, "w", 2)),
          bn((check_same_dim(x, 3, "x", w, 0, "w"), gamma), beta, mean, invstd, act, x),
          t(bn.transform(false)), rows(x[0] * x[1] * x[2]), ci(w[0]), co(w[1]) {}
};

// x (n, h, w, ci), w (ci, co) -> y (n, h, w, co) = z @ w, z = act(BN(x)) formed as x is packed.
py::array_t<float> pwconv2d_bn_act_fwd(const py::object& x_obj, const py::object& w_obj,
                                       const py::object& gamma, const py::object& beta,
                                       const py::object& mean, const py::object& invstd,
                                       const std::string& act) {
    const PwBnActArgs a(x_obj, w_obj, gamma, beta, mean, invstd, act);
    return compute_f32({a.x[0], a.x[1], a.x[2], a.co}, [&](float* y) {
        sgemm_epilogue(a.rows, a.co, a.ci, a.x.ptr, a.ci, 1, a.w.ptr, a.co, 1, y, a.co, 0, {}, &a.t);
    });
}

// pwconv2d_bn_act_fwd, and the per-channel mean and biased variance of y (ChannelStats).
py::tuple pwconv2d_bn_act_fwd_stats(const py::object& x_obj, const py::object& w_obj,
                                    const py::object& gamma, const py::object& beta,
                                    const py::object& mean, const py::object& invstd,
                                    const std::string& act) {
    const PwBnActArgs a(x_obj, w_obj, gamma, beta, mean, invstd, act);
    const index_t co = a.co;
    return compute_f32_stats({a.x[0], a.x[1], a.x[2], co}, kStatsRows, [&](float* y, ChannelStats& stats) {
        sgemm_epilogue(a.rows, co, a.ci, a.x.ptr, a.ci, 1, a.w.ptr, co, 1, y, co, 0,
                       [&](index_t i0, index_t mc, index_t j0, index_t nc) {
                           stats.add(i0, mc, j0, nc, y + i0 * co + j0, co);
                       }, &a.t);
    });
}

// x (n, h, w, ci), dy (n, h, w, co) -> dw (ci, co) = z.T @ dy over the n*h*w rows, z = act(BN(x))
// formed as x is packed. Threads split dw's rows or columns, or fixed chunks of the rows of x.
py::array_t<float> pwconv2d_bn_act_bwd_weight(const py::object& x_obj, const py::object& dy_obj,
                                              const py::object& gamma, const py::object& beta,
                                              const py::object& mean, const py::object& invstd,
                                              const std::string& act) {
    F32 x = check_f32(x_obj, "x", 4), dy = check_f32(dy_obj, "dy", 4);
    for (int d = 0; d < 3; ++d) check_same_dim(x, d, "x", dy, d, "dy");
    const BnActArgs bn(gamma, beta, mean, invstd, act, x);
    const ATransform t = bn.transform(true);
    const index_t rows = x[0] * x[1] * x[2], ci = x[3], co = dy[3];
    return compute_f32({ci, co}, [&](float* dw) {
        sgemm_epilogue(ci, co, rows, x.ptr, 1, ci, dy.ptr, co, 1, dw, co, 0, {}, &t);
    });
}

// x (n, din), w (din, dout), b (dout,) -> y (n, dout) = x @ w + b
py::array_t<float> linear_fwd(const py::object& x_obj, const py::object& w_obj,
                              const py::object& b_obj) {
    F32 x = check_f32(x_obj, "x", 2), w = check_f32(w_obj, "w", 2), b = check_f32(b_obj, "b", 1);
    check_same_dim(x, 1, "x", w, 0, "w");
    check_same_dim(b, 0, "b", w, 1, "w");
    const index_t n = x[0], din = x[1], dout = w[1];
    return compute_f32({n, dout}, [&](float* y) {
        for (index_t i = 0; i < n; ++i) std::memcpy(y + i * dout, b.ptr, sizeof(float) * dout);
        sgemm(n, dout, din, x.ptr, din, 1, w.ptr, dout, 1, y, dout, true);
    });
}

// x (n, din), w (din, dout), dy (n, dout) -> (dx (n, din), dw (din, dout), db (dout,))
py::tuple linear_bwd(const py::object& x_obj, const py::object& w_obj, const py::object& dy_obj) {
    F32 x = check_f32(x_obj, "x", 2), w = check_f32(w_obj, "w", 2);
    F32 dy = check_f32(dy_obj, "dy", 2);
    check_same_dim(x, 1, "x", w, 0, "w");
    check_same_dim(dy, 0, "dy", x, 0, "x");
    check_same_dim(dy, 1, "dy", w, 1, "w");
    const index_t n = x[0], din = x[1], dout = w[1];
    auto dx = new_f32({n, din}), dw = new_f32({din, dout}), db = new_f32({dout});
    float *dxp = ptr(dx), *dwp = ptr(dw), *dbp = ptr(db);
    {
        py::gil_scoped_release release;
        sgemm(n, din, dout, dy.ptr, dout, 1, w.ptr, 1, dout, dxp, din, false);
        sgemm(din, dout, n, x.ptr, 1, din, dy.ptr, dout, 1, dwp, dout, false);
        std::fill(dbp, dbp + dout, 0.f);
        for (index_t i = 0; i < n; ++i) {
            const float* __restrict__ g = dy.ptr + i * dout;
            for (index_t j = 0; j < dout; ++j) dbp[j] += g[j];
        }
    }
    return py::make_tuple(dx, dw, db);
}

// a (M, K) @ b[:, n0:n1] through PackedB(b) and sgemm_packed_b, and the panel width PackedB chose
// (tests hold it to matmul: the plan's GEMM).
py::tuple matmul_packed_b(const py::object& a_obj, const py::object& b_obj, index_t n0, index_t n1) {
    F32 a = check_f32(a_obj, "a", 2), b = check_f32(b_obj, "b", 2);
    check_same_dim(a, 1, "a", b, 0, "b");
    const index_t M = a[0], K = a[1], N = b[1];
    require(0 <= n0 && n0 < n1 && n1 <= N, "columns [n0, n1) must lie in [0, " +
                                               std::to_string(N) + "), got [" +
                                               std::to_string(n0) + ", " + std::to_string(n1) + ")");
    PackedB packed(K, N, b.ptr, N, 1);
    require(n0 % packed.panel == 0, "n0 must be a multiple of the panel width " +
                                        std::to_string(packed.panel) + ", got " + std::to_string(n0));
    auto y = compute_f32({M, n1 - n0}, [&](float* c) {
        AlignedFloats scratch = aligned_floats(sgemm_packed_b_scratch(M, K));
        sgemm_packed_b(M, n0, n1, a.ptr, K, 1, packed, c, n1 - n0, false, scratch.get());
    });
    return py::make_tuple(y, packed.panel);
}

// A(i, k) = src[i * rsa + koff[k]] (M rows) @ b through sgemm_packed_b's gathered A, the plan's
// stem reading its taps in place (tests hold it to _matmul_packed_b of the same A copied out).
py::array_t<float> matmul_packed_b_gather(const py::object& src_obj, index_t M, index_t rsa,
                                          const py::sequence& koff_obj,
                                          const py::object& b_obj) {
    F32 src = check_f32(src_obj, "src", 1), b = check_f32(b_obj, "b", 2);
    std::vector<index_t> koff;
    for (const auto& o : koff_obj) koff.push_back(py::cast<index_t>(o));
    const index_t K = b[0], N = b[1];
    require(index_t(koff.size()) == K, "koff must have one offset per row of b (" +
                                           std::to_string(K) + "), got " +
                                           std::to_string(koff.size()));
    require(M >= 1 && rsa >= 0, "M must be >= 1 and rsa >= 0");
    for (index_t o : koff)
        require(o >= 0 && (M - 1) * rsa + o < src.size(),
                "offset " + std::to_string(o) + " reads outside src");
    PackedB packed(K, N, b.ptr, N, 1);
    return compute_f32({M, N}, [&](float* c) {
        AlignedFloats scratch = aligned_floats(sgemm_packed_b_scratch(M, K));
        sgemm_packed_b(M, 0, N, src.ptr, rsa, 1, packed, c, N, false, scratch.get(), nullptr,
                       koff.data());
    });
}

}  // namespace

void bind_gemm(py::module_& m) {
    m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false,
          py::arg("trans_b") = false,
          "op(a) @ op(b) for 2-D float32 a, b; op transposes when trans_a / trans_b is set.");
    m.def("pwconv2d_fwd", &pwconv2d_fwd, py::arg("x"), py::arg("w"),
          "Pointwise convolution: x (N, H, W, Cin), w (Cin, Cout) -> (N, H, W, Cout).");
    m.def("pwconv2d_fwd_stats", &pwconv2d_fwd_stats, py::arg("x"), py::arg("w"),
          "x (N, H, W, Cin), w (Cin, Cout) -> (y (N, H, W, Cout), mean (Cout,), var (Cout,)):\n"
          "pwconv2d_fwd and y's per-channel mean and biased variance over N, H, W, summed as each\n"
          "tile of y is computed (for batchnorm_act_train_fwd_from_stats).");
    m.def("pwconv2d_bwd_input", &pwconv2d_bwd_input, py::arg("dy"), py::arg("w"),
          "dy (N, H, W, Cout), w (Cin, Cout) -> dx (N, H, W, Cin) = dy @ w.T.");
    m.def("pwconv2d_bwd_input_bn", &pwconv2d_bwd_input_bn, py::arg("dy"), py::arg("w"), py::arg("x"),
          py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          "dy (N, H, W, Cout), w (Cin, Cout), x (N, H, W, Cin) and gamma, beta, mean, invstd (Cin,), act\n"
          "of the training BatchNorm + act that made the convolution's input from x -> (dx, dgamma,\n"
          "dbeta) = batchnorm_act_train_bwd(pwconv2d_bwd_input(dy, w), x, ...): BatchNorm's sums are\n"
          "gathered from each block of dy @ w.T as the GEMM finishes it, then one pass in place.");
    m.def("pwconv2d_bwd_weight", &pwconv2d_bwd_weight, py::arg("x"), py::arg("dy"),
          "x (N, H, W, Cin), dy (N, H, W, Cout) -> dw (Cin, Cout) = x.T @ dy over N*H*W rows.");
    m.def("pwconv2d_bn_act_fwd", &pwconv2d_bn_act_fwd, py::arg("x"), py::arg("w"), py::arg("gamma"),
          py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          "x (N, H, W, Cin), w (Cin, Cout), gamma/beta/mean/invstd (Cin,) -> pwconv2d_fwd(z, w),\n"
          "z = act((x - mean) * invstd * gamma + beta) (training BatchNorm's apply, as\n"
          "batchnorm_act_train_fwd computes it) formed as x is packed: z is never stored.");
    m.def("pwconv2d_bn_act_fwd_stats", &pwconv2d_bn_act_fwd_stats, py::arg("x"), py::arg("w"),
          py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          "pwconv2d_bn_act_fwd -> (y, mean (Cout,), var (Cout,)): with y's per-channel mean and\n"
          "biased variance, as pwconv2d_fwd_stats.");
    m.def("pwconv2d_bn_act_bwd_weight", &pwconv2d_bn_act_bwd_weight, py::arg("x"), py::arg("dy"),
          py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          "x (N, H, W, Cin), dy (N, H, W, Cout), gamma/beta/mean/invstd (Cin,) ->\n"
          "pwconv2d_bwd_weight(z, dy), z as pwconv2d_bn_act_fwd forms it.");
    m.def("linear_fwd", &linear_fwd, py::arg("x"), py::arg("w"), py::arg("b"),
          "x (N, Din), w (Din, Dout), b (Dout,) -> x @ w + b (N, Dout).");
    m.def("linear_bwd", &linear_bwd, py::arg("x"), py::arg("w"), py::arg("dy"),
          "x (N, Din), w (Din, Dout), dy (N, Dout) -> (dx (N, Din), dw (Din, Dout), db (Dout,)).");
    m.def("_matmul_packed_b", &matmul_packed_b, py::arg("a"), py::arg("b"), py::arg("n0"),
          py::arg("n1"),
          "(a @ b[:, n0:n1], panel width) through the inference plan's prepacked-B GEMM (tests).");
    m.def("_matmul_packed_b_gather", &matmul_packed_b_gather, py::arg("src"), py::arg("m"),
          py::arg("rsa"), py::arg("koff"), py::arg("b"),
          "A @ b with A(i, k) = src[i * rsa + koff[k]], through the prepacked-B GEMM's gathered A "
          "(tests).");
}

}  // namespace mbnet
