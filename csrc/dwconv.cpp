// Depthwise KxK convolution: forward, input gradient and weight gradient.
//
// x (n, h, w, c) NHWC, w (kh, kw, c), y (n, ho, wo, c); symmetric padding p, stride s.
// Every kernel vectorizes along channels, in blocks of CB floats plus a remainder loop.
// 3x3 has fixed-tap kernels: forward and the stride-1 input gradient run dwconv3x3_f32_row on the
// interior (pixels whose taps are all in bounds; the input gradient is a forward pass over dy with
// the flipped kernel), the weight gradient runs dwconv3x3_f32_bwd_weight_row over zero-padded rows.
// Everything else (borders, strided input gradients, other K) goes through a list of the in-bounds
// taps summed channel row by channel row (sum_taps_f32).
// Threads: forward and input gradient over (n, output or input row), each element written by one
// thread (forward with statistics: over whole blocks of output rows, ChannelStats' blocks); the weight gradient over a fixed number of chunks of output rows (float partial sums,
// added up in double; with the input gradient in one pass, per GradStats block of input rows).
// Every sum runs in a fixed order: results do not depend on the thread count.
// Scratch is allocated before the parallel regions (PerThread) and bounded by a few rows of the
// input or output: zero-padded rows are only used for strides up to the kernel width, where they
// are at most (kw / s + 1) times the output row they serve.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace mbnet {
namespace {

constexpr index_t CB = 16;  // channel block of the register-tiled paths

struct DwShape {
    index_t n, h, w, c;  // input
    index_t kh, kw;      // kernel
    index_t ho, wo;      // output
    index_t s, p;        // stride, padding
};

// Output positions [lo, hi) along one axis whose taps k = 0..K-1 at o*s - p + k all lie in [0, in).
inline void interior_range(index_t in, index_t k, index_t s, index_t p, index_t out, index_t& lo,
                           index_t& hi) {
    lo = std::min((p + s - 1) / s, out);
    hi = in - k + p >= 0 ? std::min((in - k + p) / s + 1, out) : 0;
    if (hi < lo) hi = lo;
}

// Output positions [lo, hi) along one axis for which tap t reads an in-bounds input o*s - p + t.
inline void tap_range(index_t in, index_t t, index_t s, index_t p, index_t out, index_t& lo,
                      index_t& hi) {
    const index_t first = p - t;  // o*s >= p - t
    lo = first > 0 ? (first + s - 1) / s : 0;
    const index_t last = in - 1 + p - t;  // o*s <= in - 1 + p - t
    hi = last >= 0 ? std::min(last / s + 1, out) : 0;
    lo = std::min(lo, out);
    if (hi < lo) hi = lo;
}

// One T per thread, made before a parallel region (an exception inside one ends the process).
template <class T>
class PerThread {
   public:
    PerThread(const T& proto) : items_(omp_get_max_threads(), proto) {}
    T& mine() { return items_[omp_get_thread_num()]; }

