"""MobileNetV1 (Howard et al. 2017, arXiv:1704.04861, Table 1), the paper's "conv MobileNet"
(Table 4) and "shallow MobileNet" (Table 5), NHWC: (n, s, s, 3) images -> (n, num_classes) logits.

Counting (``summary``), which reproduces the paper's figures: parameters are all trainable
parameters (conv weights, BN gamma/beta, FC weight and bias); mult-adds are the conv and FC
multiply-adds per image (no BN, activation or pooling). At 224x224 with 1000 classes this gives
569M/4.2M (alpha 1), 325M/2.6M (0.75), 149M/1.3M (0.5), 41M/0.5M (0.25), 418M at 192 and 186M at
128 exactly as printed. Two printed figures are approximations of these counts: Table 7's 290M at
160 is 569M x (160/224)^2 = 290.2M (the exact count is 290.7M: the FC layer does not shrink with
the resolution), and Table 4's 4866M for conv MobileNet leaves out the FC layer's 1.0M (4866.3M;
4867.3M with it). The shallow MobileNet is MobileNetV1 less five times Table 3's 14x14x512
separable layer: 307.3M / 2.89M (printed 307M / 2.9M).

``summary`` also prints Table 2: the shares of mult-adds and weights by layer type. Its weights are
the conv and FC weight tensors (no BN parameters or biases), which reproduces the printed parameter
shares (74.59%, 1.06%, 0.02%, 24.33%) and three of the four mult-add shares (94.86%, 3.06%, 0.18%).
The printed 1.19% for the full 3x3 convolution (the stem) is 1.91% with its digits swapped: the
stem's 10.84M of 568.7M, and the printed four sum to 99.29% where 1.91% makes them 100%.
"""
from typing import NamedTuple

import numpy as np

from . import nn
from .tensor import Tensor

# Table 1: output channels and depthwise stride of the 13 depthwise-separable blocks. The table
# prints s2 for the 13th depthwise layer but its 7x7 input and output say s1, as every reference
# implementation has it.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
STEM_CHANNELS = 32
# The input normalization a model carries until training sets its data's own: CIFAR-10's training
# split, per channel, on the [0, 1] pixel scale.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# Table 2's layer types, by the layer class that computes them.
TABLE2_TYPES = (("Conv 1x1", nn.PointwiseConv2d), ("Conv DW 3x3", nn.DepthwiseConv2d), ("Conv 3x3 (full)", nn.Conv2d),
                ("Fully connected", nn.Linear))


def default_stem_stride(input_size):
    """The stem convolution's stride when none is given: 2 for ImageNet-sized inputs (> 64 px, as
    the paper's 224), 1 for CIFAR-sized ones, whose 32 px would otherwise shrink to 1x1 by block 12."""
    return 2 if input_size > 64 else 1


class LayerShape(NamedTuple):
    """One convolution of MobileNetV1: (n, size, size, cin) -> (n, out_size, out_size, cout).
    kind: "conv" (the stem's full 3x3), "dw" (depthwise 3x3, cin == cout) or "pw" (pointwise 1x1);
    block: 0 for the stem, i for the i-th row of BLOCKS (1-13); padding k // 2."""
    block: int
    kind: str
    cin: int
    cout: int
    size: int
    stride: int

    @property
    def out_size(self):
        return (self.size - 1) // self.stride + 1

    @property
    def kernel(self):
        return 1 if self.kind == "pw" else 3


def layer_shapes(alpha=1.0, size=32, stem_stride=None):
    """The 27 convolutions of ``MobileNetV1(alpha, input_size=size, stem_stride=stem_stride)`` in
    network order (stem, then dw and pw of each row of BLOCKS), as LayerShape rows: the one table of
    MobileNet's layer shapes that benchmarks and tests read. The BN + activation after each has
    (cout, out_size); the classifier is (layer_shapes(...)[-1].cout, num_classes)."""
    stride = default_stem_stride(size) if stem_stride is None else stem_stride
    c = int(STEM_CHANNELS * alpha)
    rows = [LayerShape(0, "conv", 3, c, size, stride)]
    for i, (cout, stride) in enumerate(BLOCKS, 1):
        dw = LayerShape(i, "dw", c, c, rows[-1].out_size, stride)
        rows += [dw, LayerShape(i, "pw", c, int(cout * alpha), dw.out_size, 1)]
        c = rows[-1].cout
    return rows


