"""mbnet.models: the paper's published sizes and costs (arXiv:1704.04861 Tables 1, 4, 6, 7),
architecture, seeded init, whole-model gradient checks (float64) and float32/float64 agreement."""
import numpy as np
import pytest

from mbnet import Tensor, no_grad
from mbnet import functional as F
from mbnet.models import BLOCKS, ConvMobileNet, MobileNetV1, default_stem_stride, layer_shapes
from helpers import restore_threads  # noqa: F401 (a fixture)
from test_nn import check_module_backward


def totals(model, size=None):
    t = model.summary(size, show=False)
    return t["mult_adds"] / 1e6, t["params"] / 1e6


# (alpha, resolution, published mult-adds in millions, published parameters in millions)
PAPER = [
    (1.0, 224, 569, 4.2),  # Tables 4, 6, 7
    (0.75, 224, 325, 2.6),  # Table 6
    (0.5, 224, 149, 1.3),
    (0.25, 224, 41, 0.5),
    (1.0, 192, 418, 4.2),  # Table 7
    (1.0, 128, 186, 4.2),
]


@pytest.mark.parametrize("alpha,size,madds,params", PAPER)
def test_summary_reproduces_the_paper(alpha, size, madds, params):
    got_madds, got_params = totals(MobileNetV1(alpha, num_classes=1000, input_size=size))
    assert round(got_madds) == madds, f"alpha {alpha} at {size}: {got_madds:.2f}M mult-adds"
    assert round(got_params, 1) == params, f"alpha {alpha} at {size}: {got_params:.3f}M params"


def test_summary_published_figures_that_are_approximations():
    # Table 7, 160x160: 290M is 569M scaled by (160/224)^2; the exact count is 290.7M because the
    # FC layer's 1.0M does not shrink with the input.
    m224, _ = totals(MobileNetV1(1.0, 1000, 224))
    m160, p160 = totals(MobileNetV1(1.0, 1000, 160))
    assert round(m224 * (160 / 224) ** 2) == 290 and round(p160, 1) == 4.2
    assert abs(m160 - 290.675200) < 1e-6
    # Table 4, conv MobileNet: 4866M is the convolutions alone (the FC adds 1.024M); 29.3M params.
    conv = ConvMobileNet(1.0, 1000, 224)
    madds, params = totals(conv)
    assert round(madds - 1.024) == 4866 and round(params, 1) == 29.3


def test_summary_rows_and_conventions(capsys):
    model = MobileNetV1(1.0, num_classes=1000, input_size=224)
    t = model.summary()
    out = capsys.readouterr().out
    assert "features.14.pw (PointwiseConv2d)" in out and "(7, 7, 1024)" in out and "568.7M" in out
    # conv and FC multiply-adds only; parameters include BN gamma/beta and the FC bias
    assert t["mult_adds"] == 568_740_352 and t["params"] == 4_231_976
    assert t["params"] == sum(p.size for p in model.parameters())
    assert t["buffers"] == sum(b.size for b in model.buffers())


@pytest.mark.parametrize("alpha,stem,last", [(1.0, 32, 1024), (0.75, 24, 768), (0.5, 16, 512), (0.25, 8, 256)])
def test_channel_counts(alpha, stem, last):
    m = MobileNetV1(alpha)
    assert m.features[0].weight.shape == (3, 3, 3, stem)
    assert m.features[14].pw.weight.shape == (last, last) and m.classifier.weight.shape == (last, 10)