   private:
    std::vector<T> items_;
};

// Whether 3x3 kernels may read zero-padded copies of the rows under an output row: with a stride
// larger than the kernel most of such a row is never read (stride 2^26 over a 1-pixel input
// would pad it to 2^26 pixels).
inline bool pads_rows(const DwShape& a) { return a.kh == 3 && a.kw == 3 && a.s <= a.kw; }

// A list of taps for one output element row: out[c] = sum over t of a[aoff[t] + c] * b[boff[t] + c],
// summed in list order. Border pixels and kernels without a specialization go through it.
struct Taps {
    std::vector<index_t> aoff, boff;
    index_t n = 0;
    explicit Taps(index_t capacity) : aoff(capacity), boff(capacity) {}
    void add(index_t a, index_t b) {
        aoff[n] = a;
        boff[n] = b;
        ++n;
    }
};

// sum_taps_f32 for exactly NT taps: the taps unroll and the channel block is one vector.
template <int NT>
void sum_taps_fixed_f32(index_t C, const index_t* __restrict__ ao, const index_t* __restrict__ bo,
                        const float* __restrict__ a, const float* __restrict__ b,
                        float* __restrict__ out) {
    index_t c0 = 0;
    for (; c0 + CB <= C; c0 += CB)
        for (index_t cc = 0; cc < CB; ++cc) {
            float acc = a[ao[0] + c0 + cc] * b[bo[0] + c0 + cc];
            for (int t = 1; t < NT; ++t) acc += a[ao[t] + c0 + cc] * b[bo[t] + c0 + cc];
            out[c0 + cc] = acc;
        }
    for (index_t c = c0; c < C; ++c) {
        float acc = a[ao[0] + c] * b[bo[0] + c];
        for (int t = 1; t < NT; ++t) acc += a[ao[t] + c] * b[bo[t] + c];
        out[c] = acc;
    }
}

void sum_taps_f32(index_t C, const Taps& taps, const float* __restrict__ a,
                  const float* __restrict__ b, float* __restrict__ out) {
    const index_t* ao = taps.aoff.data();
    const index_t* bo = taps.boff.data();
    switch (taps.n) {  // the tap counts of 3x3 borders and of stride-2 input gradients
        case 1: return sum_taps_fixed_f32<1>(C, ao, bo, a, b, out);
        case 2: return sum_taps_fixed_f32<2>(C, ao, bo, a, b, out);
        case 3: return sum_taps_fixed_f32<3>(C, ao, bo, a, b, out);
        case 4: return sum_taps_fixed_f32<4>(C, ao, bo, a, b, out);
        case 6: return sum_taps_fixed_f32<6>(C, ao, bo, a, b, out);
        default: break;
    }
    // Tap by tap over the whole channel row (out stays in L1): with a runtime tap count innermost,
    // GCC 12 vectorizes across taps instead of channels.
    if (taps.n == 0) {
        for (index_t c = 0; c < C; ++c) out[c] = 0.f;
        return;
    }
    {
        const float* __restrict__ ap = a + ao[0];
        const float* __restrict__ bp = b + bo[0];
        for (index_t c = 0; c < C; ++c) out[c] = ap[c] * bp[c];
    }
    for (index_t t = 1; t < taps.n; ++t) {
        const float* __restrict__ ap = a + ao[t];
        const float* __restrict__ bp = b + bo[t];
        for (index_t c = 0; c < C; ++c) out[c] += ap[c] * bp[c];
    }
}

// dst[q][c] = src[q][c] for `pixels` pixels of C channels, or with t training BatchNorm's apply +
// act of channel c (the same float operations as batchnorm_act_train_fwd's, so the same bits).
template <Act A>
void bn_act_pixels(index_t pixels, index_t C, const float* __restrict__ src, const ATransform& t,
                   float* __restrict__ dst) {
    for (index_t q = 0; q < pixels; ++q)
        for (index_t c = 0; c < C; ++c)
            dst[q * C + c] = act<A>(preact(src[q * C + c], t.mean[c], t.scale[c], t.shift[c]));
}

void copy_pixels(index_t pixels, index_t C, const float* __restrict__ src, const ATransform* t,
                 float* __restrict__ dst) {
    if (!t) {
        for (index_t e = 0; e < pixels * C; ++e) dst[e] = src[e];
        return;
    }
    switch (t->act) {
        case Act::None: return bn_act_pixels<Act::None>(pixels, C, src, *t, dst);
        case Act::ReLU: return bn_act_pixels<Act::ReLU>(pixels, C, src, *t, dst);
        case Act::ReLU6: return bn_act_pixels<Act::ReLU6>(pixels, C, src, *t, dst);
    }
}

// out (nrows, wp, c) = a window of img (h, w, c) from row row0 and column col0, zero where the
// window leaves the image: out[i][q] = img[row0 + i][col0 + q], through t (copy_pixels) if given.
// The zeros are the padding of t's output: t is not applied to them.
void padded_rows_f32(const float* __restrict__ img, index_t h, index_t w, index_t C, index_t row0,
                     index_t nrows, index_t col0, index_t wp, float* __restrict__ out,
                     const ATransform* t = nullptr) {
    const index_t left = std::min(std::max<index_t>(0, -col0), wp);               // zeros
    const index_t mid = std::max<index_t>(0, std::min(w - (col0 + left), wp - left));  // copied
    for (index_t i = 0; i < nrows; ++i) {
        const index_t r = row0 + i;
        float* __restrict__ dst = out + i * wp * C;
        if (r < 0 || r >= h) {
            for (index_t e = 0; e < wp * C; ++e) dst[e] = 0.f;
            continue;
        }
        for (index_t e = 0; e < left * C; ++e) dst[e] = 0.f;
        copy_pixels(mid, C, img + (r * w + col0 + left) * C, t, dst + left * C);
        for (index_t e = (left + mid) * C; e < wp * C; ++e) dst[e] = 0.f;
    }
}

// The zero-padded input rows under 3x3 output rows, each copied (through t if given) once into
// one of three slots (row ih in slot ih mod 3), so that the next output row of the same image
// reuses the rows it shares with this one. One per thread.
class RowRing {
   public:
    RowRing(index_t wp, index_t C) : wp_(wp), C_(C), buf_(3 * wp * C) {}
    // rows[i] = input row oh * s - p + i of image n (ximg), padded to wp pixels from column -p.
    void rows(const DwShape& a, const float* ximg, index_t n, index_t oh, const ATransform* t,
              const float* rows[3]) {
        for (index_t i = 0; i < 3; ++i) {
            const index_t ih = oh * a.s - a.p + i, slot = ((ih % 3) + 3) % 3;
            float* dst = buf_.data() + slot * wp_ * C_;
            if (n_[slot] != n || ih_[slot] != ih) {
                padded_rows_f32(ximg, a.h, a.w, C_, ih, 1, -a.p, wp_, dst, t);
                n_[slot] = n;
                ih_[slot] = ih;
            }
            rows[i] = dst;
        }
    }

