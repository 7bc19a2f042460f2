"""MobileNetV1 weights from PyTorch: a state_dict (a .pt/.pth file or a dict of arrays) -> mbnet.

Shapes the state_dict must hold, in this order (PyTorch's: a module's parameters, then its
buffers, modules in the order they were assigned); c0 = int(32·α), c_i = int(BLOCKS[i]·α):
  stem     conv weight (c0, 3, 3, 3) [bias (c0,)], BN weight, bias, running_mean, running_var (c0,)
  block i  depthwise weight (c, 1, 3, 3) [bias (c,)], BN (c,) x 4,
           pointwise weight (c_i, c, 1, 1) [bias (c_i,)], BN (c_i,) x 4       (13 blocks)
  head     linear weight (num_classes, c_13), bias (num_classes,)
num_batches_tracked entries are skipped. Tensors are matched by this order and their shapes,
whatever the modules are called (``model.3.0.weight``, ``features.dsconv7_a.dconv.weight``,
``stem.0.weight`` ...); names only cross-check: a tensor whose name ends in another of
weight/bias/running_mean/running_var than its place expects is an error. α and num_classes come
from the shapes. A conv bias followed by BN folds into the BN's running mean
(BN(conv(x) + b) has mean - b). The stem stride and input size (and the activation) are not in the
weights: they are arguments, defaulting to the CIFAR variant (stride 1, 32 px, ReLU).

Layouts: conv OIHW -> HWIO, depthwise (c, 1, 3, 3) -> (3, 3, c), pointwise (cout, cin, 1, 1) ->
(cin, cout), linear (out, in) -> (in, out). torch is imported only to read a .pt/.pth file.
"""
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError
from .models import BLOCKS, CIFAR10_MEAN, CIFAR10_STD, STEM_CHANNELS, MobileNetV1, check_weights

_BN_ROLES = ("weight", "bias", "running_mean", "running_var")
_WRAPPERS = ("state_dict", "model_state_dict", "model")  # {"state_dict": {...}, "epoch": ...} checkpoints


def read_state_dict(path):
    """{name: float32 ndarray} from a torch.save'd state_dict (torch.load with weights_only=True).
    Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a PyTorch file needs torch (pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and its own errors alike
        raise CheckpointError(f"{path}: not a PyTorch state_dict that torch.load(weights_only=True) reads "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict (save model.state_dict())")
    return _arrays(obj, path)


def _arrays(state, where):
    for key in _WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {}
    for name, v in state.items():
        if str(name).endswith("num_batches_tracked"):
            continue
        if hasattr(v, "detach"):  # a torch.Tensor, without importing torch
            if not v.is_floating_point():  # .float() would make an int or complex tensor pass
                raise CheckpointError(f"{where}: {name} is a {v.dtype} tensor, not a floating-point one")
            try:
                v = v.detach().cpu().float().numpy()
            except Exception as e:  # sparse, meta, quantized: no dense values to read
                raise CheckpointError(f"{where}: {name} is a {v.layout} {v.dtype} tensor that has no dense "
                                      f"values to read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
            raise CheckpointError(f"{where}: {name} is a {type(v).__name__}, not a floating-point tensor")
        out[str(name)] = v
    return out


class _Reader:
    """Walks the (name, array) pairs in order; each take() claims the next one for a role and
    checks its shape and name, raising CheckpointError naming the first tensor that doesn't fit."""

    def __init__(self, items, where):
        self.items, self.i, self.where = items, 0, where

    def peek(self):
        return self.items[self.i] if self.i < len(self.items) else (None, None)

    def fail(self, expected):
        name, a = self.peek()
        got = f"{name} with shape {tuple(a.shape)}" if name else "the end of the state_dict"
        raise CheckpointError(f"{self.where}: expected {expected}, got {got}")

    def take(self, role, shape, what):
        """The next array if its shape matches ``shape`` (None = any length on that axis)."""
        name, a = self.peek()
        dims = ", ".join("*" if d is None else str(d) for d in shape)
        expected = f"{what} of shape ({dims}{',' * (len(shape) == 1)})"
        if a is None or a.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, a.shape)):
            self.fail(expected)
        suffix = name.rsplit(".", 1)[-1]
        if suffix in _BN_ROLES and suffix != role:
            self.fail(expected + f" (a '{role}', by its name)")
        self.i += 1
        return a

    def vectors_ahead(self, c):
        """How many (c,) arrays follow."""
        n = 0
        while self.i + n < len(self.items) and self.items[self.i + n][1].shape == (c,):
            n += 1
        return n

    def conv_bn(self, shape, what):
        """A conv weight of ``shape``, an optional bias, then BN: -> (the weight's name,
        (weight, gamma, beta, mean, var))."""
        name = self.peek()[0]
        w = self.take("weight", shape, what + " weight")
        c = w.shape[0]
        bias = self.take("bias", (c,), what + " bias") if self.vectors_ahead(c) == 5 else None
        gamma, beta, mean, var = (self.take(role, (c,), f"{what} BN {role}") for role in _BN_ROLES)
        if bias is not None:
            mean = mean - bias
        return name, (w, gamma, beta, mean, var)


