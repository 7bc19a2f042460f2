"""Inference as a deployment engine runs it: BatchNorm folded into the convolutions, and the whole
network compiled once into one call into the extension.

Notation: n batch (at most the plan's ``batch``), s the input size, c channels, k classes.

    plan = mbnet.plan.compile(model, batch=8)     # MobileNetV1 or ConvMobileNet
    logits = plan(x)                              # x (n, s, s, 3) float32, n <= 8 -> (n, k)

``fold(model)`` turns the model into a list of ``Folded`` layers, each a convolution ("conv",
"dw", "pw") with a per-channel bias and an activation, then "pool" and "linear": BatchNorm with
its running statistics is ``scale * (conv(x) - mean) + beta`` with ``scale = gamma /
sqrt(var + eps)``, so it moves into the weights (``w * scale`` per output channel) and a bias
(``beta - mean * scale``), computed in float64. This is what ``model.eval()`` computes, so the
running statistics are used whatever mode the model is in. ``run_folded`` runs such a list layer
by layer with the kernels of ``mbnet._C`` (the slow, obvious twin the tests hold the plan to).

``compile`` hands the folded float32 weights (copies: later changes to the model do not reach the
plan) to ``mbnet._C._InferencePlan``, which preallocates every buffer for the model's input size
(or ``input_size``) and runs each separable block as one fused depthwise + bias + act + pointwise
+ bias + act pass over tiles of output rows. A batch goes through the network a chunk of images at
a time (``chunk``; by default as many as keep each activation buffer within 16 MB), so memory
stays bounded at any ``batch``. ``plan(x)`` is one call with the GIL released and no Python per
layer; any batch up to ``batch`` runs on the same plan, and results do not depend on the batch,
the chunk or the thread count (``mbnet._C.set_num_threads``).
A plan runs one call at a time (concurrent calls wait their turn).
"""
from collections import namedtuple

import numpy as np

from . import _C, nn
from .tensor import Tensor

# kind: "conv" (weight (kh, kw, ci, co)), "dw" (weight (kh, kw, c)), "pw" (weight (ci, co)),
# "pool" (no weight) or "linear" (weight (din, dout)); bias (co,); act "none" / "relu" / "relu6".
Folded = namedtuple("Folded", "kind weight bias stride padding act", defaults=(None, None, 1, 0, "none"))

_KIND = {nn.Conv2d: "conv", nn.DepthwiseConv2d: "dw", nn.PointwiseConv2d: "pw"}


def conv_bn_pairs(model):
    """[(conv name, conv, bn name, bn)]: every convolution of ``model.features`` and the
    BatchNorm2d that follows it (ValueError naming a layer that is not such a pair)."""
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise ValueError(f"fold: model must be a MobileNetV1 or ConvMobileNet, got {type(model).__name__}")
    leaves = [(name.rstrip("."), m) for name, m in model.features.named_modules("features.")
              if not m.named_children()]
    pairs = []
    for i in range(0, len(leaves), 2):
        name, conv = leaves[i]
        bn_name, bn = leaves[i + 1] if i + 1 < len(leaves) else (None, None)
        if type(conv) not in _KIND or not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"fold: {name} ({type(conv).__name__}) is not a convolution followed by BatchNorm2d")
        pairs.append((name, conv, bn_name, bn))
    return pairs


def fold_conv_bn(conv, bn):
    """conv followed by BatchNorm2d bn, as one Folded layer: (weight * scale, beta - mean * scale),
    scale = gamma / sqrt(var + eps), in float64, weights in mbnet's layouts."""
    kind = _KIND[type(conv)]
    scale = bn.gamma.data.astype(np.float64) / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    weight = conv.weight.data.astype(np.float64) * scale  # the output channel is the last axis
    bias = bn.beta.data.astype(np.float64) - bn.running_mean.astype(np.float64) * scale
    stride, padding = (conv.stride, conv.padding) if kind != "pw" else (1, 0)
    return Folded(kind, weight, bias, stride, padding, bn.act)


def fold(model):
    """The eval-mode computation of a MobileNetV1 / ConvMobileNet as a list of Folded layers
    (float64 weights): conv/dw/pw + bias + act for every convolution and its BatchNorm, then
    "pool" and "linear". Raises ValueError for a layer it cannot fold."""
    layers = [fold_conv_bn(conv, bn) for _, conv, _, bn in conv_bn_pairs(model)]
    fc = model.classifier
    layers += [Folded("pool"), Folded("linear", fc.weight.data.astype(np.float64), fc.bias.data.astype(np.float64))]
    return layers


