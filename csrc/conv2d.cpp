// Full KxK convolution by im2col + sgemm: forward, input gradient and weight gradient.
//
// x (n, h, w, ci) NHWC, w (kh, kw, ci, co) HWIO, y (n, ho, wo, co); symmetric padding p, stride s.
// The column matrix has one row per output pixel and kh*kw*ci columns in (i, j, ci) order, so the
// HWIO weight is already the (kh*kw*ci, co) right-hand matrix. The columns are built a chunk of
// images at a time, keeping the buffer under kColBudget floats. A 1x1, stride-1, unpadded
// convolution is a plain matrix product and skips the columns.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace mbnet {
namespace {

// 8 MB: the chunk is still in L3 when sgemm reads it, and glibc reuses the block rather than
// mapping (and page-faulting) a fresh one each call; 64 MB chunks ran the big convs ~2x slower.
constexpr index_t kColBudget = index_t(2) << 20;  // floats

struct ConvShape {
    index_t n, h, w, ci;  // input
    index_t kh, kw, co;   // kernel
    index_t ho, wo;       // output
    index_t s, p;         // stride, padding
    index_t kdim() const { return kh * kw * ci; }
    index_t pixels() const { return ho * wo; }
    bool is_pointwise() const { return kh == 1 && kw == 1 && s == 1 && p == 0; }
    // Images per im2col chunk: at least one, within the budget, and the chunks of equal size.
    index_t chunk() const {
        const index_t most = std::max<index_t>(1, kColBudget / (pixels() * kdim()));
        const index_t chunks = (n + most - 1) / most;
        return (n + chunks - 1) / chunks;
    }
};

// cols (nb*ho*wo, kh*kw*ci) from images [n0, n0 + nb) of x; out-of-image taps are zero.
void im2col_f32(const ConvShape& a, const float* __restrict__ x, index_t n0, index_t nb,
                float* __restrict__ cols) {
    const index_t C = a.ci, K = a.kdim();
#pragma omp parallel for collapse(2) schedule(static)
    for (index_t b = 0; b < nb; ++b)
        for (index_t oh = 0; oh < a.ho; ++oh) {
            const float* ximg = x + (n0 + b) * a.h * a.w * C;
            for (index_t ow = 0; ow < a.wo; ++ow) {
                float* __restrict__ row = cols + ((b * a.ho + oh) * a.wo + ow) * K;
                const index_t iw0 = ow * a.s - a.p;
                const bool cols_inside = iw0 >= 0 && iw0 + a.kw <= a.w;
                for (index_t i = 0; i < a.kh; ++i) {
                    const index_t ih = oh * a.s - a.p + i;
                    float* __restrict__ dst = row + i * a.kw * C;
                    if (ih < 0 || ih >= a.h) {
                        for (index_t e = 0; e < a.kw * C; ++e) dst[e] = 0.f;
                    } else if (cols_inside) {  // the kw taps are one contiguous run of x
                        copy_run(dst, ximg + (ih * a.w + iw0) * C, a.kw * C);
                    } else {
                        for (index_t j = 0; j < a.kw; ++j) {
                            const index_t iw = iw0 + j;
                            if (iw < 0 || iw >= a.w) {
                                for (index_t c = 0; c < C; ++c) dst[j * C + c] = 0.f;
                            } else {
                                const float* __restrict__ src = ximg + (ih * a.w + iw) * C;
                                for (index_t c = 0; c < C; ++c) dst[j * C + c] = src[c];
                            }
                        }
                    }
                }
            }
        }
}

// dx images [n0, n0 + nb) = adjoint of im2col applied to cols. Each thread owns whole input rows
// and gathers the column entries that land in them, so no two threads write the same element.
void col2im_f32(const ConvShape& a, const float* __restrict__ cols, index_t n0, index_t nb,
                float* __restrict__ dx) {
    const index_t C = a.ci, K = a.kdim();
#pragma omp parallel for collapse(2) schedule(static)
    for (index_t b = 0; b < nb; ++b)
        for (index_t ih = 0; ih < a.h; ++ih) {
            float* __restrict__ dxrow = dx + ((n0 + b) * a.h + ih) * a.w * C;
            for (index_t e = 0; e < a.w * C; ++e) dxrow[e] = 0.f;
            for (index_t i = 0; i < a.kh; ++i) {
                const index_t th = ih + a.p - i;  // = oh * s
                if (th < 0 || th % a.s != 0 || th / a.s >= a.ho) continue;
                const index_t oh = th / a.s;
                for (index_t ow = 0; ow < a.wo; ++ow) {
                    const float* __restrict__ row = cols + ((b * a.ho + oh) * a.wo + ow) * K;
                    const index_t iw0 = ow * a.s - a.p;
                    if (iw0 >= 0 && iw0 + a.kw <= a.w) {  // the kw taps are one contiguous run
                        const float* __restrict__ src = row + i * a.kw * C;
                        float* __restrict__ dst = dxrow + iw0 * C;
                        for (index_t e = 0; e < a.kw * C; ++e) dst[e] += src[e];
                        continue;
                    }
                    for (index_t j = 0; j < a.kw; ++j) {
                        const index_t iw = ow * a.s - a.p + j;
                        if (iw < 0 || iw >= a.w) continue;
                        const float* __restrict__ src = row + (i * a.kw + j) * C;
                        float* __restrict__ dst = dxrow + iw * C;
                        for (index_t c = 0; c < C; ++c) dst[c] += src[c];
                    }
                }
            }
        }
}

// Calls f(n0, nb, cols) for each chunk of images [n0, n0 + nb), in order, with one column buffer
// of a.chunk() * ho * wo * kh * kw * ci floats, not zeroed.
template <class F>
void for_each_chunk(const ConvShape& a, F&& f) {
    const index_t nb_max = a.chunk();
    std::unique_ptr<float[]> cols(new float[nb_max * a.pixels() * a.kdim()]);
    for (index_t n0 = 0; n0 < a.n; n0 += nb_max) f(n0, std::min(nb_max, a.n - n0), cols.get());
}

// With stats, y's per-channel statistics are added as sgemm_epilogue finishes each block of y.
void conv2d_f32_fwd(const ConvShape& a, const float* x, const float* w, float* y,
                    ChannelStats* stats = nullptr) {
    const index_t K = a.kdim(), P = a.pixels(), co = a.co;
    // y's rows [row0, row0 + m) = A (m, K) @ w.
    auto gemm = [&](index_t row0, index_t m, const float* A) {
        float* out = y + row0 * co;
        if (!stats) {
            sgemm(m, co, K, A, K, 1, w, co, 1, out, co, false);
            return;
        }
        sgemm_epilogue(m, co, K, A, K, 1, w, co, 1, out, co, row0,
                       [&](index_t i0, index_t mc, index_t j0, index_t nc) {
                           stats->add(row0 + i0, mc, j0, nc, out + i0 * co + j0, co);
                       });
    };
    if (a.is_pointwise()) {
        gemm(0, a.n * P, x);
        return;
    }
    for_each_chunk(a, [&](index_t n0, index_t nb, float* cols) {
        im2col_f32(a, x, n0, nb, cols);
        gemm(n0 * P, nb * P, cols);
    });
}

// dx = col2im(dy @ w^T).
void conv2d_f32_bwd_input(const ConvShape& a, const float* dy, const float* w, float* dx) {
    const index_t K = a.kdim(), P = a.pixels();
    if (a.is_pointwise()) {
        sgemm(a.n * P, K, a.co, dy, a.co, 1, w, 1, a.co, dx, K, false);
        return;
    }
    for_each_chunk(a, [&](index_t n0, index_t nb, float* cols) {
        sgemm(nb * P, K, a.co, dy + n0 * P * a.co, a.co, 1, w, 1, a.co, cols, K, false);
        col2im_f32(a, cols, n0, nb, dx);
    });
}

// dw (kh*kw*ci, co) = cols^T @ dy, summed over the chunks.
void conv2d_f32_bwd_weight(const ConvShape& a, const float* x, const float* dy, float* dw) {
    const index_t K = a.kdim(), P = a.pixels();
    if (a.is_pointwise()) {
        sgemm(K, a.co, a.n * P, x, 1, K, dy, a.co, 1, dw, a.co, false);
        return;
    }
    for_each_chunk(a, [&](index_t n0, index_t nb, float* cols) {
        im2col_f32(a, x, n0, nb, cols);
        sgemm(K, a.co, nb * P, cols, 1, K, dy + n0 * P * a.co, a.co, 1, dw, a.co, n0 > 0);
    });
}

// ---- bindings ----------------------------------------------------------------------------------

// Refuses an output `name` of `shape`, or an im2col matrix, that no machine holds; then computes
// the output by kernel(out) without the GIL.
template <class Kernel>
py::array_t<float> run(const ConvShape& a, const std::vector<index_t>& shape, const char* name,
                       Kernel&& kernel) {
    check_alloc({a.pixels(), a.kdim()}, "the im2col matrix of one image");
    return compute_f32(shape, kernel, name);
}

py::array_t<float> conv2d_fwd(const py::object& x_, const py::object& w_,
                              const py::object& stride, const py::object& padding) {
    F32 x = check_f32(x_, "x", 4), w = check_f32(w_, "w", 4);
    check_same_dim(x, 3, "x", w, 2, "w");
    ConvShape a{x[0], x[1], x[2], x[3], w[0], w[1], w[3], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    return run(a, {a.n, a.ho, a.wo, a.co}, "y",
               [&](float* y) { conv2d_f32_fwd(a, x.ptr, w.ptr, y); });
}

py::tuple conv2d_fwd_stats(const py::object& x_, const py::object& w_, const py::object& stride,
                           const py::object& padding) {
    F32 x = check_f32(x_, "x", 4), w = check_f32(w_, "w", 4);
    check_same_dim(x, 3, "x", w, 2, "w");
    ConvShape a{x[0], x[1], x[2], x[3], w[0], w[1], w[3], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    check_alloc({a.pixels(), a.kdim()}, "the im2col matrix of one image");
    return compute_f32_stats({a.n, a.ho, a.wo, a.co}, kStatsRows, [&](float* y, ChannelStats& stats) {
        conv2d_f32_fwd(a, x.ptr, w.ptr, y, &stats);
    });
}

py::array_t<float> conv2d_bwd_input(const py::object& dy_, const py::object& w_,
                                    const py::object& input_hw, const py::object& stride,
                                    const py::object& padding) {
    F32 dy = check_f32(dy_, "dy", 4), w = check_f32(w_, "w", 4);
    check_same_dim(dy, 3, "dy", w, 3, "w");
    auto [h, wd] = parse_hw(input_hw, "input_hw");
    ConvShape a{dy[0], h, wd, w[2], w[0], w[1], w[3], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    check_dy_shape(dy, a);
    return run(a, {a.n, a.h, a.w, a.ci}, "dx",
               [&](float* dx) { conv2d_f32_bwd_input(a, dy.ptr, w.ptr, dx); });
}

py::array_t<float> conv2d_bwd_weight(const py::object& x_, const py::object& dy_,
                                     const py::object& kernel_hw, const py::object& stride,
                                     const py::object& padding) {
    F32 x = check_f32(x_, "x", 4), dy = check_f32(dy_, "dy", 4);
    check_same_dim(x, 0, "x", dy, 0, "dy");
    auto [kh, kw] = parse_hw(kernel_hw, "kernel_hw");
    ConvShape a{x[0], x[1], x[2], x[3], kh, kw, dy[3], 0, 0, parse_stride(stride), parse_padding(padding)};
    set_out_size(a);
    check_dy_shape(dy, a);
    return run(a, {a.kh, a.kw, a.ci, a.co}, "dw",
               [&](float* dw) { conv2d_f32_bwd_weight(a, x.ptr, dy.ptr, dw); });
}

}  // namespace

void bind_conv2d(py::module_& m) {
    m.def("conv2d_fwd", &conv2d_fwd, py::arg("x"), py::arg("w"), py::arg("stride"),
          py::arg("padding"),
          "x (n, h, w, ci), w (kh, kw, ci, co) -> y (n, ho, wo, co): full convolution.");
    m.def("conv2d_fwd_stats", &conv2d_fwd_stats, py::arg("x"), py::arg("w"), py::arg("stride"),
          py::arg("padding"),
          "x (n, h, w, ci), w (kh, kw, ci, co) -> (y (n, ho, wo, co), mean (co,), var (co,)):\n"
          "conv2d_fwd and y's per-channel mean and biased variance over n, ho, wo, summed as each\n"
          "tile of y is computed (for batchnorm_act_train_fwd_from_stats).");
    m.def("conv2d_bwd_input", &conv2d_bwd_input, py::arg("dy"), py::arg("w"), py::arg("input_hw"),
          py::arg("stride"), py::arg("padding"),
          "dy (n, ho, wo, co), w (kh, kw, ci, co), input_hw (h, w) -> dx (n, h, w, ci).");
    m.def("conv2d_bwd_weight", &conv2d_bwd_weight, py::arg("x"), py::arg("dy"),
          py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"),
          "x (n, h, w, ci), dy (n, ho, wo, co), kernel_hw (kh, kw) -> dw (kh, kw, ci, co).");
}

}  // namespace mbnet
