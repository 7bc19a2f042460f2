"""Loss and accuracy curves of a run (metrics.jsonl rows) as a PNG, with matplotlib's Agg backend.

`python -m mbnet.plot RUN [RUN ...] --out FILE.png` draws several runs' curves on common axes (each
run's evaluated accuracy, EMA where it kept one, and its train loss), to compare runs that differ in
one option.
"""
import json
import sys
from pathlib import Path

from .checkpoint import atomic_write


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    """Writes fig as a PNG atomically (checkpoint.WriteError on failure) and closes it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_curves(metrics, path):
    """metrics: list of per-epoch dicts (epoch, train_loss, train_acc[, test_loss, test_acc, ema_test_acc]);
    written atomically (checkpoint.atomic_write: WriteError on failure)."""
    plt = _pyplot()

    epochs = [m["epoch"] for m in metrics]
    evaluated = [m for m in metrics if "test_acc" in m]  # every epoch, or every --eval-every N-th and the last
    tested = [m["epoch"] for m in evaluated]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax_loss.plot(tested, [m["test_loss"] for m in evaluated], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [100 * m["train_acc"] for m in metrics], "o-", label="train")
    ax_acc.plot(tested, [100 * m["test_acc"] for m in evaluated], "o-", label="test")
    if evaluated and "ema_test_acc" in evaluated[0]:
        ax_acc.plot(tested, [100 * m["ema_test_acc"] for m in evaluated], "o-", label="test (EMA)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_points(series, path, *, xlabel, ylabel, title, logy=False, join=True, proportional=False):
    """A scatter plot with log-scale x: series is {label: [(x, y, note), ...]}, the points of a
    series joined in order of x (join) and each annotated with its note (may be ""). proportional: also a
    dashed line y = k·x per series, k the median of y/x (where y follows x, the points lie on it).
    Written atomically (checkpoint.WriteError on failure)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in series.items():
        points = sorted(points)
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        line, = ax.plot(xs, ys, "o-" if join else "o", label=label)
        for x, y, note in points:
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if proportional:
            k = sorted(y / x for x, y in zip(xs, ys))[len(xs) // 2]
            ax.plot([xs[0], xs[-1]], [k * xs[0], k * xs[-1]], "--", color=line.get_color(), alpha=0.5)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_bars(labels, series, path, *, xlabel, title):
    """Horizontal grouped bars: one group per label, top to bottom, one bar per series ({name:
    [value per label]}, None for no bar). Written atomically (checkpoint.WriteError on failure)."""
    plt = _pyplot()

    n, k = len(labels), len(series)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * n * max(k, 1) ** 0.5))
    height = 0.8 / max(k, 1)
    for i, (name, values) in enumerate(series.items()):
        ys = [row + (i - (k - 1) / 2) * height for row in range(n)]
        ax.barh([y for y, v in zip(ys, values) if v is not None], [v for v in values if v is not None],
                height=height, label=name)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    if k > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_runs(runs, path, split="test"):
    """runs: {label: metrics rows}; left, each run's accuracy on `split` at the epochs it was
    evaluated (the EMA weights' where it kept an EMA, and the final TTA as a point); right, its
    train loss per epoch. Written atomically (checkpoint.WriteError on failure)."""
    plt = _pyplot()

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, metrics in runs.items():
        evaluated = [m for m in metrics if "test_acc" in m]
        key = "ema_test_acc" if evaluated and "ema_test_acc" in evaluated[-1] else "test_acc"
        line, = ax_acc.plot([m["epoch"] for m in evaluated], [100 * m[key] for m in evaluated], "o-", ms=3,
                            label=f"{label}{' (EMA)' if key == 'ema_test_acc' else ''}")
        if evaluated and "tta_test_acc" in evaluated[-1]:
            ax_acc.plot([evaluated[-1]["epoch"]], [100 * evaluated[-1]["tta_test_acc"]], "*", ms=10,
                        color=line.get_color(), label=f"{label}: final, TTA")
        ax_loss.plot([m["epoch"] for m in metrics], [m["train_loss"] for m in metrics], "-", color=line.get_color(),
                     label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{split} accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="train loss (of the batches as trained)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def main(argv=None):
    from .checkpoint import WriteError
    from .run import Parser, eval_split, read_metrics

    p = Parser(prog="python -m mbnet.plot", description="Draws the curves of several training runs on common axes.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE", help="the PNG to write")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="a run's label, once per run in order (default: the directory names)")
    args = p.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        p.error(f"{len(args.label)} --label for {len(args.runs)} runs")
    if not Path(args.out).parent.is_dir():
        p.error(f"--out {args.out}: no such directory")
    runs, splits = {}, set()
    for i, run in enumerate(args.runs):
        metrics = read_metrics(run)
        if not metrics:
            p.error(f"{run}: no metrics.jsonl with rows (not a run directory, or no epoch finished)")
        config = Path(run) / "config.json"
        splits.add(eval_split(json.loads(config.read_text())) if config.is_file() else "test")
        label = args.label[i] if args.label else Path(run).name
        if label in runs:
            p.error(f"two runs named {label!r}: give each a --label")
        runs[label] = metrics
    if len(splits) > 1:
        p.error(f"the runs were evaluated on different splits ({', '.join(sorted(splits))}): their accuracies do "
                "not compare")
    try:
        plot_runs(runs, Path(args.out), split=splits.pop())
    except WriteError as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
