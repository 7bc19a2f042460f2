// Softmax cross-entropy with label smoothing: logits (N, K), integer labels (N,).
//
// Targets t = (1 - s) * onehot(label) + s / K. Loss = mean over n of -sum_k t_k log softmax_k.
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace mbnet {
namespace {

// Checks labels against (N, K): length N, each in [0, K).
py::array_t<std::int64_t> checked_labels(const py::object& obj, index_t N, index_t K) {
    auto labels = check_labels(obj, "labels");
    require(labels.shape(0) == N, "labels has " + std::to_string(labels.shape(0)) +
                                      " entries but the batch has " + std::to_string(N));
    const std::int64_t* l = labels.data();
    for (index_t n = 0; n < N; ++n)
        if (l[n] < 0 || l[n] >= K)
            throw py::value_error("labels[" + std::to_string(n) + "] = " + std::to_string(l[n]) +
                                  " is outside [0, " + std::to_string(K) + ")");
    return labels;
}

void check_smoothing(double s) {
    require(s >= 0.0 && s < 1.0, "label_smoothing must be in [0, 1), got " + std::to_string(s));
}

py::tuple softmax_cross_entropy_fwd(const py::object& logits_, const py::object& labels_,
                                    double label_smoothing) {
    F32 logits = check_f32(logits_, "logits", 2);
    const index_t N = logits[0], K = logits[1];
    auto labels = checked_labels(labels_, N, K);
    check_smoothing(label_smoothing);
    auto probs = new_f32({N, K});
    float* pp = ptr(probs);
    const float* lp = logits.ptr;
    const std::int64_t* lab = labels.data();
    double total = 0.0;
    {
        py::gil_scoped_release release;
        const double s = label_smoothing;
#pragma omp parallel for reduction(+ : total) if (N * K >= kParallelMinLoss)
        for (index_t n = 0; n < N; ++n) {
            const float* __restrict__ z = lp + n * K;
            float* __restrict__ p = pp + n * K;
            float mx = z[0];
            for (index_t k = 1; k < K; ++k) mx = std::max(mx, z[k]);
            double sum_exp = 0.0, sum_z = 0.0;
            for (index_t k = 0; k < K; ++k) {
                p[k] = std::exp(z[k] - mx);
                sum_exp += p[k];
                sum_z += double(z[k] - mx);
            }
            double lse = std::log(sum_exp);
            float inv = float(1.0 / sum_exp);
            for (index_t k = 0; k < K; ++k) p[k] *= inv;
            // -sum_k t_k (z_k - lse) with sum_k t_k = 1; a term whose target is 0 adds 0 (0 log 0 = 0),
            // so a -inf logit (a masked class) or a float overflow of z_k - mx costs nothing unless
            // smoothing gives it mass.
            total += lse - (1.0 - s) * double(z[lab[n]] - mx) - (s > 0.0 ? s / double(K) * sum_z : 0.0);
        }
    }
    return py::make_tuple(total / double(N), probs);
}

py::array_t<float> softmax_cross_entropy_bwd(const py::object& probs_, const py::object& labels_,
                                             double label_smoothing, double grad_scale) {
    F32 probs = check_f32(probs_, "probs", 2);
    const index_t N = probs[0], K = probs[1];
    auto labels = checked_labels(labels_, N, K);
    check_smoothing(label_smoothing);
    require(std::abs(grad_scale) <= std::numeric_limits<float>::max(),
            "grad_scale must be finite in float32 (|grad_scale| <= 3.4e38), got " +
                std::string(py::str(py::float_(grad_scale))));
    auto dlogits = new_f32({N, K});
    float* dp = ptr(dlogits);
    const float* pp = probs.ptr;
    const std::int64_t* lab = labels.data();
    {
        py::gil_scoped_release release;
        const float scale = float(grad_scale / double(N));
        const float off = float(label_smoothing / double(K));
        const float hit = float(1.0 - label_smoothing);
#pragma omp parallel for if (N * K >= kParallelMin)
        for (index_t n = 0; n < N; ++n) {
            const float* __restrict__ p = pp + n * K;
            float* __restrict__ d = dp + n * K;
            for (index_t k = 0; k < K; ++k) d[k] = (p[k] - off) * scale;
            d[lab[n]] -= hit * scale;
        }
    }
    return dlogits;
}

}  // namespace

void bind_loss(py::module_& m) {
    m.def("softmax_cross_entropy_fwd", &softmax_cross_entropy_fwd, py::arg("logits"),
          py::arg("labels"), py::arg("label_smoothing") = 0.0,
          "logits (N, K) float32, labels (N,) int -> (loss: float, probs (N, K) float32).\n"
          "Mean over the batch of the cross-entropy between softmax(logits) and the targets\n"
          "(1 - label_smoothing) * onehot(labels) + label_smoothing / K.");
    m.def("softmax_cross_entropy_bwd", &softmax_cross_entropy_bwd, py::arg("probs"),
          py::arg("labels"), py::arg("label_smoothing") = 0.0, py::arg("grad_scale") = 1.0,
          "probs (N, K), labels (N,) -> dlogits (N, K) = (probs - targets) * grad_scale / N.");
}

}  // namespace mbnet
