"""Differentiable operations of MobileNetV1, Tensor in, Tensor out.

Notation: n batch, h/w input height/width, ho/wo output height/width, c channels, ci/co input/
output channels, kh/kw kernel size, k classes. Activations are NHWC; weights use TensorFlow
layouts: conv (kh, kw, ci, co) "HWIO", depthwise (kh, kw, c), pointwise (ci, co), linear
(din, dout).

Every op runs its kernel from ``mbnet._C`` when the tensors are float32 and its NumPy twin of
the same name and arguments from ``mbnet.reference`` when they are float64 (the path the
finite-difference gradient checks use). All tensors of one call must share a dtype.

``profile()`` times every kernel call by name (used by benchmarks/bench_step.py).

Convolutions called with ``stats=True`` also return their output's per-channel (mean, var), summed
by the kernel while it writes the output; ``batch_norm(..., stats=...)`` in training then
normalizes in one pass over its input instead of two. mbnet.nn does this for every convolution
followed by a BatchNorm2d while ``FUSE`` is true, and there folds the BatchNorm + activation
before a convolution into that convolution's load: between a depthwise and a pointwise
convolution into the GEMM's packing (``batch_norm_pointwise_conv2d``), before each separable block
into the depthwise kernel's rows (``batch_norm_depthwise_conv2d``). Those activations are never
stored, and the backward of such a BatchNorm runs inside the convolution's input-gradient kernel
(``{conv}_bwd_input_bn``: its sums gathered as the gradient is computed, then one pass in place).
"""
import contextlib
import time
from collections import defaultdict

import numpy as np

from . import _C, reference
from .tensor import Function, Tensor, mul

_timings = None  # name -> [calls, seconds] while profile() is active
_bn_allreduce = None  # set_batch_norm_allreduce: training BatchNorm uses the statistics of all ranks
FUSE = True  # training convolutions hand their output's statistics to the BatchNorm after them (mbnet.nn)


@contextlib.contextmanager
def profile():
    """Collects ``{kernel name: [calls, seconds]}`` for every kernel call made inside the block."""
    global _timings
    old, _timings = _timings, defaultdict(lambda: [0, 0.0])
    try:
        yield _timings
    finally:
        _timings = old


def _run(name, dtype, *args):
    """Calls kernel ``name`` for ``dtype``: mbnet._C for float32, mbnet.reference for float64."""
    if dtype == np.float32:
        fn = getattr(_C, name)
        # Gradients arriving from broadcasts or slices may be strided views; kernels need C order.
        args = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) and not a.flags.c_contiguous else a
                for a in args]
    elif dtype == np.float64:
        fn = getattr(reference, name)
    else:
        raise TypeError(f"{name}: tensors must be float32 (kernels) or float64 (reference), got {dtype}")
    if _timings is None:
        return fn(*args)
    start = time.perf_counter()
    out = fn(*args)
    entry = _timings[name]
    entry[0] += 1
    entry[1] += time.perf_counter() - start
    return out


def _common_dtype(op, **tensors):
    """The dtype shared by the named tensors (TypeError naming the odd one out)."""
    dtype = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a mbnet.Tensor, got {type(t).__name__}")
        if dtype is None:
            dtype, first = t.dtype, name
        elif t.dtype != dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first} is {dtype}")
    return dtype


# --- full and depthwise convolution -------------------------------------------------------------

def _conv_forward(function, kernel, x, w, *args):
    """y = kernel_fwd(x, w, *args); when function.stats is a list, kernel_fwd_stats appends y's
    (mean, var) to it."""
    if function.stats is None:
        return _run(kernel + "_fwd", x.dtype, x, w, *args)
    y, mean, var = _run(kernel + "_fwd_stats", x.dtype, x, w, *args)
    function.stats += [mean, var]
    return y


