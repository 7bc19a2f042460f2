"""Slow, obvious NumPy twins of every C++ kernel in ``mbnet._C``.

Each function here has the same name and arguments as its kernel and computes the same thing in
plain NumPy (``einsum`` over sliding windows, or direct formulas), in whatever float dtype it is
given, so tests can run it in float64 and check it by finite differences. Tests and benchmarks
compare the kernels against these; nothing in the training path calls them.

Notation (Chainer-style): n batch, h/w input height/width, ho/wo output height/width, c channels,
ci/co input/output channels, kh/kw kernel size, s stride, p padding (symmetric, both axes).
Activations are NHWC. Weights: conv (kh, kw, ci, co), depthwise (kh, kw, c), pointwise (ci, co),
linear (din, dout).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_out_size(size, k, stride, padding):
    out = (size + 2 * padding - k) // stride + 1
    if size + 2 * padding - k < 0 or out < 1:
        raise ValueError(f"output size would be < 1 (input {size}, kernel {k}, padding {padding})")
    return out


def _windows(x, kh, kw, stride, padding):
    """(n, ho, wo, c, kh, kw) view of the padded input's receptive fields."""
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    v = sliding_window_view(xp, (kh, kw), axis=(1, 2))
    return v[:, ::stride, ::stride]


def _scatter_windows(cols, input_hw, stride, padding):
    """Adjoint of _windows: sums (n, ho, wo, c, kh, kw) patches back into an (n, h, w, c) image."""
    n, ho, wo, c, kh, kw = cols.shape
    h, w = input_hw
    dxp = np.zeros((n, h + 2 * padding, w + 2 * padding, c), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += cols[..., i, j]
    return dxp[:, padding:padding + h, padding:padding + w]


# --- full convolution: x (n, h, w, ci), w (kh, kw, ci, co) -> y (n, ho, wo, co) ---------------

def conv2d_fwd(x, w, stride, padding):
    kh, kw = w.shape[:2]
    return np.einsum("nhwcij,ijco->nhwo", _windows(x, kh, kw, stride, padding), w)


def _with_stats(y):
    """(y, mean, var): y and its per-channel mean and biased variance over all axes but the last."""
    axes = tuple(range(y.ndim - 1))
    return y, y.mean(axis=axes), y.var(axis=axes)


def conv2d_fwd_stats(x, w, stride, padding):
    return _with_stats(conv2d_fwd(x, w, stride, padding))


def conv2d_bwd_input(dy, w, input_hw, stride, padding):
    cols = np.einsum("nhwo,ijco->nhwcij", dy, w)
    return _scatter_windows(cols, input_hw, stride, padding)


def conv2d_bwd_weight(x, dy, kernel_hw, stride, padding):
    kh, kw = kernel_hw
    return np.einsum("nhwcij,nhwo->ijco", _windows(x, kh, kw, stride, padding), dy)


# --- depthwise convolution: x (n, h, w, c), w (kh, kw, c) -> y (n, ho, wo, c) -----------------

def dwconv2d_fwd(x, w, stride, padding):
    kh, kw = w.shape[:2]
    return np.einsum("nhwcij,ijc->nhwc", _windows(x, kh, kw, stride, padding), w)


def dwconv2d_fwd_stats(x, w, stride, padding):
    return _with_stats(dwconv2d_fwd(x, w, stride, padding))


def dwconv2d_bwd_input(dy, w, input_hw, stride, padding):
    cols = np.einsum("nhwc,ijc->nhwcij", dy, w)
    return _scatter_windows(cols, input_hw, stride, padding)


def dwconv2d_bwd_weight(x, dy, kernel_hw, stride, padding):
    kh, kw = kernel_hw
    return np.einsum("nhwcij,nhwc->ijc", _windows(x, kh, kw, stride, padding), dy)


# --- pointwise (1x1) convolution: x (n, h, w, ci), w (ci, co) -> y (n, h, w, co) ---------------

def pwconv2d_fwd(x, w):
    return np.einsum("nhwc,co->nhwo", x, w)


def pwconv2d_fwd_stats(x, w):
    return _with_stats(pwconv2d_fwd(x, w))


def pwconv2d_bwd_input(dy, w):
    return np.einsum("nhwo,co->nhwc", dy, w)


def pwconv2d_bwd_weight(x, dy):
    return np.einsum("nhwc,nhwo->co", x, dy)


# --- pointwise convolution of act(BN(x)) (training BatchNorm's apply, then the activation) -------

def _bn_act(x, gamma, beta, mean, invstd, act):
    return act_fwd((x - mean) * invstd * gamma + beta, act)


def pwconv2d_bn_act_fwd(x, w, gamma, beta, mean, invstd, act):
    return pwconv2d_fwd(_bn_act(x, gamma, beta, mean, invstd, act), w)


def pwconv2d_bn_act_fwd_stats(x, w, gamma, beta, mean, invstd, act):
    return _with_stats(pwconv2d_bn_act_fwd(x, w, gamma, beta, mean, invstd, act))


def pwconv2d_bn_act_bwd_weight(x, dy, gamma, beta, mean, invstd, act):
    return pwconv2d_bwd_weight(_bn_act(x, gamma, beta, mean, invstd, act), dy)


def dwconv2d_bn_act_fwd(x, w, gamma, beta, mean, invstd, act, stride, padding):
    return dwconv2d_fwd(_bn_act(x, gamma, beta, mean, invstd, act), w, stride, padding)


def dwconv2d_bn_act_fwd_stats(x, w, gamma, beta, mean, invstd, act, stride, padding):
    return _with_stats(dwconv2d_bn_act_fwd(x, w, gamma, beta, mean, invstd, act, stride, padding))


def dwconv2d_bn_act_bwd_weight(x, dy, gamma, beta, mean, invstd, act, kernel_hw, stride, padding):
    return dwconv2d_bwd_weight(_bn_act(x, gamma, beta, mean, invstd, act), dy, kernel_hw, stride, padding)


def pwconv2d_bwd_input_bn(dy, w, x, gamma, beta, mean, invstd, act):
    return batchnorm_act_train_bwd(pwconv2d_bwd_input(dy, w), x, gamma, beta, mean, invstd, act)


def dwconv2d_bwd_input_bn(dy, w, x, gamma, beta, mean, invstd, act, stride, padding):
    gz = dwconv2d_bwd_input(dy, w, x.shape[1:3], stride, padding)
    return batchnorm_act_train_bwd(gz, x, gamma, beta, mean, invstd, act)


def dwconv2d_bn_act_bwd(dy, w, x, gamma, beta, mean, invstd, act, stride, padding):
    bn = (gamma, beta, mean, invstd, act)
    return (*dwconv2d_bwd_input_bn(dy, w, x, *bn, stride, padding),
            dwconv2d_bn_act_bwd_weight(x, dy, *bn, w.shape[:2], stride, padding))


def matmul(a, b, trans_a=False, trans_b=False):
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return np.einsum("ik,kj->ij", a, b)


# --- linear: x (n, din), w (din, dout), b (dout,) -> y (n, dout) --------------------------------

def linear_fwd(x, w, b):
    return np.einsum("nd,de->ne", x, w) + b


def linear_bwd(x, w, dy):
    """Returns (dx, dw, db)."""
    return np.einsum("ne,de->nd", dy, w), np.einsum("nd,ne->de", x, dy), dy.sum(axis=0)


# --- activations --------------------------------------------------------------------------------

def act_fwd(x, act):
    if act == "relu":
        return np.maximum(x, 0)
    if act == "relu6":
        return np.clip(x, 0, 6)
    if act == "none":
        return x.copy()
    raise ValueError(f"act must be 'none', 'relu' or 'relu6', got {act!r}")


def act_grad_mask(z, act):
    """d act(z) / dz, from the pre-activation z (or from act(z): the masks agree)."""
    if act == "relu":
        return (z > 0).astype(z.dtype)
    if act == "relu6":
        return ((z > 0) & (z < 6)).astype(z.dtype)
    return np.ones_like(z)


def act_bwd(dy, y, act):
    """Gradient of act, from its output y (y > 0 exactly where the input was > 0)."""
    return dy * act_grad_mask(y, act)


# --- BatchNorm fused with an activation; x is (..., c), statistics over all other axes ----------

def batchnorm_act_train_fwd(x, gamma, beta, running_mean, running_var, momentum, eps, act):
    """Returns (y, mean, invstd) with batch statistics (biased variance), and updates the running
    statistics in place by PyTorch's convention: new = (1 - momentum) * old + momentum * batch,
    with the unbiased batch variance."""
    _, mean, var = _with_stats(x)
    return batchnorm_act_train_fwd_from_stats(x, mean, var, gamma, beta, running_mean, running_var, momentum,
                                              eps, act)


def batchnorm_act_train_fwd_from_stats(x, mean, var, gamma, beta, running_mean, running_var, momentum, eps, act):
    """batchnorm_act_train_fwd with x's batch mean and biased variance given (from a *_fwd_stats
    convolution)."""
    m = x.size // x.shape[-1]
    invstd = 1.0 / np.sqrt(var + eps)
    z = (x - mean) * invstd * gamma + beta
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var * m / max(m - 1, 1)
    return act_fwd(z, act), mean.copy(), invstd


def batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, act):
    """Returns (dx, dgamma, dbeta) of batchnorm_act_train_fwd (the activation's mask is
    recomputed from the pre-activation)."""
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    xhat = (x - mean) * invstd
    dz = dy * act_grad_mask(xhat * gamma + beta, act)
    dbeta = dz.sum(axis=axes)
    dgamma = (dz * xhat).sum(axis=axes)
    dx = gamma * invstd / m * (m * dz - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def batchnorm_act_infer_fwd(x, gamma, beta, mean, var, eps, act):
    return act_fwd((x - mean) / np.sqrt(var + eps) * gamma + beta, act)


def batchnorm_act_infer_bwd(dy, x, y, gamma, beta, mean, var, eps, act):
    """Returns (dx, dgamma, dbeta) with fixed (running) statistics; y is unused."""
    axes = tuple(range(x.ndim - 1))
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * invstd
    dz = dy * act_grad_mask(xhat * gamma + beta, act)
    return dz * gamma * invstd, (dz * xhat).sum(axis=axes), dz.sum(axis=axes)


# --- global average pooling: x (n, h, w, c) -> (n, c) -------------------------------------------

def global_avg_pool_fwd(x):
    return x.mean(axis=(1, 2))


def global_avg_pool_bwd(dy, input_hw):
    h, w = input_hw
    return np.broadcast_to(dy[:, None, None, :] / (h * w), (dy.shape[0], h, w, dy.shape[1])).copy()


# --- softmax cross-entropy with label smoothing: logits (n, k), labels (n,) int ------------------

def _smoothed_targets(labels, k, label_smoothing, dtype):
    t = np.full((labels.shape[0], k), label_smoothing / k, dtype)
    t[np.arange(labels.shape[0]), labels] += 1 - label_smoothing
    return t


def softmax_cross_entropy_fwd(logits, labels, label_smoothing=0.0):
    """Returns (mean loss, softmax probabilities)."""
    with np.errstate(over="ignore"):  # logits further apart than the dtype reaches: exp gives 0
        z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    t = _smoothed_targets(labels, logits.shape[1], label_smoothing, logits.dtype)
    with np.errstate(invalid="ignore"):  # 0 * log 0 is 0: a class with no target mass adds nothing
        terms = np.where(t > 0, t * logp, 0.0)
    return float(-terms.sum() / logits.shape[0]), np.exp(logp)


def softmax_cross_entropy_bwd(probs, labels, label_smoothing=0.0, grad_scale=1.0):
    """d(mean loss)/d logits, times grad_scale."""
    t = _smoothed_targets(labels, probs.shape[1], label_smoothing, probs.dtype)
    return (probs - t) * (grad_scale / probs.shape[0])


# --- optimizer updates, in place: p, grad, buf, shadow, value of one shape -----------------------

def sgd_update(p, grad, buf, lr, momentum, weight_decay, nesterov):
    """PyTorch's SGD (dampening 0) on p and buf in place -> p: g = grad + weight_decay * p,
    buf = momentum * buf + g, p -= lr * (g + momentum * buf if nesterov else buf); without momentum
    (buf None) p -= lr * g. The NumPy operations, in order, that mbnet._C.sgd_update rounds like."""
    g = np.multiply(p, weight_decay) if weight_decay else np.array(grad, copy=True)
    if weight_decay:
        g += grad
    if not momentum:
        g *= lr
        p -= g
        return p
    buf *= momentum
    buf += g
    if nesterov:  # p -= lr·g + lr·m·buf
        g *= lr
        p -= g
        np.multiply(buf, lr * momentum, out=g)
    else:
        np.multiply(buf, lr, out=g)
    p -= g
    return p


def ema_update(shadow, value, decay):
    """shadow -= (shadow - value) * (1 - decay), in place -> shadow."""
    tmp = np.subtract(shadow, value, out=np.empty_like(shadow))
    tmp *= 1.0 - decay
    shadow -= tmp
    return shadow
