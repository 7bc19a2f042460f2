"""Our kernels against the NumPy reference, a numba twin of the same loop nest, and PyTorch, on
MobileNetV1 layer shapes (alpha 1, CIFAR 32x32 input, stride-1 stem) at the training batch size,
all in one process.

    python -m benchmarks.bench_kernels [--batch 128] [--repeat 10] [--threads T] [--tiny] [--json out.json]

Kernels: stem conv 3x3 (fwd; bwd = weight gradient only, the stem needs no input gradient),
depthwise 3x3 (fwd; bwd = input + weight gradients), pointwise (fwd; bwd = input + weight
gradients), BatchNorm + ReLU in training mode (fwd with batch statistics; bwd = dx, dgamma, dbeta).

- NumPy reference: mbnet.reference, the same function names and arguments (einsum, single thread).
  It is timed at the same batch with fewer repeats (--ref-repeat, default 2).
- numba: ``@njit(parallel=True, fastmath=True)`` versions of depthwise fwd, pointwise fwd (a
  triple loop, i-k-j order) and BN+ReLU fwd, written below; the first call (compilation) is the
  warm-up. Skipped when numba is not installed.
- PyTorch: torch.set_num_threads = ours; NHWC arrays viewed as channels_last NCHW tensors (no
  copy); F.conv2d (groups=C for depthwise, 1x1 for pointwise), F.batch_norm + F.relu; backward by
  torch.autograd.grad over the same inputs as ours on a graph kept with retain_graph. Skipped when
  torch is not installed.

Rates: GFLOP/s (2 per multiply-add) for the convolutions, GB/s for depthwise and BN (bytes of the
arrays the op must read and write once: fwd x + y; bwd dy + x + dx, and + y for BN). "x ref" etc.
are the other implementation's time divided by ours: above 1 means ours is faster.
"""
import time

import numpy as np

from mbnet import _C
from mbnet import reference as R
from mbnet.models import layer_shapes

from . import common

numba = common.optional_import("numba")
torch = common.optional_import("torch")

# Layer subsets of mbnet.models.layer_shapes (alpha 1, 32x32 input, stride-1 stem): the depthwise
# layers of blocks 1-3, 5, 7 and 13 (the first of each width, and block 2's stride 2), the pointwise
# layers of blocks 1, 3, 5, 7 and 13, and BN + ReLU on the stem's and on each distinct pointwise output.
SHAPES = layer_shapes(1.0, 32)
STEM = tuple(SHAPES[0][2:])  # cin, cout, size, stride
DEPTHWISE = [(L.cin, L.size, L.stride) for L in SHAPES if L.kind == "dw" and L.block in (1, 2, 3, 5, 7, 13)]
POINTWISE = [(L.cin, L.cout, L.size) for L in SHAPES if L.kind == "pw" and L.block in (1, 3, 5, 7, 13)]
BATCHNORM = list(dict.fromkeys((L.cout, L.out_size) for L in SHAPES if L.kind in ("conv", "pw")))  # channels, size
EPS, MOMENTUM = 1e-5, 0.1

# --- numba twins of the forward loop nests ------------------------------------------------------

