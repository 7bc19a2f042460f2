// The extension module mbnet._C: thread control, build information, and each op family's bindings.
#include <omp.h>

#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "common.h"

namespace mbnet {

void bind_plan(py::module_& m);  // plan.cpp

static void set_num_threads(int n) {
    require(n >= 1, "n must be >= 1, got " + std::to_string(n));
    // libgomp dies (not raises) when it cannot create threads: refuse absurd counts up front.
    const int limit = 4 * omp_get_num_procs();
    require(n <= limit, "n must be <= " + std::to_string(limit) + " (4x the " +
                            std::to_string(omp_get_num_procs()) + " processors), got " +
                            std::to_string(n));
    omp_set_num_threads(n);
}

// Buffer reuse across training steps. A step allocates and frees the same large activation and
// gradient arrays every time (up to 34 MB each at batch 128). glibc's defaults hand blocks above
// its mmap threshold (at most 32 MB) straight back to the kernel and fault them in again, zeroed,
// at the next step (about 7,600 page faults and 11-18 ms of kernel time per α=1 step at batch 128;
// a fresh 33.5 MB output made the 32->64 @ 32x32 pointwise forward 1.8x slower): serve every block
// from the heap (no mmap) and never trim it, so the next step reuses the same memory. Left alone
// when the user tunes glibc's allocator through its environment.
static bool keep_freed_memory() {
#if defined(__GLIBC__)
    for (const char* var : {"MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                            "GLIBC_TUNABLES", "MBNET_NO_MALLOPT"})
        if (std::getenv(var)) return false;
    return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
    return false;
#endif
}

static const bool kKeepsFreedMemory = keep_freed_memory();

static py::dict build_info() {
    py::dict d;
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#elif defined(__AVX__)
    d["simd"] = "avx";
#else
    d["simd"] = "sse2";
#endif
#ifdef MBNET_MARCH
    d["march"] = MBNET_MARCH;  // the -march it was compiled with
    d["native"] = std::string(MBNET_MARCH) == "native";
#else
    d["march"] = py::none();
    d["native"] = false;
#endif
    d["compiler"] = __VERSION__;
    d["openmp"] = _OPENMP;
    d["max_threads"] = omp_get_max_threads();
    d["keeps_freed_memory"] = kKeepsFreedMemory;  // see keep_freed_memory()
    return d;
}

}  // namespace mbnet

PYBIND11_MODULE(_C, m) {
    using namespace mbnet;
    m.doc() = "mbnet C++ kernels: NHWC float32 activations, TensorFlow weight layouts.";
    m.def("set_num_threads", &set_num_threads, py::arg("n"),
          "Set the number of OpenMP threads the kernels use.");
    m.def("get_num_threads", []() { return omp_get_max_threads(); },
          "The number of OpenMP threads the kernels use.");
    m.def("build_info", &build_info, "How the extension was compiled (SIMD level, OpenMP, compiler).");
    bind_gemm(m);
    bind_dwconv(m);
    bind_conv2d(m);
    bind_batchnorm(m);
    bind_pool(m);
    bind_loss(m);
    bind_optim(m);
    bind_plan(m);
}
