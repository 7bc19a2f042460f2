"""ONNX export: ONNX Runtime's logits equal mbnet's (max |ort - mbnet| <= 1e-4 · max |mbnet|) on
random and photo-like inputs for α 1, 0.5, 0.25, three resolutions, ReLU and ReLU6, BN folded or
kept, with non-trivial BN statistics; the graph, its metadata and batch dimension; the CLI."""
import io
import json

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mbnet[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mbnet[onnx]')")

from mbnet import models, nn, no_grad  # noqa: E402
from mbnet.export import export_onnx, main, to_onnx  # noqa: E402
from mbnet.models import ConvMobileNet, MobileNetV1  # noqa: E402

RTOL = 1e-4


def randomize_bn(model, rng):
    """BN statistics far from the identity (γ 0.5-2, β -0.5-1, mean ±0.5, var 0.5-2): eval-mode
    outputs then depend on every one of them, and ReLU6 clips."""
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.running_mean.size
            m.gamma.data[...] = rng.uniform(0.5, 2.0, c)
            m.beta.data[...] = rng.uniform(-0.5, 1.0, c)
            m.running_mean[...] = rng.uniform(-0.5, 0.5, c)
            m.running_var[...] = rng.uniform(0.5, 2.0, c)
    return model.eval()


def photos(model, n=2):
    """n photo-like images as the model takes them (NHWC, normalized with its mean/std): a sky
    gradient, a sun, textured ground, through JPEG compression and a resize, one crop each."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:120, 0:120] / 119.0
    img = (0.35 + 0.5 * yy)[..., None] * np.array([0.5, 0.7, 1.0])
    img[(xx - 0.7) ** 2 + (yy - 0.25) ** 2 < 0.015] = (1.0, 0.9, 0.6)
    ground = yy > 0.6 + 0.05 * np.sin(9 * xx)
    img[ground] = (0.3, 0.45, 0.2) + 0.08 * rng.standard_normal((ground.sum(), 3))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    photo = Image.open(buf).convert("RGB")
    s = model.input_size
    out = [np.asarray(photo.crop((10 * i, 5 * i, 100 + 10 * i, 100 + 5 * i)).resize((s, s), Image.BILINEAR))
           for i in range(n)]
    return ((np.stack(out) / 255.0 - model.mean) / model.std).astype(np.float32)


def mbnet_logits(model, x):
    with no_grad():
        return model.eval()(x).data


def ort_logits(proto, x_nhwc):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]


def assert_agree(got, want, what):
    assert np.abs(want).max() > 0 and np.abs(want[0] - want[1]).max() > 1e-3 * np.abs(want).max(), what
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= RTOL, f"{what}: max relative error {err:.2e}"


@pytest.mark.parametrize("alpha, size, act, fold_bn", [
    (1.0, 32, "relu", True),
    (1.0, 32, "relu6", False),
    (0.5, 32, "relu", False),
    (0.5, 96, "relu6", True),   # stem stride 2
    (0.25, 96, "relu", True),
    (0.25, 40, "relu6", True),  # odd feature maps (5x5, 3x3) under stride 2
])
def test_onnx_runtime_agrees_with_mbnet(rng, alpha, size, act, fold_bn):
    model = randomize_bn(MobileNetV1(alpha, num_classes=10, input_size=size, act=act, seed=1), rng)
    proto = to_onnx(model, fold_bn=fold_bn)
    for name, x in (("random", rng.standard_normal((2, size, size, 3)).astype(np.float32)),
                    ("photo", photos(model))):
        assert_agree(ort_logits(proto, x), mbnet_logits(model, x), f"alpha={alpha} {size}px {act} {name}")


def test_relu6_graph_clips_at_6(rng):
    model = randomize_bn(MobileNetV1(0.25, input_size=32, act="relu6", seed=2), rng)
    proto = to_onnx(model, opset=11)  # the lowest opset: Clip's bounds became inputs there
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clips) == 27 and not any(n.op_type == "Relu" for n in proto.graph.node)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    got = ort_logits(proto, x)
    assert_agree(got, mbnet_logits(model, x), "relu6")
    for _, m in model.named_modules():  # the same weights with plain ReLU give other logits
        if isinstance(m, nn.BatchNorm2d):
            m.act = "relu"
    relu = mbnet_logits(model, x)
    assert np.abs(got - relu).max() > 1e-2 * np.abs(relu).max()


def test_graph_and_metadata(rng):
    model = randomize_bn(MobileNetV1(0.25, num_classes=3, input_size=32, classes=("cat", "dog", "eel"),
                                     mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), seed=3), rng)
    folded, kept = to_onnx(model), to_onnx(model, fold_bn=False)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Conv") == 27 and "BatchNormalization" not in ops
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    groups = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["group"]
              for n in folded.graph.node if n.op_type == "Conv"]
    assert sum(g > 1 for g in groups) == 13  # the depthwise convolutions
    assert [n.op_type for n in kept.graph.node].count("BatchNormalization") == 27
    assert len(folded.graph.initializer) < len(kept.graph.initializer)
    props = {p.key: p.value for p in folded.metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog", "eel"] and props["input_layout"] == "NCHW"
    assert json.loads(props["mean"]) == [0.1, 0.2, 0.3] and json.loads(props["std"]) == [0.4, 0.5, 0.6]
    assert json.loads(props["mbnet_config"]) == model.config()
    dims = [d.dim_param or d.dim_value for d in folded.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    assert_agree(ort_logits(kept, x), ort_logits(folded, x), "BN kept vs folded")


def test_batch_dimension(rng):
    model = randomize_bn(MobileNetV1(0.25, input_size=16, seed=4), rng)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    dynamic = to_onnx(model)
    np.testing.assert_allclose(ort_logits(dynamic, x[:1]), ort_logits(dynamic, x)[:1], rtol=1e-5, atol=1e-6)
    fixed = to_onnx(model, dynamic_batch=False, batch_size=2)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert ort_logits(fixed, x[:2]).shape == (2, 10)
    with pytest.raises(Exception, match="[Ii]nvalid|dimension"):
        ort_logits(fixed, x)
    for kwargs, match in [(dict(opset="17"), "opset must be an int in 11..(.*), got '17'"),
                          (dict(opset=17.5), "opset must be an int"),
                          (dict(dynamic_batch=False, batch_size=2.5), "batch_size must be an int >= 1, got 2.5")]:
        with pytest.raises(ValueError, match=match):  # raw TypeErrors or onnx's own errors before
            to_onnx(model, **kwargs)


def test_conv_mobilenet_exports(rng):
    model = randomize_bn(ConvMobileNet(0.25, input_size=16, seed=5), rng)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    assert_agree(ort_logits(to_onnx(model), x), mbnet_logits(model, x), "ConvMobileNet")


def test_cli_round_trip(tmp_path, rng, capsys):
    model = randomize_bn(MobileNetV1(0.25, num_classes=4, input_size=32, act="relu6", classes="abcd", seed=6), rng)
    model.save(tmp_path / "w.npz")
    assert main([str(tmp_path / "w.npz"), str(tmp_path / "m.onnx"), "--batch", "2", "--opset", "13"]) == 0
    assert "m.onnx" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 13
    assert json.loads({p.key: p.value for p in proto.metadata_props}["classes"]) == list("abcd")
    x = photos(model)
    assert_agree(ort_logits(proto, x), mbnet_logits(models.load(tmp_path / "w.npz"), x), "CLI")
    export_onnx(model, tmp_path / "api.onnx")
    assert onnx.load(str(tmp_path / "api.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.npz"), str(tmp_path / "m.onnx")]) == 2
    assert "missing.npz: no such file" in capsys.readouterr().err
    MobileNetV1(0.25, input_size=8).save(tmp_path / "w.npz")
    assert main([str(tmp_path / "w.npz"), str(tmp_path / "m.onnx"), "--opset", "7"]) == 2
    assert "opset must be an int in 11.." in capsys.readouterr().err
    assert main([str(tmp_path / "w.npz"), str(tmp_path / "m.onnx"), "--act", "relu6"]) == 2
    assert "PyTorch files only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "w.npz"), str(tmp_path / "m.onnx"), "--batch", "0"])
    assert "--batch" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    (tmp_path / "copy.npz").write_bytes(b"a checkpoint")  # an output that is not .onnx: refused, kept
    with pytest.raises(SystemExit):
        main([str(tmp_path / "w.npz"), str(tmp_path / "copy.npz")])
    assert "OUT must end in .onnx" in capsys.readouterr().err
    assert (tmp_path / "copy.npz").read_bytes() == b"a checkpoint"
    assert main([str(tmp_path / "w.npz"), str(tmp_path / "none" / "m.onnx")]) == 2  # the error names the path
    assert f"cannot write {tmp_path / 'none' / 'm.onnx'}" in capsys.readouterr().err
