"""Trains MobileNetV1 on CIFAR-10, CIFAR-100 or an image folder: `python -m mbnet.train [options]` (see --help).

A run directory (--out) receives metrics.jsonl (one JSON object per epoch), curves.png, and the
checkpoints last.npz (every epoch, and on Ctrl-C) and best.npz (best test accuracy). --resume
continues from last.npz at the exact step it was saved; with the same thread count the resumed run
ends with bit-identical weights to an unbroken one, because every random choice (shuffle,
augmentation, dropout) is a pure function of (seed, epoch, batch / step).

Checkpoint (.npz): "model/<name>" (parameters and BN buffers), "optim/<key>", "ema/<key>" arrays and
"meta", a JSON string: config, position (epoch, batch, step), per-epoch metrics so far, and the
running sums of the epoch in progress.
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import data as D
from . import optim

DEFAULT_LR = {"sgd": 0.1, "rmsprop": 0.045, "adam": 1e-3}  # at batch size 128; scaled linearly
EVAL_BATCH = 250


def _fraction(name, low, high, low_open=True, high_open=True):
    """argparse type: a float in (low, high), the ends included where not open."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not ((low < v if low_open else low <= v) and (v < high if high_open else v <= high)):
            raise argparse.ArgumentTypeError(f"{name} {text}: must be in {'(' if low_open else '['}{low}, {high}"
                                             f"{')' if high_open else ']'}")
        return v
    return parse


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mbnet.train",
                                description="Train MobileNetV1 on CIFAR-10, CIFAR-100 or an image folder.")
    a = p.add_argument
    a("--alpha", type=float, default=1.0, help="width multiplier (default 1.0)")
    a("--resolution", type=int, default=32,
      help="input side S in pixels (default 32): every image is converted to RGB, its shorter side resized to S "
           "(bilinear) and the center SxS cropped, once, into the data cache")
    a("--epochs", type=int, default=50)
    a("--batch-size", type=int, default=128)
    a("--optimizer", choices=("sgd", "rmsprop", "adam"), default="sgd",
      help="sgd = Nesterov momentum 0.9; rmsprop = TF-style (decay 0.9, momentum 0.9, eps 1.0); adam")
    a("--lr", type=float, default=None,
      help="peak learning rate (default: sgd 0.1, rmsprop 0.045, adam 1e-3, times batch-size/128)")
    a("--schedule", choices=("onecycle", "cosine", "step"), default="onecycle")
    a("--warmup", type=float, default=None,
      help="warm-up length in epochs (default: 20%% of the epochs for onecycle, 5%% otherwise)")
    a("--weight-decay", type=float, default=5e-4, help="L2, not applied to BN parameters and biases")
    a("--label-smoothing", type=float, default=0.1)
    a("--dropout", type=float, default=0.0, help="dropout before the classifier")
    a("--ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights (default on)")
    a("--ema-decay", type=float, default=0.999)
    a("--tta", action=argparse.BooleanOptionalAction, default=True,
      help="horizontal-flip test-time augmentation in the final evaluation (default on)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None, help="kernel threads (mbnet._C.set_num_threads)")
    # data: source, held-out split, augmentation, subsets
    a("--data-dir", default=None,
      help="cifar-10-batches-py/, cifar-100-python/, or an image tree train/<class>/*.png|jpg with test/<class>/ "
           "or val/<class>/ (else $MBNET_DATA, else the cache dir, where CIFAR-10/100 is downloaded)")
    a("--dataset", choices=D.DATASETS, default=None, help="default: detected from --data-dir")
    a("--val-split", type=_fraction("--val-split", 0, 1), default=None, metavar="F",
      help="image folders without test/ or val/: hold out the fraction F of each class of train/ (a fixed choice)")
    a("--crop-padding", type=_fraction("--crop-padding", 0, 0.5, low_open=False), default=4 / 32, metavar="F",
      help="random crop of the image zero-padded by F x the resolution on each side (default 0.125: 4 px at 32)")
    a("--random-resized-crop", type=_fraction("--random-resized-crop", 0, 1, high_open=False), default=None,
      metavar="MIN_AREA", help="instead of the padded crop: a random box of area fraction in [MIN_AREA, 1] and "
                               "aspect ratio in [3/4, 4/3], resized back to the resolution (off by default)")
    a("--cutout", type=_fraction("--cutout", 0, 1, low_open=False), default=0.0, metavar="F",
      help="zero (the mean colour, after normalization) one square of side F x the resolution inside each "
           "training image (default 0: off)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True,
      help="mirror half the training images left-right (default on; off for digits or text)")
    a("--limit-train", type=int, default=None, help="use N training images (a fixed subset; smoke tests)")
    a("--limit-test", type=int, default=None, help="use N test images (a fixed subset)")
    a("--workers", type=int, default=None, help="processes decoding images into the cache (default: all cores)")
    a("--out", default=None, help="run directory (default runs/<name> or runs/<timestamp>)")
    a("--name", default=None, help="run name, for the default --out")
    a("--resume", action="store_true", help="continue from <out>/last.npz")
    return p


# Options that do not change the computed weights; everything else is frozen in the checkpoint.
RUNTIME_KEYS = ("threads", "data_dir", "out", "name", "resume", "workers")


def make_config(args):
    cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME_KEYS}
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR[cfg["optimizer"]] * cfg["batch_size"] / 128
    if cfg["warmup"] is None:
        cfg["warmup"] = (0.2 if cfg["schedule"] == "onecycle" else 0.05) * cfg["epochs"]
    return cfg


