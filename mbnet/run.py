"""Run helpers shared by the command lines (train, evaluate, predict, export) without importing the
trainer: evaluation, training checkpoints, the run directory (lock, orphaned temp files, metrics),
progress, interrupts, and argparse value checks with one-line errors.
"""
import argparse
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import checkpoint
from .checkpoint import dumps  # noqa: F401  (json.dumps with non-finite values as null)

EVAL_BATCH = 250


class RunError(Exception):
    """A command cannot go on: a one-line message for stderr and the exit status."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Command-line values: checked by argparse before anything runs, one line per error.


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block): `prog: error: message`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_in(lo, hi=None):
    """argparse type: an integer in [lo, hi] (hi None: no upper bound; a callable: computed at parse time)."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        top = hi() if callable(hi) else hi
        if v < lo or (top is not None and v > top):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, top, True, True)}, got {v}")
        return v

    return parse


def float_in(lo, hi=None, *, lo_open=False, hi_open=False):
    """argparse type: a finite float in the interval from lo to hi (ends open or closed; hi None: none)."""

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (
                hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_range(lo, hi, not lo_open, not hi_open)}, got {text}")
        return v

    return parse


def _range(lo, hi, lo_closed, hi_closed):
    if hi is None:
        return f"{'≥' if lo_closed else '>'} {lo}"
    return f"in {'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"


