"""Data sets other than CIFAR-10 and the cache: image folders of any size, mode and class count,
CIFAR-100 pickles, the checked memory-mapped cache, the augmentation options, and a training step
plus evaluate through each. Every data set here is written by the tests; nothing is downloaded."""
import hashlib
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from mbnet import data, evaluate, train

MODES = ("RGB", "L", "RGBA", "P")
SIZES = ((40, 40), (17, 23))  # (width, height) as Pillow has them


def _save(path, rgb, mode):
    im = Image.fromarray(rgb)
    if mode == "P":
        im = im.quantize(8)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)


def _class_image(rng, k, size):
    """A class's colour with noise, so that a step of training has something to learn."""
    w, h = size
    base = np.array([40 + 17 * k % 180, 200 - 13 * k % 160, 90 + 29 * k % 150])
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def write_folder(root, classes, n_train, n_test, test_split="test", seed=0):
    """root/train/<class>/ and root/<test_split>/<class>/ with PNG and JPEG files of SIZES in MODES."""
    rng = np.random.default_rng(seed)
    splits = (("train", n_train),) + (((test_split, n_test),) if test_split else ())
    for split, n in splits:
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                mode = MODES[(i + k) % len(MODES)]
                ext = "jpg" if mode in ("RGB", "L") and i % 2 else "png"
                _save(d / f"{i:03d}.{ext}", _class_image(rng, k, SIZES[(i + k) % 2]), mode)
    return root


TWELVE = [f"{k:02d}-{name}" for k, name in enumerate(
    "apple bee cloud daisy eagle fern grape hawk iris jay kelp lynx".split())]
