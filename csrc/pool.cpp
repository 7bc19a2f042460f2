// Global average pooling over H and W: (N, H, W, C) -> (N, C), and its backward.
#include <omp.h>

#include <vector>

#include "common.h"

namespace mbnet {
namespace {

py::array_t<float> global_avg_pool_fwd(const py::object& x_) {
    F32 x = check_f32(x_, "x", 4);
    const index_t N = x[0], HW = x[1] * x[2], C = x[3];
    const float* xp = x.ptr;
    return compute_f32({N, C}, [&](float* yp) {
        const bool parallel = N * HW * C >= kParallelMin;
        // One row of C sums per thread, allocated before the parallel region.
        std::vector<double> acc(size_t(parallel ? omp_get_max_threads() : 1) * C);
#pragma omp parallel if (parallel)
        {
            double* __restrict__ a = acc.data() + omp_get_thread_num() * C;
#pragma omp for
            for (index_t n = 0; n < N; ++n) {
                std::fill(a, a + C, 0.0);
                for (index_t p = 0; p < HW; ++p) {
                    const float* __restrict__ xr = xp + (n * HW + p) * C;
                    for (index_t c = 0; c < C; ++c) a[c] += double(xr[c]);
                }
                for (index_t c = 0; c < C; ++c) yp[n * C + c] = float(a[c] / double(HW));
            }
        }
    });
}

py::array_t<float> global_avg_pool_bwd(const py::object& dy_, const py::object& input_hw) {
    F32 dy = check_f32(dy_, "dy", 2);
    auto [H, W] = parse_hw(input_hw, "input_hw");
    const index_t N = dy[0], C = dy[1], HW = H * W;  // each <= 2^30: no overflow
    const float* dyp = dy.ptr;
    return compute_f32({N, H, W, C}, [&](float* dxp) {
        const float inv = float(1.0 / double(HW));
#pragma omp parallel for collapse(2) if (N * HW * C >= kParallelMin)
        for (index_t n = 0; n < N; ++n)
            for (index_t p = 0; p < HW; ++p) {
                float* __restrict__ dr = dxp + (n * HW + p) * C;
                const float* __restrict__ g = dyp + n * C;
                for (index_t c = 0; c < C; ++c) dr[c] = g[c] * inv;
            }
    }, "dx (dy's N and C at input_hw)");
}

}  // namespace

void bind_pool(py::module_& m) {
    m.def("global_avg_pool_fwd", &global_avg_pool_fwd, py::arg("x"),
          "x (N, H, W, C) -> (N, C): the mean over H and W.");
    m.def("global_avg_pool_bwd", &global_avg_pool_bwd, py::arg("dy"), py::arg("input_hw"),
          "dy (N, C), input_hw (H, W) -> dx (N, H, W, C) = dy / (H*W) broadcast over H and W.");
}

}  // namespace mbnet
