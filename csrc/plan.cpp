// The inference plan: an eval-mode network (BatchNorm already folded into weights and biases)
// compiled once for an input size and a maximum batch, then run by one call without the GIL.
//
// Network: layers, each "conv" (full KxK convolution + bias + act: the stem, or ConvMobileNet's
// blocks) or "dwpw" (3x3 depthwise + bias + act, then pointwise + bias + act: one separable block),
// then global average pooling and the classifier (x @ w + b).
//
// Buffers: the input and each layer's output are stored zero-padded by the padding of the layer
// that reads them, so a convolution reads its taps in place (but a first full conv, the stem, reads
// the input as it is, each output row from a zero-padded copy of the k input rows it needs:
// direct_row); the producer of each row writes its zero border too. A batch runs through the
// network a chunk of images at a time, the chunk as large as keeps each activation within
// kChunkFloats, so memory stays bounded at any batch. Within a chunk the layers run in stages
// (make_stages): consecutive layers that take the same number of images per pass, fewer for the
// large early maps, so that a pass's activations stay in the caches from one layer to the next, and
// the whole chunk for the small late maps, so that their weights are streamed once. Two ping-pong
// buffers of a chunk hold the stages' outputs, two of a pass the activations inside a stage.
//
// A layer runs in tiles of output rows (rows of the n*ho output rows; a tile may span images). Per
// tile: (1) the GEMM's left operand, M = rows*wo pixels by K (depthwise rows + bias + act, or
// im2col rows of a full conv; a stem's GEMM reads its taps in place instead, one output row at a
// time), (2) sgemm_packed_b with the (K, cout) weights, packed into the GEMM's panels once when the
// plan is built (narrow panels for a narrow layer), into a scratch tile or, when that is cheaper,
// row by row straight into the output (into the output tile itself when the output has no border),
// (3) bias + act applied by the GEMM's epilogue to each block of the product as it is finished,
// still in cache, and written to the padded output (in place when the GEMM wrote there); the zero
// border is written with the left operand. The intermediate of a separable block never leaves the
// thread's scratch; every scratch buffer is allocated when the plan is built, so a run allocates
// nothing but its output. Threads: each thread takes whole tiles when there are at least as many
// tiles as threads, or when the layer cuts into one tile per thread of kMinGemmPixels or more; a
// smaller layer (late layers, batch 1) has the team share each tile (phase 1 over rows, phases 2
// and 3 over rows too, or over blocks of whole weight panels when the tile has too few rows: two
// barriers per tile); below kParallelWork multiply-adds one thread runs it. The classifier's
// columns are shared the same way. The whole network runs in one parallel region, its phases
// separated by barriers. Every output element is computed by the same operations in the same order
// under any tiling, so results do not depend on the thread count, the batch size or the chunk.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "kernels.h"