def _alpha(widths, where):
    """The width multiplier α with int(c·α) == width for the stem and every pointwise conv
    (widths: [(the weight's name, its output channels)]); c is a power of two, so width / c is exact."""
    bases = [STEM_CHANNELS] + [cout for cout, _ in BLOCKS]
    alpha = max(w / b for (_, w), b in zip(widths, bases))
    for (name, w), b in zip(widths, bases):
        if int(b * alpha) != w:
            raise CheckpointError(f"{where}: {name} has {w} output channels where MobileNetV1 has int({b}·α); "
                                  f"no α gives the channel counts {[w for _, w in widths]}")
    return alpha


def load_torch_weights(path_or_state_dict, *, stem_stride=1, input_size=32, act="relu", classes=None,
                       mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """A MobileNetV1 (eval mode) holding the weights of a PyTorch MobileNetV1 state_dict: a
    .pt/.pth path, or a dict name -> array (ndarray or torch.Tensor). See the module docstring for
    what it must hold; raises CheckpointError (a ValueError) naming the first tensor that doesn't fit."""
    if isinstance(path_or_state_dict, dict):
        where, state = "state_dict", _arrays(path_or_state_dict, "state_dict")
    else:
        where, state = str(path_or_state_dict), read_state_dict(path_or_state_dict)
    r = _Reader(list(state.items()), where)
    layers = [("stem", *r.conv_bn((None, 3, 3, 3), "the stem conv"))]
    c = layers[0][2][0].shape[0]
    for i, _ in enumerate(BLOCKS):
        layers.append(("dw", *r.conv_bn((c, 1, 3, 3), f"block {i + 1}'s depthwise conv")))
        layers.append(("pw", *r.conv_bn((None, c, 1, 1), f"block {i + 1}'s pointwise conv")))
        c = layers[-1][2][0].shape[0]
    fc_w = r.take("weight", (None, c), "the classifier's weight")
    fc_b = r.take("bias", (fc_w.shape[0],), "the classifier's bias")
    if r.peek()[0] is not None:
        r.fail("nothing after the classifier's bias")

    alpha = _alpha([(name, w.shape[0]) for kind, name, (w, *_) in layers if kind != "dw"], where)
    model = MobileNetV1(alpha, num_classes=fc_w.shape[0], input_size=input_size, stem_stride=stem_stride, act=act,
                        classes=classes, mean=mean, std=std)
    to_mbnet = {"stem": lambda w: w.transpose(2, 3, 1, 0), "dw": lambda w: w[:, 0].transpose(1, 2, 0),
                "pw": lambda w: w[:, :, 0, 0].T}
    arrays = [a for kind, _, (w, *bn) in layers for a in (to_mbnet[kind](w), *bn)] + [fc_w.T, fc_b]
    own = model.state_dict()  # same order: conv weight, gamma, beta, running_mean, running_var, ..., linear
    model.load_state_dict(dict(zip(own, arrays)))
    check_weights(model)
    return model.eval()


def add_import_arguments(parser):
    """The options a command needs to read a PyTorch WEIGHTS file (they are not in its weights)."""
    g = parser.add_argument_group("PyTorch .pt/.pth WEIGHTS only")
    g.add_argument("--input-size", type=int, default=None, help="input resolution (default 32)")
    g.add_argument("--stem-stride", type=int, default=None, help="the stem convolution's stride (default 1)")
    g.add_argument("--act", choices=("relu", "relu6"), default=None, help="activation (default relu)")


def import_options(args):
    """The load_torch_weights keywords given on the command line (add_import_arguments)."""
    return {k: getattr(args, k) for k in ("input_size", "stem_stride", "act") if getattr(args, k) is not None}