   private:
    index_t wp_, C_;
    Floats buf_;
    index_t n_[3] = {-1, -1, -1}, ih_[3] = {0, 0, 0};
};

// Whether a 3x3 row with `inside` of its `total` pixels in the interior is better done whole over
// zero-padded rows (copying three rows) than as interior kernel plus border taps.
inline bool pad_whole_row(index_t inside, index_t total) { return (total - inside) * 4 > total; }

// ---- forward --------------------------------------------------------------------------------

// Channels [c0, c0 + kCB) of dwconv3x3_f32_row. The nine weights of the block stay in registers
// (nine named arrays: GCC keeps those in registers, not a [9][kCB] array) while the pixels stream
// past; taps are summed in the same order as sum_taps_f32. kBias: out = act<A>(sum + bias[c]).
template <index_t kCB, Act A, bool kBias>
void dwconv3x3_f32_block(index_t C, index_t c0, index_t count, index_t step, index_t r1,
                         index_t r2, const float* __restrict__ src, const float* __restrict__ w,
                         const float* __restrict__ bias, float* __restrict__ out) {
    float w0[kCB], w1[kCB], w2[kCB], w3[kCB], w4[kCB], w5[kCB], w6[kCB], w7[kCB], w8[kCB], b[kCB];
    for (index_t cc = 0; cc < kCB; ++cc) {
        b[cc] = kBias ? bias[c0 + cc] : 0.f;
        w0[cc] = w[c0 + cc];
        w1[cc] = w[C + c0 + cc];
        w2[cc] = w[2 * C + c0 + cc];
        w3[cc] = w[3 * C + c0 + cc];
        w4[cc] = w[4 * C + c0 + cc];
        w5[cc] = w[5 * C + c0 + cc];
        w6[cc] = w[6 * C + c0 + cc];
        w7[cc] = w[7 * C + c0 + cc];
        w8[cc] = w[8 * C + c0 + cc];
    }
    for (index_t k = 0; k < count; ++k) {
        const float* __restrict__ xq = src + k * step + c0;
        float* __restrict__ yq = out + k * C + c0;
        for (index_t cc = 0; cc < kCB; ++cc) {
            float acc = xq[cc] * w0[cc];
            acc += xq[C + cc] * w1[cc];
            acc += xq[2 * C + cc] * w2[cc];
            acc += xq[r1 + cc] * w3[cc];
            acc += xq[r1 + C + cc] * w4[cc];
            acc += xq[r1 + 2 * C + cc] * w5[cc];
            acc += xq[r2 + cc] * w6[cc];
            acc += xq[r2 + C + cc] * w7[cc];
            acc += xq[r2 + 2 * C + cc] * w8[cc];
            yq[cc] = kBias ? act<A>(acc + b[cc]) : acc;
        }
    }
}

// 3x3 taps for `count` output pixels of one row: out[k][c] = sum over i, j of
// src[r_i + k * step + j * C + c] * w[i][j][c] (r_0 = 0, r_1, r_2 the offsets of the second and
// third input rows from the first; kBias: act<A> of that + bias[c]), in blocks of CB channels, then
// one of CB / 2 (8: the 8 and 24 channels of α = 0.25 and 0.75), then one channel at a time.
template <Act A = Act::None, bool kBias = false>
void dwconv3x3_f32_rows(index_t C, index_t count, index_t step, index_t r1, index_t r2,
                        const float* __restrict__ src, const float* __restrict__ w,
                        float* __restrict__ out, const float* __restrict__ bias = nullptr) {
    index_t c0 = 0;
    for (; c0 + CB <= C; c0 += CB)
        dwconv3x3_f32_block<CB, A, kBias>(C, c0, count, step, r1, r2, src, w, bias, out);
    if (c0 + CB / 2 <= C) {
        dwconv3x3_f32_block<CB / 2, A, kBias>(C, c0, count, step, r1, r2, src, w, bias, out);
        c0 += CB / 2;
    }
    const index_t roff[3] = {0, r1, r2};
    for (index_t c = c0; c < C; ++c)
        for (index_t k = 0; k < count; ++k) {
            const float* __restrict__ xq = src + k * step + c;
            float acc = xq[0] * w[c];
            for (int t = 1; t < 9; ++t) acc += xq[roff[t / 3] + (t % 3) * C] * w[t * C + c];
            out[k * C + c] = kBias ? act<A>(acc + bias[c]) : acc;
        }
}

// dwconv3x3_f32_rows over rows rs floats apart (an image, or consecutive padded rows).
template <Act A = Act::None, bool kBias = false>
void dwconv3x3_f32_row(index_t C, index_t count, index_t step, index_t rs,
                       const float* __restrict__ src, const float* __restrict__ w,
                       float* __restrict__ out, const float* __restrict__ bias = nullptr) {
    dwconv3x3_f32_rows<A, kBias>(C, count, step, rs, 2 * rs, src, w, out, bias);
}

// row(r) for r in [0, rows), blocks of `per` rows each done by one thread in order (the blocks of a
// ChannelStats or GradStats): an orphaned `omp for`, called inside a parallel region.
template <class F>
void rows_in_blocks(index_t rows, index_t per, F&& row) {
#pragma omp for schedule(static)
    for (index_t r0 = 0; r0 < rows; r0 += per)
        for (index_t r = r0; r < std::min(rows, r0 + per); ++r) row(r);
}

// With stats, threads take whole blocks of stats->block() / wo output rows, and each output row
// is added to the statistics once computed. With t (3x3 kernels with pads_rows only), the input is
// t(x): every row goes through a RowRing, which applies t once per input row.
void dwconv_f32_fwd(const DwShape& a, const float* __restrict__ x, const float* __restrict__ w,
                    float* __restrict__ y, ChannelStats* stats = nullptr,
                    const ATransform* t = nullptr) {
    index_t oh_lo, oh_hi, ow_lo, ow_hi;
    interior_range(a.h, a.kh, a.s, a.p, a.ho, oh_lo, oh_hi);
    interior_range(a.w, a.kw, a.s, a.p, a.wo, ow_lo, ow_hi);
    const bool fast = a.kh == 3 && a.kw == 3, padded = pads_rows(a);
    const index_t C = a.c;
    const index_t wp = (a.wo - 1) * a.s + a.kw;  // padded width under one output row
    PerThread<Taps> all_taps(Taps(a.kh * a.kw));
    PerThread<Floats> all_xb(Floats(padded && !t ? 3 * wp * C : 0));
    PerThread<RowRing> all_rings(RowRing(t ? wp : 0, C));
#pragma omp parallel
    {
        Taps& taps = all_taps.mine();
        Floats& xb = all_xb.mine();
        RowRing& ring = all_rings.mine();
        // Output row oh of image n.
        auto row = [&](index_t n, index_t oh) {
            const float* ximg = x + n * a.h * a.w * C;
            float* yrow = y + (n * a.ho + oh) * a.wo * C;
            if (t) {
                const float* rows[3];
                ring.rows(a, ximg, n, oh, t, rows);
                dwconv3x3_f32_rows(C, a.wo, a.s * C, rows[1] - rows[0], rows[2] - rows[0], rows[0],
                                   w, yrow);
                return;
            }
            const index_t ih0 = oh * a.s - a.p;
            const bool row_inside = oh >= oh_lo && oh < oh_hi;
            if (padded && (!row_inside || pad_whole_row(ow_hi - ow_lo, a.wo))) {
                padded_rows_f32(ximg, a.h, a.w, C, ih0, 3, -a.p, wp, xb.data());
                dwconv3x3_f32_row(C, a.wo, a.s * C, wp * C, xb.data(), w, yrow);
                return;
            }
            index_t lo = 0, hi = 0;  // columns done by the fast path
            if (fast && row_inside) {
                lo = ow_lo;
                hi = ow_hi;
                if (hi > lo)
                    dwconv3x3_f32_row(C, hi - lo, a.s * C, a.w * C,
                                      ximg + (ih0 * a.w + lo * a.s - a.p) * C, w, yrow + lo * C);
            }
            const index_t i0 = std::max<index_t>(0, -ih0), i1 = std::min(a.kh, a.h - ih0);
            for (index_t ow = 0; ow < a.wo; ++ow) {
                if (ow >= lo && ow < hi) continue;
                const index_t iw0 = ow * a.s - a.p;
                const index_t j0 = std::max<index_t>(0, -iw0), j1 = std::min(a.kw, a.w - iw0);
                taps.n = 0;
                for (index_t i = i0; i < i1; ++i)
                    for (index_t j = j0; j < j1; ++j)
                        taps.add(((ih0 + i) * a.w + iw0 + j) * C, (i * a.kw + j) * C);
                sum_taps_f32(C, taps, ximg, w, yrow + ow * C);
            }
        };
        rows_in_blocks(a.n * a.ho, stats ? stats->block() / a.wo : 1, [&](index_t r) {
            row(r / a.ho, r % a.ho);
            if (stats) stats->add(r * a.wo, a.wo, 0, C, y + r * a.wo * C, C);
        });
    }
}

// ---- input gradient (a gather: each input pixel sums the taps that reach it) ------------------

// dx at input (ih, iw) sums dy[oh][ow] * w[i][j] over oh*s - p + i = ih, ow*s - p + j = iw with
// (oh, ow) inside dy: i runs over (ih + p) mod s, + s, ... while oh = (ih + p - i) / s >= 0.
// With stats (x: the convolution's input, the BatchNorm's), threads take whole blocks of
// stats->block() / w input rows, and each row of dx is added to the statistics once computed.
// after(r), if given, runs on the same thread once input row r (of the n*h) is done.
struct NoAfter {
    void operator()(index_t) const {}
};

template <class After = NoAfter>
void dwconv_f32_bwd_input(const DwShape& a, const float* __restrict__ dy,
                          const float* __restrict__ w, float* __restrict__ dx,
                          GradStats* stats = nullptr, const float* x = nullptr,
                          const After& after = After()) {
    // With stride 1 and a KxK kernel, input position i gets taps from outputs i + p - (K-1) .. i + p.
    index_t ih_lo = 0, ih_hi = 0, iw_lo = 0, iw_hi = 0;
    const bool fast = a.s == 1 && a.kh == 3 && a.kw == 3;
    if (fast) {
        ih_lo = std::min(std::max<index_t>(0, a.kh - 1 - a.p), a.h);
        ih_hi = std::max(ih_lo, std::min(a.h, a.ho - a.p));
        iw_lo = std::min(std::max<index_t>(0, a.kw - 1 - a.p), a.w);
        iw_hi = std::max(iw_lo, std::min(a.w, a.wo - a.p));
    }
    std::vector<float> wflip(fast ? 9 * a.c : 0);  // wflip[i][j] = w[2 - i][2 - j]
    for (index_t t = 0; t < (fast ? 9 : 0); ++t)
        for (index_t c = 0; c < a.c; ++c) wflip[t * a.c + c] = w[(8 - t) * a.c + c];
    // Columns whose taps all reach outputs inside dy: iw + p - (kw-1) >= 0 and (iw + p) / s < wo.
    const index_t clo = std::min(a.w, std::max<index_t>(0, a.kw - 1 - a.p));
    const index_t chi = std::max(clo, std::min(a.w, a.wo * a.s - a.p));
    const index_t C = a.c;
    // An input pixel gets at most ceil(kh/s) rows times ceil(kw/s) columns of taps.
    const index_t rows_max = (a.kh + a.s - 1) / a.s, cap = rows_max * ((a.kw + a.s - 1) / a.s);
    const index_t nres = std::min(a.s, a.kw);  // residues (iw + p) mod s that have taps
    PerThread<Taps> all_taps(Taps{cap});
    const std::vector<index_t> row_proto(rows_max);
    PerThread<std::vector<index_t>> all_row_i(row_proto), all_row_oh(row_proto);
    PerThread<Floats> all_dyb(Floats(fast ? 3 * (a.w + 2) * C : 0));
    PerThread<std::vector<Taps>> all_res_taps(std::vector<Taps>(nres, Taps(cap)));
#pragma omp parallel
    {
        Taps& taps = all_taps.mine();
        std::vector<index_t>&row_i = all_row_i.mine(), &row_oh = all_row_oh.mine();
        Floats& dyb = all_dyb.mine();
        std::vector<Taps>& res_taps = all_res_taps.mine();
        // Input row ih of image n.
        auto row = [&](index_t n, index_t ih) {
            const float* dyimg = dy + n * a.ho * a.wo * C;
            float* dxrow = dx + (n * a.h + ih) * a.w * C;
            const bool row_inside = ih >= ih_lo && ih < ih_hi;
            if (fast && (!row_inside || pad_whole_row(iw_hi - iw_lo, a.w))) {
                // dyb[i][q] = dy[ih + p - 2 + i][p - 2 + q]; dx row = 3x3 row of dyb, wflip.
                padded_rows_f32(dyimg, a.ho, a.wo, C, ih + a.p - 2, 3, a.p - 2, a.w + 2,
                                dyb.data());
                dwconv3x3_f32_row(C, a.w, C, (a.w + 2) * C, dyb.data(), wflip.data(), dxrow);
                return;
            }
            index_t lo = 0, hi = 0;
            if (fast) {
                lo = iw_lo;
                hi = iw_hi;
                // A forward pass over dy with the flipped kernel.
                if (hi > lo)
                    dwconv3x3_f32_row(C, hi - lo, C, a.wo * C,
                                      dyimg + ((ih + a.p - 2) * a.wo + lo + a.p - 2) * C,
                                      wflip.data(), dxrow + lo * C);
            }
            index_t nrows = 0;
            const index_t rh = (ih + a.p) % a.s;
            for (index_t i = rh, oh = (ih + a.p - rh) / a.s; i < a.kh && oh >= 0; i += a.s, --oh)
                if (oh < a.ho) {
                    row_i[nrows] = i;
                    row_oh[nrows++] = oh;
                }
            // Interior columns [clo, chi) reach only in-bounds outputs; their taps depend on
            // (iw + p) mod s alone, so one list per residue serves them all, offset from the
            // output column (iw + p - r) / s.
            for (index_t r = 0; r < nres; ++r) {
                Taps& t = res_taps[r];
                t.n = 0;
                for (index_t k = 0; k < nrows; ++k)
                    for (index_t j = r, d = 0; j < a.kw; j += a.s, ++d)
                        t.add((row_oh[k] * a.wo - d) * C, (row_i[k] * a.kw + j) * C);
            }
            for (index_t r = 0; r < std::min(a.s, chi - clo); ++r) {
                const index_t iw0 = clo + r, rw = (iw0 + a.p) % a.s;
                for (index_t iw = iw0, ow = (iw0 + a.p - rw) / a.s; iw < chi; iw += a.s, ++ow) {
                    if (iw >= lo && iw < hi) continue;
                    if (rw < nres)
                        sum_taps_f32(C, res_taps[rw], dyimg + ow * C, w, dxrow + iw * C);
                    else
                        for (index_t c = 0; c < C; ++c) dxrow[iw * C + c] = 0.f;
                }
            }
            for (index_t iw = 0; iw < a.w; ++iw) {
                if ((iw >= lo && iw < hi) || (iw >= clo && iw < chi)) continue;
                const index_t rw = (iw + a.p) % a.s;
                taps.n = 0;
                for (index_t k = 0; k < nrows; ++k)
                    for (index_t j = rw, ow = (iw + a.p - rw) / a.s; j < a.kw && ow >= 0;
                         j += a.s, --ow)
                        if (ow < a.wo)
                            taps.add((row_oh[k] * a.wo + ow) * C, (row_i[k] * a.kw + j) * C);
                sum_taps_f32(C, taps, dyimg, w, dxrow + iw * C);
            }
        };
        rows_in_blocks(a.n * a.h, stats ? stats->block() / a.w : 1, [&](index_t r) {
            row(r / a.h, r % a.h);
            if (stats) stats->add(r * a.w, a.w, 0, C, dx + r * a.w * C, x + r * a.w * C, C);
            after(r);
        });
    }
}

// ---- weight gradient ---------------------------------------------------------------------------

// Any K: part[i][j][c] += sum over ow of x[oh*s - p + i][ow*s - p + j][c] * dy[oh][ow][c] for one
// output row. Each (tap, channel block) sums its Wo terms in registers before touching `part`.
// tap_lo/tap_hi[j]: the output columns for which tap j is in bounds (tap_range).
void dwconv_f32_bwd_weight_row(const DwShape& a, const float* __restrict__ ximg,
                               const float* __restrict__ dyrow, float* __restrict__ part,
                               index_t oh, index_t ow_begin, index_t ow_end,
                               const index_t* tap_lo, const index_t* tap_hi) {
    const index_t C = a.c;
    for (index_t i = 0; i < a.kh; ++i) {
        const index_t ih = oh * a.s - a.p + i;
        if (ih < 0 || ih >= a.h) continue;
        const float* __restrict__ xrow = ximg + ih * a.w * C;
        for (index_t j = 0; j < a.kw; ++j) {
            const index_t lo = std::max(tap_lo[j], ow_begin), hi = std::min(tap_hi[j], ow_end);
            float* __restrict__ pp = part + (i * a.kw + j) * C;
            index_t c0 = 0;
            for (; c0 + CB <= C; c0 += CB) {
                float acc[CB] = {};
                for (index_t ow = lo; ow < hi; ++ow) {
                    const float* __restrict__ xq = xrow + (ow * a.s - a.p + j) * C + c0;
                    const float* __restrict__ dq = dyrow + ow * C + c0;
                    for (index_t cc = 0; cc < CB; ++cc) acc[cc] += xq[cc] * dq[cc];
                }
                for (index_t cc = 0; cc < CB; ++cc) pp[c0 + cc] += acc[cc];
            }
            if (c0 < C)
                for (index_t ow = lo; ow < hi; ++ow) {
                    const float* __restrict__ xq = xrow + (ow * a.s - a.p + j) * C;
                    const float* __restrict__ dq = dyrow + ow * C;
                    for (index_t c = c0; c < C; ++c) pp[c] += xq[c] * dq[c];
                }
        }
    }
}

// 3x3 taps over the zero-padded input rows x0, x1, x2 (wp, c) under one output row: the nine
// accumulators of a channel block stay in registers while the row's Wo pixels stream past (nine
// named arrays: GCC keeps those in registers, but not a [9][CB] array).
void dwconv3x3_f32_bwd_weight_row(index_t C, index_t wo, index_t s, const float* __restrict__ x0,
                                  const float* __restrict__ x1, const float* __restrict__ x2,
                                  const float* __restrict__ dyrow, float* __restrict__ part) {
    index_t c0 = 0;
    for (; c0 + CB <= C; c0 += CB) {
        float a0[CB] = {}, a1[CB] = {}, a2[CB] = {}, a3[CB] = {}, a4[CB] = {}, a5[CB] = {},
              a6[CB] = {}, a7[CB] = {}, a8[CB] = {};
        for (index_t ow = 0; ow < wo; ++ow) {
            const float* __restrict__ dq = dyrow + ow * C + c0;
            const float* __restrict__ p0 = x0 + ow * s * C + c0;
            const float* __restrict__ p1 = x1 + ow * s * C + c0;
            const float* __restrict__ p2 = x2 + ow * s * C + c0;
            for (index_t cc = 0; cc < CB; ++cc) {
                const float d = dq[cc];
                a0[cc] += p0[cc] * d;
                a1[cc] += p0[C + cc] * d;
                a2[cc] += p0[2 * C + cc] * d;
                a3[cc] += p1[cc] * d;
                a4[cc] += p1[C + cc] * d;
                a5[cc] += p1[2 * C + cc] * d;
                a6[cc] += p2[cc] * d;
                a7[cc] += p2[C + cc] * d;
                a8[cc] += p2[2 * C + cc] * d;
            }
        }
        float* __restrict__ pp = part + c0;
#pragma GCC ivdep
        for (index_t cc = 0; cc < CB; ++cc) {
            pp[cc] += a0[cc];
            pp[C + cc] += a1[cc];
            pp[2 * C + cc] += a2[cc];
            pp[3 * C + cc] += a3[cc];
            pp[4 * C + cc] += a4[cc];
            pp[5 * C + cc] += a5[cc];
            pp[6 * C + cc] += a6[cc];
            pp[7 * C + cc] += a7[cc];
            pp[8 * C + cc] += a8[cc];
        }
    }
    const float* rows[3] = {x0, x1, x2};
    for (index_t c = c0; c < C; ++c) {
        float acc[9] = {};
        for (index_t ow = 0; ow < wo; ++ow)
            for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j)
                    acc[i * 3 + j] += rows[i][(ow * s + j) * C + c] * dyrow[ow * C + c];
        for (int t = 0; t < 9; ++t) part[t * C + c] += acc[t];
    }
}