namespace mbnet {
namespace {

constexpr index_t kChunkFloats = index_t(1) << 22;  // one activation buffer (16 MB), at most
constexpr index_t kStageFloats = index_t(1) << 19;  // a layer's input + output per pass (2 MB)
constexpr index_t kStagePixels = 512;               // output pixels per pass of a layer, at least
constexpr index_t kTileFloats = index_t(1) << 18;   // left operand + scratch of one tile (1 MB)
constexpr index_t kMinGemmPixels = 256;             // GEMM rows per tile, at least
constexpr double kParallelWork = double(1 << 18);   // multiply-adds below which one thread runs
constexpr index_t kColGrain = 32;                   // column blocks of a shared GEMM, at least
constexpr index_t kRowGrain = 32;                   // row blocks of a shared tile's GEMM
constexpr index_t kSharedRows = 24;                 // per thread, at least, to split it by rows
constexpr index_t kRowSplitGrain = 8;               // and then on whole register tiles

// dst[q][c] = act(src[q][c] + b[c]) for px pixels (ld floats apart) of nc channels; dst may be src.
template <Act A>
void bias_act_f32(const float* src, float* dst, index_t px, index_t ld, index_t nc,
                  const float* __restrict__ b) {
    for (index_t q = 0; q < px; ++q) {
        const float* s = src + q * ld;
        float* d = dst + q * ld;
#pragma GCC ivdep
        for (index_t c = 0; c < nc; ++c) d[c] = act<A>(s[c] + b[c]);
    }
}

void bias_act_f32(const float* src, float* dst, index_t px, index_t ld, index_t nc, const float* b,
                  Act a) {
    switch (a) {
        case Act::None: return bias_act_f32<Act::None>(src, dst, px, ld, nc, b);
        case Act::ReLU: return bias_act_f32<Act::ReLU>(src, dst, px, ld, nc, b);
        case Act::ReLU6: return bias_act_f32<Act::ReLU6>(src, dst, px, ld, nc, b);
    }
}

inline void zero(float* p, index_t n) { std::fill(p, p + n, 0.f); }

struct Layer {
    bool dwpw;              // depthwise + pointwise, else a full conv
    index_t k, s, p;        // kernel, stride, padding of the spatial convolution
    index_t cin, cout;      // input and output channels
    index_t h, w, ho, wo;   // input and output size
    index_t p_out = 0;      // padding of the output buffer (the next layer's padding)
    bool raw_in = false;    // reads the network's input as it is, unpadded (a first full conv)
    Act act1 = Act::None;   // after the depthwise (dwpw)
    Act act2 = Act::None;   // after the GEMM
    std::vector<float> dw, db;  // depthwise (3, 3, cin) and its bias (dwpw)
    PackedB gw;                 // the GEMM's (K, cout) weight, packed once
    std::vector<float> gb;      // and its bias
    std::vector<index_t> koff;  // raw_in: tap t's offset from a pixel's first in direct_row's strip
    index_t K() const { return dwpw ? cin : k * k * cin; }
    index_t in_floats(index_t n) const {
        return raw_in ? n * h * w * cin : n * (h + 2 * p) * (w + 2 * p) * cin;
    }
    index_t out_floats(index_t n) const { return n * (ho + 2 * p_out) * (wo + 2 * p_out) * cout; }
    // Output rows per tile: within kTileFloats, but at least kMinGemmPixels pixels, so that
    // streaming the weights through the cache (once per tile) stays small against the tile's
    // multiply-adds.
    index_t tile_rows() const {
        return std::max({index_t(1), kTileFloats / (wo * (K() + cout)),
                         (kMinGemmPixels + wo - 1) / wo});
    }
    index_t tile_floats() const {
        return std::max(tile_rows() * wo * std::max(K(), cout), k * (w + 2 * p) * cin);
    }
};

// Row r = (n, oh) of the GEMM's left operand: wo pixels x K.
void left_row(const Layer& L, const float* in, index_t r, float* dst) {
    const index_t n = r / L.ho, oh = r % L.ho;
    const index_t hp = L.h + 2 * L.p, wp = L.w + 2 * L.p, C = L.cin;
    if (L.dwpw) {
        dwconv3x3_bias_act_f32_fwd_row(C, L.wo, L.s * C, wp * C,
                                       in + (n * hp + oh * L.s) * wp * C, L.dw.data(),
                                       L.db.data(), L.act1, dst);
        return;
    }
    // im2col of the padded input (H x W, pad 0) or, for raw_in, of the unpadded network input
    // (pad p: taps outside it are zeros, so the input is not copied into a padded buffer first).
    // One kernel row of taps inside the image is contiguous: one short copy_run.
    const index_t pad = L.raw_in ? L.p : 0, H = L.raw_in ? L.h : hp, W = L.raw_in ? L.w : wp;
    const float* img = in + n * H * W * C;
    const index_t run = L.k * C;
    for (index_t ow = 0; ow < L.wo; ++ow)
        for (index_t i = 0; i < L.k; ++i) {
            const index_t ih = oh * L.s + i - pad, iw = ow * L.s - pad;
            float* __restrict__ d = dst + (ow * L.k + i) * run;
            if (ih >= 0 && ih < H && iw >= 0 && iw + L.k <= W) {
                copy_run(d, img + (ih * W + iw) * C, run);
                continue;
            }
            for (index_t j = 0; j < L.k; ++j) {
                if (ih >= 0 && ih < H && iw + j >= 0 && iw + j < W)
                    std::memcpy(d + j * C, img + (ih * W + iw + j) * C, sizeof(float) * C);
                else
                    zero(d + j * C, C);
            }
        }
}

// The first pixel of output row r = (n, oh) inside the padded output.
inline float* out_row(const Layer& L, float* out, index_t r) {
    const index_t n = r / L.ho, oh = r % L.ho, p = L.p_out;
    const index_t wp = L.wo + 2 * p, hp = L.ho + 2 * p;
    return out + ((n * hp + oh + p) * wp + p) * L.cout;
}

// The zero border of output row r = (n, oh): its left and right pixels, and the padding rows above
// the first row and below the last.
void zero_border(const Layer& L, index_t r, float* out) {
    const index_t oh = r % L.ho, p = L.p_out, C = L.cout, wp = L.wo + 2 * p;
    if (p == 0) return;
    float* row = out_row(L, out, r);
    zero(row - p * C, p * C);
    zero(row + L.wo * C, p * C);
    if (oh == 0) zero(row - p * C - p * wp * C, p * wp * C);
    if (oh == L.ho - 1) zero(row - p * C + wp * C, p * wp * C);
}

// The epilogue of a tile's GEMM: its result c holds output row r0 + i / wo's pixel i % wo at
// c + i * cout; bias + act on each block (rows from m0 + row, columns of the weight) as the GEMM
// finishes it, written to the padded output (in place when c is the output itself).
struct StoreBlocks {
    const Layer* L;
    const float* c;
    index_t r0, m0;
    float* out;
    void operator()(index_t row, index_t rows, index_t j0, index_t nc) const {
        const index_t N = L->cout, wo = L->wo;
        for (index_t i = m0 + row, end = i + rows; i < end;) {
            const index_t q = i % wo, run = std::min(wo - q, end - i);
            bias_act_f32(c + i * N + j0, out_row(*L, out, r0 + i / wo) + q * N + j0, run, N, nc,
                         L->gb.data() + j0, L->act2);
            i += run;
        }
    }
};

// sgemm_packed_b of rows [m0, m0 + M) x columns [n0, n1) of a tile (left operand a, result c as
// StoreBlocks reads it) with bias + act in its epilogue. a's rows are K floats apart, or lda with
// its taps gathered by koff (direct_row).
void gemm_store(const Layer& L, index_t M, index_t n0, index_t n1, const float* a, float* c,
                index_t r0, index_t m0, float* out, float* g, index_t lda = 0,
                const index_t* koff = nullptr) {
    const StoreBlocks store{&L, c, r0, m0, out};
    const GemmEpilogue epilogue = std::cref(store);  // held in place: nothing allocated
    const index_t N = L.cout, rsa = koff ? lda : L.K();
    sgemm_packed_b(M, n0, n1, a + m0 * rsa, rsa, 1, L.gw, c + m0 * N + n0, N, false, g, &epilogue,
                   koff);
}

// Output row r of a first full conv (raw_in) without im2col: the k input rows it reads are copied
// into `strip`, zero-padded as the layer's padding asks (rows outside the image all zeros), and the
// GEMM reads each pixel's taps there in place (A's rows s * cin floats apart, gathered by koff).
// The strip is k * (w + 2p) * cin floats, about k/s times fewer than the row's im2col. Used for
// whole tiles (run_tile); a tile the team shares (a small input at batch 1) is still im2col'd.
void direct_row(const Layer& L, const float* in, index_t r, float* out, float* strip, float* g) {
    const index_t n = r / L.ho, oh = r % L.ho, C = L.cin, wp = L.w + 2 * L.p;
    for (index_t i = 0; i < L.k; ++i) {
        const index_t ih = oh * L.s - L.p + i;
        float* d = strip + i * wp * C;
        if (ih < 0 || ih >= L.h) {
            zero(d, wp * C);
            continue;
        }
        zero(d, L.p * C);
        std::memcpy(d + L.p * C, in + (n * L.h + ih) * L.w * C, sizeof(float) * L.w * C);
        zero(d + (L.p + L.w) * C, L.p * C);
    }
    gemm_store(L, L.wo, 0, L.cout, strip, out_row(L, out, r), r, 0, out, g, L.s * C,
               L.koff.data());
    zero_border(L, r, out);
}

// Where the GEMM of output rows from r0 writes: the output itself when it has no border (its rows
// are then contiguous and the epilogue works in place), else the scratch tile c.
inline float* gemm_dst(const Layer& L, float* out, float* c, index_t r0) {
    return L.p_out == 0 ? out + r0 * L.wo * L.cout : c;
}

// One thread's scratch: the GEMM's left operand, its result, sgemm_packed_b's A buffer.
struct Scratch {
    Floats a, c;
    AlignedFloats g;
};

// Output rows [r0, r1) on the calling thread, with its scratch s. Rows of wo >= K pixels are
// multiplied one by one straight into the padded output: streaming the weights per row (~K*N)
// then costs less than copying the tile out of c (~wo*N per row).
void run_tile(const Layer& L, const float* in, float* out, index_t r0, index_t r1, Scratch& s) {
    float *a = s.a.data(), *g = s.g.get();
    const index_t K = L.K(), N = L.cout, row_a = L.wo * K, M = (r1 - r0) * L.wo;
    if (L.raw_in) {
        for (index_t r = r0; r < r1; ++r) direct_row(L, in, r, out, a, g);
        return;
    }
    for (index_t r = r0; r < r1; ++r) {
        left_row(L, in, r, a + (r - r0) * row_a);
        zero_border(L, r, out);
    }
    if (L.p_out > 0 && L.wo >= K) {
        for (index_t r = r0; r < r1; ++r)
            gemm_store(L, L.wo, 0, N, a + (r - r0) * row_a, out_row(L, out, r), r, 0, out, g);
        return;
    }
    gemm_store(L, M, 0, N, a, gemm_dst(L, out, s.c.data(), r0), r0, 0, out, g);
}

// [begin, end) of part t of n items cut into `parts` pieces on multiples of `grain`.
inline void split_range(index_t n, index_t grain, index_t parts, index_t t, index_t& b,
                        index_t& e) {
    const index_t units = (n + grain - 1) / grain;
    b = std::min(n, units * t / parts * grain);
    e = std::min(n, units * (t + 1) / parts * grain);
}

// Column blocks that threads share a GEMM by: whole panels of the packed weight.
inline index_t col_grain(const PackedB& w) {
    return (kColGrain + w.panel - 1) / w.panel * w.panel;
}


// Called by every thread of the team (the plan runs in one parallel region); ends with a barrier.
void run_layer(const Layer& L, index_t n, const float* in, float* out, std::vector<Scratch>& sc) {
    const index_t R = n * L.ho, K = L.K(), N = L.cout, tile = L.tile_rows();
    const index_t T = omp_get_num_threads(), ntiles = (R + tile - 1) / tile;
    if (T == 1 || double(R) * L.wo * K * N < kParallelWork) {
#pragma omp single
        for (index_t r0 = 0; r0 < R; r0 += tile)
            run_tile(L, in, out, r0, std::min(R, r0 + tile), sc[0]);
        return;
    }
    // Each thread takes whole tiles, the same number each: when there are enough tiles, or enough
    // rows to cut the layer into one tile per thread of kMinGemmPixels or more (a batch-1 layer
    // of one tile: each thread then keeps its rows to itself, with one barrier, not three).
    if (ntiles >= T || R / T * L.wo >= kMinGemmPixels) {
        const index_t parts = (ntiles + T - 1) / T * T, rows = (R + parts - 1) / parts;
        Scratch& s = sc[omp_get_thread_num()];
#pragma omp for schedule(static)
        for (index_t r0 = 0; r0 < R; r0 += rows)
            run_tile(L, in, out, r0, std::min(R, r0 + rows), s);
        return;
    }
    // Fewer tiles than threads, and small: the team shares each tile (rows, then GEMM blocks, bias
    // and act in their epilogue). The GEMM is split by rows when each thread gets kSharedRows
    // pixels or more: a thread then multiplies mostly rows its own phase 1 wrote, and writes the
    // output rows that the next layer's phase 1 reads on the same thread, both in its own cache,
    // for the cost of reading the whole weight; else by blocks of whole weight panels.
    float *a = sc[0].a.data(), *g = sc[omp_get_thread_num()].g.get();
    const index_t grain = col_grain(L.gw);
    for (index_t r0 = 0; r0 < R; r0 += tile) {
        const index_t r1 = std::min(R, r0 + tile), M = (r1 - r0) * L.wo;
        const bool by_rows = M >= T * kSharedRows;
        const index_t cb = by_rows ? 1 : std::min<index_t>((N + grain - 1) / grain, 2 * T);
        const index_t rgrain = by_rows ? kRowSplitGrain : kRowGrain;
        const index_t rb = by_rows ? T : std::max<index_t>(
            1, std::min<index_t>((M + kRowGrain - 1) / kRowGrain, (2 * T + cb - 1) / cb));
        float* c = gemm_dst(L, out, sc[0].c.data(), r0);
#pragma omp for schedule(static)
        for (index_t r = r0; r < r1; ++r) {
            left_row(L, in, r, a + (r - r0) * L.wo * K);
            zero_border(L, r, out);
        }
#pragma omp for schedule(static) collapse(2)
        for (index_t i = 0; i < rb; ++i)
            for (index_t j = 0; j < cb; ++j) {
                index_t m0, m1, n0, n1;
                split_range(M, rgrain, rb, i, m0, m1);
                split_range(N, grain, cb, j, n0, n1);
                if (m1 > m0 && n1 > n0) gemm_store(L, m1 - m0, n0, n1, a, c, r0, m0, out, g);
            }
    }
}

// A checked float32 array of exactly `shape`.
F32 take_f32(const py::object& obj, const std::string& name, const std::vector<index_t>& shape) {
    F32 a = check_f32(obj, name.c_str(), static_cast<int>(shape.size()));
    if (a.shape != shape)
        throw py::value_error(name + " must have shape " + shape_str(shape) + ", got " +
                              shape_str(a.shape));
    return a;
}

// Copies a checked float32 array of exactly `shape` into a vector.
std::vector<float> take(const py::object& obj, const std::string& name,
                        const std::vector<index_t>& shape) {
    F32 a = take_f32(obj, name, shape);
    return std::vector<float>(a.ptr, a.ptr + a.size());
}

// A GEMM weight of exactly `shape` (..., N), packed as the (K, N) right operand of sgemm_packed_b.
PackedB take_packed(const py::object& obj, const std::string& name,
                    const std::vector<index_t>& shape) {
    F32 a = take_f32(obj, name, shape);
    const index_t N = shape.back();
    return PackedB(a.size() / N, N, a.ptr, N, 1);
}

index_t take_int(const py::handle& obj, const std::string& name, index_t lo, index_t hi) {
    if (!py::isinstance<py::int_>(obj)) throw py::type_error(name + " must be an int");
    const index_t v = py::cast<index_t>(obj);
    require(v >= lo && v <= hi, name + " must be in [" + std::to_string(lo) + ", " +
                                    std::to_string(hi) + "], got " + std::to_string(v));
    return v;
}

Act take_act(const py::handle& obj, const std::string& name) {
    if (!py::isinstance<py::str>(obj)) throw py::type_error(name + " must be a str");
    return parse_act(py::cast<std::string>(obj));
}

class InferencePlan {
   public:
    // layers: a list of ("conv", w (k, k, cin, cout), b (cout,), stride, padding, act) and
    // ("dwpw", w_dw (3, 3, c), b_dw (c,), stride, padding, act_dw, w_pw (c, cout), b_pw (cout,),
    // act_pw); then the classifier w (d, classes), b (classes,); batch: the largest batch;
    // input_hw: the image size; chunk: images per pass (0: as many as keep each activation
    // buffer within kChunkFloats).
    InferencePlan(const py::list& layers, const py::object& fc_w, const py::object& fc_b,
                  index_t batch, const py::object& input_hw, index_t chunk) {
        require(batch >= 1 && batch <= (index_t(1) << 20),
                "batch must be in [1, 2^20], got " + std::to_string(batch));
        require(py::len(layers) >= 1, "layers must not be empty");
        require(chunk >= 0, "chunk must be >= 0, got " + std::to_string(chunk));
        batch_ = batch;
        std::tie(h_, w_) = parse_hw(input_hw, "input_hw");
        index_t h = h_, w = w_, c = -1;
        for (size_t i = 0; i < py::len(layers); ++i) {
            const std::string name = "layers[" + std::to_string(i) + "]";
            if (!py::isinstance<py::tuple>(layers[i]))
                throw py::type_error(name + " must be a tuple");
            py::tuple t = layers[i];
            require(t.size() >= 1 && py::isinstance<py::str>(t[0]),
                    name + " must start with its kind, 'conv' or 'dwpw'");
            const std::string kind = py::cast<std::string>(t[0]);
            require(kind == "conv" || kind == "dwpw",
                    name + " kind must be 'conv' or 'dwpw', got '" + kind + "'");
            Layer L;
            L.dwpw = kind == "dwpw";
            require(t.size() == (L.dwpw ? 9u : 6u),
                    name + " (" + kind + ") must have " + (L.dwpw ? "9" : "6") + " entries");
            F32 w0 = check_f32(t[1], (name + " weight").c_str(), L.dwpw ? 3 : 4);
            L.k = w0[0];
            require(w0[0] == w0[1], name + " weight must have a square kernel, got " +
                                        shape_str(w0.shape));
            require(!L.dwpw || L.k == 3, name + " depthwise kernel must be 3x3, got " +
                                             shape_str(w0.shape));
            L.cin = w0[2];
            if (c >= 0)
                require(L.cin == c, name + " takes " + std::to_string(L.cin) +
                                        " channels but the layer before gives " +
                                        std::to_string(c));
            L.h = h;
            L.w = w;
            L.s = take_int(t[3], name + " stride", 1, kMaxDim);
            L.p = take_int(t[4], name + " padding", 0, kMaxDim);
            L.ho = conv_out_size(h, L.k, L.s, L.p, "height");
            L.wo = conv_out_size(w, L.k, L.s, L.p, "width");
            L.act1 = L.act2 = take_act(t[5], name + " act");
            if (L.dwpw) {
                L.dw = take(t[1], name + " weight", {3, 3, L.cin});
                L.db = take(t[2], name + " bias", {L.cin});
                F32 wp = check_f32(t[6], (name + " pointwise weight").c_str(), 2);
                L.cout = wp[1];
                L.gw = take_packed(t[6], name + " pointwise weight", {L.cin, L.cout});
                L.gb = take(t[7], name + " pointwise bias", {L.cout});
                L.act2 = take_act(t[8], name + " pointwise act");
            } else {
                L.cout = w0[3];
                L.gw = take_packed(t[1], name + " weight", {L.k, L.k, L.cin, L.cout});
                L.gb = take(t[2], name + " bias", {L.cout});
            }
            check_alloc({L.ho + 2 * L.p, L.wo + 2 * L.p, std::max(L.cin, L.cout)},
                        name + " activation of one image");
            check_alloc({L.tile_rows(), L.wo, std::max(L.K(), L.cout)}, name + " tile");
            if (!layers_.empty()) layers_.back().p_out = L.p;
            h = L.ho;
            w = L.wo;
            c = L.cout;
            layers_.push_back(std::move(L));
        }
        F32 fw = check_f32(fc_w, "classifier weight", 2);
        require(fw[0] == c, "classifier weight takes " + std::to_string(fw[0]) +
                                " features but the last layer gives " + std::to_string(c));
        classes_ = fw[1];
        fc_w_ = take_packed(fc_w, "classifier weight", {c, classes_});
        fc_b_ = take(fc_b, "classifier bias", {classes_});
        index_t act = 0;  // per image
        for (const auto& L : layers_) act = std::max(act, L.out_floats(1));
        chunk_ = std::min(batch, chunk > 0 ? chunk : std::max<index_t>(1, kChunkFloats / act));
        Layer& first = layers_[0];
        first.raw_in = !first.dwpw;
        for (index_t i = 0; first.raw_in && i < first.k; ++i)
            for (index_t t = 0; t < first.k * first.cin; ++t)
                first.koff.push_back(i * (first.w + 2 * first.p) * first.cin + t);
        if (!layers_[0].raw_in) input_.assign(layers_[0].in_floats(chunk_), 0.f);
        make_stages();
        index_t edge = 0, inner = 0;  // floats: a stage's last output (chunk_ images), the others
        for (const auto& S : stages_) {
            edge = std::max(edge, layers_[S.last].out_floats(chunk_));
            for (size_t i = S.first; i < S.last; ++i)
                inner = std::max(inner, layers_[i].out_floats(S.chunk));
        }
        buf_[0].assign(edge, 0.f);
        buf_[1].assign(edge, 0.f);
        stage_buf_[0].assign(inner, 0.f);
        stage_buf_[1].assign(inner, 0.f);
        pooled_.assign(chunk_ * c, 0.f);
        pool_sum_.assign(chunk_ * c, 0.0);
        gemm_floats_ = sgemm_packed_b_scratch(chunk_, c);
        for (const auto& L : layers_) {
            tile_floats_ = std::max(tile_floats_, L.tile_floats());
            gemm_floats_ = std::max(gemm_floats_, sgemm_packed_b_scratch(L.tile_rows() * L.wo, L.K()));
        }
        add_scratch(std::max(1, omp_get_max_threads()));
    }

