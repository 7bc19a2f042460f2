"""Classifies images with a trained model: `python -m mbnet.predict WEIGHTS IMAGE_OR_FOLDER... [options]`.

WEIGHTS is anything ``mbnet.models.load`` reads: an mbnet weights file (model.save), a training
checkpoint (last.npz; its EMA weights unless --no-ema) or a PyTorch .pt/.pth state_dict.
Each image (JPEG, PNG or anything else Pillow reads, any size and mode) gets the model's own
preprocessing: ``data.load_image`` (RGB, alpha dropped), ``data.fit_image`` (shorter side resized
to the model's input size, center crop), ``data.normalize`` with the mean and std stored in the
weights file. The network runs as the compiled inference plan (``mbnet.plan``: BN folded, one
call into the extension per batch). The output is the top-k classes by softmax probability, with
the model's class names.

From Python: ``predict(model_or_path, images_or_paths, top_k=5)`` -> one result per image,
{"path": str or None (an array), "top": [{"class": name, "index": k, "prob": p}, ...]}.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import data as D

BATCH_SIZE = 32
# What a folder is searched for (recursively, hidden files and folders skipped); a file named on the
# command line is read whatever its extension.
FOLDER_EXTS = D.IMAGE_EXTS + (".jpe", ".jfif", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".pbm", ".pnm", ".tga",
                              ".qoi")


def list_images(paths):
    """Files and folders -> image files, in the order given, each folder's images sorted by path.
    Raises DataError naming a path that does not exist."""
    out = []
    for raw in paths:
        if not str(raw):  # Path("") is ".": an empty argument would search the working directory
            raise D.DataError("an empty path: name an image file or a folder")
        p = Path(raw)
        if p.is_dir():
            found = (f for f in p.rglob("*") if f.suffix.lower() in FOLDER_EXTS and f.is_file())
            out += sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            out.append(p)
        else:
            raise D.DataError(f"{p}: no such file or directory")
    return out


def _as_items(images_or_paths):
    """-> [(path str or None, ndarray or None)]: folders expanded, arrays checked."""
    if isinstance(images_or_paths, bytes):
        images_or_paths = os.fsdecode(images_or_paths)
    if isinstance(images_or_paths, np.ndarray) and images_or_paths.ndim not in (3, 4):
        raise ValueError(f"predict: images must be one (H, W, 3) or a batch (N, H, W, 3) of uint8 arrays, "
                         f"got shape {images_or_paths.shape}")
    if isinstance(images_or_paths, (str, Path)) or getattr(images_or_paths, "ndim", 0) == 3:
        images_or_paths = [images_or_paths]  # one image; an (N, H, W, 3) array is N of them
    items = []
    for x in images_or_paths:
        if isinstance(x, np.ndarray):
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or 0 in x.shape:
                raise ValueError(f"predict: an image array must be (H, W, 3) uint8, got {x.shape} {x.dtype}")
            items.append((None, x))
        else:
            items += [(str(p), None) for p in list_images([x])]
    return items


def top_classes(probs, classes, k):
    """(n, num_classes) probabilities -> per row the k most probable [{"class", "index", "prob"}],
    most probable first (ties: lower index first)."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[j], "index": int(j), "prob": float(p[j])} for j in row] for p, row in zip(probs, order)]


