"""PyTorch MobileNetV1 weights in: three ways of writing the network in PyTorch (a Sequential with
numeric keys, named blocks with conv biases, stem/model/classifier parts), saved with torch.save and
read by mbnet.models.load, give PyTorch's eval-mode logits (max |mbnet - torch| <= 1e-4 · max
|torch|); a state_dict that does not fit names its first bad tensor; `import mbnet` never imports
torch. The tests of a plain dict of arrays need no torch."""
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from mbnet import models, no_grad
from mbnet.checkpoint import CheckpointError
from mbnet.models import BLOCKS, MobileNetV1
from mbnet.torch_import import load_torch_weights

RTOL = 1e-4


def logits(model, x):
    with no_grad():
        return model.eval()(x).data


def pytorch_layout(model):
    """An mbnet MobileNetV1's weights as PyTorch's Sequential of conv/BN layers holds them
    (``model.<layer>.0.weight`` ...): OIHW convolutions, (out, in) linear, numbered modules."""
    out, layer = OrderedDict(), 0
    for name, a in model.state_dict().items():
        kind = name.rsplit(".", 1)[-1]
        if name == "features.0.weight":
            a = a.transpose(3, 2, 0, 1)
        elif name.endswith("dw.weight"):
            a = a.transpose(2, 0, 1)[:, None]
        elif name.endswith("pw.weight"):
            a = a.T[:, :, None, None]
        elif name == "classifier.weight":
            a = a.T
        if name.startswith("classifier"):
            out[f"fc.{kind}"] = a
            continue
        if kind == "weight":  # a convolution opens the next (conv, BN) module
            layer += 1
            out[f"model.{layer}.0.weight"] = a
        else:
            out[f"model.{layer}.1.{ {'gamma': 'weight', 'beta': 'bias'}.get(kind, kind)}"] = a
            if kind == "running_var":
                out[f"model.{layer}.1.num_batches_tracked"] = np.array(5)
    return out


def random_bn(model, rng):
    for name, a in model.named_state().items():
        if name.rsplit(".", 1)[-1] in ("gamma", "beta", "running_mean", "running_var"):
            scale_like = name.endswith(("gamma", "var"))
            a[...] = rng.uniform(0.5, 1.5, a.shape) if scale_like else rng.uniform(-0.3, 0.3, a.shape)
    return model


# --- a dict of arrays (no torch needed) ----------------------------------------------------------

@pytest.mark.parametrize("alpha, act", [(0.25, "relu"), (0.75, "relu6")])
def test_dict_of_arrays_round_trip(rng, alpha, act):
    model = random_bn(MobileNetV1(alpha, num_classes=7, input_size=16, act=act, seed=1), rng).eval()
    again = load_torch_weights(pytorch_layout(model), input_size=16, act=act, classes="abcdefg")
    assert (again.alpha, again.num_classes, again.classes, again.stem_stride) == (alpha, 7, tuple("abcdefg"), 1)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    want = logits(model, x)
    assert np.abs(want[0] - want[1]).max() > 1e-3 * np.abs(want).max()
    np.testing.assert_array_equal(logits(again, x), want)


@pytest.fixture
def state():
    return pytorch_layout(MobileNetV1(0.25, seed=2))


def _edited(state, edit):
    items = list(state.items())
    edit(items)
    return OrderedDict(items)