def _call_conv(function, x, w, stats, *bn):
    """function(x, w) (function(x, *bn, w) for a convolution of BatchNorm's output), or with stats
    (y, (mean, var))."""
    if not stats:
        return function(x, *bn, w)
    function.stats = out = []  # a list of ours: Function.release() clears the function's attributes
    y = function(x, *bn, w)
    return y, tuple(out)


class _StridedConv(Function):
    """x, w -> y by the kernels ``{kernel}_fwd``, ``{kernel}_bwd_input`` and ``{kernel}_bwd_weight``,
    which take (stride, padding) and, in backward, the (h, w) of the input or of the kernel."""
    kernel = None
    stats = None

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def forward(self, x, w):
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        self.input_hw, self.kernel_hw = x.shape[1:3], w.shape[:2]
        return _conv_forward(self, self.kernel, x, w, self.stride, self.padding)

    def backward(self, gy):
        gx = gw = None
        if self.needs_input_grad[0]:
            gx = _run(self.kernel + "_bwd_input", gy.dtype, gy, self.w, self.input_hw, self.stride, self.padding)
        if self.needs_input_grad[1]:
            gw = _run(self.kernel + "_bwd_weight", gy.dtype, self.x, gy, self.kernel_hw, self.stride, self.padding)
        return gx, gw


class Conv2d(_StridedConv):
    kernel = "conv2d"


def conv2d(x, w, stride=1, padding=0, stats=False):
    """x (n, h, w, ci), w (kh, kw, ci, co) -> (n, ho, wo, co), ho = (h + 2p - kh) // s + 1.
    Full convolution (cross-correlation), no bias. stats: return (y, (mean, var)), y's
    per-channel mean and biased variance over n, ho, wo (ndarrays, for batch_norm's stats)."""
    _common_dtype("conv2d", x=x, w=w)
    return _call_conv(Conv2d(stride, padding), x, w, stats)


class DepthwiseConv2d(_StridedConv):
    kernel = "dwconv2d"


def depthwise_conv2d(x, w, stride=1, padding=1, stats=False):
    """x (n, h, w, c), w (kh, kw, c) -> (n, ho, wo, c): one kh x kw filter per channel.
    stats: return (y, (mean, var)) as conv2d does."""
    _common_dtype("depthwise_conv2d", x=x, w=w)
    return _call_conv(DepthwiseConv2d(stride, padding), x, w, stats)


# --- pointwise (1x1) convolution -----------------------------------------------------------------

class PointwiseConv2d(Function):
    stats = None

    def forward(self, x, w):
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        return _conv_forward(self, "pwconv2d", x, w)

    def backward(self, gy):
        gx = gw = None
        if self.needs_input_grad[0]:
            gx = _run("pwconv2d_bwd_input", gy.dtype, gy, self.w)
        if self.needs_input_grad[1]:
            gw = _run("pwconv2d_bwd_weight", gy.dtype, self.x, gy)
        return gx, gw


def pointwise_conv2d(x, w, stats=False):
    """x (n, h, w, ci), w (ci, co) -> (n, h, w, co): a matrix product over the n·h·w pixels.
    stats: return (y, (mean, var)) as conv2d does."""
    _common_dtype("pointwise_conv2d", x=x, w=w)
    return _call_conv(PointwiseConv2d(), x, w, stats)


# --- BatchNorm fused with an activation ----------------------------------------------------------

class BatchNormTrain(Function):
    """stats: x's batch (mean, var), or None to compute them (a second pass over x)."""

    def __init__(self, running_mean, running_var, momentum, eps, act, stats=None):
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.act, self.stats = momentum, eps, act, stats

    def forward(self, x, gamma, beta):
        running = (self.running_mean, self.running_var, self.momentum, self.eps, self.act)
        if self.stats is None:
            y, mean, invstd = _run("batchnorm_act_train_fwd", x.dtype, x, gamma, beta, *running)
        else:
            y, mean, invstd = _run("batchnorm_act_train_fwd_from_stats", x.dtype, x, *self.stats, gamma, beta,
                                   *running)
        del self.running_mean, self.running_var, self.stats
        self.saved = (x, gamma, beta, mean, invstd)
        return y

    def backward(self, gy):
        x, gamma, beta, mean, invstd = self.saved
        gx, ggamma, gbeta = _run("batchnorm_act_train_bwd", gy.dtype, gy, x, gamma, beta, mean, invstd, self.act)
        need = self.needs_input_grad
        return gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None