MAX_INPUT_SIZE = 1024  # pixels a side: 32 GB of stem activations at batch 64 with stem stride 1


def check_weights(model):
    """Refuses weights no trained network has, naming the tensor: NaN or inf anywhere (every
    prediction would be class 0, the argmax of NaN logits), a negative running variance."""
    for name, v in model.state_dict().items():
        if not np.isfinite(v).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        if name.endswith("running_var") and (v < 0).any():
            raise ValueError(f"{name} holds a negative variance")


def _check_args(alpha, num_classes, input_size, stem_stride, mean, std):
    """Refuses what would build no network or a wrong one, naming the argument (a weights file's
    settings come here too)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not (np.isfinite(alpha) and alpha * STEM_CHANNELS >= 1):
        raise ValueError(f"alpha must be a number >= 1/{STEM_CHANNELS} (every layer keeps a channel), got {alpha!r}")
    for name, v in (("num_classes", num_classes), ("input_size", input_size), ("stem_stride", stem_stride)):
        if v is not None and not nn.is_int_in(v, 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if input_size > MAX_INPUT_SIZE:  # an image of 100,000 px a side took all memory
        raise ValueError(f"input_size must be at most {MAX_INPUT_SIZE}, got {input_size}")
    for name, v in (("mean", mean), ("std", std)):
        try:
            values = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != (3,) or not np.isfinite(values).all():
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {v!r}")
    if not (np.asarray(std, np.float64) > 0).all():
        raise ValueError(f"std must be > 0 in every channel, got {std!r}")


class _ImageClassifier(nn.Module):
    """features (a Sequential: stem 3x3 conv + BN + act, then ``_block`` for each row of BLOCKS)
    -> global average pool -> dropout -> classifier (Linear)."""

    ARCH = None  # the name from_config() knows the class by
    BLOCKS = BLOCKS  # the rows of Table 1 this architecture has

    def __init__(self, alpha=1.0, num_classes=10, input_size=32, stem_stride=None, dropout=0.0, act="relu",
                 dtype=np.float32, seed=0, classes=None, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        _check_args(alpha, num_classes, input_size, stem_stride, mean, std)
        rng = np.random.default_rng(seed)
        self.alpha, self.num_classes, self.input_size = alpha, num_classes, input_size
        self.stem_stride = default_stem_stride(input_size) if stem_stride is None else stem_stride
        self.act = act
        self.classes = tuple(str(k) for k in range(num_classes)) if classes is None else tuple(classes)
        if len(self.classes) != num_classes:
            raise ValueError(f"classes: {len(self.classes)} names for num_classes={num_classes}")
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        c = int(STEM_CHANNELS * alpha)
        layers = [nn.Conv2d(3, c, 3, self.stem_stride, rng=rng, dtype=dtype),
                  nn.BatchNorm2d(c, act, dtype=dtype)]
        for cout, stride in self.BLOCKS:
            cout = int(cout * alpha)
            layers += self._block(c, cout, stride, act, rng, dtype)
            c = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.GlobalAvgPool2d()
        self.dropout = nn.Dropout(dropout, seed=seed)
        self.classifier = nn.Linear(c, num_classes, rng=rng, dtype=dtype)

    def _block(self, cin, cout, stride, act, rng, dtype):
        """The layers of one row of BLOCKS, (n, h, w, cin) -> (n, h / stride, w / stride, cout)."""
        raise NotImplementedError

    def forward(self, x):
        """x (n, h, w, 3) Tensor or ndarray of the model's dtype -> logits (n, num_classes)."""
        x = x if isinstance(x, Tensor) else Tensor(x)
        return self.classifier(self.dropout(self.pool(self.features(x))))

    def config(self):
        """Everything needed to rebuild this model (``from_config``) and feed it images: the
        architecture, the class names and the input normalization; stored in every weights file."""
        return {"arch": self.ARCH, "alpha": self.alpha, "num_classes": self.num_classes,
                "input_size": self.input_size, "stem_stride": self.stem_stride, "act": self.act,
                "dropout": self.dropout.p, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std)}

    def summary(self, input_size=None, show=True):
        """Per-layer table and Table 2 (``layer_types``) for (input_size, input_size, 3) images
        (default: the model's input_size); returns {"params", "mult_adds", "buffers", "by_type"}.
        See the module docstring."""
        s = self.input_size if input_size is None else input_size
        totals = super().summary((s, s, 3), show=show)
        totals["by_type"] = by_type = self.layer_types(s)
        if show:
            madds, weights = (sum(v[k] for v in by_type.values()) for k in ("mult_adds", "weights"))
            print(f"{'Type (Table 2)':<16} {'Mult-adds':>15} {'share':>8} {'Weights':>12} {'share':>8}")
            for kind, v in by_type.items():
                print(f"{kind:<16} {v['mult_adds']:>15,} {100 * v['mult_adds'] / madds:>7.2f}% "
                      f"{v['weights']:>12,} {100 * v['weights'] / weights:>7.2f}%")
            print(f"(weights: conv and FC weight tensors; the {totals['params'] - weights:,} BN parameters and "
                  "biases are left out, as in the paper)")
        return totals

    def layer_types(self, input_size=None):
        """The paper's Table 2 for (input_size, input_size, 3) images: {type: {"mult_adds",
        "weights"}} for the types of TABLE2_TYPES, in that order (weights: the weight tensors)."""
        s = self.input_size if input_size is None else input_size
        rows, _ = self._summary_rows((s, s, 3), "")
        modules = {name.rstrip("."): m for name, m in self.named_modules()}
        out = {kind: {"mult_adds": 0, "weights": 0} for kind, _ in TABLE2_TYPES}
        for name, _, _, _, madds in rows:
            for kind, cls in TABLE2_TYPES:
                if type(modules[name]) is cls:
                    out[kind]["mult_adds"] += madds
                    out[kind]["weights"] += modules[name].weight.size
        return out


