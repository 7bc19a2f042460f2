"""Predict: image files of any mode and size -> the model's preprocessing -> top-k classes with
softmax probabilities, from Python (predict) and the command line (python -m mbnet.predict).
Every image is generated here; the models are tiny (alpha 0.25) with a classifier scaled so that
the probabilities are far from uniform."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mbnet import Tensor, checkpoint, no_grad, optim
from mbnet import data as D
from mbnet.models import MobileNetV1
from mbnet.predict import main, predict

CLASSES = ("apple", "banana", "cherry")


def make_model(input_size=32, seed=0):
    model = MobileNetV1(alpha=0.25, num_classes=3, input_size=input_size, classes=CLASSES,
                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), seed=seed)
    rng = np.random.default_rng(seed)
    model.classifier.weight.data[...] = rng.normal(0, 3, model.classifier.weight.shape)
    return model.eval()


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.npz"
    make_model().save(path)
    return path


def write(path, array, mode=None, **save):
    """Saves a uint8/uint16 array as an image file (converted to ``mode`` if given)."""
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path, **save)
    return path


@pytest.fixture
def images(tmp_path):
    """{name: path} of images in every mode and odd sizes, in a folder tree."""
    rng = np.random.default_rng(1)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), np.uint8)  # noqa: E731
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    return {
        "gray": write(d / "gray.png", rng.integers(0, 256, (23, 17), np.uint8)),
        "rgba": write(d / "rgba.png", rng.integers(0, 256, (40, 40, 4), np.uint8)),
        "palette": write(d / "sub" / "palette.png", rgb(31, 45), "P"),
        "jpeg": write(d / "sub" / "wide.jpg", rgb(200, 300), quality=90),
        "tall": write(d / "tall.jpeg", rgb(17, 23)),
    }


def by_hand(model, path):
    """Probabilities (num_classes,) of one image file, composed from the documented steps."""
    x = D.normalize(D.fit_image(D.load_image(path), model.input_size)[None], model.mean, model.std)
    with no_grad():
        logits = model(Tensor(x)).data[0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------
# The preprocessing helpers


@pytest.mark.parametrize("h, w", [(17, 23), (300, 200), (32, 32), (1, 5), (64, 33)])
def test_fit_image_resizes_the_shorter_side_and_center_crops(h, w):
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    out = D.fit_image(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    if (h, w) == (32, 32):
        np.testing.assert_array_equal(out, img)


def test_fit_image_takes_the_center_of_an_image_whose_short_side_fits():
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, 4:20] = 200  # the centre 16x16
    np.testing.assert_array_equal(D.fit_image(img, 16), np.full((16, 16, 3), 200, np.uint8))


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    np.testing.assert_array_equal(D.load_image(write(tmp_path / "g.png", gray)), np.stack([gray] * 3, -1))
    rgba = np.random.default_rng(0).integers(0, 256, (4, 5, 4), np.uint8)
    np.testing.assert_array_equal(D.load_image(write(tmp_path / "a.png", rgba)), rgba[..., :3])
    pal = Image.new("P", (5, 4))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((2, 1), 1)
    pal.save(tmp_path / "p.png")
    out = D.load_image(tmp_path / "p.png")
    assert out.shape == (4, 5, 3) and tuple(out[1, 2]) == (10, 20, 30) and out.sum() == 60
    ramp = np.linspace(0, 65535, 20).astype(np.uint16).reshape(4, 5)  # a 16-bit PNG is scaled, not clipped
    out = D.load_image(write(tmp_path / "i16.png", ramp))
    assert out.dtype == np.uint8 and np.abs(out[..., 0] - ramp / 257).max() <= 1


def test_load_image_names_an_unreadable_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(D.DataError, match="bad.png"):
        D.load_image(tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# predict() from Python


def test_predict_agrees_with_the_preprocessing_composed_by_hand(tmp_path, images):
    model = make_model(input_size=40)
    paths = list(images.values())
    results = predict(model, paths, top_k=None, batch_size=2)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for p, r in zip(paths, results):
        expected = by_hand(model, p)
        probs = np.zeros(3)
        probs[[t["index"] for t in r["top"]]] = [t["prob"] for t in r["top"]]
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7, err_msg=str(p))
        assert [t["class"] for t in r["top"]] == [CLASSES[t["index"]] for t in r["top"]]


def test_top_k_is_sorted_by_probability_and_cut_at_k(images):
    model = make_model()
    full = predict(model, images["jpeg"], top_k=None)[0]["top"]
    probs = [t["prob"] for t in full]
    assert probs == sorted(probs, reverse=True) and probs[0] > probs[-1]
    assert abs(sum(probs) - 1) < 1e-6 and sorted(t["index"] for t in full) == [0, 1, 2]
    assert predict(model, images["jpeg"], top_k=2)[0]["top"] == full[:2]
    assert predict(model, images["jpeg"])[0]["top"] == full  # the default 5 of 3 classes: all 3


def test_a_folder_is_searched_recursively_in_sorted_order_and_batched(tmp_path, images):
    (tmp_path / "images" / ".hidden.png").write_bytes(b"skipped: hidden")
    (tmp_path / "images" / "notes.txt").write_text("skipped: not an image")
    model = make_model()
    seen = []
    one = predict(model, tmp_path / "images", top_k=3, batch_size=1, progress=lambda d, t: seen.append((d, t)))
    assert [r["path"] for r in one] == [str(images[k]) for k in ("gray", "rgba", "palette", "jpeg", "tall")]
    assert seen == [(i, 5) for i in range(1, 6)]
    many = predict(model, tmp_path / "images", top_k=3, batch_size=4)
    for a, b in zip(one, many):  # batching does not change a result
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], rtol=1e-5)


def test_predict_takes_arrays_and_a_weights_path(weights, images):
    img = D.load_image(images["jpeg"])
    from_array = predict(weights, [img, img[:50]], top_k=3)
    from_file = predict(weights, images["jpeg"], top_k=3)
    assert from_array[0]["path"] is None and from_array[0]["top"] == from_file[0]["top"]
    assert from_array[1]["top"] != from_file[0]["top"]  # a different crop, a different answer


def test_predict_errors_are_named(tmp_path, images):
    model = make_model()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(D.DataError, match="bad.jpg"):
        predict(model, [images["gray"], bad])
    skipped = predict(model, [images["gray"], bad, images["rgba"]], errors="skip")
    assert "top" in skipped[0] and "top" in skipped[2] and "bad.jpg" in skipped[1]["error"]
    with pytest.raises(D.DataError, match="missing.png"):
        predict(model, tmp_path / "missing.png")
    with pytest.raises(ValueError, match="top_k=0 must be an int >= 1"):
        predict(model, images["gray"], top_k=0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predict(model, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(40, 50\)"):  # a 2-D array: its shape, not a row's
        predict(model, np.zeros((40, 50), np.uint8))
    for kwargs, match in [(dict(top_k=2.5), "top_k=2.5 must be an int"), (dict(top_k="3"), "top_k='3' must be"),
                          (dict(batch_size=None), "batch_size=None must be an int")]:
        with pytest.raises(ValueError, match=match):
            predict(model, images["gray"], **kwargs)
    with pytest.raises(ValueError, match="model_or_path must be an mbnet classifier .* got NoneType"):
        predict(None, images["gray"])
    with pytest.raises(D.DataError, match="an empty path"):  # not the working directory, searched
        predict(model, "")


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_prints_the_weights_files_class_names(weights, images, capsys):
    assert main([str(weights), str(images["tall"]), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = predict(make_model(), images["tall"], top_k=2)[0]["top"]
    assert lines[0] == str(images["tall"]) and len(lines) == 3
    assert [line.split()[0] for line in lines[1:]] == [t["class"] for t in expected]
    assert lines[1].split()[1] == f"{100 * expected[0]['prob']:.2f}%"


def test_cli_json_is_one_document_with_probabilities_summing_to_one(weights, tmp_path, images, capsys):
    assert main([str(weights), str(tmp_path / "images"), "--json", "--top-k", "3", "--batch-size", "2",
                 "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [r["path"] for r in doc] == [str(images[k]) for k in ("gray", "rgba", "palette", "jpeg", "tall")]
    for r in doc:
        assert abs(sum(t["prob"] for t in r["top"]) - 1) < 1e-6
        assert {t["class"] for t in r["top"]} == set(CLASSES)
    assert "predict: 5/5 images" in err  # the progress bar goes to stderr


def test_cli_uses_the_ema_weights_unless_told_not_to(tmp_path, images, capsys):
    model = make_model()
    ema = optim.EMA(model.state_dict())
    ema.shadow["classifier.bias"][...] = [0, 0, 100]  # the EMA says "cherry" whatever the image
    model.classifier.bias.data[...] = [100, 0, 0]  # the raw weights say "apple"
    checkpoint.save(tmp_path / "last.npz", model, ema=ema.state_dict(), meta={"epoch": 1})
    for flags, name in (([], "cherry"), (["--no-ema"], "apple")):
        assert main([str(tmp_path / "last.npz"), str(images["gray"]), "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == name


def test_cli_goes_on_after_a_bad_image_and_exits_1(weights, tmp_path, images, capsys):
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    assert main([str(weights), str(tmp_path / "images"), "--json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert len(doc) == 6 and sum("top" in r for r in doc) == 5
    assert [r["path"] for r in doc if "error" in r] == [str(bad)]
    assert f"mbnet: {bad}: cannot decode image" in err and "1 of 6 images could not be read" in err
    assert main([str(weights), str(bad)]) == 1  # every image failed: nothing on stdout (it printed "\n")
    out, err = capsys.readouterr()
    assert out == "" and "1 of 1 images could not be read" in err


@pytest.mark.parametrize("argv, message", [
    (["{w}", "{d}/missing.jpg"], "{d}/missing.jpg: no such file or directory"),
    (["{d}/missing.npz", "{img}"], "{d}/missing.npz: no such file"),
    (["{img}", "{img}"], "{img}: corrupt or not an .npz weights file"),
    (["{w}", "{img}", "--top-k", "0"], "--top-k 0: out of range 1..3"),
    (["{w}", "{img}", "--top-k", "4"], "--top-k 4: out of range 1..3"),
    (["{w}", "{img}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["{w}", "{img}", "--threads", "0"], "--threads 0: must be in [1, "),
    (["{w}", "{img}", "--threads", "100000"], "--threads 100000: must be in [1, "),
    (["{w}", "{d}/empty"], "no images in {d}/empty"),
])
def test_cli_user_errors_are_one_line_with_exit_2(weights, tmp_path, images, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    fill = dict(w=weights, d=tmp_path, img=images["gray"])
    assert main([a.format(**fill) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mbnet: " + message.format(**fill)) and err.count("\n") == 1


def test_python_dash_m_runs(weights, images):
    r = subprocess.run([sys.executable, "-m", "mbnet.predict", str(weights), str(images["jpeg"]), "--top-k", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(images["jpeg"]) and r.stdout.split()[1] in CLASSES