    py::array_t<float> run(const py::object& x_) { return run_impl(x_, nullptr); }

    // run(x), and the seconds each layer took in it (thread 0's clock from the barrier that ends
    // the layer before to the one that ends this layer; a layer run in several passes of a stage
    // sums them), the pooling and classifier last.
    py::tuple run_timed(const py::object& x_) {
        std::vector<double> seconds(layers_.size() + 1, 0.0);
        auto y = run_impl(x_, &seconds);
        py::list per_layer;
        for (double t : seconds) per_layer.append(t);
        return py::make_tuple(y, per_layer);
    }

    py::array_t<float> run_impl(const py::object& x_, std::vector<double>* seconds) {
        F32 x = check_f32(x_, "x", 4);
        const index_t cin = layers_[0].cin;
        if (x[1] != h_ || x[2] != w_ || x[3] != cin)
            throw py::value_error("x has shape " + shape_str(x.shape) +
                                  " but the plan was compiled for (n, " + std::to_string(h_) +
                                  ", " + std::to_string(w_) + ", " + std::to_string(cin) +
                                  ") images");
        if (x[0] > batch_)
            throw py::value_error("x has a batch of " + std::to_string(x[0]) +
                                  " but the plan was compiled for at most " +
                                  std::to_string(batch_));
        const index_t n = x[0];
        auto y = new_f32({n, classes_});
        float* yp = ptr(y);
        {
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(mutex_);
            forward(n, x.ptr, yp, seconds);
        }
        return y;
    }