class BatchNormInfer(Function):
    def __init__(self, running_mean, running_var, eps, act):
        self.mean, self.var, self.eps, self.act = running_mean, running_var, eps, act

    def forward(self, x, gamma, beta):
        y = _run("batchnorm_act_infer_fwd", x.dtype, x, gamma, beta, self.mean, self.var, self.eps, self.act)
        if any(self.needs_input_grad):
            # Own copies: a later training-mode call would update the running statistics in place.
            self.saved = (x, y, gamma, beta, self.mean.copy(), self.var.copy())
        return y

    def backward(self, gy):
        x, y, gamma, beta, mean, var = self.saved
        gx, ggamma, gbeta = _run("batchnorm_act_infer_bwd", gy.dtype, gy, x, y, gamma, beta, mean, var,
                                 self.eps, self.act)
        need = self.needs_input_grad
        return gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None


class SyncBatchNormTrain(Function):
    """BatchNormTrain with the statistics of the global batch spread over several processes:
    ``allreduce`` (float64 ndarray -> its sum over the processes) reduces, per channel, the count
    m times this process's batch mean, variance and squared mean (from ``stats``, x's (mean, var),
    or summed here) and the count in forward, and the two per-channel gradient sums in backward.
    Runs on the fixed-statistics kernels; dgamma and dbeta stay this process's share (the
    gradient allreduce adds them up)."""

    def __init__(self, running_mean, running_var, momentum, eps, act, allreduce, stats=None):
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.act, self.allreduce, self.stats = momentum, eps, act, allreduce, stats

    def forward(self, x, gamma, beta):
        c = x.shape[-1]
        rows = x.size // c
        if self.stats is None:
            x2 = x.reshape(-1, c)
            total = x2.sum(0, dtype=np.float64)
            mean_sq = total * total / rows
            local = [total, np.einsum("ij,ij->j", x2, x2, dtype=np.float64) - mean_sq, mean_sq]
        else:
            mean, var = (np.asarray(a, np.float64) for a in self.stats)
            local = [rows * mean, rows * var, rows * mean * mean]
        s = self.allreduce(np.concatenate(local + [[rows]]))
        n = s[-1]
        mean = s[:c] / n
        # The variance within the processes' batches plus that of their means about the mean.
        var = np.maximum(s[c:2 * c] / n + (s[2 * c:3 * c] / n - mean * mean), 0.0)
        m = self.momentum
        self.running_mean *= 1 - m
        self.running_mean += (m * mean).astype(x.dtype)
        self.running_var *= 1 - m
        self.running_var += (m * var * n / max(n - 1, 1)).astype(x.dtype)
        del self.running_mean, self.running_var, self.stats
        mean, var = mean.astype(x.dtype), var.astype(x.dtype)
        y = _run("batchnorm_act_infer_fwd", x.dtype, x, gamma, beta, mean, var, self.eps, self.act)
        self.saved = (x, y, gamma, beta, mean, var, n)
        return y

    def backward(self, gy):
        x, y, gamma, beta, mean, var, n = self.saved
        # The kernel gives dz * gamma * invstd and this process's sum(dz * xhat), sum(dz).
        gx, ggamma, gbeta = _run("batchnorm_act_infer_bwd", gy.dtype, gy, x, y, gamma, beta, mean, var,
                                 self.eps, self.act)
        need = self.needs_input_grad
        if need[0]:
            c = x.shape[-1]
            s = self.allreduce(np.concatenate([gbeta, ggamma]).astype(np.float64)).astype(x.dtype)
            invstd = x.dtype.type(1) / np.sqrt(var + x.dtype.type(self.eps))
            xhat = (x - mean) * invstd
            gx -= gamma * invstd / x.dtype.type(n) * (s[:c] + xhat * s[c:])
        return gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None