def max_threads():
    """The most kernel threads mbnet._C.set_num_threads accepts: 4x the processors this process may use."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 4 * n


def machine_name():
    """The CPU and SIMD build this process runs on, as metrics, checkpoints and latency files record
    it: "AMD EPYC (family 25 model 17), avx512"."""
    from . import _C
    from ._native import cpu_name

    return f"{cpu_name()}, {_C.build_info().get('simd')}"


def set_threads(n):
    """mbnet._C.set_num_threads(n) for n not None, a RunError (one line) if refused."""
    if n is None:
        return
    from . import _C

    try:
        _C.set_num_threads(n)
    except ValueError as e:
        raise RunError(f"--threads {n}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Model helpers


def live_arrays(model):
    """name -> the live ndarray of every parameter (frozen ones too) and buffer (state_dict()'s keys)."""
    return model.named_state()


def dropout_modules(model):
    return [m for _, m in model.named_modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]


def translate(x, dy, dx, fill):
    """(B,H,W,C) images moved down by dy and right by dx pixels (negative: up, left), the uncovered
    border set to fill (C,)."""
    out = np.empty_like(x)
    out[...] = fill
    h, w = x.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _with_tta(forward, x, tta, shift=0, fill=0.0):
    """forward(x), or with tta the mean of forward over x and its mirror (flipped along the width),
    and with shift > 0 also over both moved by (shift, shift) and (-shift, -shift) pixels, the
    border filled with fill (6 views)."""
    logits = forward(x)
    if not tta:
        return logits
    mirror = np.ascontiguousarray(x[:, :, ::-1])
    if not shift:
        return 0.5 * (logits + forward(mirror))
    views = [mirror] + [translate(v, d, d, fill) for v in (x, mirror) for d in (shift, -shift)]
    for v in views:
        logits = logits + forward(v)
    return logits / (1 + len(views))


def black(model):
    """A black pixel after the model's input normalization (training's crop padding): (C,) float32."""
    return (-np.asarray(model.mean, np.float32) / np.asarray(model.std, np.float32)).astype(np.float32)


def forward_logits(model, x, tta=False, shift=0):
    """(B,S,S,3) float32 -> (B,classes) float32 logits through the autograd forward, no graph; with
    tta the mean over x and its mirror (and with shift their moved copies, as _with_tta)."""
    from . import Tensor, no_grad

    with no_grad():
        return _with_tta(lambda images: model(Tensor(images)).data, x, tta, shift, black(model) if shift else 0.0)


def inference(model, batch):
    """run(x, tta=False, shift=0): the eval-mode network on x (n <= batch, s, s, c) -> logits (n,
    classes), with tta the mean over x and its mirror, with shift also over their copies moved
    diagonally by +-shift pixels (_with_tta). A float32 model of the MobileNetV1 family runs as the
    compiled plan (mbnet.plan: BatchNorm folded, one call into the extension), as predict and
    export run it, made now from the model's current weights; any other model runs forward_logits."""
    from .plan import compile as compile_plan

    if all(p.dtype == np.float32 for p in model.parameters()):
        try:
            plan = compile_plan(model, batch)
        except ValueError:  # not a network the plan knows
            pass
        else:
            return lambda x, tta=False, shift=0: _with_tta(plan, x, tta, shift, black(model) if shift else 0.0)
    return lambda x, tta=False, shift=0: forward_logits(model, x, tta, shift)


def eval_split(cfg):
    """The name of the split a run evaluates on: "held-out" (--val-split) or "test"."""
    return "held-out" if cfg.get("val_split") else "test"


def evaluate(model, loader, tta=False, label_smoothing=0.0, shift=0, progress=None):
    """-> (mean loss, accuracy, predictions (N,)) over the loader, the model in eval mode
    (``inference``; tta and shift as its run takes them). progress: called as progress(done,
    total) in images after each batch."""
    from . import Tensor
    from .functional import cross_entropy

    was_training = model.training
    model.eval()
    loss_sum, preds, done = 0.0, [], 0
    try:
        run = inference(model, loader.batch_size)
        for _, x, y in loader.epoch(0):
            logits = run(x, tta, shift)
            loss_sum += float(cross_entropy(Tensor(logits), y, label_smoothing=label_smoothing).data) * len(y)
            preds.append(logits.argmax(1))
            if progress is not None:
                done += len(y)
                progress(done, len(loader.labels))
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


def all_finite(arrays):
    """True when every array of the iterable holds only finite values."""
    return all(np.isfinite(a).all() for a in arrays)


# ----------------------------------------------------------------------------------------------
# Training checkpoints (the weights file of mbnet.checkpoint plus optimizer, EMA and position)


def save_checkpoint(path, model, opt, ema, meta):
    """The weights file of ``model`` plus the optimizer, the EMA and the run's position, written
    atomically (checkpoint.WriteError names the file and the errno; the previous file is intact)."""
    checkpoint.save(path, model, optim=None if opt is None else opt.state_dict(),
                    ema=None if ema is None else ema.state_dict(), meta=meta)


def load_checkpoint(path):
    """-> dict(meta, model, optim, ema) with the arrays of each part keyed without their prefix;
    a RunError naming the file when it cannot be read."""
    try:
        return checkpoint.read(path)
    except checkpoint.CheckpointError as e:
        raise RunError(f"cannot read checkpoint {e}") from None


# ----------------------------------------------------------------------------------------------
# The run directory


def write_text(path, text):
    """Writes ``text`` to ``path`` atomically (checkpoint.atomic_write)."""
    checkpoint.atomic_write(path, lambda f: f.write(text.encode()))


def write_metrics(out, metrics):
    """metrics.jsonl: one JSON object per epoch (non-finite values as null), written atomically."""
    write_text(Path(out) / "metrics.jsonl", "".join(dumps(m) + "\n" for m in metrics))


def read_metrics(run_dir):
    """The rows of run_dir's metrics.jsonl ([] when it has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The files a run writes through temp files named <file><random>.tmp<suffix>.
RUN_FILES = ("last.npz", "curves.png", "metrics.jsonl", "config.json")


def remove_orphans(out):
    """Deletes the temp files a killed run left in ``out``; -> their names. Call with the lock held."""
    removed = []
    for name in RUN_FILES:
        stem = Path(name)
        for f in Path(out).glob(f"{name}*.tmp{stem.suffix}"):
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:  # gone already, or not ours to delete: harmless
                pass
    return sorted(removed)


class RunLock:
    """Context: an advisory lock on a run directory, held for the whole run.

    ``<out>/run.lock`` holds the owner's pid, host and start time while a run uses the directory,
    and an flock(2) on it, which the kernel drops when the owner dies however it dies. A second
    run on the directory fails at once (RunError naming the owner); a lock file left with content
    by a run that is gone (killed) is stale and taken over, with a note. The file stays, emptied,
    after the run.
    """

    NAME = "run.lock"

    def __init__(self, out):
        self.path = Path(out) / self.NAME
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unlocked
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunError(f"cannot create the lock file {self.path}: [Errno {e.errno}] {e.strerror}") from None
        owner = _read_owner(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by another run ({_describe(owner)}); "
                           "wait for it to finish or choose another --out") from None
        owner = _read_owner(fd)  # what the previous holder left, now that nobody can change it
        if owner and owner.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise RunError(f"{self.path} names a run on another host ({_describe(owner)}); if that run is over, "
                           f"delete {self.path} and start again")
        if owner:
            print(f"mbnet: note: {self.path} was left by a run that is no longer running ({_describe(owner)}); "
                  "taking it over", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as e:
            self.__exit__()
            raise RunError(f"cannot write {self.path}: [Errno {e.errno}] {e.strerror}", status=1) from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # empty: nobody owns the directory
            except OSError:
                pass
            os.close(self.fd)  # releases the flock
            self.fd = None


def _read_owner(fd):
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"pid": "?", "host": None, "started": "?"}


def _describe(owner):
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"


# ----------------------------------------------------------------------------------------------
# Progress and interrupts


class Progress:
    """One status line on stderr: rewritten in place on a terminal, plain lines (every `every` s) otherwise."""

    def __init__(self, stream=None, every=30.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.last = -math.inf
        self.open = False  # a terminal line not yet ended

    def update(self, text, final=False):
        now = time.monotonic()
        if self.tty:
            if final or now - self.last >= 0.2:
                self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
                self.stream.flush()
                self.last, self.open = now, not final
        elif final or now - self.last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now

    def clear(self):
        """Erases a terminal line that update left open, so that other output starts a clean line."""
        if self.open:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.open = False


def images_bar(name, batch):
    """A progress(done, total) callback for a pass over images in batches: "<name>: done/total
    images" on stderr (Progress, a line every 10 s off a terminal), silent when one batch holds them
    all (mbnet.predict, mbnet.evaluate)."""
    bar = Progress(sys.stderr, every=10.0)

    def progress(done, total):
        if total > batch:
            bar.update(f"{name}: {done}/{total} images", final=done == total)

    return progress


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Interrupt:
    """Context: SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, `docker stop`) set `signum`;
    the loop saves at the current step and exits with `status` (128 + the signal: 130, 143).
    A second signal aborts at once (KeyboardInterrupt for SIGINT, SystemExit(143) for SIGTERM).
    Nested (a sweep's around each run's training): a signal the outer one got before the inner
    one was entered is the inner one's too (a sweep stopped while a run loads its data stops at
    the run's first step, not at its end), and the inner one's reaches the outer one on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    _entered = []  # the Interrupts now entered, outermost first

    def __init__(self):
        self.signum = None

    @property
    def requested(self):
        return self.signum is not None

    @property
    def status(self):
        return 128 + self.signum

    def _handler(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\nmbnet: {name} received; saving after the current step ({name} again to abort)", file=sys.stderr)

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
            self.outer = Interrupt._entered[-1] if Interrupt._entered else None
            if self.outer is not None and self.signum is None:
                self.signum = self.outer.signum
            Interrupt._entered.append(self)
        return self

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)
        if self.old:
            Interrupt._entered.remove(self)
            if self.outer is not None and self.outer.signum is None:
                self.outer.signum = self.signum