THREE = ["cats", "dogs", "frogs"]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("twelve"), TWELVE, 6, 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Only train/: the test split comes from --val-split."""
    return write_folder(tmp_path_factory.mktemp("three"), THREE, 12, 0, test_split=None)


FINE = [f"fine{k:02d}" for k in range(100)]
COARSE = [f"coarse{k:02d}" for k in range(20)]


def write_cifar100(root, n_train=64, n_test=40, seed=0, bad_label=None):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in FINE],
                     b"coarse_label_names": [c.encode() for c in COARSE]}, f)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        if bad_label is not None and name == "test":
            fine[3] = bad_label
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                         b"filenames": [b"x.png"] * n}, f)
    return d


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("c100"))


# ----------------------------------------------------------------------------------------------
# One image


def test_load_image_converts_every_mode_to_rgb(tmp_path, rng):
    rgb = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    for mode in MODES:
        _save(tmp_path / f"{mode}.png", rgb, mode)
        img = data.load_image(tmp_path / f"{mode}.png")
        assert img.shape == (23, 17, 3) and img.dtype == np.uint8, mode
    np.testing.assert_array_equal(data.load_image(tmp_path / "RGBA.png"), rgb)  # alpha dropped
    gray = data.load_image(tmp_path / "L.png")
    assert (gray == gray[..., :1]).all()
    np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert len(np.unique(data.load_image(tmp_path / "P.png").reshape(-1, 3), axis=0)) <= 8

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(data.DataError, match="bad.png"):
        data.load_image(tmp_path / "bad.png")
    with pytest.raises(data.DataError, match="missing.jpg"):
        data.load_image(tmp_path / "missing.jpg")


def test_fit_image_resizes_the_shorter_side_and_crops_the_center():
    # 20 rows x 40 columns: the middle half of the columns is 200, the outer quarters 0 and 100
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200
    img[:, 30:] = 100
    out = data.fit_image(img, 10)  # 20x40 -> 10x20 -> the center 10x10 = the middle half
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:, 1:-1] == 200).all()
    tall = data.fit_image(np.ascontiguousarray(img.transpose(1, 0, 2)), 10)
    np.testing.assert_array_equal(tall, out.transpose(1, 0, 2))
    assert data.fit_image(img[:8, :8], 32).shape == (32, 32, 3)  # upscaled
    sq = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    np.testing.assert_array_equal(data.fit_image(sq, 16), sq)
    with pytest.raises(ValueError, match="uint8"):
        data.fit_image(img.astype(np.float32), 10)


def test_fit_image_of_a_long_strip_resizes_only_the_center(rng):
    """An image over 64 times longer than wide resizes only the box under the center crop: the
    same pixels as resizing it whole (within one level), without the whole resized strip in memory
    (a 1 x 300,000 PNG of 1 KB took 1.7 GB)."""
    from PIL import Image

    strip = rng.integers(0, 256, (2000, 20, 3)).astype(np.uint8)  # -> 16 x 1600, then the center 16 x 16
    whole = np.asarray(Image.fromarray(strip).resize((16, 1600), Image.BILINEAR))[792:808]
    got = data.fit_image(strip, 16)
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - whole).max() <= 1
    line = np.zeros((300000, 1, 3), np.uint8)
    line[150000:] = 255  # the lower half white: the center crop straddles the edge
    out = data.fit_image(line, 32)
    rows = out[:, 0, 0].astype(int)  # the edge, blended by the 32x upscaling along the strip
    assert out.shape == (32, 32, 3) and rows[0] < 64 and rows[-1] > 191 and (np.diff(rows) >= 0).all()


# ----------------------------------------------------------------------------------------------
# Image folders


def test_folder_of_any_size_and_mode(twelve):
    d = data.load_data(twelve, resolution=24)
    assert d["kind"] == "folder" and d["classes"] == TWELVE and d["test_split"] == "test"
    assert isinstance(d["train_x"], np.memmap) and d["train_x"].shape == (72, 24, 24, 3)
    assert d["test_x"].dtype == np.uint8 and d["test_x"].shape == (24, 24, 24, 3)
    np.testing.assert_array_equal(d["train_y"], np.repeat(np.arange(12), 6))
    np.testing.assert_array_equal(d["test_y"], np.repeat(np.arange(12), 2))
    # each cached image is exactly what predict will compute from its file
    for k, i in ((0, 0), (5, 3), (11, 5)):
        path = next(p for p in sorted((twelve / "train" / TWELVE[k]).iterdir()) if p.stem == f"{i:03d}")
        np.testing.assert_array_equal(d["train_x"][6 * k + i], data.fit_image(data.load_image(path), 24))
    # the class colours survive decoding, resizing and mode conversion
    means = d["train_x"].reshape(12, -1, 3).mean(1)
    assert np.abs(means[:, None] - means[None]).sum(-1)[~np.eye(12, dtype=bool)].min() > 10


def test_val_split_is_stratified_and_fixed(three):
    with pytest.raises(data.DataError, match="--val-split"):
        data.load_data(three)
    a = data.load_data(three, val_split=0.25)
    b = data.load_data(three, val_split=0.25, cache_dir=three / "other-cache")
    assert a["test_split"] == "0.25 of train" and a["cache"] != b["cache"]
    np.testing.assert_array_equal(a["test_y"], np.repeat(np.arange(3), 3))  # round(0.25 * 12) per class
    np.testing.assert_array_equal(a["train_y"], np.repeat(np.arange(3), 9))
    np.testing.assert_array_equal(a["test_x"], b["test_x"])
    # at least one image of a class stays in training
    held = data._carve(np.array([0, 0, 1]), 0.9)
    assert held[:2].sum() == 1 and not held[2]
    every = data.load_data(three, val_split=0.5)
    rows = lambda x: {r.tobytes() for r in np.asarray(x)}  # noqa: E731
    assert not rows(a["train_x"]) & rows(a["test_x"])
    assert rows(a["train_x"]) | rows(a["test_x"]) == rows(every["train_x"]) | rows(every["test_x"])


def test_val_folder_and_errors_name_the_folders(tmp_path):
    root = write_folder(tmp_path / "v", THREE, 2, 1, test_split="val")
    (root / "train" / "cats" / "notes.txt").write_text("not an image")  # other files are ignored
    (root / "train" / "cats" / ".hidden.png").write_bytes(b"")
    d = data.load_data(root)
    assert d["test_split"] == "val" and len(d["train_y"]) == 6 and len(d["test_y"]) == 3
    write_folder(tmp_path / "t", THREE, 0, 2)
    shutil.copytree(tmp_path / "t" / "test", root / "test")
    assert data.load_data(root)["test_split"] == "test"  # test/ wins over val/
    shutil.rmtree(root / "test")

    shutil.rmtree(root / "val" / "dogs")
    with pytest.raises(data.DataError, match=r"val: .*missing dogs"):
        data.load_data(root)
    (root / "val" / "dogs").mkdir()
    (root / "val" / "eels").mkdir()
    with pytest.raises(data.DataError, match=r"val: .*extra eels"):
        data.load_data(root)
    shutil.rmtree(root / "val" / "eels")

    bad = root / "train" / "frogs" / "001.png"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(data.DataError, match="frogs/001.png"):
        data.load_data(root)
    for f in (root / "train" / "frogs").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="frogs: no"):
        data.load_data(root)

    with pytest.raises(data.DataError, match="--data-dir is empty"):  # it meant the default: a download
        data.load_data("")
    one = write_folder(tmp_path / "one", ["cats"], 2, 1)  # it trained to a meaningless 100%
    with pytest.raises(data.DataError, match=r"one class folder \(cats\); a classifier needs two or more"):
        data.load_data(one)


# ----------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar100_pickles(cifar100, tmp_path):
    d = data.load_data(cifar100.parent, resolution=16)
    assert d["kind"] == "cifar100" and d["classes"] == FINE and d["coarse_classes"] == COARSE
    assert d["train_x"].shape == (64, 16, 16, 3) and d["test_x"].shape == (40, 16, 16, 3)
    with open(cifar100 / "test", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    fine = np.array(raw[b"fine_labels"])
    order = np.argsort(fine, kind="stable")
    np.testing.assert_array_equal(d["test_y"], fine[order])
    np.testing.assert_array_equal(d["test_coarse_y"], fine[order] // 5)
    x32 = data.load_data(cifar100, resolution=32)["test_x"]  # the pickle dir itself, at 32: unchanged
    np.testing.assert_array_equal(x32, raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[order])

    with pytest.raises(data.DataError, match="--dataset cifar10: .* holds neither cifar-10-batches-py/"):
        data.load_data(cifar100, dataset="cifar10", download=False)
    bad = write_cifar100(tmp_path / "bad", bad_label=100)
    with pytest.raises(data.DataError, match=r"cifar-100-python/test: fine_labels 100 outside the 100 classes"):
        data.load_data(bad)


def test_val_split_on_data_with_a_test_split_holds_out_of_train_and_never_reads_the_test_split(cifar100, tmp_path):
    """--val-split on a data set that has its own test split (CIFAR pickles, a folder with val/): the
    evaluation split is the fixed fraction of each class of train that _carve holds out, taken out
    of train, every label array alike; the test split's images appear nowhere."""
    whole = data.load_data(cifar100.parent, resolution=16)
    d = data.load_data(cifar100.parent, resolution=16, val_split=0.25)
    assert d["test_split"] == "0.25 of train (the test split is not read)" and d["cache"] == whole["cache"]
    held = data._carve(whole["train_y"], 0.25)
    assert 0 < held.sum() < len(held)
    for part in ("x", "y", "coarse_y"):
        np.testing.assert_array_equal(d[f"test_{part}"], whole[f"train_{part}"][held], err_msg=part)
        np.testing.assert_array_equal(d[f"train_{part}"], whole[f"train_{part}"][~held], err_msg=part)
    rows = lambda x: {r.tobytes() for r in np.asarray(x)}  # noqa: E731
    assert not (rows(d["train_x"]) | rows(d["test_x"])) & rows(whole["test_x"])
    # both parts are rows of the memory-mapped cache, not copies in memory; a subset of them too
    for part in ("train_x", "test_x"):
        assert isinstance(d[part], data.Rows) and isinstance(d[part].base, np.memmap), part
    sub = data.take_rows(d["train_x"], [4, 0, 2])
    assert sub.base is d["train_x"].base and sub.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(sub[1:], whole["train_x"][~held][[0, 2]])

    root = write_folder(tmp_path / "v", THREE, 4, 2, test_split="val")
    f = data.load_data(root, val_split=0.25)
    assert f["test_split"] == "0.25 of train (the val split is not read)"
    np.testing.assert_array_equal(f["test_y"], np.arange(3))  # round(0.25 * 4) of each class
    assert len(f["train_y"]) == 9 and not rows(f["test_x"]) & rows(data.load_data(root)["test_x"])


