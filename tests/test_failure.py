"""Failure behaviour of the training command (issue 8): a diverged run stops (or skips) and never
saves non-finite weights; a run directory is locked; every bad option is a one-line error before
anything is written; SIGTERM saves and exits 143; a failed save names the file and errno and keeps
the previous checkpoint; temp files a killed run left are removed; files get umask modes."""
import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mbnet import Tensor, checkpoint, data, evaluate, run, train
from mbnet import functional as F
from mbnet.models import MobileNetV1
from test_train import _args, _meta, _restore_threads, _tiny_cifar, tiny  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SPE = 10  # steps per epoch of _args on the tiny data: 320 images, batch 32


def _strict_json_lines(path):
    """Every line parsed as JSON that has no NaN/Infinity (json.loads accepts those by default)."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _snapshot(out, names=("last.npz",)):
    return {n: (out / n).read_bytes() for n in names if (out / n).exists()}


def _poison_training_loss(monkeypatch, bad_steps):
    """Makes the logits, so the loss, NaN at the given 0-based training steps of this process."""
    real, calls = F.cross_entropy, []

    def cross_entropy(logits, labels, **kw):
        loss = real(logits, labels, **kw)
        if logits.requires_grad:  # a training step, not an evaluation
            calls.append(len(calls))
            if calls[-1] in bad_steps:
                return real(logits * float("nan"), labels, **kw)
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


# --- 1. non-finite loss or gradient ---------------------------------------------------------------


def test_a_huge_learning_rate_stops_with_a_message_and_saves_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    assert train.main(_args(tiny, out, "--epochs", "2", "--lr", "1e6")) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mbnet: non-finite ") and "epoch 1, step " in err and "learning rate" in err
    assert "nothing was saved" in err and "--on-nan skip" in err
    assert not (out / "last.npz").exists() and not (out / "metrics.jsonl").exists()


def test_nan_in_epoch_2_keeps_epoch_1s_checkpoints(tiny, tmp_path, monkeypatch, capsys):
    out, saved = tmp_path / "r", {}
    _poison_training_loss(monkeypatch, {SPE + 2})
    hook = lambda step: step == SPE and saved.update(_snapshot(out))  # noqa: E731  (epoch 1 is on disk)
    assert train.main(_args(tiny, out, "--epochs", "3"), on_step=hook) == 3
    err = capsys.readouterr().err
    assert (f"mbnet: non-finite loss at epoch 2, step 3/{SPE} (global step {SPE + 3}); "
            "likely cause: the learning rate") in err
    assert f"{out / 'last.npz'} is intact" in err
    assert saved.keys() == {"last.npz"} and _snapshot(out) == saved
    assert [m["epoch"] for m in _strict_json_lines(out / "metrics.jsonl")] == [1]
    assert _meta(out / "last.npz")["epoch"] == 1


def test_on_nan_skip_steps_over_a_bad_batch(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    _poison_training_loss(monkeypatch, {SPE + 2})
    assert train.main(_args(tiny, out, "--epochs", "2", "--on-nan", "skip")) == 0
    assert f"mbnet: skipped epoch 2, step 3/{SPE} (global step {SPE + 3}): non-finite loss" in capsys.readouterr().err
    rows = _strict_json_lines(out / "metrics.jsonl")
    assert "skipped_steps" not in rows[0] and rows[1]["skipped_steps"] == 1
    ck = run.load_checkpoint(out / "last.npz")
    assert ck["meta"]["step"] == 2 * SPE and int(ck["optim"]["step"]) == 2 * SPE - 1  # one update left out
    assert run.all_finite(ck["model"].values()) and run.all_finite(ck["ema"].values())


def test_on_nan_skip_gives_up_after_a_run_of_bad_steps(tiny, tmp_path, monkeypatch, capsys):
    _poison_training_loss(monkeypatch, set(range(5, 100)))
    assert train.main(_args(tiny, tmp_path / "r", "--epochs", "3", "--on-nan", "skip")) == 3
    assert f"non-finite loss at {train.SKIP_LIMIT} steps in a row, the last at epoch 3" in capsys.readouterr().err


def test_non_finite_weights_are_never_saved(tiny, tmp_path):
    out = tmp_path / "r"
    parser = train.build_parser()
    argv = _args(tiny, out, "--epochs", "1")
    out.mkdir()
    r = train.start_run(parser.parse_args(argv), argv, parser, out)
    with run.Interrupt() as interrupt:
        assert r.train_epoch(interrupt)
    r.model.features[3].pw.weight.data[0, 0] = np.inf  # an overflow the gradients did not show
    with pytest.raises(run.RunError, match=f"weights became non-finite by step {SPE} ") as e:
        r.finish_epoch()
    assert e.value.status == 3 and not (out / "last.npz").exists()


def test_non_finite_gradient_is_detected():
    model = MobileNetV1(alpha=0.25, input_size=8)
    loss = F.cross_entropy(model(Tensor(np.zeros((2, 8, 8, 3), np.float32))), np.array([0, 1]))
    loss.backward()
    params = model.parameters()
    assert train.grads_finite(params)
    params[5].grad[0] = -np.inf
    assert not train.grads_finite(params)
    params[5].grad[0] = np.nan
    assert not train.grads_finite(params)


def test_metrics_are_valid_json_whatever_the_values(tmp_path):
    run.write_metrics(tmp_path, [{"epoch": 1, "test_loss": float("nan"), "x": [float("inf"), 1.5]}])
    assert _strict_json_lines(tmp_path / "metrics.jsonl") == [{"epoch": 1, "test_loss": None, "x": [None, 1.5]}]
    checkpoint.save(tmp_path / "c.npz", MobileNetV1(alpha=0.25, input_size=8), meta={"metrics": [{"loss": float("inf")}]})
    with np.load(tmp_path / "c.npz") as z:
        (tmp_path / "meta.json").write_text(str(z["meta"]))
    assert _strict_json_lines(tmp_path / "meta.json")[0]["metrics"] == [{"loss": None}]


# --- 4. run directory lock ------------------------------------------------------------------------


def test_a_second_run_on_a_locked_directory_fails_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    with run.RunLock(out):
        assert train.main(_args(tiny, out)) == 2
    err = capsys.readouterr().err
    assert f"mbnet: {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, since " in err
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing else written
    assert (out / "run.lock").read_text() == ""  # released: emptied


def test_a_stale_lock_is_taken_over(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    assert train.main(_args(tiny, out, "--epochs", "1", "--limit-train", "64", "--limit-test", "32")) == 0
    assert f"was left by a run that is no longer running (pid {dead.pid} on" in capsys.readouterr().err
    assert (out / "last.npz").exists() and (out / "run.lock").read_text() == ""

    (out / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    assert train.main(_args(tiny, out, "--resume")) == 2
    assert "names a run on another host (pid 1 on elsewhere" in capsys.readouterr().err


# --- 5. every command-line value checked before anything is written -------------------------------

BAD_VALUES = [
    (["--epochs", "0"], "--epochs: must be ≥ 1, got 0"),
    (["--epochs", "-3"], "--epochs: must be ≥ 1, got -3"),
    (["--epochs", "2.5"], "--epochs: expected an integer, got '2.5'"),
    (["--batch-size", "0"], "--batch-size: must be ≥ 1, got 0"),
    (["--batch-size", "-5"], "--batch-size: must be ≥ 1, got -5"),
    (["--alpha", "0"], "--alpha: must be a finite number in [0.03125, 4]"),
    (["--alpha", "-1"], "--alpha: must be a finite number in [0.03125, 4]"),
    (["--threads", "-1"], "--threads: must be in [1, "),
    (["--threads", "0"], "--threads: must be in [1, "),
    (["--threads", "10000"], "--threads: must be in [1, "),
    (["--label-smoothing", "1"], "--label-smoothing: must be a finite number in [0, 1), got 1"),
    (["--limit-train", "0"], "--limit-train: must be ≥ 1, got 0"),
    (["--limit-test", "0"], "--limit-test: must be ≥ 1, got 0"),
    (["--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number ≥ 0, got nan"),
    (["--ema-decay", "2"], "--ema-decay: must be a finite number in [0, 1), got 2"),
    (["--dropout", "1"], "--dropout: must be a finite number in [0, 1), got 1"),
    (["--resolution", "1"], "--resolution: must be in [8, 512], got 1"),
    (["--seed", "-1"], "--seed: must be ≥ 0, got -1"),
    (["--warmup", "-1"], "--warmup: must be a finite number ≥ 0, got -1"),
    (["--epochs", "2", "--warmup", "3"], "--warmup 3.0 is longer than --epochs 2"),
    (["--optimizer", "lbfgs"], "--optimizer: invalid choice: 'lbfgs'"),
    (["--on-nan", "ignore"], "--on-nan: invalid choice: 'ignore'"),
    (["--resume"], "--resume needs the run's --out"),
    (["--resume", "--init", "w.npz", "--name", "x"], "--init starts a new run; it cannot be combined with --resume"),
]


@pytest.mark.parametrize("argv,message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_one_line_errors_before_anything_is_written(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # the default --out would be runs/<timestamp> here
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("python -m mbnet.train: error: ") and list(tmp_path.iterdir()) == []


def test_evaluate_checks_its_values_too(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["w.npz", "--limit-test", "0"])
    assert capsys.readouterr().err == ("python -m mbnet.evaluate: error: argument --limit-test: must be ≥ 1, got 0 "
                                       "(see --help)\n")


# --- 6. SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_mid_epoch_saves_exits_143_and_resumes(tmp_path, monkeypatch, capsys):
    data = _tiny_cifar(tmp_path / "data", n_per_batch=200)  # 1000 images, 125 steps of 8
    out = tmp_path / "r"
    argv = ["--threads", "1", "--alpha", "0.25", "--resolution", "16", "--batch-size", "8", "--epochs", "1",
            "--limit-test", "32", "--no-tta", "--data-dir", str(data), "--out", str(out)]
    env = {**os.environ, "MBNET_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("MBNET_DATA", None)
    child = subprocess.Popen([sys.executable, "-m", "mbnet.train", *argv], cwd=REPO, env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in child.stderr:  # the first progress line is written after the first step
            lines.append(line)
            if "step 1/125" in line:
                break
        # meanwhile a second run on the same directory fails at once
        assert train.main(argv) == 2
        assert f"is in use by another run (pid {child.pid} on" in capsys.readouterr().err
        child.send_signal(signal.SIGTERM)
        rest = child.stderr.read()
        assert child.wait(timeout=60) == 143, "".join(lines) + rest
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "SIGTERM received; saving after the current step" in rest and "--resume" in rest
    meta = _meta(out / "last.npz")
    assert meta["epoch"] == 0 and 1 <= meta["batch"] < 125  # saved mid-epoch 1, where it was
    monkeypatch.setenv("MBNET_CACHE", str(tmp_path / "cache"))
    assert train.main(["--out", str(out), "--resume", "--data-dir", str(data), "--threads", "1"]) == 0
    assert f"resuming {out} at epoch 1, step {meta['batch']}/125" in capsys.readouterr().err
    assert _meta(out / "last.npz")["step"] == 125


def test_a_signal_an_enclosing_interrupt_got_stops_the_run_at_its_first_step(tiny, tmp_path, capsys):
    """A sweep (mbnet.experiments) holds an Interrupt around each run it trains; a SIGINT that comes
    while a run loads its data (the run's own handler not yet in place) stops the run at its first
    step, saved, not after its last epoch; and a signal the run got reaches the sweep."""
    out = tmp_path / "r"
    with run.Interrupt() as sweep:
        signal.raise_signal(signal.SIGINT)
        assert sweep.status == 130
        assert train.main(_args(tiny, out, "--epochs", "2")) == 130
    meta = _meta(out / "last.npz")
    assert (meta["epoch"], meta["batch"]) == (0, 1)
    assert "saved" in capsys.readouterr().err
    with run.Interrupt() as sweep:
        with run.Interrupt() as inner:
            assert not inner.requested
            signal.raise_signal(signal.SIGTERM)
            assert inner.status == 143
        assert sweep.status == 143
    with run.Interrupt() as sweep:  # a signal then goes to the innermost only
        assert not sweep.requested


# --- 7. full disk, no permission ------------------------------------------------------------------


def _fail_writes(monkeypatch, err):
    """From now on np.savez (what checkpoints use) writes a little and then fails with ``err``."""
    def savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(checkpoint.np, "savez", savez)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_names_the_file_and_errno_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                   capsys, err):
    out, saved = tmp_path / "r", {}

    def hook(step):
        if step == SPE:  # epoch 2's first step: epoch 1 is saved; the disk fills now
            saved.update(_snapshot(out, ("last.npz", "metrics.jsonl")))
            _fail_writes(monkeypatch, err)

    assert train.main(_args(tiny, out, "--epochs", "2"), on_step=hook) == 1
    err_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err_line == (f"mbnet: cannot write {out / 'last.npz'}: [Errno {err}] {os.strerror(err)}; "
                        f"{out / 'last.npz'} is intact")
    assert _snapshot(out, ("last.npz", "metrics.jsonl")) == saved and len(saved) == 2
    assert not list(out.glob("*.tmp*"))


def test_a_failed_save_on_sigint_is_one_line_too(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"

    def hook(step):
        if step == 2:
            _fail_writes(monkeypatch, errno.ENOSPC)
            signal.raise_signal(signal.SIGINT)

    assert train.main(_args(tiny, out, "--epochs", "1"), on_step=hook) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mbnet: cannot write {out / 'last.npz'}: [Errno 28] {os.strerror(28)}; "
        f"nothing was saved to {out / 'last.npz'}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "run.lock"]


# --- 8. temp files of a killed run, file modes, weights-only files ---------------------------------


def test_orphaned_temp_files_are_removed_and_files_get_umask_modes(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    old = os.umask(0o027)
    try:
        assert train.main(_args(tiny, out, "--epochs", "1", "--limit-train", "64", "--limit-test", "32")) == 0
    finally:
        os.umask(old)
    for name in ("last.npz", "curves.png", "metrics.jsonl", "config.json", "run.lock"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    orphans = ["last.npzk2j4.tmp.npz", "last.npz_x1.tmp.npz", "curves.pngab.tmp.png", "metrics.jsonlq.tmp.jsonl"]
    for name in orphans + ["notes.tmp.npz"]:
        (out / name).write_bytes(b"half")
    capsys.readouterr()
    assert train.main(_args(tiny, out, "--resume")) == 0  # already done: nothing to train
    assert f"removed 4 temp file(s) a killed run left in {out}" in capsys.readouterr().err
    assert not any((out / n).exists() for n in orphans) and (out / "notes.tmp.npz").exists()


def test_evaluate_reads_a_weights_only_file(tiny, tmp_path, capsys):
    model = MobileNetV1(alpha=0.25, input_size=16, classes=data.CLASSES)
    model.save(tmp_path / "w.npz")
    argv = [str(tmp_path / "w.npz"), "--data-dir", str(tiny), "--limit-test", "20", "--threads", "1"]
    assert evaluate.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{tmp_path / 'w.npz'}: raw weights") and "test accuracy:" in text


@pytest.mark.parametrize("module", ["train", "evaluate", "predict", "export", "experiments", "plot"])
def test_every_command_line_prints_its_help(module, capsys):
    """--help formats every option's help (a stray % in one of them breaks it for all)."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"mbnet.{module}").main(["--help"])
    assert e.value.code == 0 and f"python -m mbnet.{module}" in capsys.readouterr().out