// dw[t] = sum over k < nparts of parts[k * taps + t], added in k order in double.
void sum_parts(const std::vector<float>& parts, index_t nparts, index_t taps, float* __restrict__ dw) {
    constexpr index_t TB = 256;
#pragma omp parallel for schedule(static)
    for (index_t t0 = 0; t0 < taps; t0 += TB) {
        const index_t len = std::min(TB, taps - t0);
        double sum[TB] = {};
        for (index_t k = 0; k < nparts; ++k)
            for (index_t t = 0; t < len; ++t) sum[t] += parts[k * taps + t0 + t];
        for (index_t t = 0; t < len; ++t) dw[t0 + t] = static_cast<float>(sum[t]);
    }
}

// The N*Ho output rows are cut into a fixed number of chunks (independent of the thread count, so
// results are too); each chunk sums in float, and the chunks are added up in double.
void dwconv_f32_bwd_weight(const DwShape& a, const float* __restrict__ x,
                           const float* __restrict__ dy, float* __restrict__ dw,
                           const ATransform* t = nullptr) {
    const index_t rows = a.n * a.ho, taps = a.kh * a.kw * a.c;
    const index_t nchunks = std::min<index_t>(rows, 32);
    const bool fast = pads_rows(a);
    const index_t wp = (a.wo - 1) * a.s + a.kw;  // padded row width under one output row
    std::vector<index_t> tlo(a.kw), thi(a.kw);
    for (index_t j = 0; j < a.kw; ++j) tap_range(a.w, j, a.s, a.p, a.wo, tlo[j], thi[j]);
    check_alloc({nchunks, taps}, "the weight gradient's partial sums");
    std::vector<float> parts(nchunks * taps);
    PerThread<RowRing> all_rings(RowRing(fast ? wp : 0, a.c));
#pragma omp parallel
    {
        RowRing& ring = all_rings.mine();
#pragma omp for schedule(dynamic, 1)
        for (index_t k = 0; k < nchunks; ++k) {
            float* part = parts.data() + k * taps;
            for (index_t i = 0; i < taps; ++i) part[i] = 0.f;
            for (index_t r = rows * k / nchunks; r < rows * (k + 1) / nchunks; ++r) {
                const index_t n = r / a.ho, oh = r % a.ho;
                const float* ximg = x + n * a.h * a.w * a.c;
                const float* dyrow = dy + r * a.wo * a.c;
                if (!fast) {
                    dwconv_f32_bwd_weight_row(a, ximg, dyrow, part, oh, 0, a.wo, tlo.data(),
                                              thi.data());
                    continue;
                }
                const float* prow[3];
                ring.rows(a, ximg, n, oh, t, prow);
                dwconv3x3_f32_bwd_weight_row(a.c, a.wo, a.s, prow[0], prow[1], prow[2], dyrow, part);
            }
        }
    }
    sum_parts(parts, nchunks, taps, dw);
}

