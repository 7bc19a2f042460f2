// Shared argument checking and array helpers for the bindings.
//
// Every binding takes its arrays as py::object and checks them here, so that a wrong dtype raises
// TypeError and a wrong rank, shape, layout or hyper-parameter raises ValueError, each naming the
// argument. Kernels below the bindings may then assume their preconditions.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace mbnet {
namespace py = pybind11;
using index_t = std::int64_t;

// A checked float32 C-contiguous array: its data pointer and shape.
struct F32 {
    py::array arr;  // keeps the buffer alive
    float* ptr = nullptr;
    std::vector<index_t> shape;
    index_t size() const {
        index_t s = 1;
        for (auto d : shape) s *= d;
        return s;
    }
    index_t operator[](int i) const { return shape[i < 0 ? shape.size() + i : i]; }
};

// Refuses two checked (C-contiguous) arrays whose floats share memory: an array written in place
// must not be read or written through another argument (the kernels' pointers are __restrict__).
inline void require_apart(const F32& a, const char* na, const F32& b, const char* nb) {
    if (a.size() > 0 && b.size() > 0 && a.ptr < b.ptr + b.size() && b.ptr < a.ptr + a.size())
        throw py::value_error(std::string(na) + " and " + nb + " must not share memory");
}

inline std::string shape_str(const std::vector<index_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

// `ndim` < 0 accepts any rank >= -ndim.
inline F32 check_f32(const py::object& obj, const char* name, int ndim) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(std::string(name) + " must be a numpy.ndarray of float32, got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!a.dtype().equal(py::dtype::of<float>()))  // not is(): unpickled dtypes are copies
        throw py::type_error(std::string(name) + " must have dtype float32, got " +
                             std::string(py::str(a.dtype())));
    if (ndim >= 0 && a.ndim() != ndim)
        throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) +
                              " dimensions, got " + std::to_string(a.ndim()));
    if (ndim < 0 && a.ndim() < -ndim)
        throw py::value_error(std::string(name) + " must have at least " + std::to_string(-ndim) +
                              " dimensions, got " + std::to_string(a.ndim()));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) +
                              " must be C-contiguous (use numpy.ascontiguousarray)");
    // Kernels read it as float*: a misaligned one is undefined behaviour (UBSan), and a vector
    // loop peeled for alignment would never reach it.
    if (reinterpret_cast<std::uintptr_t>(a.data()) % alignof(float) != 0)
        throw py::value_error(std::string(name) +
                              " must be aligned to 4 bytes (copy it with numpy.array)");
    F32 out;
    out.arr = a;
    // Inputs may be read-only (e.g. memory-mapped data); bindings that write in place check
    // writeability of those arguments themselves.
    out.ptr = const_cast<float*>(static_cast<const float*>(a.data()));
    for (py::ssize_t i = 0; i < a.ndim(); ++i) out.shape.push_back(a.shape(i));
    for (auto d : out.shape)
        if (d <= 0)
            throw py::value_error(std::string(name) + " must not be empty, got shape " +
                                  shape_str(out.shape));
    return out;
}

// Labels: int64 (or int32, converted) 1-D array.
inline py::array_t<std::int64_t> check_labels(const py::object& obj, const char* name) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(std::string(name) + " must be a numpy.ndarray of integers");
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (a.dtype().kind() != 'i' && a.dtype().kind() != 'u')
        throw py::type_error(std::string(name) + " must have an integer dtype, got " +
                             std::string(py::str(a.dtype())));
    if (a.ndim() != 1)
        throw py::value_error(std::string(name) + " must have 1 dimension, got " +
                              std::to_string(a.ndim()));
    // A copy when it is not int64, contiguous and aligned.
    return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast |
                                         py::detail::npy_api::NPY_ARRAY_ALIGNED_>::ensure(a);
}

inline void require(bool ok, const std::string& message) {
    if (!ok) throw py::value_error(message);
}

inline void check_same_dim(const F32& a, int ia, const char* na, const F32& b, int ib,
                           const char* nb) {
    if (a[ia] != b[ib])
        throw py::value_error(std::string(na) + " " + shape_str(a.shape) + " and " + nb + " " +
                              shape_str(b.shape) + " disagree in size (" + std::to_string(a[ia]) +
                              " vs " + std::to_string(b[ib]) + ")");
}

constexpr index_t kMaxDim = index_t(1) << 30;       // bound on stride, padding and (h, w) arguments
constexpr index_t kMaxElements = index_t(1) << 31;  // the one bound on any array we allocate