def test_cifar100_download_is_md5_checked(cifar100, tmp_path, cache, monkeypatch):
    archive = tmp_path / "c100.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(cifar100, arcname="cifar-100-python")
    fetched = []

    def fake_download(url, dest):
        fetched.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(data, "_download", fake_download)
    with pytest.raises(data.DataError, match="cifar-100-python.tar.gz: MD5"):
        data.load_data(dataset="cifar100")
    (cache / "cifar-100-python.tar.gz").unlink()
    monkeypatch.setitem(data.PICKLES["cifar100"], "md5", hashlib.md5(archive.read_bytes()).hexdigest())
    d = data.load_data(dataset="cifar100")
    assert fetched == [data.CIFAR100_URL] * 2 and d["classes"] == FINE and len(d["train_y"]) == 64


# ----------------------------------------------------------------------------------------------
# The cache


def _cache_dir(d):
    from pathlib import Path

    return Path(d["cache"])


def test_damaged_cache_is_rebuilt_never_used(twelve, cache, capsys):
    first = data.load_data(twelve, resolution=16)
    train_x = np.array(first["train_x"])
    c = _cache_dir(first)
    raw = (c / "train_x.npy").read_bytes()

    def damage_and_reload(what):
        data.load_data(twelve, resolution=16)
        assert "rebuilding" not in capsys.readouterr().err  # intact: used as it is
        what()
        again = data.load_data(twelve, resolution=16)
        assert "damaged" in capsys.readouterr().err
        np.testing.assert_array_equal(again["train_x"], train_x)
        assert (c / "train_x.npy").read_bytes() == raw

    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 1  # one bit of one pixel
    damage_and_reload(lambda: (c / "train_x.npy").write_bytes(flipped))
    damage_and_reload(lambda: (c / "train_x.npy").write_bytes(raw[:-100]))
    damage_and_reload(lambda: (c / "test_y.npy").unlink())
    damage_and_reload(lambda: (c / "meta.json").write_text("{"))
    assert [p.name for p in cache.iterdir()] == [c.name]  # no temporary directories left