if numba is not None:
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def numba_dwconv_fwd(x, w, stride, pad):
        """x (n, h, w, c), w (kh, kw, c) -> (n, ho, wo, c); parallel over output rows."""
        n, h, wd, c = x.shape
        kh, kw = w.shape[0], w.shape[1]
        ho = (h + 2 * pad - kh) // stride + 1
        wo = (wd + 2 * pad - kw) // stride + 1
        y = np.zeros((n, ho, wo, c), dtype=np.float32)
        for r in prange(n * ho):
            b, oy = r // ho, r % ho
            for ox in range(wo):
                for i in range(kh):
                    iy = oy * stride - pad + i
                    if iy < 0 or iy >= h:
                        continue
                    for j in range(kw):
                        ix = ox * stride - pad + j
                        if ix < 0 or ix >= wd:
                            continue
                        for ch in range(c):
                            y[b, oy, ox, ch] += x[b, iy, ix, ch] * w[i, j, ch]
        return y

    @njit(parallel=True, fastmath=True)
    def numba_matmul(x, w):
        """x (m, k), w (k, n) -> (m, n): the triple loop, rows in parallel, inner loop contiguous."""
        m, k = x.shape
        n = w.shape[1]
        y = np.zeros((m, n), dtype=np.float32)
        for i in prange(m):
            for p in range(k):
                a = x[i, p]
                for j in range(n):
                    y[i, j] += a * w[p, j]
        return y

    @njit(parallel=True, fastmath=True)
    def numba_bn_relu_train_fwd(x, gamma, beta, running_mean, running_var, momentum, eps):
        """x (m, c) -> (relu(BN(x)), mean, invstd) with batch statistics (two passes, per-chunk
        partial sums reduced afterwards); updates the running statistics in place."""
        m, c = x.shape
        chunks = max(1, min(m, 4 * numba.get_num_threads()))
        part = np.zeros((chunks, c), dtype=np.float64)
        for t in prange(chunks):
            for r in range(t * m // chunks, (t + 1) * m // chunks):
                for ch in range(c):
                    part[t, ch] += x[r, ch]
        mean = part.sum(axis=0) / m
        part[:] = 0.0
        for t in prange(chunks):
            for r in range(t * m // chunks, (t + 1) * m // chunks):
                for ch in range(c):
                    d = x[r, ch] - mean[ch]
                    part[t, ch] += d * d
        var = part.sum(axis=0) / m
        invstd = 1.0 / np.sqrt(var + eps)
        scale = (gamma * invstd).astype(np.float32)
        shift = (beta - mean * gamma * invstd).astype(np.float32)
        y = np.empty_like(x)
        for r in prange(m):
            for ch in range(c):
                v = x[r, ch] * scale[ch] + shift[ch]
                y[r, ch] = v if v > 0 else np.float32(0)
        for ch in range(c):
            running_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * mean[ch]
            running_var[ch] = (1 - momentum) * running_var[ch] + momentum * var[ch] * m / max(m - 1, 1)
        return y, mean.astype(np.float32), invstd.astype(np.float32)


# --- the cases ----------------------------------------------------------------------------------

def _nchw(a):
    """An NHWC ndarray as a channels_last NCHW torch tensor sharing its memory."""
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def _torch_pair(fwd, inputs, dy):
    """(forward closure under no_grad, backward closure: autograd.grad over ``inputs``)."""
    def t_fwd():
        with torch.no_grad():
            return fwd()

    for t in inputs:
        t.requires_grad_(True)
    y = fwd()
    dy_t = _nchw(dy)

    def t_bwd():
        return torch.autograd.grad(y, inputs, dy_t, retain_graph=True)

    return t_fwd, t_bwd


def stem_case(batch, rng):
    cin, cout, size, s = STEM
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * np.float32(0.2)
    ho = (size - 1) // s + 1
    dy = rng.standard_normal((batch, ho, ho, cout), dtype=np.float32)
    flops = 2 * 9 * cin * cout * batch * ho * ho
    case = {
        "kernel": "stem conv 3x3", "layer": f"{cin}->{cout} @{size} s{s}", "unit": "GFLOP/s",
        "work": {"fwd": flops, "bwd": flops},
        "ours": {"fwd": lambda: _C.conv2d_fwd(x, w, s, 1),
                 "bwd": lambda: _C.conv2d_bwd_weight(x, dy, (3, 3), s, 1)},
        "ref": {"fwd": lambda: R.conv2d_fwd(x, w, s, 1),
                "bwd": lambda: R.conv2d_bwd_weight(x, dy, (3, 3), s, 1)},
    }
    if torch is not None:
        import torch.nn.functional as F
        xt, wt = _nchw(x), torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        tf, tb = _torch_pair(lambda: F.conv2d(xt, wt, None, s, 1), [wt], dy)
        case["torch"] = {"fwd": tf, "bwd": tb}
    return case


def depthwise_case(c, size, s, batch, rng):
    x = rng.standard_normal((batch, size, size, c), dtype=np.float32)
    w = rng.standard_normal((3, 3, c), dtype=np.float32) * np.float32(0.3)
    ho = (size - 1) // s + 1
    dy = rng.standard_normal((batch, ho, ho, c), dtype=np.float32)
    hw = (size, size)
    case = {
        "kernel": "depthwise 3x3", "layer": f"{c} @{size} s{s}", "unit": "GB/s",
        "work": {"fwd": x.nbytes + dy.nbytes, "bwd": dy.nbytes + 2 * x.nbytes},
        "ours": {"fwd": lambda: _C.dwconv2d_fwd(x, w, s, 1),
                 "bwd": lambda: (_C.dwconv2d_bwd_input(dy, w, hw, s, 1), _C.dwconv2d_bwd_weight(x, dy, (3, 3), s, 1))},
        "ref": {"fwd": lambda: R.dwconv2d_fwd(x, w, s, 1),
                "bwd": lambda: (R.dwconv2d_bwd_input(dy, w, hw, s, 1), R.dwconv2d_bwd_weight(x, dy, (3, 3), s, 1))},
    }
    if numba is not None:
        case["numba"] = {"fwd": lambda: numba_dwconv_fwd(x, w, s, 1)}
    if torch is not None:
        import torch.nn.functional as F
        xt, wt = _nchw(x), torch.from_numpy(w).permute(2, 0, 1).unsqueeze(1).contiguous()
        tf, tb = _torch_pair(lambda: F.conv2d(xt, wt, None, s, 1, 1, c), [xt, wt], dy)
        case["torch"] = {"fwd": tf, "bwd": tb}
    return case


def pointwise_case(cin, cout, size, batch, rng):
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((cin, cout), dtype=np.float32) * np.float32(1 / np.sqrt(cin))
    dy = rng.standard_normal((batch, size, size, cout), dtype=np.float32)
    flops = 2 * batch * size * size * cin * cout
    case = {
        "kernel": "pointwise 1x1", "layer": f"{cin}->{cout} @{size}", "unit": "GFLOP/s",
        "work": {"fwd": flops, "bwd": 2 * flops},
        "ours": {"fwd": lambda: _C.pwconv2d_fwd(x, w),
                 "bwd": lambda: (_C.pwconv2d_bwd_input(dy, w), _C.pwconv2d_bwd_weight(x, dy))},
        "ref": {"fwd": lambda: R.pwconv2d_fwd(x, w),
                "bwd": lambda: (R.pwconv2d_bwd_input(dy, w), R.pwconv2d_bwd_weight(x, dy))},
    }
    if numba is not None:
        x2 = x.reshape(-1, cin)
        case["numba"] = {"fwd": lambda: numba_matmul(x2, w)}
    if torch is not None:
        import torch.nn.functional as F
        xt, wt = _nchw(x), torch.from_numpy(np.ascontiguousarray(w.T)).view(cout, cin, 1, 1)
        tf, tb = _torch_pair(lambda: F.conv2d(xt, wt), [xt, wt], dy)
        case["torch"] = {"fwd": tf, "bwd": tb}
    return case


def batchnorm_case(c, size, batch, rng):
    x = rng.standard_normal((batch, size, size, c), dtype=np.float32) * np.float32(2) + np.float32(0.5)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, MOMENTUM, EPS, "relu")
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    case = {
        "kernel": "BN+ReLU train", "layer": f"{c} @{size}", "unit": "GB/s",
        "work": {"fwd": 2 * x.nbytes, "bwd": 3 * x.nbytes},  # x in, y out; dy and x in, dx out
        "ours": {"fwd": lambda: _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, MOMENTUM, EPS, "relu"),
                 "bwd": lambda: _C.batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, "relu")},
        "ref": {"fwd": lambda: R.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, MOMENTUM, EPS, "relu"),
                "bwd": lambda: R.batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, "relu")},
    }
    if numba is not None:
        x2 = x.reshape(-1, c)
        case["numba"] = {"fwd": lambda: numba_bn_relu_train_fwd(x2, gamma, beta, rm, rv, MOMENTUM, EPS)}
    if torch is not None:
        import torch.nn.functional as F
        xt, gt, bt = _nchw(x), torch.from_numpy(gamma), torch.from_numpy(beta)
        trm, trv = torch.zeros(c), torch.ones(c)
        tf, tb = _torch_pair(lambda: F.relu(F.batch_norm(xt, trm, trv, gt, bt, True, MOMENTUM, EPS)), [xt, gt, bt], dy)
        case["torch"] = {"fwd": tf, "bwd": tb}
    return case