def test_a_state_dict_that_does_not_fit_names_its_first_bad_tensor(state):
    at = list(state).index("model.5.0.weight")  # block 2's pointwise conv, (32, 16, 1, 1) at α=0.25
    bad_shape = _edited(state, lambda it: it.__setitem__(at, (it[at][0], np.zeros((32, 17, 1, 1), np.float32))))
    with pytest.raises(CheckpointError, match=r"block 2's pointwise conv weight of shape \(\*, 16, 1, 1\), "
                                              r"got model.5.0.weight with shape \(32, 17, 1, 1\)"):
        load_torch_weights(bad_shape)
    with pytest.raises(ValueError, match="the classifier's bias .* got the end of the state_dict"):
        load_torch_weights(_edited(state, lambda it: it.pop()))
    with pytest.raises(ValueError, match="nothing after the classifier's bias, got extra.weight"):
        load_torch_weights(_edited(state, lambda it: it.append(("extra.weight", np.zeros(3, np.float32)))))
    swapped = _edited(state, lambda it: it.__setitem__(slice(3, 5), [(it[4][0], it[3][1]), (it[3][0], it[4][1])]))
    with pytest.raises(ValueError, match=r"stem conv BN running_mean .*\(a 'running_mean', by its name\), "
                                         r"got model.1.1.running_var"):
        load_torch_weights(swapped)
    with pytest.raises(ValueError, match="model.1.0.bias is a str, not a floating-point tensor"):
        load_torch_weights({"model.1.0.bias": "x", **state})


def test_widths_of_no_alpha_are_named(state):
    widths = {k: v for k, v in state.items()}
    stem = widths["model.1.0.weight"]
    # a 12-channel stem everywhere it shows: consistent shapes, but 12 is not int(32·α) with the blocks' α
    widths["model.1.0.weight"] = np.zeros((12, *stem.shape[1:]), np.float32)
    for k in ("weight", "bias", "running_mean", "running_var"):
        widths[f"model.1.1.{k}"] = np.ones(12, np.float32)
    widths["model.2.0.weight"] = np.zeros((12, 1, 3, 3), np.float32)
    for k in ("weight", "bias", "running_mean", "running_var"):
        widths[f"model.2.1.{k}"] = np.ones(12, np.float32)
    widths["model.3.0.weight"] = np.zeros((16, 12, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"model.3.0.weight has 16 output channels where MobileNetV1 has "
                                         r"int\(64·α\)"):
        load_torch_weights(widths)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        models.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pth: "):
        models.load(tmp_path / "junk.pth")


def test_import_mbnet_does_not_import_torch():
    code = ("import sys, mbnet, mbnet.models, mbnet.checkpoint, mbnet.torch_import, mbnet.export\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- PyTorch files -------------------------------------------------------------------------------

@pytest.fixture
def torch():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    torch.set_num_threads(1)  # no PyTorch worker threads left spinning beside mbnet's on a small machine
    return torch


def widths_of(alpha):
    """The output channels of the stem and the 13 blocks."""
    return [int(32 * alpha)] + [int(c * alpha) for c, _ in BLOCKS]


def torch_nets():
    """Three ways of writing MobileNetV1 in PyTorch, as classes taking (widths, num_classes,
    stem_stride, act); defined on first use so that this file imports without torch."""
    import torch
    from torch import nn

    class SequentialNet(nn.Module):
        """Numeric keys: model.0.0.weight (stem conv), model.3.0.weight (block 3's depthwise), fc."""

        def __init__(self, w, num_classes, stem_stride, act):
            super().__init__()

            def conv_bn(cin, cout, stride):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act())

            def conv_dw(cin, cout, stride):
                return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                     act(), nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), act())

            self.model = nn.Sequential(conv_bn(3, w[0], stem_stride),
                                       *[conv_dw(cin, cout, s) for cin, cout, (_, s) in zip(w, w[1:], BLOCKS)],
                                       nn.AdaptiveAvgPool2d(1))
            self.fc = nn.Linear(w[-1], num_classes)

        def forward(self, x):
            return self.fc(self.model(x).flatten(1))

    class DSConv(nn.Module):
        def __init__(self, cin, cout, stride, act):
            super().__init__()
            self.dconv = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=True)
            self.bn1 = nn.BatchNorm2d(cin)
            self.pconv = nn.Conv2d(cin, cout, 1, bias=True)
            self.bn2 = nn.BatchNorm2d(cout)
            self.act = act()

        def forward(self, x):
            return self.act(self.bn2(self.pconv(self.act(self.bn1(self.dconv(x))))))

    class NamedNet(nn.Module):
        """Named blocks with conv biases: features.conv0, features.dsconv7_a.dconv.weight, bn1, pconv, bn2."""

        NAMES = [f"dsconv{i}" for i in range(1, 7)] + [f"dsconv7_{k}" for k in "abcde"] + ["dsconv8", "dsconv9"]

        def __init__(self, w, num_classes, stem_stride, act):
            super().__init__()
            layers = [("conv0", nn.Conv2d(3, w[0], 3, stem_stride, 1, bias=True)), ("bn0", nn.BatchNorm2d(w[0])),
                      ("act0", act())]
            layers += [(n, DSConv(cin, cout, s, act)) for n, cin, cout, (_, s) in zip(self.NAMES, w, w[1:], BLOCKS)]
            self.features = nn.Sequential(OrderedDict(layers))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(w[-1], num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, act):
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
            self.bn_dw = nn.BatchNorm2d(cin)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn_pw = nn.BatchNorm2d(cout)
            self.act = act()

        def forward(self, x):
            return self.act(self.bn_pw(self.pointwise(self.act(self.bn_dw(self.depthwise(x))))))

    class PartsNet(nn.Module):
        """stem / model / classifier parts: stem.0.weight, model.4.depthwise.weight, classifier.1.weight."""

        def __init__(self, w, num_classes, stem_stride, act):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(w[0]), act())
            self.model = nn.Sequential(*[Block(cin, cout, s, act) for cin, cout, (_, s) in zip(w, w[1:], BLOCKS)])
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(w[-1], num_classes))

        def forward(self, x):
            return self.classifier(self.model(self.stem(x)).mean((2, 3)))

    return {"sequential": SequentialNet, "named": NamedNet, "parts": PartsNet}