def _check_running(op, dtype, running_mean, running_var):
    """TypeError naming op and the argument unless both running statistics are ndarrays of dtype."""
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            raise TypeError(f"{op}: {name} must be an ndarray of {dtype}")


def _batch_norm_statistics(x, mean, var, running_mean, running_var, momentum, eps):
    """(mean, invstd) of x's batch from its (mean, var) (biased), and the running statistics
    updated in place: batchnorm_act_train_fwd_from_stats less the apply, the same float
    operations (so the same bits in float32)."""
    rows = x.size // x.shape[-1]
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * var * (rows / max(rows - 1, 1))
    return mean.astype(x.dtype), (1.0 / np.sqrt(var + eps)).astype(x.dtype)


class BatchNormConv2d(Function):
    """x, gamma, beta, w -> conv(act(BN(x)), w), BN in training with x's batch (mean, var) given
    (x_stats); conv "pwconv2d" (1x1) or "dwconv2d" (3x3 depthwise; geometry (stride, padding)).
    The normalized activation z is formed as the kernel loads x (the GEMM's packing, the depthwise
    kernel's padded rows: kernels ``{conv}_bn_act_*``) and never stored; backward forms it again for
    w's gradient (gw = conv's weight gradient of (z, gy)), and one kernel (``{conv}_bwd_input_bn``)
    gives x's: conv's input gradient of gy, BatchNorm's two sums gathered from it as it is computed,
    then BatchNorm's backward from x in place. The depthwise conv does both in one kernel
    (``dwconv2d_bn_act_bwd``, one pass over x and gy) when both are needed."""
    stats = None

    def __init__(self, conv, running_mean, running_var, momentum, eps, act, x_stats, geometry=()):
        self.conv, self.geometry = conv, geometry
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.act, self.x_stats = momentum, eps, act, x_stats

    def forward(self, x, gamma, beta, w):
        mean, invstd = _batch_norm_statistics(x, *self.x_stats, self.running_mean, self.running_var,
                                              self.momentum, self.eps)
        del self.running_mean, self.running_var, self.x_stats
        self.saved = (x, gamma, beta, mean, invstd, w)
        return _conv_forward(self, self.conv + "_bn_act", x, w, gamma, beta, mean, invstd, self.act, *self.geometry)

    def backward(self, gy):
        x, gamma, beta, mean, invstd, w = self.saved
        bn = (gamma, beta, mean, invstd, self.act)
        w_hw = (w.shape[:2],) if self.geometry else ()  # the depthwise kernel also takes the kernel's (h, w)
        need = self.needs_input_grad
        gx = ggamma = gbeta = gw = None
        if self.conv == "dwconv2d" and need[3] and any(need[:3]):  # all four in one pass over x and gy
            gx, ggamma, gbeta, gw = _run("dwconv2d_bn_act_bwd", gy.dtype, gy, w, x, *bn, *self.geometry)
        else:
            if need[3]:
                gw = _run(self.conv + "_bn_act_bwd_weight", gy.dtype, x, gy, *bn, *w_hw, *self.geometry)
            if any(need[:3]):
                gx, ggamma, gbeta = _run(self.conv + "_bwd_input_bn", gy.dtype, gy, w, x, *bn, *self.geometry)
        return gx if need[0] else None, ggamma if need[1] else None, gbeta if need[2] else None, gw


