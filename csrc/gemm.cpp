// PLACEHOLDER: a naive, correct sgemm so other kernels can be developed; to be replaced by the
// packed, register-tiled version.
#include "gemm.h"

#include "common.h"

namespace mbnet {

void sgemm(index_t M, index_t N, index_t K, const float* A, index_t rsa, index_t csa,
           const float* B, index_t rsb, index_t csb, float* C, index_t ldc, bool accumulate) {
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        if (!accumulate)
            for (index_t j = 0; j < N; ++j) c[j] = 0.f;
        for (index_t k = 0; k < K; ++k) {
            const float a = A[i * rsa + k * csa];
            for (index_t j = 0; j < N; ++j) c[j] += a * B[k * rsb + j * csb];
        }
    }
}

void bind_gemm(py::module_& m) {}

}  // namespace mbnet
