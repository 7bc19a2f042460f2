"""Evaluates a checkpoint on its data set's test split: `python -m mbnet.evaluate CHECKPOINT [options]`.

Prints the test accuracy, the accuracy of each class and the confusion matrix (rows: true class,
columns: predicted; with more than 20 classes the 20 largest confusions instead), named by the
run's classes. Uses the checkpoint's EMA weights when it has them (--no-ema for the raw ones)
and the training split's normalization stored in the checkpoint.
"""
import argparse
import sys

import numpy as np

from . import data as D
from .train import EVAL_BATCH, build_model, evaluate, load_checkpoint, prepare_data


def confusion_matrix(labels, preds, k):
    """(N,), (N,) -> (k, k) int64 counts, rows true class, columns predicted."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


MATRIX_MAX = 20  # classes up to which the whole confusion matrix is printed


def format_report(labels, preds, classes):
    cm = confusion_matrix(labels, preds, len(classes))
    name = max(10, *(len(c) for c in classes))
    lines = [f"test accuracy: {100 * (labels == preds).mean():.2f}% ({int((labels == preds).sum())}/{len(labels)})", "",
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
    p = argparse.ArgumentParser(prog="python -m mbnet.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False, help="horizontal-flip TTA")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default)")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    from . import _C

    if args.threads:
        _C.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    cfg = dict(ck["meta"]["config"], limit_train=0, limit_test=args.limit_test)
    try:
        _, _, xte, yte = prepare_data(cfg, args.data_dir, verbose=False)
    except D.DataError as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    model = build_model(cfg)
    ema = {k[2:]: v for k, v in ck["ema"].items() if k.startswith("w.")}
    use_ema = args.ema and ema
    model.load_state_dict(ema if use_ema else ck["model"])
    loader = D.Loader(xte, yte, EVAL_BATCH, np.array(cfg["mean"]), np.array(cfg["std"]), train=False)
    _, _, preds = evaluate(model, loader, tta=args.tta)
    meta = ck["meta"]
    print(f"{args.checkpoint}: epoch {meta['epoch']}, step {meta['step']}, "
          f"{'EMA' if use_ema else 'raw'} weights{', flip TTA' if args.tta else ''}")
    print(format_report(yte, preds, cfg["classes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
