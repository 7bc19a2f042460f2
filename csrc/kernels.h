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

}  // namespace mbnet