def build_model(cfg):
    from .models import MobileNetV1

    return MobileNetV1(alpha=cfg["alpha"], num_classes=cfg.get("num_classes", 10), input_size=cfg["resolution"],
                       dropout=cfg["dropout"], seed=cfg["seed"])


def _subset(n, limit):
    """A fixed (seed-independent) sorted subset of range(n): the data is class-major, so not a prefix."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(12345).permutation(n)[:limit])


def prepare_data(cfg, data_dir=None, verbose=True, workers=None):
    """-> (train_x, train_y, test_x, test_y) uint8/int64 at the resolution, subset; cfg gets mean/std,
    classes and num_classes (a run's saved classes must match the data's)."""
    t0 = time.perf_counter()
    d = D.load_data(data_dir, dataset=cfg.get("dataset"), resolution=cfg["resolution"], val_split=cfg.get("val_split"),
                    workers=workers, verbose=verbose)
    saved = cfg.get("classes", list(D.CLASSES)) if "mean" in cfg else d["classes"]  # older runs: CIFAR-10
    if saved != d["classes"]:
        def names(cs):
            return f"{len(cs)}: {', '.join(cs[:8])}{', ...' if len(cs) > 8 else ''}"
        raise D.DataError(f"{d['source']}: its classes ({names(d['classes'])}) are not the run's "
                          f"({names(saved)}); pass the data the run was trained on")
    cfg["dataset"], cfg["classes"], cfg["num_classes"] = d["kind"], d["classes"], len(d["classes"])
    if verbose:
        print(f"mbnet: {d['kind']} data from {d['source']} ({len(d['classes'])} classes, test split: "
              f"{d['test_split']}) ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tr, te = _subset(len(d["train_y"]), cfg["limit_train"]), _subset(len(d["test_y"]), cfg["limit_test"])
    xtr, ytr = (d["train_x"], d["train_y"]) if tr is None else (d["train_x"][tr], d["train_y"][tr])
    xte, yte = (d["test_x"], d["test_y"]) if te is None else (d["test_x"][te], d["test_y"][te])
    if "mean" not in cfg:
        mean, std = D.channel_stats(xtr)
        cfg["mean"], cfg["std"] = mean.tolist(), std.tolist()
    return xtr, ytr, xte, yte


def augmentation(cfg):
    """Loader keywords from the config (runs saved before these options existed used a 4-pixel pad)."""
    s = cfg["resolution"]
    return {"pad": round(cfg["crop_padding"] * s) if "crop_padding" in cfg else 4,
            "resized_crop_area": cfg.get("random_resized_crop"), "cutout": round(cfg.get("cutout", 0.0) * s),
            "hflip": cfg.get("hflip", True)}


# ----------------------------------------------------------------------------------------------
# Model helpers


def live_arrays(model):
    """name -> the live ndarray of every parameter and buffer (same keys as state_dict())."""
    d = {k: p.data for k, p in model.named_parameters()}
    d.update(model.named_buffers())
    return d


def dropout_modules(model):
    return [m for _, m in model.named_modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]


def forward_logits(model, x, tta=False):
    """(B,S,S,3) float32 -> (B,classes) float32 logits, no graph; with tta the mean over x and its mirror."""
    from . import Tensor, no_grad

    with no_grad():
        logits = model(Tensor(x)).data
        if tta:
            logits = 0.5 * (logits + model(Tensor(np.ascontiguousarray(x[:, :, ::-1]))).data)
    return logits


def evaluate(model, loader, tta=False, label_smoothing=0.0):
    """-> (mean loss, accuracy, predictions (N,)) over the loader, model in eval mode."""
    from . import Tensor
    from .functional import cross_entropy

    was_training = model.training
    model.eval()
    loss_sum, preds = 0.0, []
    try:
        for _, x, y in loader.epoch(0):
            logits = forward_logits(model, x, tta)
            loss_sum += float(cross_entropy(Tensor(logits), y, label_smoothing=label_smoothing).data) * len(y)
            preds.append(logits.argmax(1))
    finally:
        model.train(was_training)
    preds = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    n = max(1, len(preds))
    return loss_sum / n, float((preds == loader.labels).mean()) if len(preds) else 0.0, preds


class swapped_weights:
    """Context: the model holds `state` (e.g. the EMA weights) inside, its own weights after;
    state None leaves the model as it is."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __enter__(self):
        if self.state is not None:
            self.saved = self.model.state_dict()
            self.model.load_state_dict(self.state)
        return self.model

    def __exit__(self, *exc):
        if self.state is not None:
            self.model.load_state_dict(self.saved)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, model, opt, ema, meta):
    """Writes the checkpoint atomically (temp file in the same directory, then os.replace)."""
    arrays = {"meta": np.array(json.dumps(meta))}
    arrays.update({"model/" + k: v for k, v in model.state_dict().items()})
    if opt is not None:
        arrays.update({"optim/" + k: v for k, v in opt.state_dict().items()})
    if ema is not None:
        arrays.update({"ema/" + k: v for k, v in ema.state_dict().items()})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    """-> dict(meta, model, optim, ema) with the arrays of each part keyed without their prefix."""
    out = {"model": {}, "optim": {}, "ema": {}}
    try:
        with np.load(path) as z:
            out["meta"] = json.loads(str(z["meta"]))
            for k in z.files:
                part, _, name = k.partition("/")
                if part in out and name:
                    out[part][name] = z[k]
    except FileNotFoundError:
        raise SystemExit(f"mbnet: no checkpoint at {path}") from None
    except Exception as e:
        raise SystemExit(f"mbnet: cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------
# Progress and interrupts


class Progress:
    """One status line on stderr: rewritten in place on a terminal, plain lines (every `every` s) otherwise."""

    def __init__(self, stream=None, every=30.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.last = -math.inf

    def update(self, text, final=False):
        now = time.monotonic()
        if self.tty:
            if final or now - self.last >= 0.2:
                self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
                self.stream.flush()
                self.last = now
        elif final or now - self.last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class InterruptFlag:
    """Ctrl-C sets `requested` (the loop saves and stops after the current step); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmbnet: interrupted; saving after the current step (Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


# ----------------------------------------------------------------------------------------------


def _write_metrics(out, metrics):
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, out / "metrics.jsonl")


def _explicit_args(parser, argv):
    """Names of options given on the command line with a value other than the default."""
    defaults = vars(parser.parse_args([]))
    given = vars(parser.parse_args(argv))
    return {k for k, v in given.items() if v != defaults[k]}


def main(argv=None, *, on_step=None):
    """Returns the exit status: 0 when done, 130 when interrupted (after saving last.npz).
    on_step(step) is called after each optimizer step (tests use it to interrupt)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from . import Tensor, _C
    from .functional import cross_entropy

    if args.threads:
        _C.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / (args.name or time.strftime("%Y%m%d-%H%M%S")))
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(out / "last.npz")
        cfg = ckpt["meta"]["config"]
        ignored = sorted(k for k in _explicit_args(parser, argv) - set(RUNTIME_KEYS) if vars(args)[k] != cfg.get(k))
        if ignored:
            print(f"mbnet: --resume uses the run's saved configuration; ignoring {', '.join(ignored)}", file=sys.stderr)
    else:
        if (out / "last.npz").exists():
            raise SystemExit(f"mbnet: {out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = make_config(args)
    out.mkdir(parents=True, exist_ok=True)

    try:
        xtr, ytr, xte, yte = prepare_data(cfg, args.data_dir, workers=args.workers)
    except D.DataError as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    train_loader = D.Loader(xtr, ytr, cfg["batch_size"], mean, std, train=True, seed=cfg["seed"], **augmentation(cfg))
    test_loader = D.Loader(xte, yte, EVAL_BATCH, mean, std, train=False)
    spe = len(train_loader)
    total = cfg["epochs"] * spe
    schedule = optim.make_schedule(cfg["schedule"], cfg["lr"], total, round(cfg["warmup"] * spe))

    model = build_model(cfg)
    opt = optim.make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], weight_decay=cfg["weight_decay"])
    ema = optim.EMA(model.state_dict(), cfg["ema_decay"]) if cfg["ema"] else None
    dropouts = dropout_modules(model)
    fresh = {"epoch": 0, "batch": 0, "metrics": [], "sums": {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0},
             "best": None, "elapsed": 0.0}
    pos = fresh
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        pos = {k: ckpt["meta"][k] for k in fresh}
        saved_threads = ckpt["meta"].get("threads")
        if saved_threads is not None and saved_threads != _C.get_num_threads():
            print(f"mbnet: note: this run used {saved_threads} kernel threads, now {_C.get_num_threads()}; "
                  "the result will not be bit-identical to an unbroken run (pass --threads)", file=sys.stderr)
        print(f"mbnet: resuming {out} at epoch {pos['epoch'] + 1}, step {pos['batch']}/{spe}", file=sys.stderr)
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    nparams = sum(p.data.size for p in model.parameters())
    print(f"mbnet: MobileNetV1 alpha={cfg['alpha']} {cfg['resolution']}px, {nparams:,} parameters; "
          f"{len(ytr)} train / {len(yte)} test images, {spe} steps/epoch; run dir {out}", file=sys.stderr)

    def meta():
        return dict(pos, config=cfg, step=pos["epoch"] * spe + pos["batch"], threads=_C.get_num_threads())

    def save(name):
        save_checkpoint(out / name, model, opt, ema, meta())

    progress = Progress()
    with InterruptFlag() as interrupt:
        while pos["epoch"] < cfg["epochs"]:
            epoch, sums = pos["epoch"], pos["sums"]
            model.train()
            t_epoch = time.perf_counter()
            t_last = time.perf_counter()
            for i, x, y in train_loader.epoch(epoch, pos["batch"]):
                step = epoch * spe + i
                opt.lr = schedule(step)
                for k, m in enumerate(dropouts):
                    m.rng = np.random.default_rng([cfg["seed"], 3, step, k])
                model.zero_grad()
                logits = model(Tensor(x))
                loss = cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update(live_arrays(model))
                sums["loss"] += float(loss.data) * len(y)
                sums["correct"] += int((logits.data.argmax(1) == y).sum())
                sums["seen"] += len(y)
                now = time.perf_counter()
                sums["time"] += now - t_last
                t_last = now
                pos["batch"] = i + 1
                ips = sums["seen"] / max(sums["time"], 1e-9)
                eta = (spe - i - 1) * cfg["batch_size"] / ips
                progress.update(f"epoch {epoch + 1}/{cfg['epochs']} step {i + 1}/{spe} "
                                f"loss {sums['loss'] / sums['seen']:.4f} acc {100 * sums['correct'] / sums['seen']:.2f}% "
                                f"lr {opt.lr:.4g} {ips:.0f} img/s ETA {_fmt_time(eta)}", final=i + 1 == spe)
                if on_step is not None:
                    on_step(step)
                if interrupt.requested:
                    break
            pos["elapsed"] += time.perf_counter() - t_epoch
            if interrupt.requested and pos["batch"] < spe:
                save("last.npz")
                print(f"mbnet: saved {out / 'last.npz'} at epoch {epoch + 1}, step {pos['batch']}/{spe}; "
                      f"continue with: python -m mbnet.train --out {out} --resume", file=sys.stderr)
                return 130

            t_eval = time.perf_counter()
            ls = cfg["label_smoothing"]
            final = epoch + 1 == cfg["epochs"]
            test_loss, test_acc, _ = evaluate(model, test_loader, label_smoothing=ls)
            m = {"epoch": epoch + 1, "lr": opt.lr,
                 "train_loss": sums["loss"] / max(1, sums["seen"]), "train_acc": sums["correct"] / max(1, sums["seen"]),
                 "test_loss": test_loss, "test_acc": test_acc}
            primary = None if ema is None else ema.shadow  # weights that count: EMA if on
            if ema is not None:
                with swapped_weights(model, primary):
                    m["ema_test_loss"], m["ema_test_acc"], _ = evaluate(model, test_loader, label_smoothing=ls)
            if final and cfg["tta"]:
                with swapped_weights(model, primary):
                    m["tta_test_loss"], m["tta_test_acc"], _ = evaluate(model, test_loader, tta=True, label_smoothing=ls)
            pos["elapsed"] += time.perf_counter() - t_eval
            m["train_time"] = sums["time"]
            m["images_per_s"] = sums["seen"] / max(sums["time"], 1e-9)
            m["epoch_time"] = time.perf_counter() - t_epoch
            m["wall_time"] = pos["elapsed"]
            pos["metrics"].append(m)
            score = m.get("ema_test_acc", test_acc)
            is_best = pos["best"] is None or score > pos["best"]
            if is_best:
                pos["best"] = score
            pos["epoch"], pos["batch"] = epoch + 1, 0
            pos["sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
            save("last.npz")
            if is_best:
                save("best.npz")
            _write_metrics(out, pos["metrics"])
            try:
                from .plot import plot_curves

                plot_curves(pos["metrics"], out / "curves.png")
            except ImportError as e:
                print(f"mbnet: no curves.png ({e})", file=sys.stderr)
            line = (f"epoch {epoch + 1}/{cfg['epochs']}: train loss {m['train_loss']:.4f} acc {100 * m['train_acc']:.2f}% | "
                    f"test loss {test_loss:.4f} acc {100 * test_acc:.2f}%")
            if ema is not None:
                line += f" | EMA {100 * m['ema_test_acc']:.2f}%"
            if "tta_test_acc" in m:
                line += f" | TTA {100 * m['tta_test_acc']:.2f}%"
            print(line + f" | {m['images_per_s']:.0f} img/s, {_fmt_time(m['epoch_time'])}", file=sys.stderr)
            if interrupt.requested and not final:
                print(f"mbnet: saved {out / 'last.npz'} after epoch {epoch + 1}; "
                      f"continue with: python -m mbnet.train --out {out} --resume", file=sys.stderr)
                return 130
    print(f"mbnet: done; best test accuracy {100 * pos['best']:.2f}%; run dir {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
