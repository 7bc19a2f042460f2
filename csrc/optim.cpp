// Optimizer updates in place, elementwise over a parameter and its state: SGD (momentum, Nesterov,
// L2 weight decay) and the exponential moving average of the weights. One pass over memory with
// the kernel threads where their NumPy formulation (mbnet.reference.sgd_update / ema_update) makes
// six and three single-threaded passes. Each float operation is NumPy's, in the same order, with
// the hyper-parameters rounded to float as NumPy rounds a Python float against a float32 array;
// this file is compiled with -ffp-contract=off (CMakeLists.txt) so that no product and sum fuse
// into an FMA: the results are bitwise mbnet.reference's on float32 arrays.
#include <cmath>

#include "common.h"

namespace mbnet {
namespace {

enum class Sgd { Plain, Momentum, Nesterov };

// p, buf (n,): g' = g + wd·p (kDecay; else g); Plain: p -= lr·g'; Momentum: buf = m·buf + g',
// p -= lr·buf; Nesterov: the same buf, p -= lr·g' + (lr·m)·buf.
template <bool kDecay, Sgd kMode>
void sgd_f32(index_t n, float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
             double lr, double m, double wd) {
    const float lrf = float(lr), mf = float(m), wdf = float(wd), lrmf = float(lr * m);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (index_t i = 0; i < n; ++i) {
        const float gi = kDecay ? p[i] * wdf + g[i] : g[i];
        if constexpr (kMode == Sgd::Plain) {
            p[i] = p[i] - gi * lrf;
        } else {
            const float b = buf[i] * mf + gi;
            buf[i] = b;
            p[i] = kMode == Sgd::Nesterov ? (p[i] - gi * lrf) - b * lrmf : p[i] - b * lrf;
        }
    }
}

template <bool kDecay>
void sgd_f32(index_t n, float* p, const float* g, float* buf, double lr, double m, double wd, bool nesterov) {
    if (!buf) return sgd_f32<kDecay, Sgd::Plain>(n, p, g, buf, lr, m, wd);
    if (nesterov) return sgd_f32<kDecay, Sgd::Nesterov>(n, p, g, buf, lr, m, wd);
    sgd_f32<kDecay, Sgd::Momentum>(n, p, g, buf, lr, m, wd);
}

// s -= (s - v)·(1 - d)
void ema_f32(index_t n, float* __restrict__ s, const float* __restrict__ v, double d) {
    const float c = float(1.0 - d);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (index_t i = 0; i < n; ++i) s[i] = s[i] - (s[i] - v[i]) * c;
}

// A float32 array updated in place: checked like any input, and writeable.
F32 check_inout(const py::object& obj, const char* name) {
    F32 a = check_f32(obj, name, -1);
    require(a.arr.writeable(), std::string(name) + " must be writeable (it is updated in place)");
    return a;
}

void check_same_shape(const F32& a, const char* na, const F32& b, const char* nb) {
    require(a.shape == b.shape, std::string(nb) + " must have " + na + "'s shape " + shape_str(a.shape) +
                                    ", got " + shape_str(b.shape));
}

void check_real(double v, const char* name, double lo, double hi) {
    const std::string range = hi == HUGE_VAL ? ">= " + std::to_string(lo)
                                             : "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    require(std::isfinite(v) && v >= lo && v <= hi,
            std::string(name) + " must be finite and " + range + ", got " + std::to_string(v));
}

py::object sgd_update(const py::object& p_, const py::object& g_, const py::object& buf_, double lr,
                      double momentum, double weight_decay, bool nesterov) {
    F32 p = check_inout(p_, "p"), g = check_f32(g_, "grad", -1);
    check_same_shape(p, "p", g, "grad");
    require_apart(p, "p", g, "grad");
    check_real(lr, "lr", 0.0, HUGE_VAL);  // a huge lr overflows to inf, as NumPy's update does
    check_real(momentum, "momentum", 0.0, 1.0);
    check_real(weight_decay, "weight_decay", 0.0, HUGE_VAL);
    require(!nesterov || momentum > 0.0, "nesterov needs momentum > 0");
    F32 buf;
    if (momentum > 0.0) {
        require(!buf_.is_none(), "buf must be the momentum buffer when momentum > 0");
        buf = check_inout(buf_, "buf");
        check_same_shape(p, "p", buf, "buf");
        require_apart(buf, "buf", p, "p");
        require_apart(buf, "buf", g, "grad");
    }
    {
        py::gil_scoped_release nogil;
        float* b = momentum > 0.0 ? buf.ptr : nullptr;
        if (weight_decay != 0.0)
            sgd_f32<true>(p.size(), p.ptr, g.ptr, b, lr, momentum, weight_decay, nesterov);
        else
            sgd_f32<false>(p.size(), p.ptr, g.ptr, b, lr, momentum, weight_decay, nesterov);
    }
    return p_;
}

py::object ema_update(const py::object& s_, const py::object& v_, double decay) {
    F32 s = check_inout(s_, "shadow"), v = check_f32(v_, "value", -1);
    check_same_shape(s, "shadow", v, "value");
    require_apart(s, "shadow", v, "value");
    check_real(decay, "decay", 0.0, 1.0);
    {
        py::gil_scoped_release nogil;
        ema_f32(s.size(), s.ptr, v.ptr, decay);
    }
    return s_;
}

}  // namespace

void bind_optim(py::module_& m) {
    m.def("sgd_update", &sgd_update, py::arg("p"), py::arg("grad"), py::arg("buf"), py::arg("lr"),
          py::arg("momentum"), py::arg("weight_decay"), py::arg("nesterov"),
          "p, grad, buf (same shape; buf None without momentum), lr, momentum, weight_decay, nesterov\n"
          "-> p, updated in place with buf (PyTorch's SGD, dampening 0): g = grad + weight_decay * p,\n"
          "buf = momentum * buf + g, p -= lr * (g + momentum * buf if nesterov else buf).");
    m.def("ema_update", &ema_update, py::arg("shadow"), py::arg("value"), py::arg("decay"),
          "shadow, value (same shape), decay in [0, 1] -> shadow, updated in place:\n"
          "shadow -= (shadow - value) * (1 - decay).");
}

}  // namespace mbnet