// Below these many elements (or multiply-adds for sgemm) one thread beats waking the team.
constexpr index_t kParallelMinLoss = index_t(1) << 14;  // softmax forward: exp and log per element
constexpr index_t kParallelMin = index_t(1) << 15;      // elementwise and reduction passes
constexpr index_t kParallelMinGemm = index_t(1) << 18;  // M * N * K
// Streaming passes ask for each stream's data this far ahead (__builtin_prefetch: a GCC builtin,
// no ISA intrinsic): the hardware prefetcher alone leaves one core well short of the memory's
// bandwidth when a kernel streams several arrays at once.
constexpr index_t kPrefetchFloats = 1024;

// Asks for the n floats at p (one prefetch per 64-byte line).
inline void prefetch_floats(const float* p, index_t n) {
    for (index_t e = 0; e < n; e += 16) __builtin_prefetch(p + e);
}

// Asks for the lines of the n floats at p, to be written (n >= 1; the last line too when p does
// not start one).
inline void prefetch_floats_for_write(const float* p, index_t n) {
    for (index_t e = 0; e < n; e += 16) __builtin_prefetch(p + e, 1);
    __builtin_prefetch(p + n - 1, 1);
}

// An int argument (an int or an object with __index__, not a bool) in [lo, hi]; `range` spells
// [lo, hi] for the message.
inline index_t parse_int(const py::object& v, const std::string& name, index_t lo, index_t hi,
                         const std::string& range) {
    if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
        throw py::type_error(name + " must be an int, got " +
                             std::string(py::str(py::type::of(v).attr("__name__"))));
    auto iv = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr()));
    if (!iv) throw py::error_already_set();
    require(iv >= py::int_(lo) && iv <= py::int_(hi),
            name + " must be in " + range + ", got " + std::string(py::str(iv)));
    return py::cast<index_t>(iv);
}

inline index_t parse_stride(const py::object& v) { return parse_int(v, "stride", 1, kMaxDim, "[1, 2^30]"); }
inline index_t parse_padding(const py::object& v) { return parse_int(v, "padding", 0, kMaxDim, "[0, 2^30]"); }

inline void check_stride_padding(index_t stride, index_t padding) {
    require(stride >= 1, "stride must be >= 1, got " + std::to_string(stride));
    require(padding >= 0, "padding must be >= 0, got " + std::to_string(padding));
    require(stride <= kMaxDim, "stride must be <= 2^30, got " + std::to_string(stride));
    require(padding <= kMaxDim, "padding must be <= 2^30, got " + std::to_string(padding));
}

// Output size of a convolution along one axis, checked to be at least 1.
inline index_t conv_out_size(index_t in, index_t k, index_t stride, index_t padding,
                             const char* axis) {
    check_stride_padding(stride, padding);
    require(k >= 1, std::string("kernel size along ") + axis + " must be >= 1");
    index_t span = in + 2 * padding - k;
    if (span < 0)
        throw py::value_error(std::string("output ") + axis + " would be < 1: input " + axis + "=" +
                              std::to_string(in) + ", kernel=" + std::to_string(k) +
                              ", padding=" + std::to_string(padding));
    return span / stride + 1;
}

// Refuses arrays no machine holds, before allocating them (numpy would raise MemoryError, or
// succeed and swap). Every output, and every scratch buffer not bounded by an output or an input,
// goes through here.
inline void check_alloc(const std::vector<index_t>& shape, const std::string& what) {
    double total = 1.0;
    for (auto d : shape) total *= static_cast<double>(d);
    require(total <= static_cast<double>(kMaxElements),
            what + " of shape " + shape_str(shape) + " would have more than 2^31 elements");
}

// Sets a.ho and a.wo, the output size of a convolution shape with fields h, w, kh, kw, s, p.
template <class Shape>
void set_out_size(Shape& a) {
    a.ho = conv_out_size(a.h, a.kh, a.s, a.p, "height");
    a.wo = conv_out_size(a.w, a.kw, a.s, a.p, "width");
}

// dy (n, ho, wo, c) of a convolution's backward must have the output size of shape a.
template <class Shape>
void check_dy_shape(const F32& dy, const Shape& a) {
    if (dy[1] != a.ho || dy[2] != a.wo)
        throw py::value_error("dy " + shape_str(dy.shape) + " does not match the output size (" +
                              std::to_string(a.ho) + ", " + std::to_string(a.wo) +
                              ") of input_hw/kernel_hw, stride and padding");
}

