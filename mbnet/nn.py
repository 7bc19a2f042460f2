"""Layers: modules that own parameters (Tensors) and buffers (ndarrays).

A parameter with requires_grad False is frozen: ``parameters()`` (what an optimizer gets) leaves it
out, ``state_dict()``, ``save`` and ``load_state_dict`` keep it.

A module's parameters, buffers and sub-modules are its attributes, found in the order they were
assigned; dotted names follow attribute names (``features.3.bn1.gamma``). Activations are NHWC;
weights use TensorFlow layouts: conv (kh, kw, ci, co), depthwise (kh, kw, c), pointwise (ci, co),
linear (din, dout). Convolutions have no bias (a BatchNorm follows each one). In training, a
convolution's output carries its batch statistics (``Tensor.batch_stats``) for the BatchNorm2d
after it (mbnet.functional.FUSE).
"""
import numpy as np

from . import functional as F
from .tensor import Tensor


def is_int_in(v, lo, hi=None):
    """Whether v is an int (Python's or NumPy's, not a bool) in [lo, hi] (hi None: no bound): the
    check of the integer arguments of the Python API (models, plans, predict, export)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)


class Module:
    """Base class. Subclasses assign parameters/sub-modules as attributes, register buffers with
    ``register_buffer`` and define ``forward``; ``summary`` additionally assumes the sub-modules
    run one after another in the order they were assigned (true of every module here)."""

    training = True
    _buffer_names = ()

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args):
        raise NotImplementedError

    def register_buffer(self, name, array):
        """An ndarray that is state but not a parameter (BN running statistics)."""
        setattr(self, name, array)
        self._buffer_names = self._buffer_names + (name,)

    # --- traversal ---
    def named_children(self):
        return [(name, v) for name, v in vars(self).items() if isinstance(v, Module)]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix=""):
        for name, v in vars(self).items():
            if isinstance(v, Tensor) and v.requires_grad:
                yield prefix + name, v
            elif isinstance(v, Module):
                yield from v.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name, v in vars(self).items():
            if name in self._buffer_names:
                yield prefix + name, v
            elif isinstance(v, Module):
                yield from v.named_buffers(f"{prefix}{name}.")

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    # --- state ---
    def named_state(self, prefix=""):
        """name -> the live array of every parameter (frozen ones, requires_grad False, too) and
        buffer, in attribute order: what state_dict() copies and load_state_dict() fills."""
        state = {}
        for name, v in vars(self).items():
            if isinstance(v, Tensor):
                state[prefix + name] = v.data
            elif name in self._buffer_names:
                state[prefix + name] = v
            elif isinstance(v, Module):
                state.update(v.named_state(f"{prefix}{name}."))
        return state

    def state_dict(self):
        """name -> float32 copy, for every parameter (frozen or not) and buffer."""
        return {name: np.array(a, dtype=np.float32) for name, a in self.named_state().items()}

    def load_state_dict(self, state, strict=True):
        """Copies ``state`` (name -> array) into the parameters and buffers in place (cast to the
        module's dtype). Raises ValueError naming missing or unexpected entries (when strict) and
        any entry whose shape differs; nothing is modified when it raises."""
        own = self.named_state()
        missing = [n for n in own if n not in state]
        unexpected = [n for n in state if n not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(unexpected))
            raise ValueError("load_state_dict: " + "; ".join(parts))
        for name, a in own.items():
            if name in state and np.shape(state[name]) != a.shape:
                raise ValueError(f"load_state_dict: {name} has shape {np.shape(state[name])}, "
                                 f"the module expects {a.shape}")
        for name, a in own.items():
            if name in state:
                a[...] = state[name]

    def save(self, path):
        """Writes ``state_dict()`` (and, for a model with ``config()``, its architecture) to an
        .npz weights file; see mbnet.checkpoint."""
        from . import checkpoint

        checkpoint.save(path, self)

    def load(self, path, strict=True, ema=True):
        """Loads the weights of an mbnet weights file or training checkpoint (its EMA weights when
        it has them and ``ema``) into this module."""
        from . import checkpoint

        self.load_state_dict(checkpoint.weights(checkpoint.read(path), ema), strict=strict)

    # --- summary (from shapes; no forward pass) ---
    def output_shape(self, in_shape):
        """Per-image output shape for a per-image input shape (h, w, c) or (d,); a module without
        sub-modules keeps the shape unless it says otherwise."""
        for _, child in self.named_children():
            in_shape = child.output_shape(in_shape)
        return in_shape

    def mult_adds(self, in_shape):
        """Multiply-adds of this layer alone, per image (conv and linear layers; 0 otherwise)."""
        return 0

    def _summary_rows(self, in_shape, prefix):
        children = self.named_children()
        if not children:
            out = self.output_shape(in_shape)
            params = int(sum(p.size for p in self.parameters()))
            return [(prefix.rstrip("."), type(self).__name__, out, params, self.mult_adds(in_shape))], out
        rows = []
        for name, child in children:
            child_rows, in_shape = child._summary_rows(in_shape, f"{prefix}{name}.")
            rows += child_rows
        return rows, in_shape

    def summary(self, input_shape, show=True):
        """Prints one row per layer (name, type, per-image output shape, parameters, mult-adds)
        and returns ``{"params", "mult_adds", "buffers"}`` totals. input_shape is per image,
        (h, w, c). Counts: parameters are everything trainable (conv weights, BN gamma/beta,
        linear weight and bias); mult-adds are those of the conv and linear layers (the paper's
        convention), not BN, activations or pooling."""
        rows, _ = self._summary_rows(tuple(input_shape), "")
        params = sum(r[3] for r in rows)
        madds = sum(r[4] for r in rows)
        buffers = int(sum(b.size for b in self.buffers()))
        if show:
            width = max(len(r[0]) + len(r[1]) + 3 for r in rows)
            line = "-" * (width + 48)
            print(line)
            print(f"{'Layer (type)':<{width}} {'Output shape':>18} {'Params':>12} {'Mult-adds':>15}")
            print("=" * len(line))
            for name, kind, out, p, m in rows:
                print(f"{f'{name} ({kind})':<{width}} {str(out):>18} {p:>12,} {m:>15,}")
            print("=" * len(line))
            print(f"Input shape (per image): {tuple(input_shape)}")
            print(f"Total params: {params:,} ({params / 1e6:.2f}M)   buffers: {buffers:,}")
            print(f"Total mult-adds: {madds:,} ({madds / 1e6:.1f}M)")
            print(line)
        return {"params": params, "mult_adds": madds, "buffers": buffers}


def _kaiming_fan_out(rng, shape, fan_out, dtype):
    """N(0, 2 / fan_out), drawn in float64 so float32 and float64 models of one seed agree."""
    rng = rng if rng is not None else np.random.default_rng()
    return Tensor((rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(dtype), requires_grad=True)


def _conv_out(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _conv(module, fn, x, *args):
    """fn(x, module.weight, *args). In training with F.FUSE, fn's kernel also sums the output's
    per-channel statistics, kept as y.batch_stats for the BatchNorm2d after it (which then makes
    one pass over y instead of two)."""
    if not (module.training and F.FUSE):
        return fn(x, module.weight, *args)
    y, stats = fn(x, module.weight, *args, stats=True)
    y.batch_stats = stats
    return y


class _StridedConv(Module):
    """Output shape and mult-adds of a k x k convolution with weight (k, k, ..., cout), stride and
    padding."""

    def output_shape(self, in_shape):
        h, w, _ = in_shape
        k, s, p = self.weight.shape[0], self.stride, self.padding
        return _conv_out(h, k, s, p), _conv_out(w, k, s, p), self.weight.shape[-1]

    def mult_adds(self, in_shape):
        ho, wo, _ = self.output_shape(in_shape)
        return ho * wo * self.weight.size


class Conv2d(_StridedConv):
    """Full k x k convolution, no bias: (n, h, w, cin) -> (n, ho, wo, cout); weight (k, k, cin, cout),
    Kaiming normal with fan_out = k·k·cout. padding defaults to k // 2."""

    def __init__(self, cin, cout, k, stride=1, padding=None, *, rng=None, dtype=np.float32):
        self.stride, self.padding = stride, k // 2 if padding is None else padding
        self.weight = _kaiming_fan_out(rng, (k, k, cin, cout), k * k * cout, dtype)

    def forward(self, x):
        return _conv(self, F.conv2d, x, self.stride, self.padding)


class DepthwiseConv2d(_StridedConv):
    """Depthwise k x k convolution, no bias: (n, h, w, c) -> (n, ho, wo, c); weight (k, k, c),
    Kaiming normal with fan_out = k·k (PyTorch's k·k·out_channels/groups). padding defaults to k // 2."""

    def __init__(self, c, k=3, stride=1, padding=None, *, rng=None, dtype=np.float32):
        self.stride, self.padding = stride, k // 2 if padding is None else padding
        self.weight = _kaiming_fan_out(rng, (k, k, c), k * k, dtype)

    def forward(self, x):
        return _conv(self, F.depthwise_conv2d, x, self.stride, self.padding)


class PointwiseConv2d(Module):
    """1x1 convolution, no bias: (n, h, w, cin) -> (n, h, w, cout); weight (cin, cout), Kaiming
    normal with fan_out = cout."""

    def __init__(self, cin, cout, *, rng=None, dtype=np.float32):
        self.weight = _kaiming_fan_out(rng, (cin, cout), cout, dtype)

    def forward(self, x):
        return _conv(self, F.pointwise_conv2d, x)

    def output_shape(self, in_shape):
        return (*in_shape[:2], self.weight.shape[1])

    def mult_adds(self, in_shape):
        return in_shape[0] * in_shape[1] * self.weight.size


class BatchNorm2d(Module):
    """BatchNorm over the channels of (n, h, w, c), fused with an activation ("none", "relu",
    "relu6"). gamma = 1, beta = 0; buffers running_mean = 0, running_var = 1."""

    def __init__(self, c, act="none", momentum=0.1, eps=1e-5, *, dtype=np.float32):
        if act not in ("none", "relu", "relu6"):
            raise ValueError(f"act must be 'none', 'relu' or 'relu6', got {act!r}")
        self.act, self.momentum, self.eps = act, momentum, eps
        self.gamma = Tensor(np.ones(c, dtype), requires_grad=True)
        self.beta = Tensor(np.zeros(c, dtype), requires_grad=True)
        self.register_buffer("running_mean", np.zeros(c, dtype))
        self.register_buffer("running_var", np.ones(c, dtype))

    def forward(self, x):
        return F.batch_norm(x, self.gamma, self.beta, self.running_mean, self.running_var, self.training,
                            self.momentum, self.eps, self.act, stats=getattr(x, "batch_stats", None))

    def defers(self, x):
        """Whether the convolution after this BatchNorm may apply it as it loads x (training, with
        x's batch statistics from the convolution that made x: F.FUSE)."""
        return self.training and getattr(x, "batch_stats", None) is not None

    def forward_bn(self, x, bn):
        """Sequential's protocol: (x, bn) -> (y, pending), bn the BatchNorm2d the module before left
        unapplied to x (or None); pending this one, left unapplied to y for the next module when
        it defers, or None."""
        x = x if bn is None else bn(x)
        return (x, self) if self.defers(x) else (self(x), None)

    def before_conv(self, fn, x, conv, *geometry):
        """conv(self(x)) in one op: fn is F.batch_norm_pointwise_conv2d or F.batch_norm_depthwise_conv2d
        (geometry: stride, padding), called when self.defers(x). The output carries its batch
        statistics while conv is training."""
        out = fn(x, self.gamma, self.beta, self.running_mean, self.running_var, conv.weight, x.batch_stats,
                 *geometry, momentum=self.momentum, eps=self.eps, act=self.act, stats=conv.training)
        if not conv.training:
            return out
        y, y.batch_stats = out
        return y


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class ReLU6(Module):
    def forward(self, x):
        return F.relu6(x)


class GlobalAvgPool2d(Module):
    """(n, h, w, c) -> (n, c)."""

    def forward(self, x):
        return F.global_avg_pool(x)

    def output_shape(self, in_shape):
        return (in_shape[-1],)


class Linear(Module):
    """(n, din) -> (n, dout); weight (din, dout) ~ N(0, 0.01²), bias 0."""

    def __init__(self, din, dout, *, rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng()
        self.weight = Tensor((rng.standard_normal((din, dout)) * 0.01).astype(dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(dout, dtype), requires_grad=True)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def output_shape(self, in_shape):
        return (self.weight.shape[1],)

    def mult_adds(self, in_shape):
        return self.weight.size


class Dropout(Module):
    """Zeroes each element with probability p in training (scaling the rest by 1 / (1 - p)).
    ``rng`` (a np.random.Generator, seeded by ``seed``) draws the masks: reseed it or save its
    ``rng.bit_generator.state`` to reproduce a run. ``rows`` = (start, total): the input is rows
    start.. of a global batch of `total` (mbnet.distributed), masked as within the whole batch."""

    rows = None

    def __init__(self, p=0.5, seed=None):
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng, self.rows)


class Sequential(Module):
    """Runs its modules in order; they are named "0", "1", ..."""

    def __init__(self, *modules):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i):
        return self.named_children()[i][1]

    def __len__(self):
        return len(self.named_children())

    def __iter__(self):
        return iter(m for _, m in self.named_children())

    def forward(self, x):
        pending = None  # a BatchNorm2d left unapplied to x, for the next module to apply as it loads x
        for m in self:
            if hasattr(m, "forward_bn"):
                x, pending = m.forward_bn(x, pending)
            else:
                x, pending = m(x if pending is None else pending(x)), None
        return x if pending is None else pending(x)


class DepthwiseSeparable(Module):
    """MobileNet's block: 3x3 depthwise (stride) -> BN + act -> 1x1 pointwise -> BN + act,
    (n, h, w, cin) -> (n, ho, wo, cout). Attributes dw, bn1, pw, bn2. In training with F.FUSE, bn1
    is applied by pw's GEMM as it loads dw's output (F.batch_norm_pointwise_conv2d); in a
    Sequential, the BatchNorm before the block by dw's kernel as it loads x
    (F.batch_norm_depthwise_conv2d), and bn2 is left to the module after the block (forward_bn)."""

    def __init__(self, cin, cout, stride, act="relu", *, rng=None, dtype=np.float32):
        self.dw = DepthwiseConv2d(cin, 3, stride, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(cin, act, dtype=dtype)
        self.pw = PointwiseConv2d(cin, cout, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(cout, act, dtype=dtype)

    def forward(self, x):
        y, bn = self.forward_bn(x, None)
        return y if bn is None else bn(y)

    def forward_bn(self, x, bn):
        """Sequential's protocol (BatchNorm2d.forward_bn): bn applied as dw loads x, bn2 left pending
        when it defers."""
        dw, bn1, pw = self.dw, self.bn1, self.pw
        y = dw(x) if bn is None else bn.before_conv(F.batch_norm_depthwise_conv2d, x, dw, dw.stride, dw.padding)
        z = bn1.before_conv(F.batch_norm_pointwise_conv2d, y, pw) if bn1.defers(y) else pw(bn1(y))
        return (z, self.bn2) if self.bn2.defers(z) else (self.bn2(z), None)
