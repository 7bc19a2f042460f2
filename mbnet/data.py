"""CIFAR-10: loading (official pickles or an image-folder tree), a uint8 cache, augmentation, batching.

Notation: N images, S the side in pixels (32 for CIFAR-10), B the batch size.
Images are kept as uint8 (N, S, S, 3) NHWC; batches come out float32 (B, S, S, 3) C-contiguous,
labels int64 (B,).

Order: both formats are returned class-major (all of class 0, then class 1, ...); within a class the
pickles keep their official order and the folder tree its sorted file names. The shared JPEG mirror
numbers each class's files in official order, so both formats give the same arrays.

Every random choice is a pure function of (seed, epoch, batch index): the shuffle of an epoch comes
from (seed, epoch), a batch's crops and flips from (seed, epoch, batch). A run resumed in the middle
of an epoch therefore sees exactly the batches an unbroken run sees.
"""
import hashlib
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

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
CACHE_VERSION = 1

# Seeds of the independent random streams (shuffle, augmentation); see shuffle_order / augment_batch.
_SHUFFLE, _AUGMENT = 1, 2


class DataError(RuntimeError):
    """The data is missing, unreadable or malformed; the message says which file and what to do."""


def default_cache_dir():
    return Path(os.environ.get("MBNET_CACHE") or Path.home() / ".cache" / "mbnet")


# ----------------------------------------------------------------------------------------------
# Reading the two formats


def _find_pickle_dir(root):
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() or (d / TEST_BATCH).is_file():
            return d
    return None


