// BatchNorm fused with ReLU / ReLU6, and the activations alone.
//
// x has any rank >= 2 and is viewed as (M, C): C is the last (contiguous) axis, M all the others.
// Passes over memory: train forward = statistics + normalize (normalize alone when the statistics
// come from the convolution's kernel: batchnorm_act_train_fwd_from_stats); train backward =
// reduction + dx; inference forward and backward = one pass each. Every loop runs over contiguous
// channels with per-channel (per-thread) accumulators, so GCC vectorizes it without reordering
// any sum.
// Kernels (batchnorm_act_f32_*) take a BnShape and raw pointers; the bindings check the arguments,
// allocate the outputs and call them without the GIL.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"
#include "kernels.h"

namespace mbnet {
namespace {

// With few channels a row is too short for the vector loop, so the loops walk "wide rows" of
// W = k*C elements (k whole rows, W >= 64 floats) and per-channel arrays are stored k times over
// (`rep`). The last wide row may be shorter but still holds whole rows.
struct BnShape {
    index_t M, C, W, n;  // n wide rows over M*C elements
    index_t total() const { return M * C; }
    index_t len(index_t r) const { return std::min(W, total() - r * W); }
};

BnShape make_shape(index_t M, index_t C) {
    index_t k = std::max<index_t>(1, 64 / C);
    index_t W = k * C;
    return {M, C, W, (M * C + W - 1) / W};
}

template <class T, class U>
std::vector<T> rep(const BnShape& r, const U* v) {
    std::vector<T> out(r.W);
    for (index_t j = 0; j < r.W; ++j) out[j] = T(v[j % r.C]);
    return out;
}

// Thread t of T takes wide rows [lo, hi).
inline void my_rows(index_t n, index_t& lo, index_t& hi) {
    index_t t = omp_get_thread_num(), T = omp_get_num_threads();
    lo = n * t / T;
    hi = n * (t + 1) / T;
}

// Per-thread accumulators: `k` arrays of W doubles per thread, folded into C channels.
struct Partials {
    index_t W, stride;
    int k;
    std::vector<double> buf;
    Partials(index_t W_, int k_)
        : W(W_), stride((W_ + 7) / 8 * 8), k(k_), buf(size_t(omp_get_max_threads()) * k_ * stride) {}
    double* mine(int which) { return &buf[(size_t(omp_get_thread_num()) * k + which) * stride]; }
    // Sum of array `which` over threads and over the k copies of each channel.
    std::vector<double> fold(int which, index_t C) const {
        std::vector<double> out(C, 0.0);
        index_t T = index_t(buf.size() / (size_t(k) * stride));
        for (index_t t = 0; t < T; ++t) {
            const double* p = &buf[(size_t(t) * k + which) * stride];
            for (index_t j = 0; j < W; ++j) out[j % C] += p[j];
        }
        return out;
    }
};

// dy times act's derivative, read from act's output y (branch-free, for the vectorizer).
template <Act A>
inline float masked(float dy, float y) {
    if constexpr (A == Act::ReLU) return dy * float(y > 0.0f);
    if constexpr (A == Act::ReLU6) return dy * float((y > 0.0f) & (y < 6.0f));
    return dy;
}

template <class F>
void with_act(Act a, F&& f) {
    switch (a) {
        case Act::None: f(std::integral_constant<Act, Act::None>{}); break;
        case Act::ReLU: f(std::integral_constant<Act, Act::ReLU>{}); break;
        case Act::ReLU6: f(std::integral_constant<Act, Act::ReLU6>{}); break;
    }
}

// Calls row(o, len) for each wide row [o, o + len) of R, in parallel when R is large enough. Each
// thread takes a fixed contiguous run of wide rows (my_rows), so per-thread sums (Partials::mine)
// do not depend on scheduling.
template <class F>
void for_each_row(const BnShape& R, F&& row) {
#pragma omp parallel if (R.total() >= kParallelMin)
    {
        index_t lo, hi;
        my_rows(R.n, lo, hi);
        for (index_t r = lo; r < hi; ++r) row(r * R.W, R.len(r));
    }
}

// y = act((x - mean) * scale + shift), per channel.
template <Act A>
void normalize_act(const BnShape& R, const float* x, float* y, const std::vector<float>& mean_r,
                   const std::vector<float>& scale_r, const std::vector<float>& shift_r) {
    for_each_row(R, [&](index_t o, index_t len) {
        const float* __restrict__ mu = mean_r.data();
        const float* __restrict__ a = scale_r.data();
        const float* __restrict__ b = shift_r.data();
        const float* __restrict__ xr = x + o;
        float* __restrict__ yr = y + o;
        for (index_t j = 0; j < len; ++j) yr[j] = act<A>(preact(xr[j], mu[j], a[j], b[j]));
    });
}

// Batch statistics of the (M, C) view: biased variance, computed from sums of x minus its first
// row in double, so that a large mean does not cancel the variance away.
void batch_stats(const BnShape& R, const float* x, std::vector<double>& mean,
                 std::vector<double>& var) {
    std::vector<float> shift_r = rep<float>(R, x);
    Partials P(R.W, 2);
    for_each_row(R, [&](index_t o, index_t len) {
        double* __restrict__ s = P.mine(0);
        double* __restrict__ q = P.mine(1);
        const float* __restrict__ sh = shift_r.data();
        const float* __restrict__ xr = x + o;
        for (index_t j = 0; j < len; ++j) {
            double d = double(xr[j] - sh[j]);
            s[j] += d;
            q[j] += d * d;
        }
    });
    std::vector<double> S = P.fold(0, R.C), Q = P.fold(1, R.C);
    mean.resize(R.C);
    var.resize(R.C);
    for (index_t c = 0; c < R.C; ++c) {
        double m = S[c] / double(R.M);
        mean[c] = double(x[c]) + m;
        var[c] = std::max(Q[c] / double(R.M) - m * m, 0.0);
    }
}

// Per-channel sums of dz = mask(dy) and of dz * (x - mean), the two reductions of training
// backward; the mask at the pre-activation (x - mean) * scale + shift.
template <Act A>
void grad_sums(const BnShape& R, const float* dy, const float* x, const std::vector<float>& mean_r,
               const std::vector<float>& scale_r, const std::vector<float>& shift_r,
               std::vector<double>& sum_dz, std::vector<double>& sum_dz_xc) {
    Partials P(R.W, 2);
    for_each_row(R, [&](index_t o, index_t len) {
        grad_sums_row<A>(len, dy + o, x + o, mean_r.data(), scale_r.data(), shift_r.data(), P.mine(0), P.mine(1));
    });
    sum_dz = P.fold(0, R.C);
    sum_dz_xc = P.fold(1, R.C);
}

// ---- kernels -----------------------------------------------------------------------------------
// x, y, dy, dx (M, C); per-channel arrays (C,). Training backward recomputes the activation's mask
// from x (one stream fewer in each of its two passes); inference backward reads it from y.

// y = act(BN(x)) with the batch statistics mean and var (biased: batch_stats, or the convolution's
// ChannelStats); writes mean_out and invstd, updates rmean and rvar in place.
void batchnorm_act_f32_train_apply(const BnShape& R, Act act_kind, const float* x,
                                   const std::vector<double>& mean, const std::vector<double>& var,
                                   const float* gamma, const float* beta, float* rmean, float* rvar,
                                   double momentum, double eps, float* y, float* mean_out,
                                   float* invstd_out) {
    const index_t C = R.C;
    std::vector<float> scale(C), shift(C);
    for (index_t c = 0; c < C; ++c) {
        double invstd = 1.0 / std::sqrt(var[c] + eps);
        mean_out[c] = float(mean[c]);
        invstd_out[c] = float(invstd);
        scale[c] = train_scale(invstd_out[c], gamma[c]);
        shift[c] = beta[c];
    }
    auto mean_r = rep<float>(R, mean_out), scale_r = rep<float>(R, scale.data()),
         shift_r = rep<float>(R, shift.data());
    with_act(act_kind, [&](auto A) { normalize_act<decltype(A)::value>(R, x, y, mean_r, scale_r, shift_r); });
    double unbias = double(R.M) / double(std::max<index_t>(R.M - 1, 1));
    for (index_t c = 0; c < C; ++c) {
        rmean[c] = float((1.0 - momentum) * rmean[c] + momentum * mean[c]);
        rvar[c] = float((1.0 - momentum) * rvar[c] + momentum * var[c] * unbias);
    }
}

// Backward through the batch statistics, given the two sums (grad_sums, or GradStats gathered
// by a convolution's input gradient): dgamma, dbeta and dx = k1*dz - k2 - k3*(x - mean), the
// usual gamma*invstd/M * (M*dz - dbeta - xhat*dgamma). dx may be dy (in place).
void train_bwd_apply(const BnShape& R, Act act_kind, const float* dy, const float* x, const float* gamma,
                     const float* beta, const float* mean, const float* invstd, const double* sum_dz,
                     const double* sum_dz_xc, float* dx, float* dgamma, float* dbeta) {
    const index_t C = R.C, M = R.M;
    std::vector<float> scale(C), k1(C), k2(C), k3(C);
    for (index_t c = 0; c < C; ++c) {
        scale[c] = train_scale(invstd[c], gamma[c]);
        double is = invstd[c], g = gamma[c];
        double dg = sum_dz_xc[c] * is;
        dgamma[c] = float(dg);
        dbeta[c] = float(sum_dz[c]);
        k1[c] = float(g * is);
        k2[c] = float(g * is * sum_dz[c] / double(M));
        k3[c] = float(g * is * is * dg / double(M));
    }
    auto mean_r = rep<float>(R, mean), scale_r = rep<float>(R, scale.data()), shift_r = rep<float>(R, beta);
    auto k1_r = rep<float>(R, k1.data()), k2_r = rep<float>(R, k2.data()), k3_r = rep<float>(R, k3.data());
    with_act(act_kind, [&](auto A) {
        for_each_row(R, [&](index_t o, index_t len) {
            const float* __restrict__ mu = mean_r.data();
            const float* __restrict__ p1 = k1_r.data();
            const float* __restrict__ p2 = k2_r.data();
            const float* __restrict__ p3 = k3_r.data();
            const float* __restrict__ a = scale_r.data();
            const float* __restrict__ b = shift_r.data();
            const float* __restrict__ xr = x + o;
            const float* dyr = dy + o;  // not __restrict__: dx may be dy, element for element
            float* dxr = dx + o;
            if (o + kPrefetchFloats + len <= R.total()) {
                prefetch_floats(xr + kPrefetchFloats, len);
                prefetch_floats(dyr + kPrefetchFloats, len);
            }
#pragma GCC ivdep
            for (index_t j = 0; j < len; ++j) {
                float g = masked_pre<decltype(A)::value>(dyr[j], preact(xr[j], mu[j], a[j], b[j]));
                dxr[j] = p1[j] * g - p2[j] - p3[j] * (xr[j] - mu[j]);
            }
        });
    });
}

void batchnorm_act_f32_train_bwd(const BnShape& R, Act act_kind, const float* dy, const float* x,
                                 const float* gamma, const float* beta, const float* mean,
                                 const float* invstd, float* dx, float* dgamma, float* dbeta) {
    std::vector<float> scale(R.C);
    for (index_t c = 0; c < R.C; ++c) scale[c] = train_scale(invstd[c], gamma[c]);
    auto mean_r = rep<float>(R, mean), scale_r = rep<float>(R, scale.data()), shift_r = rep<float>(R, beta);
    std::vector<double> sum_dz, sum_dz_xc;
    with_act(act_kind, [&](auto A) {
        grad_sums<decltype(A)::value>(R, dy, x, mean_r, scale_r, shift_r, sum_dz, sum_dz_xc);
    });
    train_bwd_apply(R, act_kind, dy, x, gamma, beta, mean, invstd, sum_dz.data(), sum_dz_xc.data(), dx,
                    dgamma, dbeta);
}

// y = act(x), and dx = dy masked by act's derivative at y, over n floats. The pointers are function
// parameters: inside a lambda that captures them, `omp simd` made GCC 12 reload the captured
// pointer in every lane (gathers: 3.5x slower than this on 64 MB, one thread).
template <Act A>
void act_f32_fwd(index_t n, const float* __restrict__ x, float* __restrict__ y) {
#pragma omp parallel for simd if (n >= kParallelMin)
    for (index_t i = 0; i < n; ++i) y[i] = act<A>(x[i]);
}

template <Act A>
void act_f32_bwd(index_t n, const float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ dx) {
#pragma omp parallel for simd if (n >= kParallelMin)
    for (index_t i = 0; i < n; ++i) dx[i] = masked<A>(dy[i], y[i]);
}

// y = act(BN(x)) with fixed statistics.
void batchnorm_act_f32_infer_fwd(const BnShape& R, Act act_kind, const float* x, const float* gamma,
                                 const float* beta, const float* mean, const float* var, double eps,
                                 float* y) {
    std::vector<float> scale(R.C);
    for (index_t c = 0; c < R.C; ++c)
        scale[c] = float(double(gamma[c]) / std::sqrt(double(var[c]) + eps));
    auto mean_r = rep<float>(R, mean), scale_r = rep<float>(R, scale.data()),
         shift_r = rep<float>(R, beta);
    with_act(act_kind, [&](auto A) { normalize_act<decltype(A)::value>(R, x, y, mean_r, scale_r, shift_r); });
}

// Backward with fixed statistics: dx and the two reductions in one pass.
void batchnorm_act_f32_infer_bwd(const BnShape& R, Act act_kind, const float* dy, const float* x,
                                 const float* y, const float* gamma, const float* mean,
                                 const float* var, double eps, float* dx, float* dgamma,
                                 float* dbeta) {
    const index_t C = R.C;
    std::vector<double> invstd(C);
    std::vector<float> k(C);
    for (index_t c = 0; c < C; ++c) {
        invstd[c] = 1.0 / std::sqrt(double(var[c]) + eps);
        k[c] = float(gamma[c] * invstd[c]);
    }
    auto mean_r = rep<float>(R, mean), k_r = rep<float>(R, k.data());
    Partials P(R.W, 2);
    with_act(act_kind, [&](auto A) {
        for_each_row(R, [&](index_t o, index_t len) {
            double* __restrict__ sb = P.mine(0);
            double* __restrict__ sg = P.mine(1);
            const float* __restrict__ mu = mean_r.data();
            const float* __restrict__ kp = k_r.data();
            const float* __restrict__ dyr = dy + o;
            const float* __restrict__ xr = x + o;
            const float* __restrict__ yr = y + o;
            float* __restrict__ dxr = dx + o;
            for (index_t j = 0; j < len; ++j) {
                float g = masked<decltype(A)::value>(dyr[j], yr[j]);
                dxr[j] = g * kp[j];
                sb[j] += double(g);
                sg[j] += double(g * (xr[j] - mu[j]));
            }
        });
    });
    std::vector<double> sum_dz = P.fold(0, C), sum_dz_xc = P.fold(1, C);
    for (index_t c = 0; c < C; ++c) {
        dgamma[c] = float(sum_dz_xc[c] * invstd[c]);
        dbeta[c] = float(sum_dz[c]);
    }
}

// --- argument checking ------------------------------------------------------------------------

void check_same_shape(const F32& a, const char* na, const F32& b, const char* nb) {
    if (a.shape != b.shape)
        throw py::value_error(std::string(na) + " " + shape_str(a.shape) + " and " + nb + " " +
                              shape_str(b.shape) + " must have the same shape");
}

F32 check_channel_vec(const py::object& obj, const char* name, const F32& x) {
    F32 v = check_f32(obj, name, 1);
    check_same_dim(v, 0, name, x, -1, "x");
    return v;
}

F32 check_writeable_channel_vec(const py::object& obj, const char* name, const F32& x) {
    if (py::isinstance<py::array>(obj) && !py::reinterpret_borrow<py::array>(obj).writeable())
        throw py::value_error(std::string(name) + " must be writeable (it is updated in place)");
    return check_channel_vec(obj, name, x);
}

// The arguments both backwards share: dy, x (..., C) of one shape; gamma, beta, mean (C,).
struct BwdArgs {
    F32 dy, x, gamma, beta, mean;
    BwdArgs(const py::object& dy_, const py::object& x_, const py::object& gamma_,
            const py::object& beta_, const py::object& mean_)
        : dy(check_f32(dy_, "dy", -2)), x(check_f32(x_, "x", -2)) {
        check_same_shape(dy, "dy", x, "x");
        gamma = check_channel_vec(gamma_, "gamma", x);
        beta = check_channel_vec(beta_, "beta", x);
        mean = check_channel_vec(mean_, "mean", x);
    }
};

// A biased variance: >= 0 or NaN (the statistics of a diverged network are NaN, as
// batchnorm_act_train_fwd's are).
void check_variance(const F32& var) {
    for (index_t c = 0; c < var.size(); ++c)
        require(!(var.ptr[c] < 0.0f), "var must be >= 0 (a biased variance), got " + std::to_string(var.ptr[c]));
}

void check_eps(double eps) {
    require(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got " + std::to_string(eps));
}

// --- bindings ---------------------------------------------------------------------------------

BnShape shape_of(const F32& x) { return make_shape(x.size() / x[-1], x[-1]); }

// The arguments both training forwards share: x (..., C); gamma, beta, running_* (C,).
struct TrainFwdArgs {
    F32 x, gamma, beta, rmean, rvar;
    double momentum, eps;
    Act act;
    TrainFwdArgs(const py::object& x_, const py::object& gamma_, const py::object& beta_,
                 const py::object& rmean_, const py::object& rvar_, double momentum_, double eps_,
                 const std::string& act_name)
        : x(check_f32(x_, "x", -2)), momentum(momentum_), eps(eps_) {
        gamma = check_channel_vec(gamma_, "gamma", x);
        beta = check_channel_vec(beta_, "beta", x);
        rmean = check_writeable_channel_vec(rmean_, "running_mean", x);
        rvar = check_writeable_channel_vec(rvar_, "running_var", x);
        require_apart(rmean, "running_mean", rvar, "running_var");
        require(momentum >= 0.0 && momentum <= 1.0,
                "momentum must be in [0, 1], got " + std::to_string(momentum));
        check_eps(eps);
        act = parse_act(act_name);
    }

    // (y, mean, invstd) from stats(mean, var), then apply, without the GIL.
    template <class Stats>
    py::tuple run(Stats&& stats) const {
        const BnShape R = shape_of(x);
        auto y = new_f32(x.shape, "y"), mean = new_f32({R.C}), invstd = new_f32({R.C});
        float *yp = ptr(y), *mp = ptr(mean), *ip = ptr(invstd);
        {
            py::gil_scoped_release nogil;
            std::vector<double> m, v;
            stats(R, m, v);
            batchnorm_act_f32_train_apply(R, act, x.ptr, m, v, gamma.ptr, beta.ptr, rmean.ptr,
                                          rvar.ptr, momentum, eps, yp, mp, ip);
        }
        return py::make_tuple(y, mean, invstd);
    }
};

py::tuple bn_train_fwd(const py::object& x_, const py::object& gamma_, const py::object& beta_,
                       const py::object& rmean_, const py::object& rvar_, double momentum,
                       double eps, const std::string& act_name) {
    const TrainFwdArgs args(x_, gamma_, beta_, rmean_, rvar_, momentum, eps, act_name);
    return args.run([&](const BnShape& R, std::vector<double>& m, std::vector<double>& v) {
        batch_stats(R, args.x.ptr, m, v);
    });
}

py::tuple bn_train_fwd_from_stats(const py::object& x_, const py::object& mean_,
                                  const py::object& var_, const py::object& gamma_,
                                  const py::object& beta_, const py::object& rmean_,
                                  const py::object& rvar_, double momentum, double eps,
                                  const std::string& act_name) {
    const TrainFwdArgs args(x_, gamma_, beta_, rmean_, rvar_, momentum, eps, act_name);
    F32 mean = check_channel_vec(mean_, "mean", args.x), var = check_channel_vec(var_, "var", args.x);
    check_variance(var);
    return args.run([&](const BnShape& R, std::vector<double>& m, std::vector<double>& v) {
        m.assign(mean.ptr, mean.ptr + R.C);
        v.assign(var.ptr, var.ptr + R.C);
    });
}

py::tuple bn_train_bwd(const py::object& dy_, const py::object& x_, const py::object& gamma_,
                       const py::object& beta_, const py::object& mean_, const py::object& invstd_,
                       const std::string& act_name) {
    const BwdArgs args(dy_, x_, gamma_, beta_, mean_);
    F32 invstd = check_channel_vec(invstd_, "invstd", args.x);
    Act a = parse_act(act_name);
    const BnShape R = shape_of(args.x);
    auto dx = new_f32(args.x.shape, "dx"), dgamma = new_f32({R.C}), dbeta = new_f32({R.C});
    float *dxp = ptr(dx), *dgp = ptr(dgamma), *dbp = ptr(dbeta);
    {
        py::gil_scoped_release nogil;
        batchnorm_act_f32_train_bwd(R, a, args.dy.ptr, args.x.ptr, args.gamma.ptr, args.beta.ptr,
                                    args.mean.ptr, invstd.ptr, dxp, dgp, dbp);
    }
    return py::make_tuple(dx, dgamma, dbeta);
}

py::array_t<float> bn_infer_fwd(const py::object& x_, const py::object& gamma_,
                                const py::object& beta_, const py::object& mean_,
                                const py::object& var_, double eps, const std::string& act_name) {
    F32 x = check_f32(x_, "x", -2);
    F32 gamma = check_channel_vec(gamma_, "gamma", x);
    F32 beta = check_channel_vec(beta_, "beta", x);
    F32 mean = check_channel_vec(mean_, "mean", x);
    F32 var = check_channel_vec(var_, "var", x);
    check_variance(var);
    check_eps(eps);
    Act a = parse_act(act_name);
    return compute_f32(x.shape, [&](float* y) {
        batchnorm_act_f32_infer_fwd(shape_of(x), a, x.ptr, gamma.ptr, beta.ptr, mean.ptr, var.ptr, eps, y);
    }, "y");
}

py::tuple bn_infer_bwd(const py::object& dy_, const py::object& x_, const py::object& y_,
                       const py::object& gamma_, const py::object& beta_, const py::object& mean_,
                       const py::object& var_, double eps, const std::string& act_name) {
    const BwdArgs args(dy_, x_, gamma_, beta_, mean_);
    F32 y = check_f32(y_, "y", -2);
    check_same_shape(y, "y", args.x, "x");
    F32 var = check_channel_vec(var_, "var", args.x);
    check_variance(var);
    check_eps(eps);
    Act a = parse_act(act_name);
    const BnShape R = shape_of(args.x);
    auto dx = new_f32(args.x.shape, "dx"), dgamma = new_f32({R.C}), dbeta = new_f32({R.C});
    float *dxp = ptr(dx), *dgp = ptr(dgamma), *dbp = ptr(dbeta);
    {
        py::gil_scoped_release nogil;
        batchnorm_act_f32_infer_bwd(R, a, args.dy.ptr, args.x.ptr, y.ptr, args.gamma.ptr,
                                    args.mean.ptr, var.ptr, eps, dxp, dgp, dbp);
    }
    return py::make_tuple(dx, dgamma, dbeta);
}

py::array_t<float> act_fwd(const py::object& x_, const std::string& act_name) {
    F32 x = check_f32(x_, "x", -1);
    Act a = parse_act(act_name);
    return compute_f32(x.shape, [&](float* y) {
        with_act(a, [&](auto A) { act_f32_fwd<decltype(A)::value>(x.size(), x.ptr, y); });
    });
}

py::array_t<float> act_bwd(const py::object& dy_, const py::object& y_, const std::string& act_name) {
    F32 dy = check_f32(dy_, "dy", -1);
    F32 y = check_f32(y_, "y", -1);
    check_same_shape(dy, "dy", y, "y");
    Act a = parse_act(act_name);
    return compute_f32(y.shape, [&](float* dx) {
        with_act(a, [&](auto A) { act_f32_bwd<decltype(A)::value>(y.size(), dy.ptr, y.ptr, dx); });
    });
}

}  // namespace

void batchnorm_act_f32_train_bwd_apply(index_t M, index_t C, Act act, const float* dy, const float* x,
                                       const float* gamma, const float* beta, const float* mean,
                                       const float* invstd, const double* sum_dz, const double* sum_dz_xc,
                                       float* dx, float* dgamma, float* dbeta) {
    train_bwd_apply(make_shape(M, C), act, dy, x, gamma, beta, mean, invstd, sum_dz, sum_dz_xc, dx, dgamma,
                    dbeta);
}

void bind_batchnorm(py::module_& m) {
    m.def("batchnorm_act_train_fwd", &bn_train_fwd, py::arg("x"), py::arg("gamma"), py::arg("beta"),
          py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"),
          py::arg("act"),
          "x (..., C), gamma/beta/running_* (C,) -> (y (..., C), mean (C,), invstd (C,)).\n"
          "act(BatchNorm(x)) with batch statistics over all axes but the last; updates\n"
          "running_mean/running_var in place: new = (1-momentum)*old + momentum*batch, with the\n"
          "unbiased batch variance.");
    m.def("batchnorm_act_train_fwd_from_stats", &bn_train_fwd_from_stats, py::arg("x"),
          py::arg("mean"), py::arg("var"), py::arg("gamma"), py::arg("beta"),
          py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"),
          py::arg("act"),
          "x (..., C), mean/var/gamma/beta/running_* (C,) -> (y (..., C), mean (C,), invstd (C,)).\n"
          "batchnorm_act_train_fwd with x's batch mean and biased variance given (as the *_fwd_stats\n"
          "convolutions return them): one pass over x instead of two.");
    m.def("batchnorm_act_train_bwd", &bn_train_bwd, py::arg("dy"), py::arg("x"), py::arg("gamma"),
          py::arg("beta"), py::arg("mean"), py::arg("invstd"), py::arg("act"),
          "dy, x (..., C), gamma, beta, mean, invstd (C,) -> (dx (..., C), dgamma (C,), dbeta (C,)).\n"
          "Backward of batchnorm_act_train_fwd; the activation's mask is recomputed from x (the same\n"
          "pre-activation, bit for bit, as the forward's).");
    m.def("batchnorm_act_infer_fwd", &bn_infer_fwd, py::arg("x"), py::arg("gamma"), py::arg("beta"),
          py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("act"),
          "x (..., C), gamma, beta, mean, var (C,) -> y (..., C): act(BatchNorm(x)) with fixed statistics.");
    m.def("batchnorm_act_infer_bwd", &bn_infer_bwd, py::arg("dy"), py::arg("x"), py::arg("y"),
          py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("var"), py::arg("eps"),
          py::arg("act"),
          "dy, x, y (..., C), gamma, beta, mean, var (C,) -> (dx (..., C), dgamma (C,), dbeta (C,)).\n"
          "Backward of batchnorm_act_infer_fwd; the activation's mask is read from y.");
    m.def("act_fwd", &act_fwd, py::arg("x"), py::arg("act"),
          "x (...) -> act(x), act one of 'none', 'relu', 'relu6'.");
    m.def("act_bwd", &act_bwd, py::arg("dy"), py::arg("y"), py::arg("act"),
          "dy, y (...) -> dx (...): dy times act's derivative, read from act's output y.");
}

}  // namespace mbnet