def _batch_norm_conv2d(op, conv, unfused, x, gamma, beta, running_mean, running_var, w, x_stats, momentum, eps,
                       act, stats, geometry=(), fusable=True):
    """conv(batch_norm(x, ...), w) as one BatchNormConv2d, or as the two ops (unfused(z)) when
    not fusable or for synchronized statistics."""
    _check_running(op, _common_dtype(op, x=x, gamma=gamma, beta=beta, w=w), running_mean, running_var)
    if _bn_allreduce is not None or not fusable:
        return unfused(batch_norm(x, gamma, beta, running_mean, running_var, True, momentum, eps, act, x_stats))
    function = BatchNormConv2d(conv, running_mean, running_var, momentum, eps, act, x_stats, geometry)
    return _call_conv(function, x, w, stats, gamma, beta)


def batch_norm_pointwise_conv2d(x, gamma, beta, running_mean, running_var, w, x_stats, momentum=0.1, eps=1e-5,
                                act="none", stats=False):
    """pointwise_conv2d(batch_norm(x, gamma, beta, running_mean, running_var, True, momentum, eps,
    act, stats=x_stats), w, stats) -- x (n, h, w, ci), w (ci, co) -- in one op whose GEMM applies
    the BatchNorm and activation to x as it loads it: their output is never stored. Training mode
    only; x_stats is x's per-channel (mean, var) from the convolution that made x. After
    set_batch_norm_allreduce(fn), the two ops run one after the other (synchronized statistics)."""
    return _batch_norm_conv2d("batch_norm_pointwise_conv2d", "pwconv2d", lambda z: pointwise_conv2d(z, w, stats),
                              x, gamma, beta, running_mean, running_var, w, x_stats, momentum, eps, act, stats)


def batch_norm_depthwise_conv2d(x, gamma, beta, running_mean, running_var, w, x_stats, stride=1, padding=1,
                                momentum=0.1, eps=1e-5, act="none", stats=False):
    """depthwise_conv2d(batch_norm(x, ..., act, stats=x_stats), w, stride, padding, stats) -- x
    (n, h, w, c), w (kh, kw, c) -- in one op whose kernel applies the BatchNorm and activation to
    each input row as it loads it, as batch_norm_pointwise_conv2d does. Its kernels take 3x3 w with
    stride <= 3; other w and strides, and set_batch_norm_allreduce(fn), run the two ops."""
    fusable = isinstance(w, Tensor) and w.shape[:2] == (3, 3) and isinstance(stride, int) and 1 <= stride <= 3
    return _batch_norm_conv2d("batch_norm_depthwise_conv2d", "dwconv2d",
                              lambda z: depthwise_conv2d(z, w, stride, padding, stats), x, gamma, beta, running_mean,
                              running_var, w, x_stats, momentum, eps, act, stats, (stride, padding), fusable)


def set_batch_norm_allreduce(allreduce):
    """Makes every training-mode batch_norm synchronized (SyncBatchNormTrain) with ``allreduce``
    (float64 ndarray -> its sum over the processes); None restores per-process statistics."""
    global _bn_allreduce
    _bn_allreduce = allreduce


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5, act="none",
               stats=None):
    """x (..., c) (NHWC: statistics over n, h, w), gamma/beta (c,) Tensors, running_mean/var (c,)
    ndarrays of x's dtype -> act(BN(x)), same shape as x.

    training: normalizes with the batch statistics (biased variance) and updates running_mean /
    running_var in place: new = (1 - momentum) * old + momentum * batch (unbiased variance), also
    under no_grad. Otherwise normalizes with the running statistics. act: "none", "relu", "relu6".
    After set_batch_norm_allreduce(fn), training uses the statistics of all processes.
    stats: x's per-channel (mean, var) (biased) from a convolution called with stats=True; training
    then uses them instead of a pass over x.
    """
    _check_running("batch_norm", _common_dtype("batch_norm", x=x, gamma=gamma, beta=beta), running_mean, running_var)
    if training and _bn_allreduce is not None:
        return SyncBatchNormTrain(running_mean, running_var, momentum, eps, act, _bn_allreduce, stats)(x, gamma, beta)
    if training:
        return BatchNormTrain(running_mean, running_var, momentum, eps, act, stats)(x, gamma, beta)
    return BatchNormInfer(running_mean, running_var, eps, act)(x, gamma, beta)


