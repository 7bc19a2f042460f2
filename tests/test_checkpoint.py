"""The one weights file: model.save -> mbnet.models.load rebuilds the model with no flag repeated;
a training checkpoint is read by the same readers (EMA weights by default); bad files are named."""
import json

import numpy as np
import pytest

from mbnet import checkpoint, models, optim
from mbnet.models import ConvMobileNet, MobileNetV1


def _logits(model, x):
    from mbnet import no_grad

    with no_grad():
        return model.eval()(x).data


@pytest.mark.parametrize("make", [
    lambda: MobileNetV1(alpha=0.25, num_classes=3, input_size=16, act="relu6", classes=("a", "b", "c"),
                        mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), seed=3),
    lambda: ConvMobileNet(alpha=0.25, num_classes=2, input_size=8, stem_stride=2, seed=4),
])
def test_save_then_load_rebuilds_the_model(tmp_path, rng, make):
    model = make()
    for m in model.buffers():  # non-trivial BN statistics, so eval mode depends on them
        m[...] = rng.uniform(0.5, 1.5, m.shape)
    model.save(tmp_path / "w.npz")
    again = models.load(tmp_path / "w.npz")
    assert type(again) is type(model) and again.config() == model.config()
    x = rng.standard_normal((2, model.input_size, model.input_size, 3)).astype(np.float32)
    np.testing.assert_array_equal(_logits(again, x), _logits(model, x))


def test_training_checkpoint_is_a_weights_file_with_ema_by_default(tmp_path):
    model = MobileNetV1(alpha=0.25, input_size=8, seed=1)
    ema = optim.EMA(model.state_dict())
    ema.shadow["classifier.bias"][...] = 7.0  # the EMA differs from the raw weights
    checkpoint.save(tmp_path / "ck.npz", model, ema=ema.state_dict(), meta={"epoch": 1})
    assert (models.load(tmp_path / "ck.npz").classifier.bias.data == 7).all()
    assert (models.load(tmp_path / "ck.npz", ema=False).classifier.bias.data == 0).all()
    plain = MobileNetV1(alpha=0.25, input_size=8, seed=9)
    plain.load(tmp_path / "ck.npz", ema=False)  # Module.load reads checkpoints too
    np.testing.assert_array_equal(plain.features[0].weight.data, model.features[0].weight.data)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="nope.npz: no such file"):
        models.load(tmp_path / "nope.npz")
    with pytest.raises(checkpoint.CheckpointError, match="a directory, not a weights file"):
        models.load(tmp_path)
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.CheckpointError, match="trunc.npz: corrupt"):
        models.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "foreign.npz", weight=np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="foreign.npz: not an mbnet weights file"):
        models.load(tmp_path / "foreign.npz")
    np.savez(tmp_path / "json.npz", meta=np.array('{"format": "other"}'), **{"model/x": np.zeros(1)})
    with pytest.raises(checkpoint.CheckpointError, match="json.npz: 'meta' is not mbnet's"):
        models.load(tmp_path / "json.npz")
    np.save(tmp_path / "bare.npy", np.zeros(3))  # np.load gives an array, not an archive
    with pytest.raises(checkpoint.CheckpointError, match=r"bare.npy: a single NumPy array \(.npy\)"):
        models.load(tmp_path / "bare.npy")


@pytest.mark.parametrize("tensor, value, match", [
    ("classifier.weight", np.nan, "classifier.weight holds NaN or infinite values"),
    ("features.1.running_var", -1.0, "features.1.running_var holds a negative variance"),
])
def test_weights_no_trained_network_has_are_refused(tmp_path, tensor, value, match):
    """NaN weights made every prediction class 0 (evaluate reported 10%), a negative variance NaN
    outputs (export wrote them into the ONNX file)."""
    model = models.MobileNetV1(alpha=0.25, input_size=16)
    state = model.state_dict()
    state[tensor].flat[0] = value
    model.load_state_dict(state)
    model.save(tmp_path / "w.npz")
    with pytest.raises(checkpoint.CheckpointError, match="w.npz: .*" + match):
        models.load(tmp_path / "w.npz")


@pytest.mark.parametrize("change, match", [
    (dict(version="2"), "format version that is not an integer: '2'"),
    (dict(model=dict(alpha=0)), "alpha must be a number >= 1/32"),
    (dict(model=dict(alpha=float("inf"))), "alpha must be a number >= 1/32"),
    (dict(model=dict(stem_stride=0)), "stem_stride must be a positive int"),
    (dict(model=dict(input_size="8")), "input_size must be a positive int"),
    (dict(model=dict(std=[0, 0, 0])), r"std must be > 0 in every channel"),
    (dict(model=dict(mean=[0.5])), "mean must be 3 finite numbers"),
    (dict(model=dict(input_size=100000)), "input_size must be at most 1024"),  # evaluating it took all memory
])
def test_a_weights_files_settings_are_checked(tmp_path, change, match):
    """A weights file's stored settings go through the model's own checks: a file edited (or
    written by something else) to hold alpha 0 or std 0 used to raise ZeroDivisionError or give
    NaN predictions silently."""
    path = tmp_path / "w.npz"
    models.MobileNetV1(alpha=0.25, input_size=16).save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in change.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        models.load(path)