def _act(y, act):
    if act == "relu":
        return np.maximum(y, 0, out=y)
    if act == "relu6":
        return np.clip(y, 0, 6, out=y)
    return y


def run_folded(layers, x):
    """x (n, h, w, c) -> logits (n, k) through Folded layers, one mbnet._C kernel per layer, in
    float32 (the unfused twin of the plan)."""
    y = np.ascontiguousarray(x, dtype=np.float32)
    for layer in layers:
        w = None if layer.weight is None else np.ascontiguousarray(layer.weight, dtype=np.float32)
        if layer.kind == "conv":
            y = _C.conv2d_fwd(y, w, layer.stride, layer.padding)
        elif layer.kind == "dw":
            y = _C.dwconv2d_fwd(y, w, layer.stride, layer.padding)
        elif layer.kind == "pw":
            y = _C.pwconv2d_fwd(y, w)
        elif layer.kind == "pool":
            y = _C.global_avg_pool_fwd(y)
            continue
        elif layer.kind == "linear":
            y = _C.linear_fwd(y, w, layer.bias.astype(np.float32))
            continue
        y = _act(y + layer.bias.astype(np.float32), layer.act)
    return y


def _plan_layers(layers):
    """Folded layers -> the (conv | dwpw) tuples of _C._InferencePlan, the classifier (w, b)."""
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    out, i = [], 0
    while layers[i].kind != "pool":
        a = layers[i]
        if a.kind == "conv":
            out.append(("conv", f32(a.weight), f32(a.bias), int(a.stride), int(a.padding), a.act))
            i += 1
        elif a.kind == "dw" and layers[i + 1].kind == "pw":
            b = layers[i + 1]
            out.append(("dwpw", f32(a.weight), f32(a.bias), int(a.stride), int(a.padding), a.act,
                        f32(b.weight), f32(b.bias), b.act))
            i += 2
        else:
            raise ValueError(f"compile: layer {i} ({a.kind}) must be a conv or a dw followed by a pw")
    fc = layers[i + 1]
    return out, f32(fc.weight), f32(fc.bias)


def _input(x):
    x = x.data if isinstance(x, Tensor) else x
    if not isinstance(x, np.ndarray):
        raise TypeError(f"plan: x must be a numpy.ndarray of float32, got {type(x).__name__}")
    return np.ascontiguousarray(x)


class Plan:
    """A compiled eval-mode network: ``plan(x)`` maps x (n, s, s, c) float32 (ndarray or Tensor)
    with n <= ``batch`` to logits (n, k), a new ndarray. ``info()`` lists the compiled layers, their tiles and GEMM panel widths, and the buffer bytes."""

    def __init__(self, layers, batch, input_hw, chunk=0):
        self.batch, self.input_hw = batch, tuple(input_hw)
        convs, fc_w, fc_b = _plan_layers(layers)
        self._plan = _C._InferencePlan(convs, fc_w, fc_b, batch, self.input_hw, chunk)

    def __call__(self, x):
        return self._plan.run(_input(x))

    def timed(self, x):
        """``(logits, seconds)``: one call of the plan, and the wall-clock seconds each compiled layer
        took in it (the order of ``info()["layers"]``), the pooling and classifier last."""
        return self._plan.run_timed(_input(x))

    def info(self):
        return self._plan.info()

    def __repr__(self):
        info = self.info()
        return (f"Plan(batch={self.batch}, input_hw={self.input_hw}, layers={len(info['layers'])}, "
                f"buffers={info['buffer_bytes'] / 2**20:.1f} MiB)")


MAX_BATCH = 2**20  # the extension's bound on a plan's batch


def compile(model, batch, input_size=None, chunk=0):
    """The Plan of ``model`` (MobileNetV1 or ConvMobileNet, folded with its running statistics)
    for up to ``batch`` images of input_size x input_size (default: the model's input_size).
    chunk: images run through the network together (0: as many as keep each activation buffer
    within 16 MB; results are the same for every chunk)."""
    if not hasattr(model, "features"):
        raise ValueError(f"compile: model must be a MobileNetV1 or ConvMobileNet, got {type(model).__name__}")
    if not nn.is_int_in(batch, 1, MAX_BATCH):
        raise ValueError(f"compile: batch must be an int in [1, 2^20], got {batch!r}")
    size = model.input_size if input_size is None else input_size
    if not nn.is_int_in(size, 1, 2**30):
        raise ValueError(f"compile: input_size must be a positive int, got {size!r}")
    if not nn.is_int_in(chunk, 0, MAX_BATCH):
        raise ValueError(f"compile: chunk must be an int in [0, 2^20], got {chunk!r}")
    return Plan(fold(model), int(batch), (int(size), int(size)), int(chunk))