# --- activations ---------------------------------------------------------------------------------

class Activation(Function):
    def __init__(self, act):
        self.act = act

    def forward(self, x):
        self.y = _run("act_fwd", x.dtype, x, self.act)
        return self.y

    def backward(self, gy):
        return _run("act_bwd", gy.dtype, gy, self.y, self.act)


def relu(x):
    """x (any shape) -> max(x, 0)."""
    return Activation("relu")(x)


def relu6(x):
    """x (any shape) -> min(max(x, 0), 6)."""
    return Activation("relu6")(x)


# --- pooling, classifier, loss -------------------------------------------------------------------

class GlobalAvgPool(Function):
    def forward(self, x):
        self.input_hw = x.shape[1:3]
        return _run("global_avg_pool_fwd", x.dtype, x)

    def backward(self, gy):
        return _run("global_avg_pool_bwd", gy.dtype, gy, self.input_hw)


def global_avg_pool(x):
    """x (n, h, w, c) -> (n, c): the mean over h and w."""
    return GlobalAvgPool()(x)


class Linear(Function):
    def forward(self, x, w, b):
        self.x, self.w = x, w
        return _run("linear_fwd", x.dtype, x, w, b)

    def backward(self, gy):
        gx, gw, gb = _run("linear_bwd", gy.dtype, self.x, self.w, gy)
        need = self.needs_input_grad
        return gx if need[0] else None, gw if need[1] else None, gb if need[2] else None


def linear(x, w, b=None):
    """x (n, din), w (din, dout), b (dout,) or None -> x @ w + b, (n, dout)."""
    if b is None:
        b = Tensor(np.zeros(w.shape[1], w.dtype))
    _common_dtype("linear", x=x, w=w, b=b)
    return Linear()(x, w, b)


def dropout(x, p, training, rng, rows=None):
    """x (any shape) -> x * mask / (1 - p), mask ~ Bernoulli(1 - p) drawn from ``rng``
    (a np.random.Generator); the identity when not training or p == 0. rows=(start, total): x is
    rows start.. of a batch of `total` (a process's shard) and gets those rows of its mask."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    if rows is None:
        keep = rng.random(x.shape, dtype=x.dtype) >= p
    else:
        start, total = rows
        keep = rng.random((total, *x.shape[1:]), dtype=x.dtype)[start:start + len(x)] >= p
    return mul(x, keep.astype(x.dtype) * x.dtype.type(1 / (1 - p)))


class CrossEntropy(Function):
    def __init__(self, labels, label_smoothing):
        self.labels, self.label_smoothing = labels, label_smoothing

    def forward(self, logits):
        loss, self.probs = _run("softmax_cross_entropy_fwd", logits.dtype, logits, self.labels, self.label_smoothing)
        return np.asarray(loss, dtype=logits.dtype)

    def backward(self, gy):
        return _run("softmax_cross_entropy_bwd", self.probs.dtype, self.probs, self.labels, self.label_smoothing,
                    float(gy))


def cross_entropy(logits, labels, label_smoothing=0.0):
    """logits (n, k), labels (n,) integers in [0, k) -> mean softmax cross-entropy, a scalar Tensor.
    With label smoothing s the target is (1 - s) one-hot + s / k."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError("cross_entropy: logits must be a 2-D mbnet.Tensor (n, k)")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: labels must be integers of shape {logits.shape[:1]}, "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"cross_entropy: labels must be in [0, {logits.shape[1]})")
    return CrossEntropy(labels.astype(np.int64, copy=False), label_smoothing)(logits)
