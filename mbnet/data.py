"""Image-classification data: CIFAR-10, CIFAR-100 or an image-folder tree; a memory-mapped uint8
cache at the training resolution; augmentation; batches.

Notation: N images, K classes, S the side in pixels (the training resolution), B the batch size.
Images are kept as uint8 (N, S, S, 3) NHWC RGB; batches come out float32 (B, S, S, 3) C-contiguous,
labels int64 (B,) in [0, K).

Sources (load_data; `kind` is the --dataset name):
- "cifar10":  cifar-10-batches-py/ (data_batch_1..5, test_batch), the official pickles.
- "cifar100": cifar-100-python/ (train, test, meta): fine labels (100 classes); the 20 coarse labels
  come along as train_coarse_y / test_coarse_y / coarse_classes.
- "folder":   train/<class>/*.jpg|*.jpeg|*.png and test/<class>/... (or val/<class>/...); class
  index = position of the folder name in sorted order; both splits must have the same class folders.
  Without a test/ or val/ split, val_split=F holds out round(F * n) images of each class of train/
  (a fixed choice that depends only on the file names).

val_split=F on data that has its own test split (every kind; a folder with test/ or val/) holds out
the same way from the decoded train split, and the test split is not read: the split to choose
options on (recipes, ablations) without the test split ever choosing anything.

Preprocessing (fit_image, the same for training, evaluation and prediction): every image is
converted to RGB (grayscale, palette and RGBA alike; alpha is dropped), its shorter side resized to S
(bilinear) and the center S x S cropped. This is done once per data set and resolution, in worker
processes, into the cache: one directory of raw .npy files (memory-mapped when loaded, so a 224 px
set is never held in RAM twice) and a meta.json with each file's size and SHA-256 digest (of the
whole file). A cache that does
not match its meta.json is rebuilt. The cache is keyed by the source's fingerprint (relative file
names, sizes and modification times: moving the data keeps the cache, touching a file rebuilds it),
the resolution and the validation split.

Order: every split is class-major (all of class 0, then class 1, ...); within a class the pickles
keep their official order and folders their sorted file names.

Every random choice is a pure function of (seed, epoch, batch index): the shuffle of an epoch comes
from (seed, epoch), a batch's crops, flips, TrivialAugment operations, cutout squares and mixup/cutmix
draws from (seed, epoch, batch). A run resumed in the middle of an epoch therefore sees exactly the
batches an unbroken run sees.

Mixup and CutMix (mix_batch) are batch-level: one draw per global batch pairs every image with a
partner of the same batch (a random permutation) and one lambda ~ Beta(alpha, alpha); mixup takes
lambda x image + (1 - lambda) x partner, CutMix pastes the partner's box of area fraction 1 - lambda
(lambda recomputed from the box clipped to the image). The labels come as Mixed(a, b, lam): the loss
is lam CE(a) + (1 - lam) CE(b). With both on, each batch is one or the other, with equal chances.
With a probability p < 1, a coin of its own stream leaves each batch unmixed with chance 1 - p; a
batch it mixes is the batch p = 1 mixes.
"""
import hashlib
import json
import os
import pickle
import queue
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DATASETS = ("cifar10", "cifar100", "folder")
CACHE_VERSION = 4  # 3: EXIF orientation and 16-bit scaling in the decode; 4: whole-file digests
PARALLEL_MIN = 2000  # fewer images are decoded in this process (a pool costs more than it saves)

# Seeds of the independent random streams; see shuffle_order, augment_batch, cutout_batch, _carve, mix_draw
# (3 is the trainer's dropout stream).
_SHUFFLE, _AUGMENT, _CUTOUT, _VAL, _MIX, _MIX_COIN, _TRIVIAL = 1, 2, 4, 5, 6, 7, 8


class DataError(RuntimeError):
    """The data is missing, unreadable or malformed; the message says which file and what to do."""


def default_cache_dir():
    return Path(os.environ.get("MBNET_CACHE") or Path.home() / ".cache" / "mbnet")


# ----------------------------------------------------------------------------------------------
# One image: reading and fitting to the resolution (what the cache, evaluate and predict all use)


def _open_rgb(path):
    """-> PIL RGB image of the file; DataError naming the file when it cannot be decoded.

    The first frame of an animation, EXIF orientation applied; grayscale and palette images become
    RGB, an alpha channel is dropped, 16- and 32-bit integer images are scaled to 8 bits (65535 -> 255).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                a = np.asarray(im, dtype=np.float64) / 257.0
                im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
            elif im.mode in ("P", "PA"):  # RGBA first: Pillow warns on P with byte transparency -> RGB
                im = im.convert("RGBA")
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _fit(im, size):
    """PIL RGB image -> (size, size, 3) uint8: shorter side resized to size (bilinear), center crop."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > 64 * size * size:
        # A very long image (a 1 x 300,000 strip): resize only the source box under the center
        # crop, so that memory is the crop's, not the whole resized strip's (gigabytes).
        sx, sy = nw / w, nh / h
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    if (nw, nh) != (size, size):
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def load_image(path):
    """Image file (JPEG/PNG, any mode) -> (H, W, 3) uint8 RGB; DataError naming a bad file."""
    return np.asarray(_open_rgb(path), dtype=np.uint8)


def fit_image(img, size):
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the shorter side resized to size (bilinear), then
    the center size x size cropped. The training preprocessing of every cached image."""
    from PIL import Image

    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise ValueError(f"fit_image: expected a non-empty (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    return _fit(Image.fromarray(img), size)


def _fit_into(out_path, start, items, size):
    """Fills rows start.. of the (n, size, size, 3) .npy at out_path with the fitted items (file
    paths or (h, w, 3) uint8 arrays). Runs in the worker processes."""
    from PIL import Image

    out = np.load(out_path, mmap_mode="r+")
    for i, item in enumerate(items):
        out[start + i] = _fit(_open_rgb(item) if isinstance(item, str) else Image.fromarray(item), size)
    out.flush()


def fit_all(out_path, items, size, workers=None):
    """Fits every item into the .npy at out_path, in `workers` processes (Pillow holds the GIL)."""
    workers = workers or os.cpu_count() or 1
    n = len(items)
    if workers == 1 or n < PARALLEL_MIN:
        return _fit_into(out_path, 0, items, size)
    chunk = max(64, min(1000, -(-n // (4 * workers))))
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_fit_into, out_path, s, items[s:s + chunk], size) for s in range(0, n, chunk)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def decode_images(paths, size, workers=None):
    """Image files -> (n, size, size, 3) uint8 in RAM, fitted as in the cache (tests, benchmarks)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.npy")
        np.lib.format.open_memmap(path, "w+", np.uint8, (len(paths), size, size, 3))
        fit_all(path, list(paths), size, workers)
        return np.load(path)