// The input gradient through BatchNorm (dwconv_f32_bwd_input with stats) and the weight gradient
// of a 3x3 convolution of t(x) (pads_rows) in one pass over x and dy: once input row ih of an
// image has its gradient, the output rows whose centre input row it is (clamped into the image)
// add their weight-gradient terms, while the dy rows the gradient gathered and x's rows are still
// in cache. The weight gradient's partial sums are per block of GradStats (fixed by the shape,
// each summed by one thread in row order), added up in double: dw does not depend on the thread
// count either.
void dwconv_f32_bwd_input_weight(const DwShape& a, const float* __restrict__ dy,
                                 const float* __restrict__ w, const float* __restrict__ x,
                                 const ATransform& t, float* __restrict__ dx, GradStats& stats,
                                 float* __restrict__ dw) {
    const index_t taps = 9 * a.c, per = stats.block() / a.w, nblocks = stats.blocks();
    std::vector<index_t> first_oh(a.h + 1, a.ho);  // output rows [first_oh[ih], first_oh[ih + 1])
    for (index_t oh = a.ho - 1; oh >= 0; --oh)
        first_oh[std::min(std::max<index_t>(oh * a.s - a.p + 1, 0), a.h - 1)] = oh;
    for (index_t ih = a.h - 1; ih >= 0; --ih) first_oh[ih] = std::min(first_oh[ih], first_oh[ih + 1]);
    check_alloc({nblocks, taps}, "the weight gradient's partial sums");
    std::vector<float> parts(nblocks * taps, 0.f);
    PerThread<RowRing> all_rings(RowRing((a.wo - 1) * a.s + 3, a.c));
    dwconv_f32_bwd_input(a, dy, w, dx, &stats, x, [&](index_t r) {
        const index_t n = r / a.h, ih = r % a.h;
        const float* ximg = x + n * a.h * a.w * a.c;
        float* part = parts.data() + r / per * taps;
        RowRing& ring = all_rings.mine();
        for (index_t oh = first_oh[ih]; oh < first_oh[ih + 1]; ++oh) {
            const float* prow[3];
            ring.rows(a, ximg, n, oh, &t, prow);
            dwconv3x3_f32_bwd_weight_row(a.c, a.wo, a.s, prow[0], prow[1], prow[2],
                                         dy + (n * a.ho + oh) * a.wo * a.c, part);
        }
    });
    sum_parts(parts, nblocks, taps, dw);
}