// A (height, width) pair of ints in [1, 2^30].
inline std::pair<index_t, index_t> parse_hw(const py::object& obj, const char* name) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
        throw py::type_error(std::string(name) + " must be a (height, width) tuple of ints");
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    if (seq.size() != 2)
        throw py::value_error(std::string(name) + " must have 2 entries (height, width), got " +
                              std::to_string(seq.size()));
    index_t hw[2];
    for (int i = 0; i < 2; ++i)
        hw[i] = parse_int(seq[i], std::string(name) + " entries", 1, kMaxDim, "[1, 2^30]");
    return {hw[0], hw[1]};
}

// Every array and scratch buffer the kernels write starts on a 64-byte boundary (a cache line,
// one AVX-512 vector): NumPy's own allocations start 16 bytes past one, so that each vector load
// and store of a channel block straddled two lines (measured on Zen 4: the 13 depthwise layers
// 7% faster in isolation, a training step about 4%, with every allocation aligned).
constexpr std::size_t kAlign = 64;

// std::vector's allocator for aligned scratch: std::vector<float, Aligned<float>>.
template <class T>
struct Aligned {
    using value_type = T;
    Aligned() = default;
    template <class U>
    Aligned(const Aligned<U>&) {}
    T* allocate(std::size_t n) {
        return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign)));
    }
    void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kAlign)); }
    template <class U>
    bool operator==(const Aligned<U>&) const { return true; }
    template <class U>
    bool operator!=(const Aligned<U>&) const { return false; }
};
using Floats = std::vector<float, Aligned<float>>;

// Reports an allocation of `bytes` at p (bytes = 0: its release) to tracemalloc, in NumPy's domain,
// so that tracemalloc sees the kernels' arrays as it sees NumPy's. Called through dlsym: Python
// 3.11's tracemalloc.h declares these functions without C linkage.
inline void trace_malloc(void* p, std::size_t bytes) {
    using Track = int (*)(unsigned, std::uintptr_t, std::size_t);
    using Untrack = int (*)(unsigned, std::uintptr_t);
    static const auto track = reinterpret_cast<Track>(dlsym(RTLD_DEFAULT, "PyTraceMalloc_Track"));
    static const auto untrack = reinterpret_cast<Untrack>(dlsym(RTLD_DEFAULT, "PyTraceMalloc_Untrack"));
    constexpr unsigned kNumpyDomain = 389047;
    if (bytes && track) track(kNumpyDomain, reinterpret_cast<std::uintptr_t>(p), bytes);
    if (!bytes && untrack) untrack(kNumpyDomain, reinterpret_cast<std::uintptr_t>(p));
}