def predict(model_or_path, images_or_paths, top_k=5, batch_size=BATCH_SIZE, *, ema=True, errors="raise",
            progress=None):
    """Classifies images -> a list with one result per image, in input order (folders expanded):
    {"path": str or None, "top": [{"class", "index", "prob"}, ... top_k of them]}.

    model_or_path: a model (``model.classes``, ``input_size``, ``mean``, ``std``) or a path for
    ``mbnet.models.load`` (``ema`` as there). images_or_paths: one or a list of image files,
    folders (searched recursively, sorted) and (H, W, 3) uint8 RGB arrays. top_k: how many classes
    (all of them when the model has fewer; None: all). errors: "raise" (a DataError naming the first
    unreadable image) or "skip" (its result is {"path", "error": message} and the others go on).
    progress: called as progress(done, total) after each batch.
    """
    from .models import load
    from .nn import is_int_in
    from .plan import compile as compile_plan

    model = load(model_or_path, ema=ema) if isinstance(model_or_path, (str, Path)) else model_or_path
    if not hasattr(model, "classes"):
        raise ValueError(f"predict: model_or_path must be an mbnet classifier or a weights file's path, "
                         f"got {type(model).__name__}")
    n_classes = len(model.classes)
    if top_k is not None and not is_int_in(top_k, 1):
        raise ValueError(f"top_k={top_k!r} must be an int >= 1 (or None: all classes)")
    top_k = n_classes if top_k is None else min(int(top_k), n_classes)
    if not is_int_in(batch_size, 1):
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors={errors!r}: 'raise' or 'skip'")
    items = _as_items(images_or_paths)
    results = []
    run = compile_plan(model, max(1, min(batch_size, len(items))))  # eval-mode network, BN folded, one call
    for start in range(0, len(items), batch_size):
        batch, ok = [], []
        for path, img in items[start:start + batch_size]:
            try:
                batch.append(D.fit_image(D.load_image(path) if img is None else img, model.input_size))
                ok.append(len(results))
                results.append({"path": path})
            except D.DataError as e:
                if errors == "raise":
                    raise
                results.append({"path": path, "error": str(e)})
        if batch:
            x = D.normalize(np.stack(batch), model.mean, model.std)
            logits = run(x).astype(np.float64)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            for i, top in zip(ok, top_classes(e / e.sum(axis=1, keepdims=True), model.classes, top_k)):
                results[i]["top"] = top
        if progress is not None:
            progress(len(results), len(items))
    return results


def format_result(result):
    """One result -> its lines of text: the path, then one line per class, most probable first."""
    width = max(len(t["class"]) for t in result["top"])
    lines = [f"  {t['class']:<{width}s}  {100 * t['prob']:6.2f}%" for t in result["top"]]
    return "\n".join([str(result["path"])] + lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mbnet.predict", description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Errors: an image that cannot be read is named on stderr (in --json also as {path, error})\n"
               "and the others go on; the exit status is then 1. A missing path, an unreadable WEIGHTS\n"
               "file or a bad option stops before any image is read, with exit status 2.")
    p.add_argument("weights", metavar="WEIGHTS",
                   help="an mbnet weights file, training checkpoint or PyTorch .pt/.pth state_dict")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, and folders searched recursively (in sorted order) for "
                        + ", ".join(FOLDER_EXTS))
    p.add_argument("--top-k", type=int, metavar="K", default=None,
                   help="classes shown per image (default: 5, or all if fewer)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document to stdout: a list of {path, top: [{class, index, prob}]}")
    p.add_argument("--batch-size", type=int, metavar="B", default=BATCH_SIZE,
                   help=f"images per forward pass (default {BATCH_SIZE})")
    p.add_argument("--threads", type=int, metavar="N", default=None, help="kernel threads (mbnet._C.set_num_threads)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use a training checkpoint's EMA weights when it has them (default; --no-ema: the raw weights)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from . import _C
    from .checkpoint import CheckpointError
    from .models import load
    from .run import images_bar, max_threads

    def fail(message):
        print(f"mbnet: {message}", file=sys.stderr)
        return 2

    if args.batch_size < 1:
        return fail(f"--batch-size {args.batch_size}: must be at least 1")
    if args.threads is not None and not 1 <= args.threads <= max_threads():
        return fail(f"--threads {args.threads}: must be in [1, {max_threads()}] (4x this machine's processors)")
    try:
        paths = list_images(args.images)
    except D.DataError as e:
        return fail(e)
    if not paths:
        return fail(f"no images in {', '.join(args.images)} (searched for {', '.join(FOLDER_EXTS)})")
    try:
        model = load(args.weights, ema=args.ema)
    except CheckpointError as e:
        return fail(e)
    except (ValueError, OSError, ImportError) as e:  # e.g. the PyTorch importer
        return fail(f"{args.weights}: cannot load weights ({type(e).__name__}: {e})")
    n_classes = len(model.classes)
    top_k = min(5, n_classes) if args.top_k is None else args.top_k
    if not 1 <= top_k <= n_classes:
        return fail(f"--top-k {top_k}: out of range 1..{n_classes} (the model has {n_classes} classes)")
    if args.threads:
        _C.set_num_threads(args.threads)

    results = predict(model, paths, top_k, args.batch_size, errors="skip",
                      progress=images_bar("predict", args.batch_size))
    for r in results:
        if "error" in r:
            print(f"mbnet: {r['error']}", file=sys.stderr)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        for r in results:
            if "top" in r:  # none when every image failed: then stdout stays empty
                print(format_result(r))
    failed = sum("error" in r for r in results)
    if failed:
        print(f"mbnet: {failed} of {len(results)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