// ---- bindings ----------------------------------------------------------------------------------

// The checked shape of a depthwise convolution of x (n, h, w, c) by w (kh, kw, c); with bn (the
// *_bn_act kernels, which read x through a RowRing) only 3x3 kernels with stride <= 3.
DwShape fwd_shape(const F32& x, const F32& w, const py::object& stride, const py::object& padding,
                  bool bn) {
    check_same_dim(x, 3, "x", w, 2, "w");
    DwShape a{x[0], x[1], x[2], x[3], w[0], w[1], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    if (bn && !pads_rows(a))
        throw py::value_error("the dwconv2d_bn_act kernels take a 3x3 w and stride <= 3, got w " +
                              shape_str(w.shape) + " and stride " + std::to_string(a.s));
    return a;
}

// y = dwconv(x, w), or (y, mean, var) with stats; x read as act(BN(x)) when bn is given.
py::object dw_forward(const F32& x, const F32& w, const DwShape& a, bool with_stats,
                      const BnActArgs* bn = nullptr) {
    const ATransform t = bn ? bn->transform(false) : ATransform{};
    const ATransform* tp = bn ? &t : nullptr;
    if (!with_stats)
        return compute_f32(
            {a.n, a.ho, a.wo, a.c}, [&](float* y) { dwconv_f32_fwd(a, x.ptr, w.ptr, y, nullptr, tp); },
            "y");
    // Blocks of whole output rows, about kStatsRows pixels each.
    const index_t block = std::max<index_t>(1, kStatsRows / a.wo) * a.wo;
    return compute_f32_stats({a.n, a.ho, a.wo, a.c}, block, [&](float* y, ChannelStats& stats) {
        dwconv_f32_fwd(a, x.ptr, w.ptr, y, &stats, tp);
    });
}

py::object dwconv2d_fwd(const py::object& x_, const py::object& w_, const py::object& stride,
                        const py::object& padding, bool with_stats) {
    F32 x = check_f32(x_, "x", 4), w = check_f32(w_, "w", 3);
    return dw_forward(x, w, fwd_shape(x, w, stride, padding, false), with_stats);
}

py::object dwconv2d_bn_act_fwd(const py::object& x_, const py::object& w_,
                               const py::object& gamma, const py::object& beta,
                               const py::object& mean, const py::object& invstd,
                               const std::string& act, const py::object& stride,
                               const py::object& padding, bool with_stats) {
    F32 x = check_f32(x_, "x", 4), w = check_f32(w_, "w", 3);
    const DwShape a = fwd_shape(x, w, stride, padding, true);
    const BnActArgs bn(gamma, beta, mean, invstd, act, x);
    return dw_forward(x, w, a, with_stats, &bn);
}

py::array_t<float> dwconv2d_bwd_input(const py::object& dy_, const py::object& w_,
                                      const py::object& input_hw, const py::object& stride,
                                      const py::object& padding) {
    F32 dy = check_f32(dy_, "dy", 4), w = check_f32(w_, "w", 3);
    check_same_dim(dy, 3, "dy", w, 2, "w");
    auto [h, wd] = parse_hw(input_hw, "input_hw");
    DwShape a{dy[0], h, wd, dy[3], w[0], w[1], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    check_dy_shape(dy, a);
    return compute_f32(
        {a.n, a.h, a.w, a.c}, [&](float* dx) { dwconv_f32_bwd_input(a, dy.ptr, w.ptr, dx); },
        "dx");
}

// dy (n, ho, wo, c), w (kh, kw, c), x (n, h, w, c) the input of a training BatchNorm + act whose
// output the convolution read -> (dx, dgamma, dbeta): BatchNorm's two backward sums gathered
// from each row of the convolution's input gradient as it is computed, then BatchNorm's apply in
// place (one pass over that gradient and x fewer than dwconv2d_bwd_input + batchnorm_act_train_bwd).
// with_weight (3x3, stride <= 3): -> (dx, dgamma, dbeta, dw), dw from the same pass over dy and x.
py::tuple dw_bwd_input_bn(const py::object& dy_, const py::object& w_, const py::object& x_,
                          const py::object& gamma, const py::object& beta, const py::object& mean,
                          const py::object& invstd, const std::string& act, const py::object& stride,
                          const py::object& padding, bool with_weight) {
    F32 dy = check_f32(dy_, "dy", 4), w = check_f32(w_, "w", 3), x = check_f32(x_, "x", 4);
    const DwShape a = fwd_shape(x, w, stride, padding, with_weight);
    check_same_dim(x, 0, "x", dy, 0, "dy");
    check_same_dim(x, 3, "x", dy, 3, "dy");
    check_dy_shape(dy, a);
    const BnActArgs bn(gamma, beta, mean, invstd, act, x);
    const index_t block = std::max<index_t>(1, kStatsRows / a.w) * a.w;  // whole input rows
    if (!with_weight)
        return compute_bn_bwd(x.shape, bn, x, block, [&](float* dx, GradStats& stats) {
            dwconv_f32_bwd_input(a, dy.ptr, w.ptr, dx, &stats, x.ptr);
        });
    const ATransform t = bn.transform(false);
    auto dw = new_f32({a.kh, a.kw, a.c}, "dw");
    float* dwp = ptr(dw);
    py::tuple dx = compute_bn_bwd(x.shape, bn, x, block, [&](float* dxp, GradStats& stats) {
        dwconv_f32_bwd_input_weight(a, dy.ptr, w.ptr, x.ptr, t, dxp, stats, dwp);
    });
    return py::make_tuple(dx[0], dx[1], dx[2], dw);
}

// dw (kh, kw, c) of y = dwconv(x, w); x read as act(BN(x)) when bn is given.
py::array_t<float> dw_bwd_weight(const F32& x, const py::object& dy_, const py::object& kernel_hw,
                                 const py::object& stride, const py::object& padding,
                                 const BnActArgs* bn = nullptr) {
    F32 dy = check_f32(dy_, "dy", 4);
    check_same_dim(x, 0, "x", dy, 0, "dy");
    check_same_dim(x, 3, "x", dy, 3, "dy");
    auto [kh, kw] = parse_hw(kernel_hw, "kernel_hw");
    DwShape a{x[0], x[1], x[2], x[3], kh, kw, 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    check_dy_shape(dy, a);
    if (bn && !pads_rows(a))
        throw py::value_error("dwconv2d_bn_act_bwd_weight takes kernel_hw (3, 3) and stride <= 3, got (" +
                              std::to_string(kh) + ", " + std::to_string(kw) + ") and stride " +
                              std::to_string(a.s));
    const ATransform t = bn ? bn->transform(false) : ATransform{};
    return compute_f32(
        {a.kh, a.kw, a.c},
        [&](float* dw) { dwconv_f32_bwd_weight(a, x.ptr, dy.ptr, dw, bn ? &t : nullptr); }, "dw");
}

py::array_t<float> dwconv2d_bwd_weight(const py::object& x_, const py::object& dy_,
                                       const py::object& kernel_hw, const py::object& stride,
                                       const py::object& padding) {
    return dw_bwd_weight(check_f32(x_, "x", 4), dy_, kernel_hw, stride, padding);
}

py::array_t<float> dwconv2d_bn_act_bwd_weight(const py::object& x_, const py::object& dy_,
                                              const py::object& gamma, const py::object& beta,
                                              const py::object& mean, const py::object& invstd,
                                              const std::string& act, const py::object& kernel_hw,
                                              const py::object& stride, const py::object& padding) {
    F32 x = check_f32(x_, "x", 4);
    const BnActArgs bn(gamma, beta, mean, invstd, act, x);
    return dw_bwd_weight(x, dy_, kernel_hw, stride, padding, &bn);
}

}  // namespace

void dwconv3x3_bias_act_f32_fwd_row(index_t C, index_t count, index_t step, index_t rs,
                                    const float* src, const float* w, const float* bias, Act a,
                                    float* out) {
    switch (a) {
        case Act::None:
            return dwconv3x3_f32_row<Act::None, true>(C, count, step, rs, src, w, out, bias);
        case Act::ReLU:
            return dwconv3x3_f32_row<Act::ReLU, true>(C, count, step, rs, src, w, out, bias);
        case Act::ReLU6:
            return dwconv3x3_f32_row<Act::ReLU6, true>(C, count, step, rs, src, w, out, bias);
    }
}

void bind_dwconv(py::module_& m) {
    m.def(
        "dwconv2d_fwd",
        [](const py::object& x, const py::object& w, const py::object& stride, const py::object& padding) {
            return dwconv2d_fwd(x, w, stride, padding, false);
        },
        py::arg("x"), py::arg("w"), py::arg("stride"), py::arg("padding"),
        "x (n, h, w, c), w (kh, kw, c) -> y (n, ho, wo, c): depthwise convolution.");
    m.def(
        "dwconv2d_fwd_stats",
        [](const py::object& x, const py::object& w, const py::object& stride, const py::object& padding) {
            return dwconv2d_fwd(x, w, stride, padding, true);
        },
        py::arg("x"), py::arg("w"), py::arg("stride"), py::arg("padding"),
        "x (n, h, w, c), w (kh, kw, c) -> (y (n, ho, wo, c), mean (c,), var (c,)): dwconv2d_fwd\n"
        "and y's per-channel mean and biased variance over n, ho, wo, summed as each output row is\n"
        "computed (for batchnorm_act_train_fwd_from_stats).");
    const char* bn_doc =
        "x (n, h, w, c), w (3, 3, c), gamma, beta, mean, invstd (c,), act -> dwconv2d_fwd(z, w),\n"
        "z = act(BN(x)) with x's batch mean and invstd (batchnorm_act_train_fwd's output, same bits),\n"
        "formed once per input row as the kernel loads it and never stored. Stride <= 3.";
    for (bool with_stats : {false, true})
        m.def(
            with_stats ? "dwconv2d_bn_act_fwd_stats" : "dwconv2d_bn_act_fwd",
            [with_stats](const py::object& x, const py::object& w, const py::object& gamma,
                         const py::object& beta, const py::object& mean, const py::object& invstd,
                         const std::string& act, const py::object& stride, const py::object& padding) {
                return dwconv2d_bn_act_fwd(x, w, gamma, beta, mean, invstd, act, stride, padding,
                                           with_stats);
            },
            py::arg("x"), py::arg("w"), py::arg("gamma"), py::arg("beta"), py::arg("mean"),
            py::arg("invstd"), py::arg("act"), py::arg("stride"), py::arg("padding"),
            with_stats ? "dwconv2d_bn_act_fwd -> (y, mean (c,), var (c,)) as dwconv2d_fwd_stats."
                       : bn_doc);
    m.def("dwconv2d_bwd_input", &dwconv2d_bwd_input, py::arg("dy"), py::arg("w"),
          py::arg("input_hw"), py::arg("stride"), py::arg("padding"),
          "dy (n, ho, wo, c), w (kh, kw, c), input_hw (h, w) -> dx (n, h, w, c).");
    const char* bwd_docs[] = {
        "dy (n, ho, wo, c), w (kh, kw, c), x (n, h, w, c) and gamma, beta, mean, invstd (c,), act of\n"
        "the training BatchNorm + act that made the convolution's input from x -> (dx, dgamma, dbeta)\n"
        "= batchnorm_act_train_bwd(dwconv2d_bwd_input(dy, w, x.shape[1:3], stride, padding), x, ...):\n"
        "BatchNorm's sums gathered row by row as the input gradient is computed, then one pass in place.",
        "dy (n, ho, wo, c), w (3, 3, c), x (n, h, w, c), gamma, beta, mean, invstd (c,), act ->\n"
        "(dx, dgamma, dbeta, dw): dwconv2d_bwd_input_bn's three (the same bits) and\n"
        "dwconv2d_bn_act_bwd_weight's dw (its partial sums cut differently: equal within rounding)\n"
        "in one pass over dy and x. Stride <= 3."};
    for (bool with_weight : {false, true})
        m.def(
            with_weight ? "dwconv2d_bn_act_bwd" : "dwconv2d_bwd_input_bn",
            [with_weight](const py::object& dy, const py::object& w, const py::object& x, const py::object& gamma,
                          const py::object& beta, const py::object& mean, const py::object& invstd,
                          const std::string& act, const py::object& stride, const py::object& padding) {
                return dw_bwd_input_bn(dy, w, x, gamma, beta, mean, invstd, act, stride, padding, with_weight);
            },
            py::arg("dy"), py::arg("w"), py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("mean"),
            py::arg("invstd"), py::arg("act"), py::arg("stride"), py::arg("padding"), bwd_docs[with_weight]);
    m.def("dwconv2d_bwd_weight", &dwconv2d_bwd_weight, py::arg("x"), py::arg("dy"),
          py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"),
          "x (n, h, w, c), dy (n, ho, wo, c), kernel_hw (kh, kw) -> dw (kh, kw, c).");
    m.def("dwconv2d_bn_act_bwd_weight", &dwconv2d_bn_act_bwd_weight, py::arg("x"), py::arg("dy"),
          py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"),
          "dwconv2d_bwd_weight(z, dy), z = act(BN(x)) as dwconv2d_bn_act_fwd forms it. kernel_hw\n"
          "(3, 3), stride <= 3.");
}

}  // namespace mbnet