# ----------------------------------------------------------------------------------------------
# The official pickles


PICKLES = {  # --dataset -> its release
    "cifar10": {"dir": "cifar-10-batches-py", "url": CIFAR_URL, "md5": CIFAR_MD5,
                "train": TRAIN_BATCHES, "test": (TEST_BATCH,), "marker": ("data_batch_1", TEST_BATCH)},
    "cifar100": {"dir": "cifar-100-python", "url": CIFAR100_URL, "md5": CIFAR100_MD5,
                 "train": ("train",), "test": ("test",), "marker": ("meta",)},
}


def _find_pickle_dir(root, kind):
    for d in (root, root / PICKLES[kind]["dir"]):
        if any((d / m).is_file() for m in PICKLES[kind]["marker"]):
            return d
    return None


# What the CIFAR pickles are made of: dicts, lists, bytes, ints and NumPy arrays. Any other global
# a pickle names (os.system, say) is refused: unpickling runs whatever a file names.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                   ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no data set holds (not loaded)")
        return super().find_class(module, name)


def _unpickle(path, kind):
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        spec = PICKLES[kind]
        files = spec["train"] + spec["test"] + (("meta",) if kind == "cifar100" else ())
        raise DataError(f"{path}: missing (a complete {spec['dir']} has {', '.join(files)})") from None
    except Exception as e:
        raise DataError(f"{path}: corrupt or truncated {kind} pickle ({type(e).__name__}: {e})") from None


def _read_pickle_batch(path, kind, label_keys, num_classes):
    """One pickle file -> (images (n,32,32,3) uint8, [labels (n,) int64 for each key])."""
    d = _unpickle(path, kind)
    try:
        raw = np.asarray(d[b"data"])
        # Pixels are integers 0..255 and labels integers: a cast would wrap 300 to 44, truncate 0.7
        # to 0 and turn floats in [0, 1] into black images, silently.
        if raw.dtype.kind not in "ui" or (raw.size and (raw.min() < 0 or raw.max() > 255)):
            raise ValueError(f"b'data' must hold integer pixels 0..255, got {raw.dtype}"
                             + (f" from {raw.min()} to {raw.max()}" if raw.size and raw.dtype.kind in "uif" else ""))
        data = raw.astype(np.uint8)
        labels = []
        for k in label_keys:
            y = np.asarray(d[k])
            if y.size and y.dtype.kind not in "ui":
                raise ValueError(f"{k!r} must hold integer labels, got {y.dtype}")
            labels.append(y.astype(np.int64))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or any(y.shape != (data.shape[0],) for y in labels):
            raise ValueError(f"expected b'data' (n, 3072) and n labels, got {data.shape} and "
                             f"{[y.shape for y in labels]}")
    except Exception as e:
        raise DataError(f"{path}: corrupt or truncated {kind} pickle ({type(e).__name__}: {e})") from None
    for key, y, k in zip(label_keys, labels, num_classes):
        if y.size and (y.min() < 0 or y.max() >= k):
            bad = int(y[(y < 0) | (y >= k)][0])
            raise DataError(f"{path}: {key.decode()} {bad} outside the {k} classes 0..{k - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_pickles(root, kind="cifar10"):
    """cifar-10-batches-py or cifar-100-python directory -> dict(train_x, train_y, test_x, test_y,
    classes) (+ train_coarse_y, test_coarse_y, coarse_classes for CIFAR-100), class-major, 32x32."""
    root = Path(root)
    spec = PICKLES[kind]
    if kind == "cifar10":
        out, keys, counts = {"classes": list(CLASSES)}, (b"labels",), (10,)
    else:
        meta = _unpickle(root / "meta", kind)
        try:
            fine = [s.decode() for s in meta[b"fine_label_names"]]
            coarse = [s.decode() for s in meta[b"coarse_label_names"]]
        except Exception as e:
            raise DataError(f"{root / 'meta'}: no fine_label_names/coarse_label_names "
                            f"({type(e).__name__}: {e})") from None
        out = {"classes": fine, "coarse_classes": coarse}
        keys, counts = (b"fine_labels", b"coarse_labels"), (len(fine), len(coarse))
    for split in ("train", "test"):
        parts = [_read_pickle_batch(root / n, kind, keys, counts) for n in spec[split]]
        x = np.concatenate([p[0] for p in parts])
        ys = [np.concatenate([p[1][j] for p in parts]) for j in range(len(keys))]
        order = np.argsort(ys[0], kind="stable")
        out[split + "_x"], out[split + "_y"] = np.ascontiguousarray(x[order]), ys[0][order]
        if kind == "cifar100":
            out[split + "_coarse_y"] = ys[1][order]
    return out


# ----------------------------------------------------------------------------------------------
# Image folders


def _class_folders(d):
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _images_in(d):
    return sorted(e.name for e in os.scandir(d)
                  if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTS))


def _list_split(d, classes, require):
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = _images_in(d / c)
        if require and not files:
            raise DataError(f"{d / c}: no {'/'.join(IMAGE_EXTS)} images (every class of train/ needs some)")
        base = os.path.join(d, c, "")
        paths += [base + f for f in files]  # string joins: pathlib is slow over 10^5 files
        labels += [k] * len(files)
    return paths, np.array(labels, dtype=np.int64)


