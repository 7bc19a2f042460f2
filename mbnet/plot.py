"""Loss and accuracy curves of a run (metrics.jsonl rows) as a PNG, with matplotlib's Agg backend."""
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