// A new float32 array of `shape`, refused (ValueError naming `what`) over the shared bound. Its
// memory is aligned (kAlign) and owned by a capsule, its base.
inline py::array_t<float> new_f32(const std::vector<index_t>& shape,
                                  const std::string& what = "the output") {
    check_alloc(shape, what);
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    const std::size_t bytes = (std::max<std::size_t>(n, 1) * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    void* p = ::operator new(bytes, std::align_val_t(kAlign));  // std::bad_alloc: MemoryError
    trace_malloc(p, bytes);
    py::capsule owner(p, [](void* q) {
        trace_malloc(q, 0);
        ::operator delete(q, std::align_val_t(kAlign));
    });
    std::vector<py::ssize_t> s(shape.begin(), shape.end());
    return py::array_t<float>(s, static_cast<float*>(p), owner);
}
inline float* ptr(py::array_t<float>& a) { return a.mutable_data(); }

// Copies a short run of n floats (an im2col row of kernel taps). A loop, not a libc memcpy call
// per run; the stem's 3 taps of 3 channels (n = 9) get a copy of a length known at compile time,
// one 32-byte and one 4-byte move: with a run-time length, copying them took as long as the
// stem's GEMM.
inline void copy_run(float* __restrict__ dst, const float* __restrict__ src, index_t n) {
    if (n == 9)
        std::memcpy(dst, src, 9 * sizeof(float));
    else
        for (index_t e = 0; e < n; ++e) dst[e] = src[e];
}

// A new float32 array of `shape` (checked by new_f32), filled by kernel(data) without the GIL.
// Kernels allocate their scratch before any parallel region: there std::bad_alloc reaches Python
// as MemoryError, while inside one it would end the process.
template <class Kernel>
py::array_t<float> compute_f32(const std::vector<index_t>& shape, Kernel&& kernel,
                               const std::string& what = "the output") {
    auto out = new_f32(shape, what);
    float* p = ptr(out);
    bool out_of_memory = false;
    {
        py::gil_scoped_release nogil;
        try {
            kernel(p);
        } catch (const std::bad_alloc&) {
            out_of_memory = true;
        }
    }
    if (out_of_memory) {
        PyErr_SetString(PyExc_MemoryError,
                        (what + ": not enough memory for the kernel's scratch buffers").c_str());
        throw py::error_already_set();
    }
    return out;
}

// Activation fused into BatchNorm and friends.
enum class Act { None = 0, ReLU = 1, ReLU6 = 2 };
inline Act parse_act(const std::string& s) {
    if (s == "none") return Act::None;
    if (s == "relu") return Act::ReLU;
    if (s == "relu6") return Act::ReLU6;
    throw py::value_error("act must be 'none', 'relu' or 'relu6', got '" + s + "'");
}

// The activation itself, for the kernels that apply it.
template <Act A>
inline float act(float z) {
    if constexpr (A == Act::ReLU) return std::max(z, 0.0f);
    if constexpr (A == Act::ReLU6) return std::min(std::max(z, 0.0f), 6.0f);
    return z;
}

// The pre-activation of training BatchNorm: forward applies act to it, backward recomputes it
// (the same float operations on the same float per-channel values, so the same bits) for the
// activation's mask instead of reading the forward's output, and the pwconv2d_bn_act kernels
// apply it to their input as they pack it.
inline float preact(float x, float mean, float scale, float shift) { return (x - mean) * scale + shift; }

// The scale of training BatchNorm, from the invstd it returns.
inline float train_scale(float invstd, float gamma) { return float(double(invstd) * gamma); }

// dy times act's derivative at the pre-activation z (z > 0 exactly where act(z) > 0; branch-free,
// for the vectorizer).
template <Act A>
inline float masked_pre(float dy, float z) {
    if constexpr (A == Act::ReLU) return dy * float(z > 0.0f);
    if constexpr (A == Act::ReLU6) return dy * float((z > 0.0f) & (z < 6.0f));
    return dy;
}

// Training BatchNorm's apply + act as a consuming kernel applies it to its input while loading it
// (sgemm_epilogue's packing of A, the depthwise kernels' padded rows): element v of channel c is
// read as act<act>(preact(v, mean[c], scale[c], shift[c])). per_row: A's channel is its row i (a
// transposed A) instead of its column k.
struct ATransform {
    const float *mean, *scale, *shift;
    Act act;
    bool per_row;
};

// The BatchNorm arguments of the *_bn_act kernels: gamma, beta, mean, invstd (C,) for x's C
// channels and act, as the ATransform that applies training BatchNorm + act to x as it is loaded
// (the same float operations as batchnorm_act_train_fwd's apply, so the same bits).
struct BnActArgs {
    F32 gamma, beta, mean, invstd;
    Act act;
    std::vector<float> scale;
    BnActArgs(const py::object& gamma_, const py::object& beta_, const py::object& mean_,
              const py::object& invstd_, const std::string& act_name, const F32& x) {
        const char* names[] = {"gamma", "beta", "mean", "invstd"};
        const py::object* objs[] = {&gamma_, &beta_, &mean_, &invstd_};
        F32* fields[] = {&gamma, &beta, &mean, &invstd};
        for (int i = 0; i < 4; ++i) {
            *fields[i] = check_f32(*objs[i], names[i], 1);
            check_same_dim(*fields[i], 0, names[i], x, 3, "x");
        }
        act = parse_act(act_name);
        scale.resize(x[3]);
        for (index_t c = 0; c < x[3]; ++c) scale[c] = train_scale(invstd.ptr[c], gamma.ptr[c]);
    }
    ATransform transform(bool per_row) const { return {mean.ptr, scale.data(), beta.ptr, act, per_row}; }
};

// Per-channel batch statistics of a convolution's output y, viewed as (M, C), for the BatchNorm
// after it: the convolution's kernel adds each tile of y while it is still in cache, saving
// BatchNorm a pass over y. Rows come in blocks (kStatsRows rows, or whole output rows for the
// depthwise kernel: fixed by the shape, never by the threads); one thread adds a block's rows in
// row order, in double, less the block's first row (so a large mean does not cancel the variance
// away), and finish() combines the blocks in order. The statistics do not depend on the thread
// count.
constexpr index_t kStatsRows = 256;

class ChannelStats {
   public:
    ChannelStats(index_t M, index_t C, index_t block = kStatsRows)
        : M_(M), C_(C), block_(block), shift_(blocks() * C), s_(blocks() * C), q_(blocks() * C) {}
    index_t block() const { return block_; }
    index_t blocks() const { return (M_ + block_ - 1) / block_; }

    // Adds rows [r0, r0 + n), columns [c0, c0 + nc) of y; row r0 at `y`, rows `ld` floats apart.
    // Each block's rows must come in order, from one thread at a time.
    void add(index_t r0, index_t n, index_t c0, index_t nc, const float* y, index_t ld) {
        for (index_t r = r0; r < r0 + n;) {  // the rows [r, end) of one block
            const index_t b = r / block_, end = std::min(r0 + n, (b + 1) * block_);
            const float* yr = y + (r - r0) * ld;
            float* k = &shift_[b * C_ + c0];
            if (r == b * block_) std::copy(yr, yr + nc, k);
            add_rows(end - r, nc, yr, ld, k, &s_[b * C_ + c0], &q_[b * C_ + c0]);
            r = end;
        }
    }

    // mean and biased variance (C,) of all M rows: block b's rows sum to s_b + n_b * k_b, and
    // their squared deviations from the mean m to q_b + 2 (k_b - m) s_b + n_b (k_b - m)^2.
    void finish(float* mean, float* var) const {
        std::vector<double> m(C_, 0.0), ss(C_, 0.0);
        for (index_t b = 0; b < blocks(); ++b) {
            const double nb = double(std::min(M_, (b + 1) * block_) - b * block_);
            for (index_t c = 0; c < C_; ++c) m[c] += s_[b * C_ + c] + nb * shift_[b * C_ + c];
        }
        for (index_t c = 0; c < C_; ++c) m[c] /= double(M_);
        for (index_t b = 0; b < blocks(); ++b) {
            const double nb = double(std::min(M_, (b + 1) * block_) - b * block_);
            for (index_t c = 0; c < C_; ++c) {
                const double dev = shift_[b * C_ + c] - m[c];
                ss[c] += q_[b * C_ + c] + 2.0 * dev * s_[b * C_ + c] + nb * dev * dev;
            }
        }
        for (index_t c = 0; c < C_; ++c) {
            mean[c] = float(m[c]);
            var[c] = float(std::max(ss[c] / double(M_), 0.0));
        }
    }

   private:
    // s[j] += sum over rows i of (y[i * ld + j] - k[j]), q[j] of its square, j < nc, in row order
    // (the difference in float, as batchnorm.cpp's batch_stats). Rows outer, columns inner: the
    // loop vectorizer takes the columns whole (each column's sums still take the rows in order),
    // the sums staying in L1 (a block's nc <= the GEMM's NC columns).
#if defined(__AVX512F__)
    __attribute__((target("prefer-vector-width=512")))
#endif
    static void add_rows(index_t rows, index_t nc, const float* __restrict__ y, index_t ld,
                         const float* __restrict__ k, double* __restrict__ s, double* __restrict__ q) {
        for (index_t i = 0; i < rows; ++i, y += ld)
            for (index_t j = 0; j < nc; ++j) {
                const double d = double(y[j] - k[j]);
                s[j] += d;
                q[j] += d * d;
            }
    }

    index_t M_, C_, block_;
    std::vector<float> shift_;    // (blocks, C): each block's first row
    std::vector<double> s_, q_;  // (blocks, C): sums, squares
};

// BatchNorm backward's two per-channel sums over one row of n channels: s += dz and
// q += dz * (x - mean), dz = dy masked at the pre-activation (x - mean) * a + sh. Shared by
// GradStats (a convolution's input gradient) and batchnorm.cpp's standalone backward.
template <Act A>
inline void grad_sums_row(index_t n, const float* __restrict__ dy, const float* __restrict__ x,
                          const float* __restrict__ mu, const float* __restrict__ a, const float* __restrict__ sh,
                          double* __restrict__ s, double* __restrict__ q) {
    for (index_t j = 0; j < n; ++j) {
        const float g = masked_pre<A>(dy[j], preact(x[j], mu[j], a[j], sh[j]));
        s[j] += double(g);
        q[j] += double(g * (x[j] - mu[j]));
    }
}

// The two per-channel sums of training BatchNorm's backward, sum(dz) and sum(dz * (x - mean)) with
// dz = dy masked by act's derivative at x's pre-activation, gathered as a convolution's
// input-gradient kernel produces dy (the gradient of the BatchNorm's output) while each tile of
// it is in cache: BatchNorm's backward is then its apply pass alone (batchnorm_act_f32_train_bwd_apply,
// kernels.h). Blocks of rows and their order as ChannelStats (fixed by the shape): the sums do
// not depend on the thread count. Rows summed by grad_sums_row, as batchnorm.cpp's own backward.
class GradStats {
   public:
    GradStats(index_t M, index_t C, index_t block, const ATransform& t)
        : M_(M), C_(C), block_(block), t_(t), s_(blocks() * C), q_(blocks() * C) {}
    index_t block() const { return block_; }
    index_t blocks() const { return (M_ + block_ - 1) / block_; }

    // Adds rows [r0, r0 + n), columns [c0, c0 + nc): dy's row r0 at `dy`, x's at `x`, rows `ld`
    // floats apart in both. Each block's rows must come in order, from one thread at a time.
    void add(index_t r0, index_t n, index_t c0, index_t nc, const float* dy, const float* x, index_t ld) {
        for (index_t r = r0; r < r0 + n;) {
            const index_t b = r / block_, end = std::min(r0 + n, (b + 1) * block_);
            const index_t o = (r - r0) * ld;
            double *s = &s_[b * C_ + c0], *q = &q_[b * C_ + c0];
            const float *mu = t_.mean + c0, *a = t_.scale + c0, *sh = t_.shift + c0;
            const index_t rows = end - r, avail = M_ - r;
            switch (t_.act) {
                case Act::None: add_rows<Act::None>(rows, avail, nc, dy + o, x + o, ld, mu, a, sh, s, q); break;
                case Act::ReLU: add_rows<Act::ReLU>(rows, avail, nc, dy + o, x + o, ld, mu, a, sh, s, q); break;
                case Act::ReLU6: add_rows<Act::ReLU6>(rows, avail, nc, dy + o, x + o, ld, mu, a, sh, s, q); break;
            }
            r = end;
        }
    }

    // sum_dz, sum_dz_xc (C,): the blocks' sums added in block order.
    void finish(double* sum_dz, double* sum_dz_xc) const {
        std::fill(sum_dz, sum_dz + C_, 0.0);
        std::fill(sum_dz_xc, sum_dz_xc + C_, 0.0);
        for (index_t b = 0; b < blocks(); ++b)
            for (index_t c = 0; c < C_; ++c) {
                sum_dz[c] += s_[b * C_ + c];
                sum_dz_xc[c] += q_[b * C_ + c];
            }
    }

   private:
    // Rows outer, columns inner (as ChannelStats::add_rows).
    template <Act A>
#if defined(__AVX512F__)
    __attribute__((target("prefer-vector-width=512")))
#endif
    // avail: rows of x from `x` on (x's rows past `rows` are only prefetched).
    static void add_rows(index_t rows, index_t avail, index_t nc, const float* dy, const float* x, index_t ld,
                         const float* mu, const float* a, const float* sh, double* s, double* q) {
        const index_t ahead = std::max<index_t>(1, kPrefetchFloats / nc);  // rows
        for (index_t i = 0; i < rows; ++i, dy += ld, x += ld) {
            if (i + ahead < avail) prefetch_floats(x + ahead * ld, nc);  // x comes from memory, dy from cache
            grad_sums_row<A>(nc, dy, x, mu, a, sh, s, q);
        }
    }

    index_t M_, C_, block_;
    ATransform t_;
    std::vector<double> s_, q_;  // (blocks, C)
};

// (y, mean, var) of a convolution with statistics: y (shape) filled by kernel(y, stats) without
// the GIL.
// `block`: ChannelStats' block of rows.
template <class Kernel>
py::tuple compute_f32_stats(const std::vector<index_t>& shape, index_t block, Kernel&& kernel,
                            const std::string& what = "y") {
    const index_t C = shape.back();
    index_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
    check_alloc(shape, what);
    ChannelStats stats(M, C, block);
    auto y = compute_f32(shape, [&](float* yp) { kernel(yp, stats); }, what);
    auto mean = new_f32({C}, "mean"), var = new_f32({C}, "var");
    stats.finish(ptr(mean), ptr(var));
    return py::make_tuple(y, mean, var);
}

// Registration functions, one per op family (each defined in its own .cpp).
void bind_gemm(py::module_& m);
void bind_dwconv(py::module_& m);
void bind_conv2d(py::module_& m);
void bind_batchnorm(py::module_& m);
void bind_pool(py::module_& m);
void bind_loss(py::module_& m);
void bind_optim(py::module_& m);

}  // namespace mbnet