def _carve(labels, fraction):
    """Boolean mask of the held-out images: round(fraction * n) of each class (at least one image
    stays in train), chosen by a fixed random stream, so a function of the listing only."""
    held = np.zeros(len(labels), bool)
    rng = np.random.default_rng(_VAL)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n = min(round(fraction * len(idx)), len(idx) - 1)
        held[rng.permutation(idx)[:n]] = True
    return held


def _carve_checked(labels, fraction, what):
    held = _carve(labels, fraction)
    if not held.any():
        raise DataError(f"--val-split {fraction}: holds out no image of {what} (too few images per class)")
    return held


class Rows:
    """Rows `index` of an image array (the memory-mapped cache) without reading them: r[i] (an int,
    slice or index array) reads base[index[i]] then, so a split or a subset of a cache larger than
    memory costs only its index. np.asarray(r) reads them all."""

    def __init__(self, base, index):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self):
        return len(self.index)

    @property
    def shape(self):
        return (len(self.index),) + self.base.shape[1:]

    @property
    def dtype(self):
        return self.base.dtype

    def __getitem__(self, i):
        return self.base[self.index[i]]

    def __array__(self, dtype=None, copy=None):
        a = self.base[self.index]
        return a if dtype is None else a.astype(dtype)


def take_rows(images, index):
    """Rows `index` of images (an array or Rows) as Rows over the same base array."""
    if isinstance(images, Rows):
        return Rows(images.base, images.index[index])
    return Rows(images, index)


def _hold_out(d, fraction):
    """d (load_data's) with its test arrays replaced by the fixed fraction of each class of its train
    split that _carve holds out, and that removed from train (the images as Rows of the cache: nothing
    read; the labels copied)."""
    held = _carve_checked(d["train_y"], fraction, f"{d['source']}'s train split")
    out = dict(d, test_split=f"{fraction:g} of train (the {d['test_split']} split is not read)")
    out["train_x"] = take_rows(d["train_x"], np.flatnonzero(~held))
    out["test_x"] = take_rows(d["train_x"], np.flatnonzero(held))
    for part in ("y", "coarse_y"):
        if f"train_{part}" in d:
            a = d[f"train_{part}"]
            out[f"train_{part}"], out[f"test_{part}"] = a[~held], a[held]
    return out


def list_folder(root, val_split=None):
    """root/train/<class>/... and root/test/ (or val/) -> dict(classes, test_split, train (paths,
    labels), test (paths, labels)); with val_split and no test/val folder, test is carved from train
    (with one, load_data carves val_split from the decoded train split)."""
    root = Path(root)
    train = root / "train"
    classes = _class_folders(train)
    if not classes:
        raise DataError(f"{train}: no class folders (expected {train}/<class>/*.png or *.jpg)")
    if len(classes) == 1:  # every prediction would be right: nothing to learn or to measure
        raise DataError(f"{train}: one class folder ({classes[0]}); a classifier needs two or more")
    test_split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    if not test_split and not val_split:
        raise DataError(f"{root}: no test/ or val/ folder beside train/; add one, or pass --val-split F "
                        "to hold out a fraction F of train/")
    tr = _list_split(train, classes, require=True)
    if test_split:
        d = root / test_split
        other = _class_folders(d)
        missing, extra = [c for c in classes if c not in other], [c for c in other if c not in classes]
        if missing or extra:
            what = [f"{word} {', '.join(cs)}" for word, cs in (("missing", missing), ("extra", extra)) if cs]
            raise DataError(f"{d}: its class folders differ from {train}'s ({'; '.join(what)}); "
                            "both splits need the same class folders")
        te = _list_split(d, classes, require=False)
    else:
        held = _carve_checked(tr[1], val_split, train)
        paths = np.array(tr[0], dtype=object)
        te = list(paths[held]), tr[1][held]
        tr = list(paths[~held]), tr[1][~held]
        test_split = f"{val_split:g} of train"
    return {"classes": classes, "test_split": test_split, "train": tr, "test": te}


# ----------------------------------------------------------------------------------------------
# Locating the data, the download


def _detect(root):
    """-> (kind, dir) or None. Pickles first, then a folder tree."""
    for kind in ("cifar10", "cifar100"):
        p = _find_pickle_dir(root, kind)
        if p is not None:
            return kind, p
    if (root / "train").is_dir():
        return "folder", root
    return None


def _no_data_message(where, cache_dir, why):
    return (
        f"no data set found ({why}).\n"
        f"  Looked in: {where}\n"
        "  Either pass --data-dir DIR (or set MBNET_DATA=DIR), where DIR holds the official\n"
        "  cifar-10-batches-py/ or cifar-100-python/ or an image tree train/<class>/*.png|jpg with\n"
        "  test/<class>/ (or val/<class>/, or --val-split F),\n"
        f"  or put {CIFAR_URL.rsplit('/', 1)[1]} (MD5 {CIFAR_MD5}) into {cache_dir}\n"
        f"  (download it from {CIFAR_URL}; for --dataset cifar100: {CIFAR100_URL}, MD5 {CIFAR100_MD5})."
    )


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url, dest):
    """Fetches url into dest (atomically). Separate so tests can replace it."""
    tmp = Path(str(dest) + ".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


def _fetch_official(cache_dir, download, kind="cifar10"):
    """Makes sure cache_dir holds the extracted release of kind (extracting or downloading it)."""
    found = _find_pickle_dir(cache_dir, kind)
    if found is not None:
        return found
    spec = PICKLES[kind]
    url, md5 = spec["url"], spec["md5"]
    archive = cache_dir / url.rsplit("/", 1)[1]
    if not archive.exists():
        if not download:
            raise DataError(_no_data_message(cache_dir, cache_dir, "downloading is switched off"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"mbnet: downloading {url} into {cache_dir} ...", file=sys.stderr)
        try:
            _download(url, archive)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(_no_data_message(cache_dir, cache_dir, f"download failed: {e}")) from None
    try:
        got = _md5(archive)
    except OSError as e:  # a directory of that name, no permission
        raise DataError(f"{archive}: cannot read ({e})") from None
    if got != md5:
        raise DataError(f"{archive}: MD5 {got} does not match {md5} (corrupt or truncated download; "
                        "delete it and retry)")
    # Extracted into a temporary directory and renamed into place: an interrupted extraction leaves
    # no partial spec["dir"] behind (which the next run would take for the data and find truncated).
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".extract-"))
        with tarfile.open(archive) as t:
            # filter="data" exists from Python 3.9.17/3.10.12/3.11.4; the archive's MD5 is checked above
            t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not (tmp / spec["dir"]).is_dir():
            raise DataError(f"{archive}: holds no {spec['dir']}")
        os.replace(tmp / spec["dir"], cache_dir / spec["dir"])
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    found = _find_pickle_dir(cache_dir, kind)
    if found is None:
        raise DataError(f"{archive}: holds no {spec['dir']}")
    return found