def _read_pickle_batch(path):
    """One official batch file -> (images (n,32,32,3) uint8, labels (n,) int64)."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"expected b'data' (n, 3072) and n b'labels', got {data.shape} and {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise ValueError("labels outside 0..9")
    except FileNotFoundError:
        raise DataError(f"{path}: missing (a complete cifar-10-batches-py has "
                        f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH})") from None
    except Exception as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR-10 batch ({type(e).__name__}: {e})") from None
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _class_major(images, labels):
    order = np.argsort(labels, kind="stable")
    return np.ascontiguousarray(images[order]), labels[order]


def read_pickles(root):
    """cifar-10-batches-py directory -> dict(train_x, train_y, test_x, test_y), class-major."""
    root = Path(root)
    out = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        parts = [_read_pickle_batch(root / n) for n in names]
        x, y = _class_major(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        out[split + "_x"], out[split + "_y"] = x, y
    return out


def _list_folder(root, split):
    """root/split/<class>/* -> (paths, labels); class index = position of the folder in sorted order."""
    d = Path(root) / split
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{d}: no class folders")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(e.name for e in os.scandir(d / c) if e.name.lower().endswith(IMAGE_EXTS))
        paths += [str(d / c / f) for f in files]
        labels += [k] * len(files)
    return paths, np.array(labels, dtype=np.int64)


def _decode_files(paths):
    """Decodes a list of image files -> (n, 32, 32, 3) uint8; raises DataError naming a bad file."""
    from PIL import Image

    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    raise ValueError(f"size {im.size[0]}x{im.size[1]}, expected 32x32")
                out[i] = np.asarray(im)
        except Exception as e:
            raise DataError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None
    return out


def decode_images(paths, workers=None):
    """Decodes image files in parallel (a process pool: Pillow holds the GIL) -> (n,32,32,3) uint8."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 2000:
        return _decode_files(paths)
    chunk = 1000
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_decode_files, chunks)))


def read_folder(root, workers=None):
    """root/{train,test}/<class>/*.jpg|png -> dict(train_x, train_y, test_x, test_y), class-major."""
    out = {}
    for split in ("train", "test"):
        paths, labels = _list_folder(root, split)
        out[split + "_x"], out[split + "_y"] = decode_images(paths, workers), labels
    return out


# ----------------------------------------------------------------------------------------------
# Locating the data, the cache, the download


def _fingerprint(files):
    """Changes when a source file is added, removed, rewritten or touched."""
    h = hashlib.sha256()
    n = 0
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        n += 1
    return f"{n}:{h.hexdigest()}"


def _source_files(kind, root):
    if kind == "pickle":
        return [str(root / n) for n in TRAIN_BATCHES + (TEST_BATCH,) if (root / n).exists()]
    files = []
    for split in ("train", "test"):
        d = root / split
        for c in sorted(os.listdir(d)):
            if (d / c).is_dir():
                files += sorted(e.path for e in os.scandir(d / c) if e.name.lower().endswith(IMAGE_EXTS))
    return files


def _detect(root):
    """-> ("pickle", dir) or ("folder", dir) or None."""
    p = _find_pickle_dir(root)
    if p is not None:
        return "pickle", p
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder", root
    return None


def _no_data_message(where, cache_dir, why):
    return (
        f"CIFAR-10 not found ({why}).\n"
        f"  Looked in: {where}\n"
        "  Either pass --data-dir DIR (or set MBNET_DATA=DIR), where DIR holds the official\n"
        "  cifar-10-batches-py/ (data_batch_1..5, test_batch) or an image tree train/<class>/*.png,\n"
        "  test/<class>/*.png (JPEG works too),\n"
        f"  or put {CIFAR_URL.rsplit('/', 1)[1]} (MD5 {CIFAR_MD5}) into {cache_dir}\n"
        f"  (download it from {CIFAR_URL})."
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


def _fetch_official(cache_dir, download):
    """Makes sure cache_dir/cifar-10-batches-py exists (extracting or downloading the archive)."""
    found = _find_pickle_dir(cache_dir)
    if found is not None:
        return found
    archive = cache_dir / "cifar-10-python.tar.gz"
    if not archive.exists():
        if not download:
            raise DataError(_no_data_message(cache_dir, cache_dir, "downloading is switched off"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"mbnet: downloading {CIFAR_URL} into {cache_dir} ...", file=sys.stderr)
        try:
            _download(CIFAR_URL, archive)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(_no_data_message(cache_dir, cache_dir, f"download failed: {e}")) from None
    md5 = _md5(archive)
    if md5 != CIFAR_MD5:
        raise DataError(f"{archive}: MD5 {md5} does not match {CIFAR_MD5} (corrupt or truncated download; "
                        "delete it and retry)")
    try:
        with tarfile.open(archive) as t:
            # filter="data" exists from Python 3.9.17/3.10.12/3.11.4; the archive's MD5 is checked above
            t.extractall(cache_dir, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from None
    found = _find_pickle_dir(cache_dir)
    if found is None:
        raise DataError(f"{archive}: holds no cifar-10-batches-py")
    return found


def _atomic_savez(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_cifar10(data_dir=None, *, cache_dir=None, download=True, workers=None, verbose=False):
    """-> dict(train_x (50000,32,32,3) uint8, train_y (50000,) int64, test_x, test_y, source str).

    data_dir, else $MBNET_DATA, else the cache dir ($MBNET_CACHE or ~/.cache/mbnet) where the
    official archive is downloaded (download=True) and checked. Decoded arrays are cached in the cache
    dir, keyed by the source's path and invalidated when its files change.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    data_dir = data_dir or os.environ.get("MBNET_DATA")
    if data_dir:
        root = Path(data_dir).expanduser().resolve()
        if not root.is_dir():
            raise DataError(_no_data_message(root, cache_dir, f"{root} is not a directory"))
        found = _detect(root)
        if found is None:
            archive = root / "cifar-10-python.tar.gz"
            if archive.exists():
                found = "pickle", _fetch_official(root, download=False)
            else:
                raise DataError(_no_data_message(root, cache_dir, "neither cifar-10-batches-py nor train/ and test/"))
    else:
        found = "pickle", _fetch_official(cache_dir, download)
    kind, src = found
    src = src.resolve()
    files = _source_files(kind, src)
    key = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar10-{kind}-{key}.npz"
    fingerprint = f"v{CACHE_VERSION}:{kind}:{src}:{_fingerprint(files)}"
    if cache.exists():
        try:
            with np.load(cache) as z:
                if str(z["fingerprint"]) == fingerprint:
                    out = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
                    out["source"] = str(src)
                    return out
        except Exception:
            pass  # unreadable cache: rebuild it
    t0 = time.perf_counter()
    out = read_pickles(src) if kind == "pickle" else read_folder(src, workers)
    if verbose:
        print(f"mbnet: decoded {kind} data from {src} in {time.perf_counter() - t0:.1f}s; cached in {cache}",
              file=sys.stderr)
    try:
        _atomic_savez(cache, fingerprint=np.array(fingerprint), **out)
    except OSError as e:
        print(f"mbnet: warning: cannot write the data cache {cache}: {e}", file=sys.stderr)
    out["source"] = str(src)
    return out


# ----------------------------------------------------------------------------------------------
# Preprocessing, augmentation, batches


def resize_images(images, size):
    """(N,S,S,3) uint8 -> (N,size,size,3) uint8, bilinear (Pillow); done once for the resolution multiplier."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    return out


def channel_stats(images):
    """(N,H,W,3) uint8 -> (mean (3,), std (3,)) float64 on the [0, 1] scale."""
    x = images.reshape(-1, images.shape[-1])
    mean = np.zeros(x.shape[1])
    sq = np.zeros(x.shape[1])
    for i in range(0, len(x), 1 << 20):  # chunks keep the float64 temporaries small
        c = x[i:i + (1 << 20)].astype(np.float64)
        mean += c.sum(0)
        sq += (c * c).sum(0)
    mean /= len(x)
    std = np.sqrt(np.maximum(sq / len(x) - mean * mean, 0.0))
    return mean / 255.0, std / 255.0


def normalize(images, mean, std):
    """(B,H,W,3) uint8 -> float32 (x/255 - mean)/std, C-contiguous."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    shift = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    out = images.astype(np.float32)
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


def augment_batch(images, seed, epoch, batch, pad=4, rows=None):
    """Random crop (zero padding `pad`) and horizontal flip, drawn from (seed, epoch, batch).

    rows=(start, total): `images` are rows start.. of a batch of `total` images (a process's shard
    of the global batch); each image gets the draws it would get in the whole batch."""
    start, total = rows if rows is not None else (0, len(images))
    rng = np.random.default_rng([seed, _AUGMENT, epoch, batch])
    part = slice(start, start + len(images))
    dy = rng.integers(0, 2 * pad + 1, total)[part]
    dx = rng.integers(0, 2 * pad + 1, total)[part]
    flip = (rng.random(total) < 0.5)[part]
    return crop_flip(images, dy, dx, flip, pad)


class Loader:
    """Batches of one split: (x (B,S,S,3) float32 normalized, y (B,) int64).

    Training loaders (train=True) shuffle each epoch, augment, and drop the last incomplete batch;
    evaluation loaders go in order over every image. `epoch(e, start)` iterates with a background
    thread preparing the next `prefetch` batches while the model computes.

    shard=(rank, size): a training loader yields process `rank`'s shard of every global batch of
    `batch_size` images (mbnet.distributed.shard_bounds), with the same shuffle and augmentation
    draws as the whole batch; len() stays the number of global batches.
    """

    def __init__(self, images, labels, batch_size, mean, std, *, train, seed=0, pad=4, prefetch=2, shard=(0, 1)):
        self.images, self.labels = images, labels
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.train, self.seed, self.pad, self.prefetch = train, seed, pad, prefetch
        self.shard = shard

    def _train_batch(self, order, epoch, i):
        """(x, y) of this process's shard of global batch i, `order` the epoch's shuffle."""
        from .distributed import shard_bounds

        b = self.batch_size
        lo, hi = shard_bounds(b, *self.shard)
        idx = order[i * b:(i + 1) * b][lo:hi]
        x = augment_batch(self.images[idx], self.seed, epoch, i, self.pad, rows=(lo, b))
        return normalize(x, self.mean, self.std), self.labels[idx]

    def __len__(self):
        n, b = len(self.images), self.batch_size
        if self.train:
            return max(1, n // b) if n else 0
        return -(-n // b)

    def batch(self, epoch, i):
        """Batch i of epoch `epoch`; a pure function of (seed, epoch, i) and the data."""
        if self.train:
            return self._train_batch(shuffle_order(len(self.images), self.seed, epoch), epoch, i)
        idx = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return normalize(self.images[idx], self.mean, self.std), self.labels[idx]

    def epoch(self, epoch, start=0):
        """Iterates (i, x, y) for i in start..len-1, prefetching in a thread."""
        return _Prefetcher(self, epoch, start)


class _Prefetcher:
    def __init__(self, loader, epoch, start):
        self.queue = queue.Queue(maxsize=max(1, loader.prefetch))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(loader, epoch, start), daemon=True)
        self.thread.start()

    def _work(self, loader, epoch, start):
        if loader.train:  # computed once per epoch rather than per batch
            order = shuffle_order(len(loader.images), loader.seed, epoch)
        for i in range(start, len(loader) + 1):
            if i == len(loader):
                item = None  # end of epoch
            else:
                try:
                    if loader.train:
                        item = (i, *loader._train_batch(order, epoch, i))
                    else:
                        item = (i, *loader.batch(epoch, i))
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