def act_case(c, size, batch, rng):
    """ReLU alone (mbnet.functional.relu: an activation not fused into a BatchNorm)."""
    x = rng.standard_normal((batch, size, size, c), dtype=np.float32)
    y = np.maximum(x, 0)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    case = {
        "kernel": "ReLU", "layer": f"{c} @{size}", "unit": "GB/s",
        "work": {"fwd": 2 * x.nbytes, "bwd": 3 * x.nbytes},  # x in, y out; dy and y in, dx out
        "ours": {"fwd": lambda: _C.act_fwd(x, "relu"), "bwd": lambda: _C.act_bwd(dy, y, "relu")},
        "ref": {"fwd": lambda: R.act_fwd(x, "relu"), "bwd": lambda: R.act_bwd(dy, y, "relu")},
    }
    if torch is not None:
        import torch.nn.functional as F
        xt = _nchw(x)
        tf, tb = _torch_pair(lambda: F.relu(xt), [xt], dy)
        case["torch"] = {"fwd": tf, "bwd": tb}
    return case


def _first(out):
    """The main output array of a call (y of (y, mean, invstd); a torch tensor back to NHWC)."""
    if isinstance(out, tuple):
        out = out[0]
    if torch is not None and isinstance(out, torch.Tensor):
        out = out.detach().permute(0, 2, 3, 1).numpy() if out.ndim == 4 else out.detach().numpy()
    return np.asarray(out).reshape(-1)