def _locate(data_dir, dataset, cache_dir, download):
    """-> (kind, source dir)."""
    if dataset not in (None,) + DATASETS:
        raise DataError(f"--dataset {dataset}: choose one of {', '.join(DATASETS)}")
    if data_dir is not None and not str(data_dir):  # "" would mean the default: a download
        raise DataError("--data-dir is empty: name a directory, or leave it out for the default")
    data_dir = data_dir or os.environ.get("MBNET_DATA")
    if not data_dir:
        if dataset == "folder":
            raise DataError("--dataset folder needs --data-dir DIR (or MBNET_DATA=DIR) holding train/<class>/...")
        kind = dataset or "cifar10"
        return kind, _fetch_official(cache_dir, download, kind)
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(_no_data_message(root, cache_dir, f"{root} is not a directory"))
    if dataset is None:
        found = _detect(root)
        if found is not None:
            return found
        for kind in PICKLES:
            if (root / PICKLES[kind]["url"].rsplit("/", 1)[1]).exists():
                return kind, _fetch_official(root, False, kind)
        raise DataError(_no_data_message(root, cache_dir, "neither cifar-10-batches-py, cifar-100-python nor train/"))
    if dataset == "folder":
        if not (root / "train").is_dir():
            raise DataError(f"--dataset folder: {root} has no train/ folder (expected train/<class>/*.png|jpg)")
        return "folder", root
    found = _find_pickle_dir(root, dataset)
    if found is not None:
        return dataset, found
    archive = PICKLES[dataset]["url"].rsplit("/", 1)[1]
    if (root / archive).exists():
        return dataset, _fetch_official(root, False, dataset)
    raise DataError(f"--dataset {dataset}: {root} holds neither {PICKLES[dataset]['dir']}/ nor {archive}")


# ----------------------------------------------------------------------------------------------
# The cache