def test_architecture_of_table_1():
    m = MobileNetV1(1.0, num_classes=1000, input_size=224)
    assert m.features[0].stride == 2
    assert [b.dw.stride for b in list(m.features)[2:]] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert [b.pw.weight.shape[1] for b in list(m.features)[2:]] == \
        [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert all(b.bn1.act == "relu" and b.bn2.act == "relu" for b in list(m.features)[2:])
    assert m.output_shape((224, 224, 3)) == (1000,)
    assert m.features.output_shape((224, 224, 3)) == (7, 7, 1024)
    assert MobileNetV1(input_size=32).features[0].stride == 1  # CIFAR sizes keep the stem at stride 1
    assert MobileNetV1(input_size=32, stem_stride=2).features[0].stride == 2
    assert MobileNetV1(act="relu6").features[5].bn2.act == "relu6"
    assert "features.3.bn1.gamma" in dict(m.named_parameters())
    assert len(m.state_dict()) == 27 + 4 * 27 + 2  # conv weights, BN params and buffers, FC


@pytest.mark.parametrize("alpha, size, stem_stride", [(1.0, 32, None), (0.25, 224, None), (0.5, 65, None),
                                                     (0.75, 20, None), (0.25, 33, 2), (0.5, 128, 1)])
def test_layer_shapes_match_a_forward_pass(alpha, size, stem_stride):
    model = MobileNetV1(alpha, input_size=size, stem_stride=stem_stride, seed=0).eval()
    blocks = list(model.features)[2:]
    layers = [(model.features[0], model.features[1])]
    layers += [pair for b in blocks for pair in ((b.dw, b.bn1), (b.pw, b.bn2))]
    shapes = layer_shapes(alpha, size, stem_stride)
    assert len(shapes) == len(layers) == 27
    weight_shape = {"conv": lambda L: (3, 3, L.cin, L.cout), "dw": lambda L: (3, 3, L.cin),
                    "pw": lambda L: (L.cin, L.cout)}
    x = Tensor(np.random.default_rng(0).standard_normal((1, size, size, 3), dtype=np.float32))
    with no_grad():
        for i, (L, (conv, bn)) in enumerate(zip(shapes, layers)):
            assert x.shape == (1, L.size, L.size, L.cin), f"layer {i} {L}: input {x.shape}"
            assert getattr(conv, "stride", 1) == L.stride, f"layer {i} {L}"
            assert conv.weight.shape == weight_shape[L.kind](L), f"layer {i} {L}"
            x = bn(conv(x))
            assert x.shape == (1, L.out_size, L.out_size, L.cout), f"layer {i} {L}: output {x.shape}"
    assert model.classifier.weight.shape == (shapes[-1].cout, 10)


def test_default_stem_stride():
    assert [default_stem_stride(s) for s in (16, 32, 64, 65, 128, 224)] == [1, 1, 1, 2, 2, 2]
    assert MobileNetV1(input_size=65).stem_stride == 2 and MobileNetV1(input_size=64).stem_stride == 1


def test_init_is_seeded_and_dtype_independent():
    a, b = MobileNetV1(0.25, seed=3), MobileNetV1(0.25, seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert not np.array_equal(a.features[0].weight.data, MobileNetV1(0.25, seed=4).features[0].weight.data)
    c = MobileNetV1(0.25, seed=3, dtype=np.float64)
    assert c.features[5].pw.weight.dtype == np.float64 and c.features[5].bn1.running_var.dtype == np.float64
    np.testing.assert_array_equal(c.features[5].pw.weight.data.astype(np.float32), a.features[5].pw.weight.data)
    w = a.features[14].pw.weight.data  # (256, 256) pointwise: fan_out 256
    assert abs(w.std() / np.sqrt(2 / 256) - 1) < 0.05
    assert np.all(a.features[4].bn2.gamma.data == 1) and np.all(a.classifier.bias.data == 0)


@pytest.mark.parametrize("model_cls", [MobileNetV1, ConvMobileNet])
def test_forward_shapes(model_cls, rng):
    m = model_cls(0.25, num_classes=7, input_size=16, dtype=np.float64)
    with no_grad():
        y = m(rng.standard_normal((2, 16, 16, 3)))
    assert y.shape == (2, 7) and y.dtype == np.float64


def small_model(dropout=0.0, dtype=np.float64, size=8):
    return MobileNetV1(0.25, num_classes=5, input_size=size, dropout=dropout, dtype=dtype, seed=1)


@pytest.mark.parametrize("training", [True, False])
def test_whole_model_gradients_float64(training, rng):
    model = small_model(dropout=0.2 if training else 0.0)
    with no_grad():  # running statistics away from (0, 1) for the eval-mode check
        for _ in range(3):
            model(rng.standard_normal((4, 8, 8, 3)))
    model.train(training)
    # Batch statistics of 8 samples at the 1x1 layers make the training-mode loss sharply curved
    # and ReLU kinks close: a small step keeps the central difference accurate.
    check_module_backward(model, rng.standard_normal((8, 8, 8, 3)), np.array([0, 4, 2, 1, 3, 3, 0, 2]),
                          f"MobileNetV1(0.25, 8x8, training={training})", rng, rtol=1e-5, eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("training", [True, False])
def test_float32_kernels_agree_with_float64_reference_on_the_whole_model(training, rng):
    # 8 images of 16x16: with fewer samples per channel at the 1x1 layers, training-mode batch
    # statistics make the gradients so sensitive that float32 rounding alone moves them by %.
    x = rng.standard_normal((8, 16, 16, 3))
    labels = np.array([3, 0, 1, 4, 2, 2, 0, 1])
    results = {}
    for dtype in (np.float64, np.float32):
        model = small_model(dtype=dtype, size=16)
        with no_grad():
            for i in range(2):
                model(Tensor(np.cos(x * (i + 1)).astype(dtype)))
        model.train(training)
        loss = F.cross_entropy(model(Tensor(x.astype(dtype))), labels, label_smoothing=0.1)
        loss.backward()
        results[dtype] = {"loss": loss.data, **{n: p.grad for n, p in model.named_parameters()},
                          **dict(model.named_buffers())}
    for name, want in results[np.float64].items():
        got = results[np.float32][name]
        assert got.dtype == np.float32, name
        err = np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-30)
        # In training mode a BN's gamma gradient nearly cancels (the next BN undoes its scale), so
        # float32 rounding of the large terms is large next to their small sum.
        tol = 1e-4 if not training else 2e-2 if name.endswith("gamma") else 1e-3
        assert err <= tol, f"{name}: float32 differs from float64 by {err:.3g} (relative norm), tolerance {tol}"


def training_step(model_cls, dtype, fuse, x, labels, monkeypatch):
    """{kernel name: calls}, and {loss, every parameter gradient, every buffer} of one training step
    with mbnet.functional.FUSE = fuse."""
    monkeypatch.setattr(F, "FUSE", fuse)
    model = model_cls(0.25, num_classes=5, input_size=16, dtype=dtype, seed=1)
    with F.profile() as calls:
        loss = F.cross_entropy(model(Tensor(x.astype(dtype))), labels, label_smoothing=0.1)
        loss.backward()
    return {k: v[0] for k, v in calls.items()}, {"loss": loss.data, **{n: p.grad for n, p in model.named_parameters()},
                        **dict(model.named_buffers())}


@pytest.mark.parametrize("model_cls", [MobileNetV1, ConvMobileNet])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_batch_statistics_match_the_unfused_step(model_cls, dtype, monkeypatch, rng):
    """Convolutions that hand BatchNorm their output's statistics (F.FUSE) give the step of
    separate statistics passes: to float64 rounding on the reference path; in float32, the loss and
    running statistics to 1e-5 and the gradients within twice the float32 rounding noise that
    test_float32_kernels_agree_with_float64_reference_on_the_whole_model allows each path.
    In MobileNetV1 each block's first BatchNorm is applied by the pointwise GEMM as it loads
    (pwconv2d_bn_act_*), and the BatchNorm before each block by the depthwise kernel
    (dwconv2d_bn_act_*): only the last block's second BatchNorm writes its output. Their backward
    runs each of those BatchNorms' backward in the convolution's input-gradient kernel
    ({conv}_bwd_input_bn; the depthwise one also gives w's gradient in the same pass,
    dwconv2d_bn_act_bwd)."""
    x = rng.standard_normal((8, 16, 16, 3))
    labels = np.array([3, 0, 1, 4, 2, 2, 0, 1])
    fused_calls, fused = training_step(model_cls, dtype, True, x, labels, monkeypatch)
    calls, unfused = training_step(model_cls, dtype, False, x, labels, monkeypatch)
    assert {"conv2d_fwd_stats", "batchnorm_act_train_fwd_from_stats"} <= set(fused_calls), fused_calls
    assert "batchnorm_act_train_fwd" not in fused_calls and not any(k.endswith("_stats") for k in calls)
    assert not any("_bn_act" in k for k in calls), calls
    blocks = len(BLOCKS) if model_cls is MobileNetV1 else 0
    for conv in ("pwconv2d", "dwconv2d"):
        assert fused_calls.get(conv + "_bn_act_fwd_stats", 0) == blocks, fused_calls
        assert fused_calls.get(conv + "_bwd_input", 0) == calls.get(conv + "_bwd_input", 0) - blocks, fused_calls
    assert fused_calls.get("pwconv2d_bn_act_bwd_weight", 0) == blocks, fused_calls
    assert fused_calls.get("pwconv2d_bwd_input_bn", 0) == blocks, fused_calls
    assert fused_calls.get("dwconv2d_bn_act_bwd", 0) == blocks, fused_calls  # both gradients in one pass
    assert fused_calls["batchnorm_act_train_fwd_from_stats"] == calls["batchnorm_act_train_fwd"] - 2 * blocks
    assert fused_calls["batchnorm_act_train_bwd"] == calls["batchnorm_act_train_bwd"] - 2 * blocks
    for name, want in unfused.items():
        got = fused[name]
        assert got.dtype == dtype, name
        err = np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-30)
        if dtype == np.float64:
            tol = 1e-10
        elif name == "loss" or "running" in name:
            tol = 1e-5
        else:
            tol = 4e-2 if name.endswith("gamma") else 2e-3
        assert err <= tol, f"{name}: fused differs from unfused by {err:.3g} (relative norm), tolerance {tol}"


def test_fused_step_does_not_hold_the_convolutions_inputs(rng, monkeypatch):
    """Under F.FUSE the BatchNorm outputs that are a convolution's input (a separable block's
    first, the pointwise convolution's input, formed inside the GEMM; the one before each block,
    the depthwise convolution's input, formed in its kernel's padded rows) are never stored: after
    the forward, the graph holds less memory by at least 90% of those 26 activations' size
    (tracemalloc sees NumPy's and the kernels' arrays)."""
    import tracemalloc

    x = Tensor(rng.standard_normal((8, 16, 16, 3)).astype(np.float32))
    dws = [s for s in layer_shapes(0.5, 16) if s.kind == "dw"]
    z_bytes = sum(8 * (s.out_size ** 2 + s.size ** 2) * s.cout * 4 for s in dws)
    held = {}
    for fuse in (True, False):
        monkeypatch.setattr(F, "FUSE", fuse)
        model = MobileNetV1(0.5, input_size=16)
        tracemalloc.start()
        try:
            logits = model(x)
            held[fuse] = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del logits
    assert held[False] - held[True] >= 0.9 * z_bytes, (held, z_bytes)


def test_training_step_is_the_same_at_1_and_2_threads(restore_threads):
    """Loss and every gradient of a MobileNetV1 step are bitwise the same at 1 and 2 threads: no
    kernel splits a sum by the thread count (the stem's weight gradient, a GEMM over 16,384 rows,
    sums fixed chunks of them)."""
    from mbnet import _C

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    results = []
    for threads in (1, 2):
        _C.set_num_threads(threads)
        model = MobileNetV1(1.0, num_classes=10, input_size=32, seed=0)
        loss = F.cross_entropy(model(Tensor(x)), labels)
        loss.backward()
        results.append({"loss": np.asarray(loss.data), **{n: p.grad for n, p in model.named_parameters()}})
    assert len(results[0]) > 80
    for k, v in results[0].items():
        np.testing.assert_array_equal(results[1][k], v, err_msg=k)
