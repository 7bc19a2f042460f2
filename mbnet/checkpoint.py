"""The one weights file of mbnet, and the training checkpoint that extends it.

A weights file is an .npz archive:
  "meta"          a JSON string: {"format": "mbnet", "version": 1, "model": ARCH or null, ...}
  "model/<name>"  every parameter and buffer of ``Module.state_dict()`` (float32)
ARCH is ``model.config()`` of an image classifier: the architecture (arch, alpha, num_classes,
input_size, stem_stride, act, dropout), the class names and the input normalization (mean, std on
the [0, 1] pixel scale), so ``mbnet.models.load(path)`` rebuilds the model with no flag repeated.

A training checkpoint (``python -m mbnet.train``'s last.npz) is the same file plus
"optim/<key>" and "ema/<key>" arrays and the run's position in "meta" (config, epoch, batch, step,
metrics...). Every reader takes both. Where a checkpoint holds an EMA of the weights, readers yield
the EMA weights unless asked for the raw ones (``ema=False``): the EMA is what training reports.
"""
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT, VERSION = "mbnet", 1
PARTS = ("model", "optim", "ema")
_EMA_PREFIX = "w."  # optim.EMA.state_dict() keys: "updates" and "w.<name>"


class CheckpointError(ValueError):
    """A weights file is missing, corrupt or not mbnet's; the message names the file."""


class WriteError(Exception):
    """Writing a file failed (full disk, no permission...): the message is one line naming the file
    and the errno (also in ``errno``); the previous version of the file is intact."""

    def __init__(self, path, err):
        super().__init__(f"cannot write {path}: [Errno {err.errno}] {err.strerror or err}")
        self.errno, self.path = err.errno, path


def atomic_write(path, write, suffix=None):
    """Calls ``write(f)`` on a binary temp file beside ``path`` (named <name><random>.tmp<suffix>,
    suffix default path's), then renames it over ``path``: an interrupted or failed write leaves the
    previous file intact and no temp file. The file gets the umask's usual mode. Raises WriteError."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp" + (suffix or path.suffix))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here, before the rename, not after
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise WriteError(path, e) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp):
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_npz(path, arrays):
    """Writes ``arrays`` to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_safe(v):
    """v with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def dumps(obj, **kwargs):
    """json.dumps where NaN and infinities become null: always valid JSON."""
    return json.dumps(_json_safe(obj), allow_nan=False, **kwargs)


def save(path, model, *, optim=None, ema=None, meta=None):
    """Writes ``model`` (and, for a training checkpoint, the optimizer and EMA state and the run's
    ``meta`` keys) to ``path`` in the one weights format."""
    config = model.config() if hasattr(model, "config") else None
    head = {"format": FORMAT, "version": VERSION, "model": config}
    arrays = {"meta": np.array(dumps({**(meta or {}), **head}))}
    for part, state in (("model", model.state_dict()), ("optim", optim), ("ema", ema)):
        arrays.update({f"{part}/{k}": v for k, v in (state or {}).items()})
    write_npz(path, arrays)


def read(path):
    """-> {"meta": dict, "model": {...}, "optim": {...}, "ema": {...}}, each part's arrays keyed
    without their prefix. Raises CheckpointError naming the file and what is wrong."""
    path = Path(path)
    out = {p: {} for p in PARTS}
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a weights file (a run's is RUN/last.npz)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file: one bare array
            raise CheckpointError(f"{path}: a single NumPy array (.npy), not an .npz weights file")
        with loaded as z:
            if "meta" not in z.files:
                raise CheckpointError(f"{path}: not an mbnet weights file (no 'meta' entry; "
                                      f"it holds {', '.join(z.files[:4]) or 'nothing'}{'...' if len(z.files) > 4 else ''})")
            out["meta"] = json.loads(str(z["meta"]))
            for k in z.files:
                part, _, name = k.partition("/")
                if part in out and name:
                    out[part][name] = z[k]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or not an .npz weights file ({type(e).__name__}: {e})") from None
    meta = out["meta"]
    if not isinstance(meta, dict) or (meta.get("format") != FORMAT and "config" not in meta):
        raise CheckpointError(f"{path}: 'meta' is not mbnet's (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
    if not isinstance(meta.get("version", VERSION), int):
        raise CheckpointError(f"{path}: 'meta' has a format version that is not an integer: {meta['version']!r}")
    if meta.get("version", VERSION) > VERSION:
        raise CheckpointError(f"{path}: written by a newer mbnet (format version {meta['version']} > {VERSION})")
    if not out["model"]:
        raise CheckpointError(f"{path}: holds no model weights")
    return out


def model_config(ck, path="weights"):
    """The architecture stored in a read() result; training checkpoints from before the format
    (version 0: only the run's config) are translated."""
    meta = ck["meta"]
    if meta.get("model"):
        return dict(meta["model"])
    cfg = meta.get("config")
    if not cfg:
        raise CheckpointError(f"{path}: holds weights but no architecture (a bare Module.save of a "
                              "non-classifier?); build the module yourself and call module.load()")
    from .data import CLASSES

    return {"arch": "mobilenet", "alpha": cfg["alpha"], "num_classes": len(CLASSES), "input_size": cfg["resolution"],
            "stem_stride": None, "act": "relu", "dropout": cfg.get("dropout", 0.0),
            "classes": list(CLASSES), "mean": cfg["mean"], "std": cfg["std"]}


def weights(ck, ema=True):
    """The model's state from a read() result: the EMA's when ``ema`` and the checkpoint has one."""
    shadow = {k[len(_EMA_PREFIX):]: v for k, v in ck["ema"].items() if k.startswith(_EMA_PREFIX)}
    return shadow if ema and shadow else ck["model"]


def build(ck, path="weights", *, ema=True):
    """The classifier of a read() result with its weights (the EMA's when it has them and
    ``ema``), in eval mode."""
    from .models import check_weights, from_config

    try:
        model = from_config(model_config(ck, path))
        model.load_state_dict(weights(ck, ema))
        check_weights(model)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not describe a model this mbnet can build ({type(e).__name__}: {e})") from None
    return model.eval()


def load_model(path, *, ema=True):
    """Rebuilds the classifier stored in an mbnet weights file or training checkpoint."""
    return build(read(path), path, ema=ema)