def _fingerprint(root, files):
    """Changes when a source file is added, removed, renamed, rewritten or touched; not when the
    whole tree moves."""
    h = hashlib.sha256()
    prefix = len(os.path.join(root, ""))  # every file is under root
    for f in files:
        st = os.stat(f)
        h.update(f"{f[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(files)}:{h.hexdigest()}"


def file_digest(path):
    """SHA-256 of the size and the whole file (about 0.5 GB/s: a 32 px CIFAR-10 cache checks in
    0.3 s, a 224 px one in about 15 s; any changed byte is caught)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_cache(d):
    """-> the loaded data of cache directory d; ValueError saying what is wrong with it."""
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"meta.json unreadable ({type(e).__name__})") from None
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"version {meta.get('version')}, expected {CACHE_VERSION}")
    out = {}
    for name, want in meta["files"].items():
        p = d / name
        size = p.stat().st_size if p.exists() else None
        if size != want["bytes"]:
            raise ValueError(f"{name} has {size} bytes, expected {want['bytes']}")
        if file_digest(p) != want["digest"]:
            raise ValueError(f"{name} does not match its digest")
        key = name[:-4]
        out[key] = np.load(p, mmap_mode="r" if key.endswith("_x") else None)
    k, s = len(meta["classes"]), meta["resolution"]
    for split in ("train", "test"):
        x, y = out[split + "_x"], out[split + "_y"]
        if x.shape[1:] != (s, s, 3) or x.dtype != np.uint8 or y.shape != (len(x),) or (y.size and y.max() >= k):
            raise ValueError(f"{split} arrays {x.dtype} {x.shape} / {y.shape} do not fit {s}px, {k} classes")
    out.update(classes=meta["classes"], test_split=meta["test_split"])
    if "coarse_classes" in meta:
        out["coarse_classes"] = meta["coarse_classes"]
    return out


def _build_cache(d, kind, src, resolution, val_split, listing, workers, verbose):
    """Decodes/fits the source (for folders: list_folder's listing) into a new cache directory d,
    written under a temporary name and renamed when complete."""
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        if kind == "folder":
            meta = {"classes": listing["classes"], "test_split": listing["test_split"]}
            splits = {s: listing[s] for s in ("train", "test")}
        else:
            raw = read_pickles(src, kind)
            meta = {"classes": raw["classes"], "test_split": "test"}
            splits = {s: (raw[s + "_x"], raw[s + "_y"]) for s in ("train", "test")}
            if kind == "cifar100":
                meta["coarse_classes"] = raw["coarse_classes"]
                for s in ("train", "test"):
                    np.save(tmp / f"{s}_coarse_y.npy", raw[s + "_coarse_y"])
        n = sum(len(y) for _, y in splits.values())
        if verbose:
            print(f"mbnet: decoding {n} images of {src} at {resolution}px into {d} ...", file=sys.stderr)
        for s, (items, labels) in splits.items():
            np.save(tmp / f"{s}_y.npy", labels)
            shape = (len(labels), resolution, resolution, 3)
            np.lib.format.open_memmap(tmp / f"{s}_x.npy", "w+", np.uint8, shape).flush()
            fit_all(str(tmp / f"{s}_x.npy"), list(items), resolution, workers)
        files = {p.name: {"bytes": p.stat().st_size, "digest": file_digest(p)} for p in sorted(tmp.glob("*.npy"))}
        meta.update(version=CACHE_VERSION, kind=kind, source=str(src), resolution=resolution, val_split=val_split,
                    files=files)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        try:
            os.rename(tmp, d)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"mbnet: decoded {n} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_data(data_dir=None, *, dataset=None, resolution=32, val_split=None, cache_dir=None, download=True,
              workers=None, verbose=False):
    """-> dict(train_x (N,S,S,3) uint8 memory-mapped, train_y (N,) int64, test_x, test_y, classes
    [K names], kind, source, test_split, cache) (+ CIFAR-100's coarse labels, see the module doc).

    data_dir, else $MBNET_DATA, else the cache dir ($MBNET_CACHE or ~/.cache/mbnet) where the
    official archive of `dataset` (default CIFAR-10) is downloaded (download=True) and MD5-checked.
    dataset None detects the kind from data_dir. S = resolution. The first call decodes into the
    cache in `workers` processes (default: all cores); later calls check and map it.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"resolution {resolution!r}: must be a positive integer")
    if val_split is not None and not 0 < val_split < 1:
        raise DataError(f"--val-split {val_split}: must be between 0 and 1")
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    kind, src = _locate(data_dir, dataset, cache_dir, download)
    src = src.resolve()
    listing = None
    if kind == "folder":
        listing = list_folder(src, val_split)  # checks the tree before anything is decoded
        files = listing["train"][0] + listing["test"][0]
        hold_out = val_split if listing["test_split"] in ("test", "val") else None
    else:
        hold_out = val_split
        spec = PICKLES[kind]
        files = [str(src / n) for n in spec["train"] + spec["test"] + (("meta",) if kind == "cifar100" else ())]
        files = [f for f in files if os.path.exists(f)]
    if hold_out is not None:  # the data's own splits are cached; the held-out part is carved on loading
        val_split = None
    key = hashlib.sha256(f"v{CACHE_VERSION}|{kind}|{_fingerprint(src, sorted(files))}|{resolution}|{val_split}"
                         .encode()).hexdigest()[:20]
    d = cache_dir / f"{kind}-{resolution}px-{key}"
    if d.exists():
        try:
            out = _check_cache(d)
        except Exception as e:
            print(f"mbnet: the data cache {d} is damaged ({e}); rebuilding it", file=sys.stderr)
        else:
            out = dict(out, kind=kind, source=str(src), cache=str(d))
            return _nonempty(out if hold_out is None else _hold_out(out, hold_out))
    try:
        _build_cache(d, kind, src, resolution, val_split, listing, workers, verbose)
        out = _check_cache(d)
    except OSError as e:
        raise DataError(f"cannot write the data cache {d} ({e}); set MBNET_CACHE to a writable directory") from None
    except ValueError as e:
        raise DataError(f"the data cache {d} just written does not check ({e})") from None
    out = dict(out, kind=kind, source=str(src), cache=str(d))
    return _nonempty(out if hold_out is None else _hold_out(out, hold_out))


def _nonempty(d):
    """d, if both of its splits hold images (an empty one trained on nothing or reported 0/0)."""
    if not len(d["train_y"]):
        raise DataError(f"{d['source']}: no training images")
    if not len(d["test_y"]):
        raise DataError(f"{d['source']}: no images in its test split ({d.get('test_split')})")
    return d


def _subset(n, limit):
    """A fixed (seed-independent) sorted subset of range(n): the data is class-major, so not a prefix."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(12345).permutation(n)[:limit])


def prepare_data(cfg, data_dir=None, verbose=True, workers=None):
    """-> (train_x, train_y, test_x, test_y) uint8/int64 at the resolution, subset; cfg gets mean/std,
    classes and num_classes (a run's saved classes must match the data's)."""
    t0 = time.perf_counter()
    d = load_data(data_dir, dataset=cfg.get("dataset"), resolution=cfg["resolution"], val_split=cfg.get("val_split"),
                    workers=workers, verbose=verbose)
    # A resumed run's classes must be the data's (runs from before classes were saved: CIFAR-10's);
    # a new run takes the data's (classes None: --init, whose classifier is re-made if they differ).
    saved = cfg["classes"] if "classes" in cfg else list(CLASSES) if "mean" in cfg else None
    if saved is not None and saved != d["classes"]:
        def names(cs):
            return f"{len(cs)}: {', '.join(cs[:8])}{', ...' if len(cs) > 8 else ''}"
        raise DataError(f"{d['source']}: its classes ({names(d['classes'])}) are not the run's "
                          f"({names(saved)}); pass the data the run was trained on")
    cfg["dataset"], cfg["classes"], cfg["num_classes"] = d["kind"], d["classes"], len(d["classes"])
    if verbose:
        print(f"mbnet: {d['kind']} data from {d['source']} ({len(d['classes'])} classes, test split: "
              f"{d['test_split']}) ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tr, te = _subset(len(d["train_y"]), cfg["limit_train"]), _subset(len(d["test_y"]), cfg["limit_test"])
    xtr, ytr = (d["train_x"], d["train_y"]) if tr is None else (take_rows(d["train_x"], tr), d["train_y"][tr])
    xte, yte = (d["test_x"], d["test_y"]) if te is None else (take_rows(d["test_x"], te), d["test_y"][te])
    if "mean" not in cfg:
        mean, std = channel_stats(xtr)
        cfg["mean"], cfg["std"] = mean.tolist(), std.tolist()
    return xtr, ytr, xte, yte


# ----------------------------------------------------------------------------------------------
# Normalization, augmentation, batches


def channel_stats(images):
    """(N,H,W,3) uint8 (an array or Rows) -> (mean (3,), std (3,)) float64 on the [0, 1] scale."""
    n, c = len(images), images.shape[-1]
    step = max(1, (1 << 20) // max(1, images.shape[1] * images.shape[2]))  # chunks keep the float64 temporaries small
    mean, sq = np.zeros(c), np.zeros(c)
    for i in range(0, n, step):
        x = np.asarray(images[i:i + step]).reshape(-1, c).astype(np.float64)
        mean += x.sum(0)
        sq += (x * x).sum(0)
    pixels = max(1, n * images.shape[1] * images.shape[2])
    mean /= pixels
    std = np.sqrt(np.maximum(sq / pixels - mean * mean, 0.0))
    # A channel that never varies (all images red-free, say) normalizes to 0 with any std: 1, not 0/0.
    return mean / 255.0, np.where(std > 0, std / 255.0, 1.0)


def normalize(images, mean, std):
    """(B,H,W,3) uint8 -> float32 (x/255 - mean)/std, C-contiguous."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    shift = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    out = np.asarray(images).astype(np.float32)
    out *= scale
    out += shift
    return out


def shuffle_order(n, seed, epoch):
    """Permutation of range(n) for one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(n)


def crop_flip(images, dy, dx, flip, pad):
    """(B,S,S,C) uint8, offsets dy, dx in [0, 2*pad], flip bool (B,) -> (B,S,S,C) uint8.

    Crops the zero-padded image at (dy, dx) and mirrors it left-right where flip is set.
    """
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_boxes(b, s, min_area, rng):
    """-> (top, left, height, width) int arrays (b,): a box of area fraction in [min_area, 1] of the
    S x S image and aspect ratio (w/h) in [3/4, 4/3], each side clipped to S, placed uniformly."""
    area = rng.uniform(min_area, 1.0, b) * s * s
    ratio = np.exp(rng.uniform(*np.log(RESIZED_CROP_RATIO), b))
    w = np.clip(np.round(np.sqrt(area * ratio)), 1, s).astype(np.int64)
    h = np.clip(np.round(np.sqrt(area / ratio)), 1, s).astype(np.int64)
    top = (rng.random(b) * (s - h + 1)).astype(np.int64)
    left = (rng.random(b) * (s - w + 1)).astype(np.int64)
    return top, left, h, w


def resized_crop(images, top, left, h, w, flip):
    """(B,S,S,3) uint8 -> (B,S,S,3) uint8: box i resized (bilinear) to S x S, mirrored where flip."""
    from PIL import Image

    b, s = len(images), images.shape[1]
    out = np.empty_like(images)
    for i in range(b):
        box = (int(left[i]), int(top[i]), int(left[i] + w[i]), int(top[i] + h[i]))
        out[i] = np.asarray(Image.fromarray(images[i]).resize((s, s), Image.BILINEAR, box=box))
        if flip[i]:
            out[i] = out[i, :, ::-1]
    return out


def _rows(rows, n):
    """-> (part, total) of rows=(start, total) for n images: `part` indexes their draws among the
    batch's `total`; start is an int (rows start..start+n-1) or an int array (those rows)."""
    if rows is None:
        return slice(0, n), n
    start, total = rows
    return (slice(start, start + n) if np.ndim(start) == 0 else np.asarray(start)), total


def augment_batch(images, seed, epoch, batch, pad=4, resized_crop_area=None, hflip=True, rows=None):
    """Random crop and (if hflip) horizontal flip, drawn from (seed, epoch, batch): with
    resized_crop_area a random-resized crop (area fraction in [resized_crop_area, 1]), else a crop
    of the image zero-padded by `pad` pixels.

    rows=(start, total): `images` are rows start.. of a batch of `total` images (a process's shard
    of the global batch; start may be an array of row numbers); each image gets the draws it would
    get in the whole batch."""
    rng = np.random.default_rng([seed, _AUGMENT, epoch, batch])
    part, b = _rows(rows, len(images))
    if resized_crop_area is not None:
        box = [a[part] for a in resized_crop_boxes(b, images.shape[1], resized_crop_area, rng)]
        return resized_crop(images, *box, ((rng.random(b) < 0.5) & hflip)[part])
    dy = rng.integers(0, 2 * pad + 1, b)[part]
    dx = rng.integers(0, 2 * pad + 1, b)[part]
    flip = ((rng.random(b) < 0.5) & hflip)[part]
    return crop_flip(images, dy, dx, flip, pad)


# TrivialAugment (Mueller & Hutter 2021, "wide" magnitudes, as torchvision's TrivialAugmentWide): one
# operation per image, uniformly among these, at a magnitude drawn uniformly from TRIVIAL_BINS levels
# (the ones marked signed mirrored with probability 1/2). Geometric operations fill with black and
# sample the nearest pixel.
TRIVIAL_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
               "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
TRIVIAL_BINS = 31


def trivial_magnitude(op, level, side, sign=1):
    """The parameter of TRIVIAL_OPS' `op` at magnitude level 0..TRIVIAL_BINS-1 for images of `side` px,
    times sign (+1 or -1) where the operation has a direction: shear factor 0..0.99; translation
    0..side px (torchvision's 32 at 32 px); rotation 0..135 degrees; enhancement factor offset 0..0.99
    (the image is enhanced by 1 + it); unsigned: posterize bits 8..2, solarize threshold 255..0; None
    for operations without one."""
    t = level / (TRIVIAL_BINS - 1)
    if op in ("shear_x", "shear_y", "brightness", "color", "contrast", "sharpness"):
        return sign * 0.99 * t
    if op in ("translate_x", "translate_y"):
        return sign * side * t
    if op == "rotate":
        return sign * 135.0 * t
    if op == "posterize":
        return 8 - int(round(level / ((TRIVIAL_BINS - 1) / 6)))
    if op == "solarize":
        return 255.0 * (1 - t)
    return None


def trivial_op(img, op, m):
    """One (S,S,3) uint8 image through TRIVIAL_OPS' `op` with signed parameter m -> (S,S,3) uint8."""
    from PIL import Image, ImageEnhance, ImageOps

    im = Image.fromarray(img)
    affine = {"shear_x": (1, m, 0, 0, 1, 0), "shear_y": (1, 0, 0, m, 1, 0),
              "translate_x": (1, 0, m, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, m)}
    enhance = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
               "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
    if op == "identity":
        return img
    if op in affine:
        im = im.transform(im.size, Image.AFFINE, affine[op], Image.NEAREST, fillcolor=(0, 0, 0))
    elif op == "rotate":
        im = im.rotate(m, Image.NEAREST, fillcolor=(0, 0, 0))
    elif op in enhance:
        im = enhance[op](im).enhance(1.0 + m)
    elif op == "posterize":
        im = ImageOps.posterize(im, int(m))
    elif op == "solarize":
        im = ImageOps.solarize(im, m)
    elif op == "autocontrast":
        im = ImageOps.autocontrast(im)
    elif op == "equalize":
        im = ImageOps.equalize(im)
    else:
        raise ValueError(f"trivial_op: unknown operation {op!r}; expected one of {TRIVIAL_OPS}")
    return np.asarray(im)


def trivial_draw(seed, epoch, batch, b):
    """-> (op, level, sign) int arrays (b,) of batch (seed, epoch, batch): an index into TRIVIAL_OPS,
    a magnitude level in [0, TRIVIAL_BINS), and +1 or -1."""
    rng = np.random.default_rng([seed, _TRIVIAL, epoch, batch])
    return (rng.integers(0, len(TRIVIAL_OPS), b), rng.integers(0, TRIVIAL_BINS, b),
            np.where(rng.random(b) < 0.5, -1, 1))


def trivial_augment_batch(images, seed, epoch, batch, rows=None):
    """(B,S,S,3) uint8 -> (B,S,S,3) uint8: TrivialAugment, one operation per image, drawn from
    (seed, epoch, batch) (trivial_draw). rows: as in augment_batch."""
    part, b = _rows(rows, len(images))
    ops, levels, signs = (a[part] for a in trivial_draw(seed, epoch, batch, b))
    out = np.empty_like(images)
    for i, img in enumerate(images):
        op = TRIVIAL_OPS[ops[i]]
        out[i] = trivial_op(img, op, trivial_magnitude(op, int(levels[i]), images.shape[1], int(signs[i])))
    return out


def cutout_batch(x, seed, epoch, batch, side, rows=None):
    """Zeroes (in place) one side x side square per image of x (B,S,S,C), placed uniformly inside
    the image, drawn from (seed, epoch, batch). On a normalized batch zero is the mean colour.
    rows: as in augment_batch."""
    if side <= 0:
        return x
    part, b = _rows(rows, len(x))
    s = x.shape[1]
    side = min(side, s)
    rng = np.random.default_rng([seed, _CUTOUT, epoch, batch])
    top, left = rng.integers(0, s - side + 1, b)[part], rng.integers(0, s - side + 1, b)[part]
    for i in range(len(x)):
        x[i, top[i]:top[i] + side, left[i]:left[i] + side] = 0
    return x


class Mixed(NamedTuple):
    """The labels of a mixed batch (B,) each: the images are lam of a's and 1 - lam of b's."""
    a: np.ndarray
    b: np.ndarray
    lam: float


class MixDraw(NamedTuple):
    """One batch's mixing: kind "mixup" or "cutmix", lam, partner (B,) (image i is mixed with image
    partner[i] of the batch), box (top, left, height, width) of CutMix (None for mixup)."""
    kind: str
    lam: float
    partner: np.ndarray
    box: tuple


def mix_draw(seed, epoch, batch, b, s, mixup=0.0, cutmix=0.0, prob=1.0):
    """The MixDraw of batch (seed, epoch, batch) of b images of side s, or None when mixup and cutmix
    (the Beta(alpha, alpha) parameters) are both 0, or with probability 1 - prob (a coin of its own
    stream, so the batches it mixes are mixed as with prob 1). With both > 0 a coin picks one per batch.

    CutMix: a box of sides s x sqrt(1 - lam) centred uniformly on the image and clipped to it; lam
    is then 1 - the box's area fraction, the weight of the labels of the images it is pasted into."""
    if not (mixup or cutmix):
        return None
    if prob < 1 and np.random.default_rng([seed, _MIX_COIN, epoch, batch]).random() >= prob:
        return None
    rng = np.random.default_rng([seed, _MIX, epoch, batch])
    kind = "cutmix" if not mixup else "mixup" if not cutmix else ("mixup", "cutmix")[rng.integers(2)]
    alpha = mixup if kind == "mixup" else cutmix
    lam = float(rng.beta(alpha, alpha))
    partner = rng.permutation(b)
    if kind == "mixup":
        return MixDraw(kind, lam, partner, None)
    side = s * np.sqrt(1.0 - lam)
    cy, cx = rng.random(2) * s
    top, bottom = (int(np.clip(round(c), 0, s)) for c in (cy - side / 2, cy + side / 2))
    left, right = (int(np.clip(round(c), 0, s)) for c in (cx - side / 2, cx + side / 2))
    box = (top, left, bottom - top, right - left)
    return MixDraw(kind, 1.0 - box[2] * box[3] / (s * s), partner, box)


def mix_batch(x, partner_x, draw):
    """(B,S,S,C) float32 images and the images of their partners -> the mixed batch (x, modified in
    place): mixup lam x + (1 - lam) partner_x; cutmix: partner_x's box pasted into x."""
    if draw.kind == "mixup":
        x *= np.float32(draw.lam)
        x += np.float32(1.0 - draw.lam) * partner_x
    else:
        top, left, h, w = draw.box
        x[:, top:top + h, left:left + w] = partner_x[:, top:top + h, left:left + w]
    return x


def area_taps(s, side):
    """-> (index, weight) (side, K) arrays: output pixel i of a row resampled from s to `side`
    pixels averages input pixels index[i, k] with weights weight[i, k] (float32, summing to 1):
    their overlaps with the span [i s/side, (i+1) s/side). side < s: a box filter, exact for any
    ratio (s/side = 2 averages pixel pairs); every input pixel gets the same total weight, side/s."""
    if not 1 <= side <= s:
        raise ValueError(f"area_taps: side must be in [1, {s}], got {side}")
    spans = [(i * s / side, (i + 1) * s / side) for i in range(side)]
    pixels = [range(int(np.floor(lo)), min(s, int(np.ceil(hi)))) for lo, hi in spans]
    k = max(len(p) for p in pixels)  # 2 for s/side = 4/3 or 2; shorter lists padded with zero weights
    index, weight = np.zeros((side, k), np.int64), np.zeros((side, k), np.float64)
    for i, ((lo, hi), p) in enumerate(zip(spans, pixels)):
        for t, j in enumerate(p):
            index[i, t], weight[i, t] = j, (min(hi, j + 1) - max(lo, j)) * side / s
    return index, weight.astype(np.float32)


def area_resize(x, side):
    """(B,S,S,C) float32 -> (B,side,side,C) float32: each axis resampled by area_taps (rows, then
    columns), elementwise in a fixed order, so the result does not depend on threads or BLAS."""
    s = x.shape[1]
    if side == s:
        return x
    index, weight = area_taps(s, side)
    rows = weight[None, :, 0, None, None] * x[:, index[:, 0]]
    for t in range(1, index.shape[1]):
        rows += weight[None, :, t, None, None] * x[:, index[:, t]]
    out = weight[None, None, :, 0, None] * rows[:, :, index[:, 0]]
    for t in range(1, index.shape[1]):
        out += weight[None, None, :, t, None] * rows[:, :, index[:, t]]
    return out


class Loader:
    """Batches of one split: (x (B,S,S,3) float32 normalized, y (B,) int64).

    Training loaders (train=True) shuffle each epoch, augment (crop with `pad` pixels of zero
    padding, or a random-resized crop of area fraction >= resized_crop_area; a horizontal flip
    of half the images if hflip; a TrivialAugment operation per image if trivial; a cutout square of
    `cutout` pixels if > 0), mix the batch (mixup / cutmix: Beta parameters, 0 off; the labels then
    come as Mixed; a batch with probability
    mix_prob; with mix_epochs, only in the epochs before it) and drop the last incomplete batch;
    evaluation loaders go in order over every image. side(epoch), if given, is the side in pixels
    of epoch's training batches: batches made at S are then area_resize'd to it (progressive
    resizing).

    `for x, y in loader` runs one epoch (the first loop epoch 0, the next epoch 1, ...);
    `epoch(e, start)` iterates (i, x, y) of epoch e from batch `start`. Both prepare the next
    `prefetch` batches in a background thread while the model computes.

    shard=(rank, size): a training loader yields process `rank`'s shard of every global batch of
    `batch_size` images (mbnet.distributed.shard_bounds), with the same shuffle and augmentation
    draws as the whole batch; len() stays the number of global batches.
    """

    def __init__(self, images, labels, batch_size, mean, std, *, train, seed=0, pad=4, resized_crop_area=None,
                 cutout=0, hflip=True, trivial=False, mixup=0.0, cutmix=0.0, mix_prob=1.0, mix_epochs=None, prefetch=2,
                 shard=(0, 1), side=None):
        self.images, self.labels = images, labels
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.train, self.seed, self.pad, self.prefetch = train, seed, pad, prefetch
        self.resized_crop_area, self.cutout, self.hflip, self.trivial = resized_crop_area, cutout, hflip, trivial
        self.mixup, self.cutmix, self.mix_prob, self.mix_epochs = mixup, cutmix, mix_prob, mix_epochs
        self.side = side
        self.next_epoch = 0
        self.shard = shard

    def __len__(self):
        n, b = len(self.images), self.batch_size
        if self.train:
            return max(1, n // b) if n else 0
        return -(-n // b)

    def _make(self, epoch, i, order):
        b = self.batch_size
        if not self.train:
            return normalize(self.images[i * b:(i + 1) * b], self.mean, self.std), self.labels[i * b:(i + 1) * b]
        from .distributed import shard_bounds

        lo, hi = shard_bounds(b, *self.shard)  # the whole batch on one process
        batch = order[i * b:(i + 1) * b]
        x = self._augmented(batch[lo:hi], epoch, i, lo)
        y = self.labels[batch[lo:hi]]
        mixing = self.mix_epochs is None or epoch < self.mix_epochs
        draw = mix_draw(self.seed, epoch, i, b, x.shape[1], self.mixup, self.cutmix, self.mix_prob) \
            if mixing else None
        side = x.shape[1] if self.side is None else self.side(epoch)
        if draw is None:
            return area_resize(x, side), y
        rows = draw.partner[lo:hi]  # under MPI the partners may lie in other shards: made here as well
        partner_x = x[rows] if hi - lo == b else self._augmented(batch[rows], epoch, i, rows)
        return area_resize(mix_batch(x, partner_x, draw), side), Mixed(y, self.labels[batch[rows]], draw.lam)

    def _augmented(self, idx, epoch, i, rows):
        """The images idx, rows `rows` (augment_batch) of training batch i, augmented and normalized."""
        b = self.batch_size
        x = augment_batch(np.asarray(self.images[idx]), self.seed, epoch, i, self.pad, self.resized_crop_area,
                          self.hflip, rows=(rows, b))
        if self.trivial:
            x = trivial_augment_batch(x, self.seed, epoch, i, rows=(rows, b))
        return cutout_batch(normalize(x, self.mean, self.std), self.seed, epoch, i, self.cutout, rows=(rows, b))

    def batch(self, epoch, i):
        """Batch i of epoch `epoch`; a pure function of (seed, epoch, i) and the data."""
        order = shuffle_order(len(self.images), self.seed, epoch) if self.train else None
        return self._make(epoch, i, order)

    def epoch(self, epoch, start=0):
        """Iterates (i, x, y) for i in start..len-1, prefetching in a thread."""
        return _Prefetcher(self, epoch, start)

    def __iter__(self):
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        with self.epoch(epoch) as batches:
            for _, x, y in batches:
                yield x, y


class _Prefetcher:
    def __init__(self, loader, epoch, start):
        self.queue = queue.Queue(maxsize=max(1, loader.prefetch))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(loader, epoch, start), daemon=True)
        self.thread.start()

    def _work(self, loader, epoch, start):
        # the shuffle is computed once per epoch rather than per batch
        order = shuffle_order(len(loader.images), loader.seed, epoch) if loader.train else None
        for i in range(start, len(loader) + 1):
            if i == len(loader):
                item = None  # end of epoch
            else:
                try:
                    item = (i, *loader._make(epoch, i, order))
                except BaseException as e:  # handed to the consumer
                    item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if self.stop.is_set() or not isinstance(item, tuple):
                return

    def __iter__(self):
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self):
        self.stop.set()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