def _agree(ours, theirs):
    """True when the other implementation's main output (y, or dx for a backward) matches ours:
    a check that the same thing is being timed, not a test. Up to 1e-4 of the elements may differ:
    where BN's output rounds to either side of zero, the ReLU masks of two engines disagree."""
    a, b = _first(ours()), _first(theirs())
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(a).max()) if a.size else 1.0, 1.0)
    bad = ~np.isclose(a, b, rtol=1e-3, atol=1e-4 * scale)
    return bool(bad.mean() <= 1e-4)


def run_case(case, repeat, ref_repeat, warmup):
    rows = []
    for op in ("fwd", "bwd"):
        ours = common.measure(case["ours"][op], repeat, warmup)["median"]
        work = case["work"][op]
        row = {"kernel": case["kernel"], "layer": case["layer"], "op": op, "unit": case["unit"],
               "work": work, "ours_s": ours, "ours_rate": work / ours / 1e9}
        for impl, reps in (("ref", ref_repeat), ("numba", repeat), ("torch", repeat)):
            fn = case.get(impl, {}).get(op)
            if fn is None:
                row[f"{impl}_s"] = row[f"{impl}_ratio"] = None
                continue
            t = common.measure(fn, reps, max(warmup, 1) if impl == "numba" else warmup)["median"]
            row[f"{impl}_s"], row[f"{impl}_ratio"] = t, t / ours
            if impl != "ref" and (op == "fwd" or not case["kernel"].startswith("stem")):
                row[f"{impl}_agrees"] = _agree(case["ours"][op], fn)
        rows.append(row)
    return rows


def run(batch=128, repeat=10, ref_repeat=2, threads=None, tiny=False, use_numba=True, use_torch=True):
    global numba, torch
    if not use_numba:
        numba = None
    if not use_torch:
        torch = None
    if threads is not None:
        _C.set_num_threads(threads)
    threads = _C.get_num_threads()
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if torch is not None:
        torch.set_num_threads(threads)
    warmup = 1
    if tiny:
        common.PAUSE = 0
        batch, repeat, ref_repeat = 2, 1, 1
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    dws = DEPTHWISE[:2] if tiny else DEPTHWISE
    pws = POINTWISE[:1] if tiny else POINTWISE
    bns = BATCHNORM[:1] if tiny else BATCHNORM
    cases = [lambda: stem_case(batch, rng)]
    cases += [lambda a=a: depthwise_case(*a, batch, rng) for a in dws]
    cases += [lambda a=a: pointwise_case(*a, batch, rng) for a in pws]
    cases += [lambda a=a: batchnorm_case(*a, batch, rng) for a in bns]
    cases += [lambda: act_case(64, 32, batch, rng)]
    rows = []
    for make in cases:
        rows += run_case(make(), repeat, ref_repeat, warmup)  # one case's arrays alive at a time
    return {"benchmark": "kernels", **common.machine_info(), "batch": batch, "repeat": repeat,
            "ref_repeat": ref_repeat, "numba": getattr(numba, "__version__", None),
            "torch": getattr(torch, "__version__", None), "rows": rows, "seconds": time.perf_counter() - t0}


def markdown(res):
    lines = ["## Kernels vs NumPy reference, numba, PyTorch", ""] + common.header(res) + [
        "",
        f"Batch {res['batch']}, MobileNetV1 α=1 layers at 32x32 input; median of {res['repeat']} "
        f"(reference: of {res['ref_repeat']}), same thread count for all. "
        f"numba: {res['numba'] or 'not installed (skipped)'}; PyTorch: {res['torch'] or 'not installed (skipped)'}. "
        "x ref / x numba / x torch = their time / our time (> 1: ours is faster). "
        "Stem bwd = weight gradient only; other bwd = all gradients.",
        "",
    ]
    rows = []
    for r in res["rows"]:
        def ms(key):
            return None if r[key] is None else r[key] * 1e3

        def ratio(key):
            v = r[key]
            if v is None:
                return None
            flag = "" if r.get(key.replace("_ratio", "_agrees"), True) else " (outputs differ!)"
            return f"{v:.2f}{flag}"
        rows.append((r["kernel"], r["layer"], r["op"], r["ours_s"] * 1e3, f"{r['ours_rate']:.1f} {r['unit']}",
                     ms("ref_s"), ratio("ref_ratio"), ms("numba_s"), ratio("numba_ratio"), ms("torch_s"),
                     ratio("torch_ratio")))
    lines.append(common.table(["kernel", "layer", "op", "ours ms", "ours rate", "ref ms", "x ref", "numba ms",
                               "x numba", "torch ms", "x torch"], rows, "lllrrrrrrrr"))
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"ref_repeat": "repeats of the slow NumPy reference",
                                                     "tiny": "batch 2, 1 repeat, a few layers: a smoke run"})


if __name__ == "__main__":
    main()