    py::dict info() const {
        py::list layers;
        for (const auto& L : layers_)
            layers.append(py::dict(py::arg("kind") = L.dwpw ? "dwpw" : "conv",
                                   py::arg("input") = py::make_tuple(L.h, L.w, L.cin),
                                   py::arg("output") = py::make_tuple(L.ho, L.wo, L.cout),
                                   py::arg("stride") = L.s, py::arg("tile_rows") = L.tile_rows(),
                                   py::arg("gemm_panel") = L.gw.panel));
        py::list stages;
        for (const auto& S : stages_) stages.append(py::make_tuple(S.first, S.last, S.chunk));
        const index_t floats = index_t(input_.size() + 2 * buf_[0].size() + 2 * stage_buf_[0].size() +
                                       pooled_.size());
        return py::dict(py::arg("batch") = batch_, py::arg("chunk") = chunk_,
                        py::arg("input_hw") = py::make_tuple(h_, w_),
                        py::arg("classes") = classes_, py::arg("classifier_panel") = fc_w_.panel,
                        py::arg("layers") = layers, py::arg("stages") = stages,
                        py::arg("buffer_bytes") = 4 * floats);
    }

   private:
    // Layers [first, last] run together, `chunk` images at a time (at most chunk_): each pass
    // takes the images' input from the stage before and writes their output for the stage after;
    // the activations in between stay in the caches (stage_buf_).
    struct Stage {
        size_t first, last;
        index_t chunk;
    };

