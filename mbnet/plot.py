"""Loss and accuracy curves of a run (metrics.jsonl rows) as a PNG, with matplotlib's Agg backend."""
from .checkpoint import atomic_write


def plot_curves(metrics, path):
    """metrics: list of per-epoch dicts (epoch, train_loss, train_acc, test_loss, test_acc[, ema_test_acc]);
    written atomically (checkpoint.atomic_write: WriteError on failure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax_loss.plot(epochs, [m["test_loss"] for m in metrics], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [100 * m["train_acc"] for m in metrics], "o-", label="train")
    ax_acc.plot(epochs, [100 * m["test_acc"] for m in metrics], "o-", label="test")
    if metrics and "ema_test_acc" in metrics[0]:
        ax_acc.plot(epochs, [100 * m["ema_test_acc"] for m in metrics], "o-", label="test (EMA)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
