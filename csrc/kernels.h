// C++ entry points of kernels that live in other files' anonymous namespaces, for callers that
// schedule them themselves (plan.cpp). sgemm and sgemm_packed_b are in gemm.h.
#pragma once
#include "common.h"

namespace mbnet {

// dwconv.cpp: one row of a 3x3 depthwise convolution + bias + act, C channels, `count` output
// pixels: out[k][c] = act(sum over i, j of src[i * rs + k * step + j * C + c] * w[i][j][c] +
// bias[c]), with every tap in bounds (src is a zero-padded image or the interior). step = stride *
// C, rs = the image row length in floats. Single-threaded; taps summed in a fixed order, the same
// as dwconv2d_fwd's.
void dwconv3x3_bias_act_f32_fwd_row(index_t C, index_t count, index_t step, index_t rs,
                                    const float* src, const float* w, const float* bias, Act a,
                                    float* out);

// batchnorm.cpp: training BatchNorm's backward from its two sums (GradStats, common.h): x, dy, dx
// (M, C), the rest (C,); dgamma = sum_dz_xc * invstd, dbeta = sum_dz, dx the gradient of x (the
// same float operations as batchnorm_act_train_bwd's). dx may be dy: the pass runs in place.
// Threads over rows; call it from outside any parallel region.
void batchnorm_act_f32_train_bwd_apply(index_t M, index_t C, Act act, const float* dy, const float* x,
                                       const float* gamma, const float* beta, const float* mean,
                                       const float* invstd, const double* sum_dz, const double* sum_dz_xc,
                                       float* dx, float* dgamma, float* dbeta);

// (dx, dgamma, dbeta) of training BatchNorm + act (bn, of x with `shape` (..., C)) followed by a
// convolution: kernel(dx, stats) writes the convolution's input gradient into dx and adds each
// tile of it to `stats` (a GradStats of blocks of `block` rows) while it is in cache; BatchNorm's
// apply pass then turns dx into x's gradient in place. All of it without the GIL.
template <class Kernel>
py::tuple compute_bn_bwd(const std::vector<index_t>& shape, const BnActArgs& bn, const F32& x, index_t block,
                         Kernel&& kernel) {
    const index_t C = shape.back(), M = x.size() / C;
    auto dgamma = new_f32({C}, "dgamma"), dbeta = new_f32({C}, "dbeta");
    float *dgp = ptr(dgamma), *dbp = ptr(dbeta);
    auto dx = compute_f32(shape, [&](float* dxp) {
        GradStats stats(M, C, block, bn.transform(false));
        kernel(dxp, stats);
        std::vector<double> sum_dz(C), sum_dz_xc(C);
        stats.finish(sum_dz.data(), sum_dz_xc.data());
        batchnorm_act_f32_train_bwd_apply(M, C, bn.act, dxp, x.ptr, bn.gamma.ptr, bn.beta.ptr, bn.mean.ptr,
                                          bn.invstd.ptr, sum_dz.data(), sum_dz_xc.data(), dxp, dgp, dbp);
    }, "dx");
    return py::make_tuple(dx, dgamma, dbeta);
}

}  // namespace mbnet