    // Images per pass of each layer: as many as keep its input and output within kStageFloats,
    // but enough for kStagePixels output pixels (each pass streams the layer's weights once), a
    // power of two, at most chunk_ and at most the next layer's. Stages: runs of equal counts. A
    // 32 px MobileNetV1 (α=1) runs its 32x32 and 16x16 layers 4 images at a time, the 8x8 ones 8,
    // the 4x4 ones 32 and the 2x2 ones the whole chunk: 6-21% faster than the whole chunk through
    // every layer at batch 128 (Zen 4, docs/benchmarks-zen4.md); 1 or 4 MB per pass, or 256 or
    // 1024 pixels, did no better.
    void make_stages() {
        const size_t n = layers_.size();
        std::vector<index_t> per(n);
        for (size_t i = n; i-- > 0;) {
            const Layer& L = layers_[i];
            const index_t fit = kStageFloats / (L.in_floats(1) + L.out_floats(1));
            const index_t want = std::max(fit, (kStagePixels + L.ho * L.wo - 1) / (L.ho * L.wo));
            index_t c = 1;
            while (2 * c <= want) c *= 2;
            per[i] = std::min({c, chunk_, i + 1 < n ? per[i + 1] : chunk_});
        }
        for (size_t i = 0; i < n; ++i) {
            if (i == 0 || per[i] != per[i - 1]) stages_.push_back({i, i, per[i]});
            stages_.back().last = i;
        }
    }

