// C++ entry points of kernels that live in other files' anonymous namespaces, for callers that
// schedule them themselves (plan.cpp). sgemm and sgemm_packed_b are in gemm.h.
#pragma once
#include "common.h"

namespace mbnet {

// dwconv.cpp: one row of a 3x3 depthwise convolution, C channels, `count` output pixels:
// out[k][c] = sum over i, j of src[i * rs + k * step + j * C + c] * w[i][j][c], with every tap in
// bounds (src is a zero-padded image or the interior). step = stride * C, rs = the image row
// length in floats. Single-threaded; taps summed in a fixed order.
void dwconv3x3_f32_fwd_row(index_t C, index_t count, index_t step, index_t rs,
                           const float* src, const float* w, float* out);

}  // namespace mbnet