class MobileNetV1(_ImageClassifier):
    """MobileNetV1 with width multiplier alpha: stem 3x3 conv (int(32·alpha) channels, stride 2
    for ImageNet-sized inputs > 64, else 1) + BN + act, the 13 depthwise-separable blocks of
    Table 1 (int(c·alpha) channels), global average pool, dropout (p = ``dropout``), FC.

    Init (seeded by ``seed``): Kaiming normal fan-out convolutions, BN gamma 1 beta 0, FC weight
    N(0, 0.01²) bias 0. Names: features.0 (stem conv), features.1 (stem BN), features.2 ...
    features.14 (the blocks: dw, bn1, pw, bn2), classifier.weight / classifier.bias.
    """

    ARCH = "mobilenet"

    def _block(self, cin, cout, stride, act, rng, dtype):
        return [nn.DepthwiseSeparable(cin, cout, stride, act, rng=rng, dtype=dtype)]


class ConvMobileNet(_ImageClassifier):
    """Table 4's "conv MobileNet": MobileNetV1 with each depthwise-separable block replaced by one
    full 3x3 convolution (the block's stride and output channels) + BN + act. Same arguments and
    init as MobileNetV1; features is a flat Sequential of conv, BN, conv, BN, ..."""

    ARCH = "conv"

    def _block(self, cin, cout, stride, act, rng, dtype):
        return [nn.Conv2d(cin, cout, 3, stride, rng=rng, dtype=dtype), nn.BatchNorm2d(cout, act, dtype=dtype)]


class ShallowMobileNet(MobileNetV1):
    """Table 5's "shallow MobileNet": MobileNetV1 without the five repeated separable blocks of
    512 channels at stride 1 (14x14x512 at 224 px). Same arguments and init as MobileNetV1;
    features.0 ... features.9 (stem conv, stem BN, 8 blocks)."""

    ARCH = "shallow"
    BLOCKS = BLOCKS[:6] + BLOCKS[11:]


ARCHS = {cls.ARCH: cls for cls in (MobileNetV1, ConvMobileNet, ShallowMobileNet)}


def from_config(config, **kwargs):
    """A freshly initialized model from ``model.config()`` (kwargs: dtype, seed)."""
    config = dict(config)
    arch = config.pop("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    return ARCHS[arch](**config, **kwargs)


def load(path, *, ema=True, **import_options):
    """The model stored at ``path``, with its weights, in eval mode: an mbnet weights file or
    training checkpoint (the EMA weights when it has them and ``ema``), or a PyTorch state_dict
    file (.pt/.pth; needs torch; ``import_options`` as ``mbnet.torch_import.load_torch_weights``)."""
    from pathlib import Path

    if Path(path).suffix.lower() in (".pt", ".pth"):
        from .torch_import import load_torch_weights

        return load_torch_weights(path, **import_options).eval()
    if import_options:
        raise TypeError(f"load: {', '.join(import_options)} apply to PyTorch files only")
    from .checkpoint import load_model

    return load_model(path, ema=ema)