    // Scratch for up to T threads: allocated at construction, grown (never shrunk) when a call
    // finds more threads, so a run allocates nothing once the thread count is steady.
    void add_scratch(int T) {
        while (static_cast<int>(scratch_.size()) < T) {
            Scratch s;
            s.a.resize(tile_floats_);
            s.c.resize(tile_floats_);
            s.g = aligned_floats(gemm_floats_);
            scratch_.push_back(std::move(s));
        }
    }

    void forward(index_t n, const float* x, float* y, std::vector<double>* seconds) {
        const int T = std::max(1, omp_get_max_threads());
        add_scratch(T);
        // One parallel region for the whole network: a layer's phases end in barriers, not in
        // joins and forks.
#pragma omp parallel num_threads(T)
        for (index_t b0 = 0; b0 < n; b0 += chunk_)
            forward_chunk(std::min(chunk_, n - b0), x + b0 * h_ * w_ * layers_[0].cin,
                          y + b0 * classes_, seconds);
    }

    // Images [0, n) of x (n <= chunk_) -> logits y; called by every thread of the team. With
    // seconds, thread 0 adds each layer's time to its slot (each layer ends with a barrier).
    void forward_chunk(index_t n, const float* x, float* y, std::vector<double>* seconds) {
        // The input as it is for a first full conv, else zero-padded for the first layer (its
        // border was zeroed at compile).
        const Layer& first = layers_[0];
        const index_t p = first.p, C = first.cin, wp = w_ + 2 * p, hp = h_ + 2 * p;
        if (!first.raw_in) {
#pragma omp for schedule(static)
            for (index_t r = 0; r < n * h_; ++r)
                std::memcpy(input_.data() + ((r / h_ * hp + r % h_ + p) * wp + p) * C,
                            x + r * w_ * C, sizeof(float) * w_ * C);
        }
        const float* in = first.raw_in ? x : input_.data();
        const bool timer = seconds != nullptr && omp_get_thread_num() == 0;
        double clock = timer ? omp_get_wtime() : 0.0;
        auto lap = [&](size_t slot) {
            if (!timer) return;
            const double now = omp_get_wtime();
            (*seconds)[slot] += now - clock;
            clock = now;
        };
        for (size_t s = 0; s < stages_.size(); ++s) {
            const Stage& S = stages_[s];
            float* out = buf_[s % 2].data();
            for (index_t b0 = 0; b0 < n; b0 += S.chunk) {
                const index_t nb = std::min(S.chunk, n - b0);
                const float* src = in + b0 * layers_[S.first].in_floats(1);
                for (size_t i = S.first; i <= S.last; ++i) {
                    float* dst = i == S.last ? out + b0 * layers_[i].out_floats(1)
                                             : stage_buf_[(i - S.first) % 2].data();
                    run_layer(layers_[i], nb, src, dst, scratch_);
                    lap(i);
                    src = dst;
                }
            }
            in = out;
        }
        // Global average pool (in double, like global_avg_pool_fwd), then the classifier, its
        // columns shared by the team.
        const Layer& last = layers_.back();
        const index_t hw = last.ho * last.wo, c = last.cout;
#pragma omp for schedule(static)
        for (index_t b = 0; b < n; ++b) {
            double* __restrict__ acc = pool_sum_.data() + b * c;
            std::fill(acc, acc + c, 0.0);
            for (index_t q = 0; q < hw; ++q) {
                const float* __restrict__ xr = in + (b * hw + q) * c;
                for (index_t j = 0; j < c; ++j) acc[j] += double(xr[j]);
            }
            for (index_t j = 0; j < c; ++j) pooled_[b * c + j] = float(acc[j] / double(hw));
        }
        const index_t T = omp_get_num_threads(), grain = col_grain(fc_w_);
        const index_t parts = double(n) * c * classes_ < kParallelWork ? 1 : T;
        float* g = scratch_[omp_get_thread_num()].g.get();
#pragma omp for schedule(static)
        for (index_t t = 0; t < parts; ++t) {
            index_t n0, n1;
            split_range(classes_, grain, parts, t, n0, n1);
            if (n1 <= n0) continue;
            for (index_t b = 0; b < n; ++b)
                std::memcpy(y + b * classes_ + n0, fc_b_.data() + n0, sizeof(float) * (n1 - n0));
            sgemm_packed_b(n, n0, n1, pooled_.data(), c, 1, fc_w_, y + n0, classes_, true, g);
        }
        lap(layers_.size());
    }

