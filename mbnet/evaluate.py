"""Evaluates weights on the test split of their data set: `python -m mbnet.evaluate WEIGHTS [options]`.

A checkpoint of a run trained with --val-split is evaluated on its held-out split (the part of the
train split it did not train on), and the report says "held-out accuracy".

WEIGHTS is any mbnet weights file (model.save), training checkpoint (last.npz) or, like
everything mbnet.models.load reads, a PyTorch .pt/.pth state_dict of a MobileNetV1. Prints
the test accuracy, the accuracy of each class and the confusion matrix (rows: true class, columns:
predicted; with more than 20 classes the 20 largest confusions instead), named by the model's
classes. A checkpoint with an EMA of the weights yields the EMA weights (--no-ema for the raw
ones); the input normalization is the one stored in the file. The network runs as the compiled
inference plan (mbnet.run.inference), as in mbnet.predict.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from . import checkpoint
from . import data as D
from .models import load
from .run import EVAL_BATCH, Parser, RunError, eval_split, evaluate, images_bar, int_in, max_threads, set_threads


def confusion_matrix(labels, preds, k):
    """(N,), (N,) -> (k, k) int64 counts, rows true class, columns predicted."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


MATRIX_MAX = 20  # classes up to which the whole confusion matrix is printed


def format_report(labels, preds, classes, split="test"):
    cm = confusion_matrix(labels, preds, len(classes))
    name = max(10, *(len(c) for c in classes))
    right = int((labels == preds).sum())
    lines = [f"{split} accuracy: {100 * (labels == preds).mean():.2f}% ({right}/{len(labels)})", "",
             "per-class accuracy:"]
    for k, c in enumerate(classes):
        n = cm[k].sum()
        lines.append(f"  {c:<{name}s} {100 * cm[k, k] / max(n, 1):6.2f}%  ({cm[k, k]}/{n})")
    if len(classes) > MATRIX_MAX:
        off = cm - np.diag(np.diag(cm))
        top = [divmod(int(i), len(classes)) for i in np.argsort(-off, axis=None, kind="stable")[:MATRIX_MAX]]
        lines += ["", f"largest confusions (true -> predicted: count), of {len(classes)} classes:"]
        lines += [f"  {classes[t]} -> {classes[p]}: {off[t, p]}" for t, p in top if off[t, p]]
        return "\n".join(lines)
    kw = len(str(len(classes) - 1))
    w = max(4, len(str(cm.max())) + 1, kw + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, by index):",
              " " * (kw + name + 3) + "".join(f"{k:>{w}d}" for k in range(len(classes)))]
    for k, c in enumerate(classes):
        lines.append(f"  {k:>{kw}d} {c:<{name}s}" + "".join(f"{v:>{w}d}" for v in cm[k]))
    return "\n".join(lines)


def main(argv=None):
    p = Parser(prog="python -m mbnet.evaluate", description=__doc__.splitlines()[0],
               epilog="A training checkpoint with an EMA of the weights (train's default) yields the EMA weights, "
                      "the ones training reports; --no-ema evaluates the raw weights.")
    p.add_argument("weights", help="an mbnet weights file or training checkpoint, or a PyTorch .pt/.pth state_dict")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="horizontal-flip TTA")
    p.add_argument("--tta-shift", type=int_in(0, 8), default=0, metavar="PX",
                   help="with --tta, also the image and its mirror moved diagonally by +-PX pixels (6 views)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default; --no-ema: the raw weights)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="test: the run's test (or held-out) split (default); train: the images it trained on, "
                        "unaugmented (how far the weights fit them, against the test split's figure)")
    p.add_argument("--limit-test", type=int_in(1), default=None,
                   help="use N images of the evaluated split (a fixed subset)")
    p.add_argument("--threads", type=int_in(1, max_threads), default=None, help="kernel threads")
    args = p.parse_args(argv)
    if args.tta_shift and not args.tta:
        p.error(f"--tta-shift {args.tta_shift} needs --tta")
    try:
        set_threads(args.threads)
        if Path(args.weights).suffix.lower() in (".pt", ".pth"):  # a PyTorch state_dict, through models.load
            ck, model = None, load(args.weights)
        else:
            ck = checkpoint.read(args.weights)
            model = checkpoint.build(ck, args.weights, ema=args.ema)
    except (checkpoint.CheckpointError, RunError) as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    except (ImportError, OSError, ValueError) as e:
        print(f"mbnet: {args.weights}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    run_cfg = {} if ck is None else ck["meta"].get("config", {})  # the run's data set and split
    if not isinstance(run_cfg, dict):
        print(f"mbnet: {args.weights}: its run configuration is not a dict ({type(run_cfg).__name__})", file=sys.stderr)
        return 2
    # A PyTorch file names no classes (its model has '0', '1', ...): it takes the data's, if as many.
    named = ck is not None
    train = args.split == "train"
    cfg = {"dataset": run_cfg.get("dataset"), "val_split": run_cfg.get("val_split"), "resolution": model.input_size,
           "limit_train": args.limit_test if train else 0, "limit_test": 0 if train else args.limit_test,
           "classes": list(model.classes) if named else None, "mean": model.mean, "std": model.std}
    try:
        xtr, ytr, xte, yte = D.prepare_data(cfg, args.data_dir, verbose=False)
        if train:
            xte, yte = xtr, ytr
    except D.DataError as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:  # a run configuration edited or written by something else
        print(f"mbnet: {args.weights}: its run configuration does not fit ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    classes = model.classes if named else cfg["classes"]
    if len(classes) != model.num_classes:
        print(f"mbnet: {args.weights}: {model.num_classes} classes, but the data has {len(classes)}", file=sys.stderr)
        return 2
    use_ema = ck is not None and args.ema and checkpoint.weights(ck) is not ck["model"]
    loader = D.Loader(xte, yte, EVAL_BATCH, np.array(model.mean), np.array(model.std), train=False)
    _, _, preds = evaluate(model, loader, tta=args.tta, shift=args.tta_shift,
                           progress=images_bar("evaluate", EVAL_BATCH))
    meta = {} if ck is None else ck["meta"]
    where = f"epoch {meta['epoch']}, step {meta.get('step', '?')}, " if "epoch" in meta else ""
    tta = f", flip + {args.tta_shift} px shift TTA" if args.tta_shift else ", flip TTA" if args.tta else ""
    print(f"{args.weights}: {where}{'EMA' if use_ema else 'raw'} weights{tta}")
    print(format_report(yte, preds, classes, "train (unaugmented)" if train else eval_split(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
