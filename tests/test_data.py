"""CIFAR-10 loading (both formats), the download, error messages, augmentation and batch determinism.
(Other data sets, the cache checks and training through them: test_datasets.py.)

Everything runs on tiny archives the tests write themselves; nothing is downloaded.
"""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from mbnet import data


def _official_like(rng, n_per_batch):
    """Random images/labels laid out like the official release: 5 train batches + 1 test batch."""
    batches = {}
    for name in data.TRAIN_BATCHES + (data.TEST_BATCH,):
        labels = rng.integers(0, 10, n_per_batch)
        labels[:10] = np.arange(10)  # every class present
        rng.shuffle(labels)
        images = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        batches[name] = (images, labels)
    return batches


def _write_pickles(root, batches):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, (images, labels) in batches.items():
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel-major rows
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [int(v) for v in labels], b"batch_label": name.encode()}, f)
    return d


def _write_folder(root, batches, ext="png"):
    """Numbers each class's files in official order, as the shared JPEG mirror does."""
    for split, names in (("train", data.TRAIN_BATCHES), ("test", (data.TEST_BATCH,))):
        images = np.concatenate([batches[n][0] for n in names])
        labels = np.concatenate([batches[n][1] for n in names])
        count = [0] * 10
        for im, y in zip(images, labels):
            d = root / split / data.CLASSES[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{count[y]:04d}.{ext}")
            count[y] += 1
    return root


@pytest.fixture
def batches(rng):
    return _official_like(rng, 24)


def _expected(batches, names):
    images = np.concatenate([batches[n][0] for n in names])
    labels = np.concatenate([batches[n][1] for n in names])
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def test_pickles_and_folder_give_the_same_arrays(tmp_path, batches, cache):
    _write_pickles(tmp_path / "pk", batches)
    _write_folder(tmp_path / "img", batches)
    a = data.load_data(tmp_path / "pk")
    b = data.load_data(tmp_path / "img")
    for split, names in (("train", data.TRAIN_BATCHES), ("test", (data.TEST_BATCH,))):
        x, y = _expected(batches, names)
        for d in (a, b):
            assert d[split + "_x"].dtype == np.uint8 and d[split + "_x"].shape == (len(y), 32, 32, 3)
            assert d[split + "_y"].dtype == np.int64
            np.testing.assert_array_equal(d[split + "_x"], x)
            np.testing.assert_array_equal(d[split + "_y"], y)


def test_pickle_dir_itself_and_env_var(tmp_path, batches, cache, monkeypatch):
    d = _write_pickles(tmp_path, batches)
    monkeypatch.setenv("MBNET_DATA", str(d))
    out = data.load_data()
    np.testing.assert_array_equal(out["test_y"], _expected(batches, (data.TEST_BATCH,))[1])


def test_jpeg_folder_decodes_close_to_the_source(tmp_path, batches, cache):
    smooth = {k: (np.repeat(np.repeat(x[:, ::4, ::4], 4, 1), 4, 2), y) for k, (x, y) in batches.items()}
    _write_folder(tmp_path / "jpg", smooth, ext="jpg")
    out = data.load_data(tmp_path / "jpg")
    x, _ = _expected(smooth, (data.TEST_BATCH,))
    assert np.abs(out["test_x"].astype(int) - x).mean() < 20


def test_cache_is_reused_then_invalidated(tmp_path, batches, cache, monkeypatch):
    root = _write_folder(tmp_path / "img", batches)
    first = data.load_data(root)
    assert len(list(cache.glob("folder-32px-*"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "fit_all", no_decoding)
    second = data.load_data(root)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(first[k], second[k])

    # a new file changes the source: the cache must be rebuilt
    Image.fromarray(batches["test_batch"][0][0]).save(root / "test" / "cat" / "9999.png")
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_data(root)
    monkeypatch.undo()
    monkeypatch.setenv("MBNET_CACHE", str(cache))
    third = data.load_data(root)
    assert len(third["test_y"]) == len(first["test_y"]) + 1


class _Sets:
    """Unpickling calls os.system(...) to rebuild one of these: a pickle can run any code."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _rewrite(pk, name, change):
    with open(pk / name, "rb") as f:
        d = pickle.load(f)
    change(d)
    with open(pk / name, "wb") as f:
        pickle.dump(d, f)


@pytest.mark.parametrize("change, match", [
    (lambda d, flag: d.update({b"batch_label": _Sets(flag)}), "names posix.system, which no data set holds"),
    (lambda d, flag: d.update({b"data": d[b"data"] / 255.0}), "integer pixels 0..255, got float64"),
    (lambda d, flag: d.update({b"data": d[b"data"].astype(np.int64) + 100}), "integer pixels 0..255, got int64 from"),
    (lambda d, flag: d.update({b"labels": [v + 0.7 for v in d[b"labels"]]}), "b'labels' must hold integer labels"),
])
def test_pickles_hold_only_data(tmp_path, batches, cache, change, match):
    """A CIFAR pickle is unpickled with only arrays, lists, dicts and bytes allowed (a plain
    pickle.load ran the os.system of a crafted file), and its pixels and labels must be integers
    in range (a cast wrapped 300 to 44, truncated labels and made floats in [0, 1] black images)."""
    pk = _write_pickles(tmp_path / "pk", batches)
    flag = tmp_path / "ran"
    _rewrite(pk, "data_batch_2", lambda d: change(d, flag))
    with pytest.raises(data.DataError, match="data_batch_2: corrupt .*" + match):
        data.load_data(tmp_path / "pk")
    assert not flag.exists()


def test_an_empty_split_is_refused(tmp_path, batches, cache):
    pk = _write_pickles(tmp_path / "pk", batches)
    _rewrite(pk, data.TEST_BATCH, lambda d: d.update({b"data": d[b"data"][:0], b"labels": []}))
    with pytest.raises(data.DataError, match="no images in its test split"):  # it reported 0/0 = nan%
        data.load_data(tmp_path / "pk")


def test_corrupt_files_are_named(tmp_path, batches, cache):
    pk = _write_pickles(tmp_path / "pk", batches)
    raw = (pk / "data_batch_3").read_bytes()
    (pk / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_data(tmp_path / "pk")

    img = _write_folder(tmp_path / "img", batches)
    bad = img / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(data.DataError, match="dog/0001.png"):
        data.load_data(img)


def test_corrupt_file_named_through_the_process_pool(tmp_path, rng):
    paths = []
    for i in range(2100):
        p = tmp_path / f"{i:04d}.png"
        Image.fromarray(np.full((32, 32, 3), i % 256, np.uint8)).save(p)
        paths.append(str(p))
    out = data.decode_images(paths, 32, workers=2)
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(2100) % 256)
    (tmp_path / "1500.png").write_bytes(b"not an image")
    with pytest.raises(data.DataError, match="1500.png"):
        data.decode_images(paths, 32, workers=2)


def test_missing_data_gives_a_clear_message(tmp_path, cache, monkeypatch):
    def offline(url, dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(data.DataError) as e:
        data.load_data()
    msg = str(e.value)
    assert "--data-dir" in msg and str(cache) in msg and data.CIFAR_MD5 in msg and "unreachable" in msg

    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_data(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_data(tmp_path / "empty")


def test_download_is_checked_and_extracted(tmp_path, batches, cache, monkeypatch):
    import hashlib
    import tarfile

    src = _write_pickles(tmp_path / "src", batches)
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname="cifar-10-batches-py")
    fetched = []

    def fake_download(url, dest):
        fetched.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(data, "_download", fake_download)
    monkeypatch.setitem(data.PICKLES["cifar10"], "md5", hashlib.md5(archive.read_bytes()).hexdigest())
    out = data.load_data()
    assert fetched == [data.CIFAR_URL] and (cache / "cifar-10-batches-py" / "test_batch").is_file()
    np.testing.assert_array_equal(out["train_y"], _expected(batches, data.TRAIN_BATCHES)[1])
    data.load_data()
    assert len(fetched) == 1


def test_a_failed_extraction_leaves_nothing_behind(tmp_path, batches, cache, monkeypatch):
    """The archive is extracted beside the cache and renamed into place: a truncated one (its MD5
    made to match) fails with its name and leaves no partial cifar-10-batches-py, which the next run
    took for the data and reported as a truncated pickle."""
    import hashlib
    import tarfile

    src = _write_pickles(tmp_path / "src", batches)
    with tarfile.open(tmp_path / "full.tar", "w") as t:  # uncompressed: a cut leaves the first members whole
        t.add(src, arcname="cifar-10-batches-py")
    archive = cache / data.CIFAR_URL.rsplit("/", 1)[1]
    cache.mkdir(parents=True, exist_ok=True)
    archive.write_bytes((tmp_path / "full.tar").read_bytes()[:-30000])
    monkeypatch.setitem(data.PICKLES["cifar10"], "md5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(data.DataError, match="cannot extract"):
        data.load_data(download=False)
    assert sorted(p.name for p in cache.iterdir()) == [archive.name]
    archive.unlink()
    archive.mkdir()  # a directory where the archive should be: named, not a traceback
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_data(download=False)


def test_archive_with_wrong_md5_is_refused(tmp_path, cache):
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    with pytest.raises(data.DataError, match="cifar-10-python.tar.gz.*MD5"):
        data.load_data(download=False)


# ----------------------------------------------------------------------------------------------
# Augmentation and batches


def test_crop_flip_geometry(rng):
    x = rng.integers(1, 256, (6, 8, 8, 3), dtype=np.uint8)
    b = len(x)
    center = np.full(b, 4)
    none = np.zeros(b, bool)
    np.testing.assert_array_equal(data.crop_flip(x, center, center, none, 4), x)
    flipped = data.crop_flip(x, center, center, ~none, 4)
    np.testing.assert_array_equal(flipped, x[:, :, ::-1])
    np.testing.assert_array_equal(data.crop_flip(flipped, center, center, ~none, 4), x)
    # a shifted crop keeps the overlapping content and fills the rest with zeros
    dy, dx = rng.integers(0, 9, b), rng.integers(0, 9, b)
    out = data.crop_flip(x, dy, dx, none, 4)
    for i in range(b):
        p = np.pad(x[i], ((4, 4), (4, 4), (0, 0)))
        np.testing.assert_array_equal(out[i], p[dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
        assert (out[i] == 0).all(-1).sum() == 64 - (8 - abs(dy[i] - 4)) * (8 - abs(dx[i] - 4))


def test_augmentation_statistics(rng):
    x = rng.integers(1, 256, (4000, 4, 4, 3), dtype=np.uint8)
    out = data.augment_batch(x, seed=3, epoch=0, batch=0, pad=1)
    assert out.shape == x.shape and out.dtype == np.uint8
    flipped = (out == x[:, :, ::-1]).all((1, 2, 3))
    kept = (out == x).all((1, 2, 3))
    assert 0.05 < flipped.mean() < 0.2 and 0.05 < kept.mean() < 0.2  # 1/2 flip x 1/9 offsets
    out = data.augment_batch(x, seed=3, epoch=0, batch=0, pad=1, hflip=False)
    assert not (out == x[:, :, ::-1]).all((1, 2, 3)).any() and 0.08 < (out == x).all((1, 2, 3)).mean() < 0.15


def test_normalize(rng):
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    x[..., 1] //= 4
    mean, std = data.channel_stats(x)
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0) / 255, rtol=1e-12)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0) / 255, rtol=1e-9)
    y = data.normalize(x, mean, std)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.reshape(-1, 3).std(0), 1, atol=1e-5)


def _loader(rng, train, n=100, **kw):
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    return data.Loader(x, y, 16, np.full(3, 0.5), np.full(3, 0.25), train=train, **kw)


def test_batches_depend_only_on_seed_epoch_index(rng):
    a = _loader(rng, True, seed=5)
    b = data.Loader(a.images, a.labels, 16, a.mean, a.std, train=True, seed=5)
    assert len(a) == 6
    full = list(a.epoch(2))
    assert [i for i, *_ in full] == list(range(6))
    for i, x, y in full:
        assert x.shape == (16, 8, 8, 3) and x.dtype == np.float32 and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (16,)
    # resume mid-epoch in a fresh loader, and random access, give the same batches
    for (i, x, y), (j, x2, y2) in zip(full[3:], b.epoch(2, start=3)):
        assert i == j
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    x3, y3 = b.batch(2, 4)
    np.testing.assert_array_equal(x3, full[4][1])
    # another epoch / seed gives other batches; each epoch sees distinct images
    assert not np.array_equal(a.batch(3, 0)[0], full[0][1])
    assert not np.array_equal(_loader(rng, True, seed=6).batch(2, 0)[1], full[0][2])
    order = data.shuffle_order(100, 5, 2)
    assert sorted(order) == list(range(100))


def test_eval_loader_covers_everything_in_order(rng):
    ld = _loader(rng, False, n=37)
    got = list(ld.epoch(0))
    assert len(ld) == 3 and [len(y) for _, _, y in got] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([y for *_, y in got]), ld.labels)
    np.testing.assert_array_equal(got[0][1], data.normalize(ld.images[:16], ld.mean, ld.std))


def test_prefetcher_stops_when_abandoned(rng):
    ld = _loader(rng, True, n=400, prefetch=1)
    it = ld.epoch(0)
    for i, *_ in it:
        if i == 2:
            break
    it.close()
    assert not it.thread.is_alive()


def test_errors_in_the_prefetch_thread_reach_the_consumer(rng):
    ld = _loader(rng, True)
    ld.mean = None  # breaks normalize
    with pytest.raises(TypeError):
        list(ld.epoch(0))