    std::vector<Layer> layers_;
    PackedB fc_w_;
    std::vector<float> fc_b_;
    index_t batch_ = 0, chunk_ = 0, h_ = 0, w_ = 0, classes_ = 0;
    index_t tile_floats_ = 0, gemm_floats_ = 0;  // per thread: tiles a and c, sgemm_packed_b's A
    std::vector<Stage> stages_;
    Floats input_, buf_[2], stage_buf_[2], pooled_;
    std::vector<double> pool_sum_;
    std::vector<Scratch> scratch_;
    std::mutex mutex_;
};

}  // namespace

void bind_plan(py::module_& m) {
    py::class_<InferencePlan>(m, "_InferencePlan",
                              "An eval-mode network with folded BatchNorm, compiled for one input "
                              "size and a maximum batch (built by mbnet.plan.compile).")
        .def(py::init<const py::list&, const py::object&, const py::object&, index_t,
                      const py::object&, index_t>(),
             py::arg("layers"), py::arg("fc_w"), py::arg("fc_b"), py::arg("batch"),
             py::arg("input_hw"), py::arg("chunk") = 0)
        .def("run", &InferencePlan::run, py::arg("x"),
             "x (n, h, w, c) float32, n <= batch -> logits (n, classes); one call, no GIL.")
        .def("run_timed", &InferencePlan::run_timed, py::arg("x"),
             "run(x) and the seconds of each layer in it, the pooling and classifier last: "
             "(logits, [seconds]).")
        .def("info", &InferencePlan::info, "The compiled layers, tile sizes, GEMM panel widths and buffer bytes.");
}

}  // namespace mbnet