def make_torch(style, widths, num_classes=10, stem_stride=1, act="relu", size=32, seed=0):
    """A PyTorch network of the given style in eval mode, with BN statistics measured on a random
    batch (else the untrained network's logits hardly depend on its input), then perturbed, and
    random BN affine parameters and conv biases."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = torch_nets()[style](widths, num_classes, stem_stride, {"relu": nn.ReLU, "relu6": nn.ReLU6}[act])
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.momentum = None  # running statistics = the average over the batches seen
        net.train()(torch.randn(4, 3, size, size))
        for m in bns:
            m.running_mean.add_(0.2 * torch.randn_like(m.running_mean) * m.running_var.sqrt())
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.6, 1.5))
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def assert_same_logits(model, net, x):
    import torch

    with torch.no_grad():
        want = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = logits(model, x)
    assert np.abs(want).max() > 0 and np.abs(want[0] - want[1]).max() > 1e-3 * np.abs(want).max()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= RTOL, f"max relative error {err:.2e}"


@pytest.mark.parametrize("style, alpha, size, stem_stride, act, num_classes, ext", [
    ("sequential", 1.0, 32, 1, "relu", 10, ".pth"),
    ("named", 0.5, 64, 2, "relu6", 10, ".pt"),
    ("parts", 0.75, 32, 1, "relu", 7, ".pt"),
])
def test_pytorch_file_gives_pytorchs_logits(torch, tmp_path, rng, style, alpha, size, stem_stride, act, num_classes,
                                            ext):
    net = make_torch(style, widths_of(alpha), num_classes, stem_stride, act, size)
    path = tmp_path / f"net{ext}"
    torch.save(net.state_dict(), path)
    options = {} if (size, stem_stride, act) == (32, 1, "relu") else \
        {"input_size": size, "stem_stride": stem_stride, "act": act}  # the defaults are the CIFAR variant
    model = models.load(path, **options)
    assert (model.alpha, model.num_classes, model.input_size, model.stem_stride, model.act) == \
        (alpha, num_classes, size, stem_stride, act)
    assert not model.training
    assert_same_logits(model, net, rng.standard_normal((2, size, size, 3)).astype(np.float32))


def test_checkpoint_dict_and_live_state_dict(torch, tmp_path, rng):
    net = make_torch("parts", widths_of(0.25), seed=1)
    torch.save({"epoch": 3, "state_dict": net.state_dict(), "optimizer": {}}, tmp_path / "ck.pth")
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    assert_same_logits(models.load(tmp_path / "ck.pth"), net, x)
    assert_same_logits(load_torch_weights(net.state_dict()), net, x)  # torch tensors, no file
    torch.save(net.state_dict(), tmp_path / "NET.PT")  # the suffix in capitals: still PyTorch's
    assert_same_logits(models.load(tmp_path / "NET.PT"), net, x)


def test_evaluate_takes_a_pytorch_file_with_the_datas_classes(torch, tmp_path, capsys):
    """A .pt names no classes: evaluate takes the data's when there are as many (it refused every
    PyTorch file, comparing the data's names with '0', '1', ...)."""
    from test_train import _tiny_cifar

    from mbnet import evaluate

    root = _tiny_cifar(tmp_path / "cifar")
    torch.save(make_torch("parts", widths_of(0.25), seed=1).state_dict(), tmp_path / "net.pt")
    assert evaluate.main([str(tmp_path / "net.pt"), "--data-dir", str(root), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "  airplane " in out and "  truck " in out
    torch.save(make_torch("parts", widths_of(0.25), num_classes=4, seed=1).state_dict(), tmp_path / "four.pt")
    assert evaluate.main([str(tmp_path / "four.pt"), "--data-dir", str(root), "--threads", "1"]) == 2
    assert "four.pt: 4 classes, but the data has 10" in capsys.readouterr().err


@pytest.mark.parametrize("kind, match", [
    ("int", "is a torch.int64 tensor, not a floating-point one"),  # .float() let it through before
    ("sparse", "is a torch.sparse_coo torch.float32 tensor that has no dense values"),
    ("meta", "is a .* tensor that has no dense values"),
])
def test_tensors_without_float_values_are_named(torch, kind, match):
    state = make_torch("parts", widths_of(0.25), seed=1).state_dict()
    name = next(iter(state))
    w = state[name]
    state[name] = {"int": lambda: w.long(), "sparse": lambda: w.to_sparse(),
                   "meta": lambda: torch.empty(w.shape, device="meta")}[kind]()
    with pytest.raises(CheckpointError, match=f"{name} " + match):
        load_torch_weights(state)


def test_widths_rounded_to_multiples_of_8_are_refused_with_the_tensor_named(torch, tmp_path):
    rounded = [(c + 7) // 8 * 8 for c in widths_of(0.35)]  # torchvision's rounding: 11 -> 16, 22 -> 24, ...
    torch.save(make_torch("sequential", rounded).state_dict(), tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match=r"r.pt: model.1.3.weight has 24 output channels where MobileNetV1 "
                                              r"has int\(64·α\)"):
        models.load(tmp_path / "r.pt")


def test_a_pickled_module_is_refused(torch, tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "whole.pt")  # the module, not its state_dict
    with pytest.raises(CheckpointError, match="whole.pt: not a PyTorch state_dict"):
        models.load(tmp_path / "whole.pt")


def test_export_cli_takes_a_pytorch_file(torch, tmp_path, rng):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mbnet[onnx]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mbnet[onnx]')")
    from mbnet.export import main

    net = make_torch("named", widths_of(0.25), stem_stride=2, act="relu6", size=48)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    assert main([str(tmp_path / "net.pt"), str(tmp_path / "net.onnx"), "--input-size", "48", "--stem-stride", "2",
                 "--act", "relu6"]) == 0
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)  # NCHW, as both PyTorch and the ONNX graph take it
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