def test_cache_key_follows_content_and_resolution_not_location(twelve, tmp_path, cache, monkeypatch):
    a = data.load_data(twelve, resolution=16)
    b = data.load_data(twelve, resolution=20)
    assert a["cache"] != b["cache"] and b["train_x"].shape[1:3] == (20, 20)
    moved = tmp_path / "moved"
    shutil.copytree(twelve, moved)  # copy2 keeps sizes and modification times

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "fit_all", no_decoding)
    assert data.load_data(moved, resolution=16)["cache"] == a["cache"]
    meta = json.loads((_cache_dir(a) / "meta.json").read_text())
    assert meta["resolution"] == 16 and meta["classes"] == TWELVE
    touched = moved / "train" / TWELVE[3] / "002.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1000))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_data(moved, resolution=16)


def test_digest_catches_any_changed_byte(tmp_path):
    p = tmp_path / "big"
    raw = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    p.write_bytes(raw)
    d0 = data.file_digest(p)
    for k in (0, len(raw) // 2 + 12345, len(raw) - 1):  # first, middle (between 1 MiB reads), last
        raw[k] ^= 1
        p.write_bytes(raw)
        assert data.file_digest(p) != d0, k
        raw[k] ^= 1
    p.write_bytes(raw[:-1])
    assert data.file_digest(p) != d0


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_cutout_zeroes_one_square_of_the_given_side(rng):
    x = rng.uniform(0.5, 1.0, (16, 12, 12, 3)).astype(np.float32)
    out = data.cutout_batch(x.copy(), seed=1, epoch=2, batch=3, side=5)
    assert out.shape == x.shape and out.dtype == np.float32
    for i in range(16):
        zero = (out[i] == 0).all(-1)
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        assert zero.sum() == 25 and len(rows) == 5 and len(cols) == 5, i
        assert rows[-1] - rows[0] == 4 and cols[-1] - cols[0] == 4
        np.testing.assert_array_equal(out[i][~zero], x[i][~zero])
    np.testing.assert_array_equal(data.cutout_batch(x.copy(), 1, 2, 3, 5), out)
    assert not np.array_equal(data.cutout_batch(x.copy(), 1, 2, 4, 5), out)
    np.testing.assert_array_equal(data.cutout_batch(x.copy(), 1, 2, 3, 0), x)


def test_trivial_augment_batch_shape_dtype_determinism_and_draws(rng):
    x = rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    before = x.copy()
    out = data.trivial_augment_batch(x, seed=1, epoch=2, batch=3)
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(data.trivial_augment_batch(x, 1, 2, 3), out)
    for other in ((2, 2, 3), (1, 3, 3), (1, 2, 4)):  # another seed, epoch, step: other draws
        assert not np.array_equal(data.trivial_augment_batch(x, *other), out)
    ops, levels, signs = data.trivial_draw(1, 2, 3, 64)
    for i in range(64):  # each image went through its own drawn operation, nothing else
        op = data.TRIVIAL_OPS[ops[i]]
        m = data.trivial_magnitude(op, int(levels[i]), 12, int(signs[i]))
        np.testing.assert_array_equal(out[i], data.trivial_op(x[i], op, m), err_msg=op)
    np.testing.assert_array_equal(x, before)  # the input is left as it was
    ops, levels, signs = data.trivial_draw(0, 0, 0, 14000)  # uniform over operations, levels and signs
    assert np.bincount(ops, minlength=14).min() > 850 and np.bincount(levels, minlength=31).min() > 350
    assert set(np.unique(signs)) == {-1, 1} and 0.45 < (signs > 0).mean() < 0.55
    part = data.trivial_augment_batch(x[10:20], 1, 2, 3, rows=(10, 64))  # an MPI shard: the whole batch's draws
    np.testing.assert_array_equal(part, out[10:20])


def test_trivial_ops_do_what_they_are_named_for(rng):
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    op, mag = data.trivial_op, data.trivial_magnitude
    for name in data.TRIVIAL_OPS:  # level 0 leaves the image (solarize's threshold 255 flips only 255s)
        m = mag(name, 0, 8)
        if name not in ("autocontrast", "equalize", "solarize"):
            np.testing.assert_array_equal(op(img, name, m), img, err_msg=name)
    shifted = op(img, "translate_x", 3.0)  # content moves 3 px left, black comes in on the right
    np.testing.assert_array_equal(shifted[:, :5], img[:, 3:])
    assert (shifted[:, 5:] == 0).all()
    down = op(img, "translate_y", -2.0)
    np.testing.assert_array_equal(down[2:], img[:-2])
    assert (down[:2] == 0).all()
    assert mag("translate_x", 30, 32) == 32 and mag("rotate", 30, 32) == 135 and mag("shear_x", 30, 32) == 0.99
    assert mag("rotate", 30, 32, -1) == -135 and mag("posterize", 30, 32, -1) == 2  # posterize has no direction
    for bits in (2, 5):
        assert (op(img, "posterize", bits) & ((1 << (8 - bits)) - 1) == 0).all()
    np.testing.assert_array_equal(op(img, "solarize", 128.0), np.where(img >= 128, 255 - img, img))
    flat = np.full((8, 8, 3), 77, np.uint8)
    for name in ("brightness", "color", "contrast", "sharpness"):  # stronger factor, further from the image
        near = np.abs(op(img, name, mag(name, 3, 8)).astype(int) - img).sum()
        far = np.abs(op(img, name, mag(name, 30, 8)).astype(int) - img).sum()
        assert 0 < near < far, name
    assert (op(flat, "brightness", -0.99) < 77).all() and (op(flat, "brightness", 0.99) > 77).all()
    rot = op(img, "rotate", 90.0)  # a quarter turn of a square image about its centre: exact
    np.testing.assert_array_equal(rot, np.rot90(img))
    with pytest.raises(ValueError, match="unknown operation 'blur'"):
        op(img, "blur", 1.0)


def test_resized_crop_boxes_and_geometry(rng):
    top, left, h, w = data.resized_crop_boxes(4000, 32, 0.25, np.random.default_rng(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32 ** 2
    assert area.min() >= 0.2 and area.max() <= 1 and np.quantile(area, 0.9) > 0.7
    ratio = w / h
    inside = (h < 32) & (w < 32)  # unclipped boxes keep the ratio up to rounding
    assert ratio[inside].min() > 0.7 and ratio[inside].max() < 1.45

    x = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    full = np.full(3, 8)
    zero = np.zeros(3, int)
    np.testing.assert_array_equal(data.resized_crop(x, zero, zero, full, full, np.zeros(3, bool)), x)
    np.testing.assert_array_equal(data.resized_crop(x, zero, zero, full, full, np.ones(3, bool)), x[:, :, ::-1])
    # the bottom-left quarter (200 inside, 0 around it) fills the output, up to the bilinear border
    q = np.zeros((3, 8, 8, 3), np.uint8)
    q[:, 4:, :4] = 200
    quarter = data.resized_crop(q, zero + 4, zero, full // 2, full // 2, np.zeros(3, bool))
    assert (quarter[:, 1:, :-1] == 200).all() and quarter.shape == q.shape


def test_augmentation_options_are_deterministic_per_batch(rng):
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    kw = dict(train=True, seed=7, pad=2, resized_crop_area=0.3, cutout=4, trivial=True)
    a = data.Loader(x, y, 8, np.full(3, 0.5), np.full(3, 0.25), **kw)
    b = data.Loader(x, y, 8, np.full(3, 0.5), np.full(3, 0.25), **kw)
    got = list(a.epoch(1))
    for (i, xa, ya), (j, xb, yb) in zip(got[2:], b.epoch(1, start=2)):  # a resumed epoch
        assert i == j
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    xa, ya = a.batch(1, 3)
    np.testing.assert_array_equal(xa, got[3][1])
    assert xa.shape == (8, 16, 16, 3) and xa.dtype == np.float32
    assert ((xa == 0).all(-1).sum((1, 2)) >= 16).all()  # the cutout square (mean colour = 0)
    assert not np.array_equal(a.batch(2, 3)[0], xa)


def test_crop_padding_scales_with_the_resolution():
    cfg = train.make_config(train.build_parser().parse_args(["--resolution", "224", "--cutout", "0.25"]))
    assert train.augmentation(cfg) == {"pad": 28, "resized_crop_area": None, "cutout": 56, "hflip": True,
                                       "trivial": False, "mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0,
                                       "mix_epochs": None}
    cfg = train.make_config(train.build_parser().parse_args(["--crop-padding", "0.25", "--random-resized-crop", "0.5",
                                                             "--no-hflip", "--mixup", "0.2", "--cutmix", "1",
                                                             "--mix-prob", "0.5", "--mix-until", "0.8",
                                                             "--trivial-augment"]))
    assert train.augmentation(cfg) == {"pad": 8, "resized_crop_area": 0.5, "cutout": 0, "hflip": False,
                                       "trivial": True, "mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.5, "mix_epochs": 40}
    assert train.augmentation({"resolution": 64})["pad"] == 4  # a run saved before the option existed


@pytest.mark.parametrize("argv", [["--val-split", "1"], ["--val-split", "0"], ["--cutout", "-0.1"],
                                  ["--random-resized-crop", "0"], ["--crop-padding", "nan"]])
def test_bad_data_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_loader_is_a_plain_iterable(rng):
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    ld = data.Loader(x, np.arange(50) % 5, 16, np.full(3, 0.5), np.full(3, 0.25), train=True, seed=1)
    first = [(bx, by) for bx, by in ld]
    second = list(ld)
    assert len(first) == len(second) == 3
    for (bx, by), (_, ex, ey) in zip(first, ld.epoch(0)):
        np.testing.assert_array_equal(bx, ex)
        np.testing.assert_array_equal(by, ey)
    np.testing.assert_array_equal(second[0][0], ld.batch(1, 0)[0])


# ----------------------------------------------------------------------------------------------
# Training and evaluation through train.main / evaluate.main

SMALL = ["--threads", "1", "--alpha", "0.25", "--batch-size", "8", "--epochs", "1", "--warmup", "0", "--no-tta",
         "--ema-decay", "0.5"]


def _train(tmp_path, root, *extra):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--data-dir", str(root), "--out", str(out), *extra]) == 0
    return out, json.loads((out / "config.json").read_text())


def _evaluate(out, root, capsys):
    capsys.readouterr()
    assert evaluate.main([str(out / "last.npz"), "--data-dir", str(root), "--threads", "1"]) == 0
    return capsys.readouterr().out


def test_twelve_class_folder_trains_and_evaluates(twelve, tmp_path, capsys):
    out, cfg = _train(tmp_path, twelve, "--resolution", "24", "--limit-train", "24", "--cutout", "0.25",
                      "--random-resized-crop", "0.5")
    assert cfg["dataset"] == "folder" and cfg["classes"] == TWELVE and cfg["num_classes"] == 12
    assert cfg["cutout"] == 0.25 and cfg["random_resized_crop"] == 0.5 and cfg["crop_padding"] == 0.125
    with np.load(out / "last.npz") as z:
        assert z["model/classifier.weight"].shape[1] == 12 and z["model/classifier.bias"].shape == (12,)
    text = _evaluate(out, twelve, capsys)
    assert "test accuracy" in text and "(24)" not in text
    for name in TWELVE:
        assert f"  {name} " in text
    assert "airplane" not in text
    lines = text.splitlines()
    header = lines[lines.index("confusion matrix (rows: true class, columns: predicted class, by index):") + 1]
    assert header.split() == [str(k) for k in range(12)]
    assert [line.split()[:2] for line in lines[-12:]] == [[str(k), name] for k, name in enumerate(TWELVE)]
    assert sum(int(v) for line in lines[-12:] for v in line.split()[2:]) == 24


def test_three_class_val_split_trains_and_evaluates(three, tmp_path, capsys):
    out, cfg = _train(tmp_path, three, "--resolution", "16", "--val-split", "0.25")
    assert cfg["classes"] == THREE and cfg["val_split"] == 0.25
    text = _evaluate(out, three, capsys)
    assert "(9)" not in text and "held-out accuracy: " in text and "test accuracy" not in text and "/9)" in text
    for name in THREE:
        assert f"  {name} " in text

    # the weights belong to 3 classes: evaluating them on a 4-class folder is refused with a message
    other = write_folder(tmp_path / "other", ["ants", "bees", "cats", "dogs"], 4, 0, test_split=None)
    assert evaluate.main([str(out / "last.npz"), "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "classes" in err


def test_init_on_an_image_folder_keeps_or_remakes_the_classifier(three, twelve, tmp_path, capsys):
    """--init onto a folder's classes: the weights of a run on the same folder keep their
    classifier, those of another folder's get a new one (it used to refuse both: the run took
    CIFAR-10's classes for its own)."""
    out, _ = _train(tmp_path, three, "--resolution", "16", "--val-split", "0.25")
    capsys.readouterr()
    again = tmp_path / "again"
    assert train.main(SMALL[:2] + SMALL[4:] + ["--resolution", "16", "--data-dir", str(three), "--out", str(again),
                                               "--init", str(out / "last.npz"), "--val-split", "0.25"]) == 0
    assert "classifier kept" in capsys.readouterr().err
    assert json.loads((again / "config.json").read_text())["classes"] == THREE
    other = tmp_path / "other"
    assert train.main(SMALL[:2] + SMALL[4:] + ["--resolution", "16", "--data-dir", str(twelve), "--out", str(other),
                                               "--init", str(out / "last.npz"), "--limit-train", "24"]) == 0
    assert "classifier re-made for 12 classes (the weights have 3)" in capsys.readouterr().err
    cfg = json.loads((other / "config.json").read_text())
    assert cfg["classes"] == TWELVE and cfg["mean"] == json.loads((out / "config.json").read_text())["mean"]


def test_a_channel_that_never_varies_normalizes_to_zero():
    """Images without red: the channel's std is 0, and dividing by it made every input NaN (the
    run then stopped blaming the learning rate); its std is taken as 1."""
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    x[..., 0] = 0
    mean, std = data.channel_stats(x)
    assert mean[0] == 0 and std[0] == 1 and 0 < std[1] < 1 and 0 < std[2] < 1
    z = data.normalize(x, mean, std)
    assert np.isfinite(z).all() and (z[..., 0] == 0).all()


def test_cifar100_trains_and_evaluates(cifar100, tmp_path, capsys):
    out, cfg = _train(tmp_path, cifar100.parent, "--resolution", "16", "--limit-train", "16")
    assert cfg["dataset"] == "cifar100" and cfg["num_classes"] == 100 and cfg["classes"][:2] == FINE[:2]
    text = _evaluate(out, cifar100.parent, capsys)
    assert "fine99" in text and "largest confusions" in text and "->" in text


def test_cifar100_val_split_trains_and_evaluates_on_the_held_out_part(cifar100, tmp_path, capsys):
    out, cfg = _train(tmp_path, cifar100.parent, "--resolution", "16", "--val-split", "0.25")
    assert cfg["val_split"] == 0.25
    held = int(data._carve(data.load_data(cifar100.parent, resolution=16)["train_y"], 0.25).sum())
    text = _evaluate(out, cifar100.parent, capsys)  # evaluate reads the run's --val-split: the same images
    assert f"/{held})" in text and f"/40)" not in text  # the held-out part, not the 40 test images
    assert "held-out accuracy: " in text


def test_data_errors_are_one_line_messages(tmp_path, capsys):
    root = write_folder(tmp_path / "f", THREE, 1, 1)
    shutil.rmtree(root / "test" / "cats")
    assert train.main(SMALL + ["--data-dir", str(root), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing cats" in err and str(root / "test") in err and "Traceback" not in err
    (root / "test" / "cats").mkdir()
    (root / "train" / "dogs" / "000.png").write_bytes(b"not a png")
    assert train.main(SMALL + ["--data-dir", str(root), "--out", str(tmp_path / "r")]) == 2
    assert "dogs/000.png" in capsys.readouterr().err


def test_digits_tool_writes_a_fixed_folder_tree(tmp_path):
    pytest.importorskip("sklearn", reason="tools/make_digits_folder.py needs scikit-learn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "make_digits_folder.py"
    spec = importlib.util.spec_from_file_location("make_digits_folder", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.write_digits(tmp_path / "a") == {"train": 1438, "test": 359}
    # the first test images of digit 0 for seed 0 (a fixed split: a change here changes the README figure)
    assert sorted(p.name for p in (tmp_path / "a" / "test" / "0").iterdir())[:3] == ["0048.png", "0079.png", "0335.png"]
    d = data.load_data(tmp_path / "a", resolution=8)
    assert d["classes"] == [str(k) for k in range(10)] and len(d["test_y"]) == 359
    assert np.bincount(d["test_y"]).min() >= 35 and (d["train_x"][..., 0] == d["train_x"][..., 2]).all()  # grayscale


def test_resume_with_every_augmentation_option_is_bit_identical(twelve, tmp_path):
    import signal

    opts = ["--resolution", "16", "--limit-train", "40", "--cutout", "0.3", "--random-resized-crop", "0.4",
            "--dropout", "0.1", "--trivial-augment"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(SMALL + ["--data-dir", str(twelve), "--out", str(a), *opts]) == 0

    def interrupt(step):
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    assert train.main(SMALL + ["--data-dir", str(twelve), "--out", str(b), *opts], on_step=interrupt) == 130
    assert train.main(["--data-dir", str(twelve), "--out", str(b), "--resume", "--threads", "1"]) == 0
    with np.load(a / "last.npz") as za, np.load(b / "last.npz") as zb:
        assert set(za.files) == set(zb.files)
        for k in za.files:
            if k != "meta":
                np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
