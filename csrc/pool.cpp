// Global average pooling over H and W: (N, H, W, C) -> (N, C), and its backward.
#include <omp.h>

#include <array>
#include <vector>

#include <pybind11/stl.h>

#include "common.h"

namespace mbnet {
namespace {

py::array_t<float> global_avg_pool_fwd(const py::object& x_) {
    F32 x = check_f32(x_, "x", 4);
    const index_t N = x[0], HW = x[1] * x[2], C = x[3];
    auto y = new_f32({N, C});
    float* yp = ptr(y);
    const float* xp = x.ptr;
    {
        py::gil_scoped_release release;
#pragma omp parallel if (N * HW * C >= (1 << 15))
        {
            std::vector<double> acc(C);
            double* __restrict__ a = acc.data();
#pragma omp for
            for (index_t n = 0; n < N; ++n) {
                std::fill(acc.begin(), acc.end(), 0.0);
                for (index_t p = 0; p < HW; ++p) {
                    const float* __restrict__ xr = xp + (n * HW + p) * C;
                    for (index_t c = 0; c < C; ++c) a[c] += double(xr[c]);
                }
                for (index_t c = 0; c < C; ++c) yp[n * C + c] = float(a[c] / double(HW));
            }
        }
    }
    return y;
}

py::array_t<float> global_avg_pool_bwd(const py::object& dy_, std::array<index_t, 2> input_hw) {
    F32 dy = check_f32(dy_, "dy", 2);
    const index_t N = dy[0], C = dy[1], H = input_hw[0], W = input_hw[1];
    require(H >= 1 && W >= 1, "input_hw must be >= 1, got (" + std::to_string(H) + ", " +
                                  std::to_string(W) + ")");
    index_t HW, total;
    require(!__builtin_mul_overflow(H, W, &HW) && !__builtin_mul_overflow(HW, N * C, &total) &&
                total <= (index_t(1) << 40),
            "input_hw (" + std::to_string(H) + ", " + std::to_string(W) + ") is too large");
    auto dx = new_f32({N, H, W, C});
    float* dxp = ptr(dx);
    const float* dyp = dy.ptr;
    {
        py::gil_scoped_release release;
        const float inv = float(1.0 / double(HW));
#pragma omp parallel for collapse(2) if (total >= (1 << 15))
        for (index_t n = 0; n < N; ++n)
            for (index_t p = 0; p < HW; ++p) {
                float* __restrict__ dr = dxp + (n * HW + p) * C;
                const float* __restrict__ g = dyp + n * C;
                for (index_t c = 0; c < C; ++c) dr[c] = g[c] * inv;
            }
    }
    return dx;
}

}  // namespace

void bind_pool(py::module_& m) {
    m.def("global_avg_pool_fwd", &global_avg_pool_fwd, py::arg("x"),
          "x (N, H, W, C) -> (N, C): the mean over H and W.");
    m.def("global_avg_pool_bwd", &global_avg_pool_bwd, py::arg("dy"), py::arg("input_hw"),
          "dy (N, C), input_hw (H, W) -> dx (N, H, W, C) = dy / (H*W) broadcast over H and W.");
}

}  // namespace mbnet
