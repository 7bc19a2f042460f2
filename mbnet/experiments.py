"""The paper's accuracy-cost experiments (arXiv:1704.04861 Tables 4-7, Figures 4-5) on CIFAR-10,
with measured latency: `python -m mbnet.experiments [TABLE ...] [options]` (see --help).

Tables (all by default):
  table4   conv MobileNet (full 3x3 convolutions) against MobileNetV1 at one alpha (--table4-alpha,
           default 0.5: at alpha 1 the conv model trains 6.6x slower per step than MobileNetV1, which
           alone would take about as long as the whole 16-point grid)
  table5   narrow (alpha 0.75, full depth) against shallow (alpha 1 without the five 512-channel blocks)
  table6   alpha 1, 0.75, 0.5, 0.25 at 32 px
  table7   resolution 32, 28, 24, 20 px at alpha 1 (CIFAR downscaled; --upscaled: 224, 192, 160, 128)
  figures  the 16-point alpha x resolution grid: Figures 4 and 5 and latency against mult-adds
  dwdecay  alpha 1 at the first resolution with --dw-weight-decay 0 against the default (the
           depthwise filters decayed like the other weights): the paper's advice, measured
  noise    one configuration (--noise-alpha at the first resolution) with each of --seeds
  ablation alpha 1 at the first resolution: the trainer's default recipe against the default plus
           each part the fast and record recipes add (ABLATION: cutout, mixup, CutMix, random-resized
           crop, no depthwise weight decay, progressive resizing from half the side), one run each,
           the same epochs; read it beside the noise band
           (`ablation noise`: a difference smaller than the seeds' spread is marked "within noise")

One recipe for every run: the trainer's defaults with --epochs and --train-args. Every run is an
ordinary run directory of `python -m mbnet.train`, OUT/runs/<arch>-a<alpha>-r<px>-s<seed>, trained
once however many tables it is in (alpha 1 at 32 px is in Tables 6 and 7 and the grid; every run but
the noise band's other seeds uses the first of --seeds). OUT/manifest.json holds the settings and
each run's trainer options and state. Running the same command again skips finished runs and
continues interrupted ones with the trainer's --resume at the saved step (bit-identical to an
unbroken run: the thread count is a setting); settings other than the manifest's are refused.

Each row: test accuracy at the final epoch as the recipe evaluates it (EMA weights and flip TTA by
default; never an epoch chosen by test score), mult-adds and parameters from summary() at the
run's input size, inference latency measured after training (median of repeated calls on batches
of 1 and 128, the compiled plan mbnet.plan when this build has it, else the autograd eval path;
OUT/runs/<run>/latency.json; --measure-latency measures all runs again in one pass of several
rounds, so that they compare), training time. Outputs, rewritten at the end of every invocation
(rows not yet trained say "pending"): OUT/results.json, OUT/results.md (each row beside the paper's
ImageNet figures; differences from a table's first row smaller than the noise band's spread are
marked as such), and the PNGs of FIGURES.

Exit status: 0 done; 130/143 a signal stopped a run after saving it (run again to continue); 1 or
2 a run could not be written or refused its options (the trainer's message), 2 bad options or a
sweep directory made with other settings or in use; 3 some run diverged: it is recorded in the
manifest and skipped from then on (delete its directory to try again), the other runs go on.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from .run import (Interrupt, Parser, RunError, RunLock, dumps, float_in, int_in, machine_name, max_threads, set_threads,
                  read_metrics, write_text)

ALPHAS = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS = (32, 28, 24, 20)  # rho = 1, 6/7, 5/7, 4/7 of CIFAR's 32 px
UPSCALED = (224, 192, 160, 128)  # the paper's own sizes, CIFAR upscaled
# --tiny: every width x 1/8 and these sizes, a few hundred images, one epoch: the pipeline in seconds.
TINY_WIDTH, TINY_RESOLUTIONS = 1 / 8, (16, 14, 12, 10)
TINY_RECIPE = ["--limit-train", "256", "--limit-test", "100", "--batch-size", "64", "--ema-decay", "0.9"]
TABLES = ("table4", "table5", "table6", "table7", "figures", "dwdecay", "noise", "ablation")
RUN_ORDER = ("table6", "table7", "table5", "table4", "noise", "dwdecay", "ablation", "figures")  # most-cited first
# The ablation's rows: the default recipe plus one part (mbnet.train options; the values of train.RECIPES).
ABLATION = (("cutout, 0.25 of the side (8 px at 32)", ("--cutout", "0.25")),
            ("mixup, alpha 0.2", ("--mixup", "0.2")),
            ("CutMix, alpha 1", ("--cutmix", "1")),
            ("random-resized crop, area >= 0.35", ("--random-resized-crop", "0.35")),
            ("no weight decay on the depthwise filters", ("--dw-weight-decay", "0")),
            ("progressive resizing from half the side (16 px at 32; same epochs, fewer pixels)",
             ("--progressive-resize", "{half}")))


def ablation_rows(side):
    """ABLATION with its options for runs at `side` px ({half}: side // 2)."""
    return [(label, tuple(x.format(half=side // 2) for x in extra)) for label, extra in ABLATION]


DEFAULT_EPOCHS, TINY_EPOCHS = 15, 1
SHARED_BELOW = 0.8  # an epoch whose process got less of its threads' time than this shared the cores
REPEATS, TINY_REPEATS = {1: 50, 128: 10}, {1: 3, 128: 2}  # latency: timed calls per batch size
ROUNDS, TINY_ROUNDS = 5, 2  # --measure-latency: passes over all runs
FIGURES = {"fig4": "fig4_accuracy_vs_mult_adds.png", "fig5": "fig5_accuracy_vs_params.png",
           "latency": "latency_vs_mult_adds.png"}

# The paper's ImageNet figures: (top-1 accuracy %, mult-adds M, parameters M).
PAPER_CONV, PAPER_MOBILENET, PAPER_SHALLOW = (71.7, 4866, 29.3), (70.6, 569, 4.2), (65.3, 307, 2.9)
PAPER_ALPHA = {1.0: (70.6, 569, 4.2), 0.75: (68.4, 325, 2.6), 0.5: (63.7, 149, 1.3), 0.25: (50.6, 41, 0.5)}
PAPER_RHO = [("224", (70.6, 569, 4.2)), ("192", (69.1, 418, 4.2)), ("160", (67.2, 290, 4.2)), ("128", (64.4, 186, 4.2))]


class Spec(namedtuple("Spec", "arch alpha resolution seed extra", defaults=((),))):
    """One training run: architecture, width, input size, seed, and trainer options of its own
    (extra: they come after the sweep's recipe, so they win)."""

    @property
    def name(self):
        return f"{self.arch}-a{self.alpha:g}-r{self.resolution}-s{self.seed}" + \
            "".join("-" + x.lstrip("-") for x in self.extra)

    def own_options(self):
        """The options that make this run its table row (--train-args may not set them)."""
        return ["--arch", self.arch, "--alpha", repr(self.alpha), "--resolution", str(self.resolution),
                "--seed", str(self.seed)]

    def options(self, settings):
        """The trainer options of this run in the sweep."""
        return self.own_options() + recipe(settings) + list(self.extra)


Row = namedtuple("Row", "label spec paper_label paper")  # paper: (acc, mult-adds M, params M) or None
Table = namedtuple("Table", "title rows")


def resolutions(settings):
    return TINY_RESOLUTIONS if settings["tiny"] else UPSCALED if settings["upscaled"] else RESOLUTIONS


def make_tables(settings):
    """{table name: Table} for the settings (tiny, upscaled, table4_alpha, noise_alpha, seeds)."""
    width = TINY_WIDTH if settings["tiny"] else 1.0
    res = resolutions(settings)
    seed = settings["seeds"][0]

    def spec(arch, alpha, r=res[0], s=seed):
        return Spec(arch, alpha * width, r, s)

    def a(alpha):
        return f"α={alpha * width:g}"

    a4 = settings["table4_alpha"]
    return {
        "table4": Table(f"Table 4: depthwise separable vs full convolution (α={a4 * width:g}; the paper: α=1)", [
            Row(f"Conv MobileNet {a(a4)}", spec("conv", a4), "Conv MobileNet", PAPER_CONV),
            Row(f"MobileNet {a(a4)}", spec("mobilenet", a4), "MobileNet", PAPER_MOBILENET)]),
        "table5": Table("Table 5: narrow vs shallow", [
            Row(f"narrow {a(0.75)}", spec("mobilenet", 0.75), "0.75 MobileNet", PAPER_ALPHA[0.75]),
            Row(f"shallow {a(1.0)}", spec("shallow", 1.0), "Shallow MobileNet", PAPER_SHALLOW)]),
        "table6": Table(f"Table 6: width multiplier α ({res[0]} px)", [
            Row(f"MobileNet {a(x)}", spec("mobilenet", x), f"{x} MobileNet-224", PAPER_ALPHA[x]) for x in ALPHAS]),
        "table7": Table(f"Table 7: resolution ρ ({a(1.0)})", [
            Row(f"MobileNet {r} px", spec("mobilenet", 1.0, r), f"1.0 MobileNet-{p}", fig)
            for r, (p, fig) in zip(res, PAPER_RHO)]),
        "figures": Table("Figures 4 and 5: the α x ρ grid", [
            Row(f"{a(x)} {r} px", spec("mobilenet", x, r), None, None) for x in ALPHAS for r in res]),
        "dwdecay": Table(f"Weight decay on the depthwise filters ({a(1.0)}, {res[0]} px; the paper: little or none)", [
            Row("depthwise filters decayed like the other weights (default)", spec("mobilenet", 1.0), None, None),
            Row("no weight decay on the depthwise filters", spec("mobilenet", 1.0)._replace(
                extra=("--dw-weight-decay", "0")), None, None)]),
        "noise": Table(f"Noise band: MobileNet {a(settings['noise_alpha'])} {res[0]} px, seeds "
                       f"{', '.join(map(str, settings['seeds']))}", [
            Row(f"seed {s}", spec("mobilenet", settings["noise_alpha"], s=s), None, None) for s in settings["seeds"]]),
        "ablation": Table(f"Ablation: the default recipe plus one part ({a(1.0)}, {res[0]} px)", [
            Row("default recipe", spec("mobilenet", 1.0), None, None)] + [
            Row(f"+ {label}", spec("mobilenet", 1.0)._replace(extra=extra), None, None)
            for label, extra in ablation_rows(res[0])]),
    }


def recipe(settings):
    """The trainer options every run of the sweep shares."""
    return ["--epochs", str(settings["epochs"])] + (TINY_RECIPE if settings["tiny"] else []) + \
        shlex.split(settings["train_args"])


def accuracy_name(settings):
    """(name, note) of the accuracy the runs report: on the test split, or, with --val-split F in
    --train-args, on the fixed fraction F of the train split the trainer holds out (the test split unread).
    note is "" or a parenthesis saying which split."""
    from . import train

    split = train.parse_args(train.build_parser(), recipe(settings)).val_split  # as the trainer reads it
    if split is None:
        return "test accuracy", ""
    return "held-out accuracy", (f" (the fixed {float(split):g} of each class of the train split "
                                 "that --val-split holds out; the test split is not read)")


# ----------------------------------------------------------------------------------------------
# Runs


def run_state(run_dir, epochs):
    """"done" (all epochs in metrics.jsonl), "interrupted" (a last.npz to resume) or "new"."""
    rows = read_metrics(run_dir)
    if rows and rows[-1]["epoch"] >= epochs:
        return "done"
    return "interrupted" if (Path(run_dir) / "last.npz").is_file() else "new"


def final_accuracy(m):
    """(accuracy, what it is) of a final metrics row: TTA of the EMA weights, else EMA, else raw."""
    tta = f"flip + {m['tta_shift']} px shift TTA" if m.get("tta_shift") else "flip TTA"
    for key, what in (("tta_test_acc", f"EMA + {tta}" if "ema_test_acc" in m else tta),
                      ("ema_test_acc", "EMA"), ("test_acc", "final weights")):
        if m.get(key) is not None:
            return m[key], what


def measure_latency(model, batch, repeats):
    """(median seconds of one call on a batch of random images, engine): the compiled plan
    (mbnet.plan) when this build has it, else the autograd model in eval mode."""
    s = model.input_size
    x = np.random.default_rng(0).standard_normal((batch, s, s, 3)).astype(np.float32)
    try:
        from . import plan

        infer, engine = plan.compile(model, batch=batch), "plan"
    except ImportError:
        from .run import forward_logits

        model.eval()
        infer, engine = (lambda images: forward_logits(model, images)), "autograd"
    infer(x)  # warm-up: buffers, caches, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        infer(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), engine


def latency_repeats(settings):
    """{batch size: timed calls}."""
    return TINY_REPEATS if settings["tiny"] else REPEATS


def write_latency(run_dir, settings, seconds, engine, rounds):
    """Writes and returns the run's latency.json: {"batch_1_ms", "batch_128_ms", "engine", "threads",
    "repeats", "rounds", "machine"}; seconds: {batch size: median seconds of one call}."""
    from . import _C

    out = {"threads": _C.get_num_threads(), "repeats": latency_repeats(settings), "rounds": rounds,
           "machine": machine_name(), "engine": engine,
           **{f"batch_{b}_ms": 1e3 * s for b, s in seconds.items()}}
    write_text(Path(run_dir) / "latency.json", dumps(out, indent=1) + "\n")
    return out


def latency(run_dir, settings):
    """The run's latency.json, measured once from last.npz after training (one round) and kept;
    --measure-latency measures every run again in one pass (measure_all_latency)."""
    from .models import load

    path = Path(run_dir) / "latency.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load(Path(run_dir) / "last.npz")
    timed = {b: measure_latency(model, b, r) for b, r in latency_repeats(settings).items()}
    return write_latency(run_dir, settings, {b: t[0] for b, t in timed.items()}, timed[1][1], 1)


def measure_all_latency(out, specs, settings, manifest, interrupt):
    """Measures the latency of every finished run of `specs` again, all in one pass: ROUNDS rounds,
    each timing every run in turn, so that a slow spell of the machine falls on all runs alike
    rather than on the one measured then (as after each run's training). A run's figure is the
    median of its rounds. Rewrites runs/<run>/latency.json and the manifest's entries; nothing if
    a signal stops it (interrupt.requested)."""
    from .models import load

    done = [s.name for s in specs if run_state(out / "runs" / s.name, settings["epochs"]) == "done"]
    models = {name: load(out / "runs" / name / "last.npz") for name in done}
    rounds = TINY_ROUNDS if settings["tiny"] else ROUNDS
    times = {name: {b: [] for b in latency_repeats(settings)} for name in done}
    engine = None
    for i in range(rounds):
        t0 = time.perf_counter()
        for name, model in models.items():
            for b, r in latency_repeats(settings).items():
                if interrupt.requested:
                    return
                seconds, engine = measure_latency(model, b, r)
                times[name][b].append(seconds)
        print(f"mbnet.experiments: latency round {i + 1}/{rounds}: {len(done)} runs in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for name in done:
        seconds = {b: statistics.median(t) for b, t in times[name].items()}
        manifest["runs"].setdefault(name, {})["latency"] = write_latency(
            out / "runs" / name, settings, seconds, engine, rounds)


def train_run(spec, run_dir, state, settings, data_dir, on_step):
    """Trains (state "new") or resumes ("interrupted") one run; -> the trainer's exit status."""
    from . import train

    runtime = ["--out", str(run_dir), "--threads", str(settings["threads"])]
    runtime += ["--data-dir", str(data_dir)] if data_dir else []
    if state == "interrupted":
        argv = runtime + ["--resume"]
    else:
        argv = spec.options(settings) + runtime
    print(f"mbnet.experiments: {'resuming' if state == 'interrupted' else 'training'} {spec.name}: "
          f"python -m mbnet.train {shlex.join(argv)}", file=sys.stderr)
    return train.main(argv, on_step=on_step)


# ----------------------------------------------------------------------------------------------
# The sweep directory


def load_manifest(out, settings):
    """The manifest of ``out`` (a fresh one if there is none); RunError if its settings differ."""
    path = out / "manifest.json"
    if not path.is_file():
        return {"settings": settings, "tables": [], "runs": {}}
    try:
        manifest = json.loads(path.read_text())
        saved = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a sweep manifest ({type(e).__name__}: {e})") from None
    diff = [k for k in settings if saved.get(k) != settings[k]]
    if diff:
        was = ", ".join(f"{k} {saved.get(k)!r} (now {settings[k]!r})" for k in diff)
        raise RunError(f"{out} is a sweep with other settings: {was}; pass the same options or choose another --out")
    return manifest


def save_manifest(out, manifest):
    manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_text(out / "manifest.json", dumps(manifest, indent=1) + "\n")


def run_specs(tables, names):
    """The distinct Specs of the named tables, in RUN_ORDER."""
    specs = []
    for name in RUN_ORDER:
        if name in names:
            specs += [row.spec for row in tables[name].rows if row.spec not in specs]
    return specs


def sweep(out, settings, names, data_dir=None, on_step=None, report_only=False, measure_again=False):
    """Trains what is missing of the named tables, measures latency, writes the report; -> exit status.
    report_only: trains nothing; measure_again: trains nothing, measures every finished run's latency
    again in one pass (measure_all_latency)."""
    tables = make_tables(settings)
    manifest = load_manifest(out, settings)
    if names is None:  # all tables; with report_only, those the sweep has
        names = manifest["tables"] if (report_only or measure_again) and manifest["tables"] else list(TABLES)
    manifest["tables"] = [t for t in TABLES if t in set(manifest["tables"]) | set(names)]
    status, diverged = 0, []
    with Interrupt() as interrupt:
        if measure_again:
            measure_all_latency(out, run_specs(tables, names), settings, manifest, interrupt)
            status = interrupt.status if interrupt.requested else 0
        for spec in [] if report_only or measure_again else run_specs(tables, names):
            run_dir = out / "runs" / spec.name
            entry = manifest["runs"].setdefault(spec.name, {"options": spec.options(settings)})
            state = run_state(run_dir, settings["epochs"])
            if entry.get("state") == "diverged" and state != "done" and run_dir.is_dir():
                print(f"mbnet.experiments: skipping {spec.name}: it diverged (delete {run_dir} to try again)",
                      file=sys.stderr)
                diverged.append(spec.name)
                continue
            if state != "done":
                code = train_run(spec, run_dir, state, settings, data_dir, on_step)
                state = run_state(run_dir, settings["epochs"])
                if code == 3:
                    state = "diverged"
                    diverged.append(spec.name)
                elif code != 0:
                    status = code
            entry["state"] = state
            if state == "done":
                entry["latency"] = latency(run_dir, settings)
            save_manifest(out, manifest)
            if status or interrupt.requested:
                status = status or interrupt.status
                break
    save_manifest(out, manifest)
    write_report(out, settings, tables, manifest)
    if status in (130, 143):
        print("mbnet.experiments: stopped; run the same command again to continue", file=sys.stderr)
    elif not status and diverged:
        print(f"mbnet.experiments: diverged: {', '.join(diverged)}; the other runs are done", file=sys.stderr)
        status = 3
    return status


# ----------------------------------------------------------------------------------------------
# The report


def row_result(out, row, manifest):
    """The numbers of one row (None where the run is not done)."""
    from . import train

    spec = row.spec
    run_dir = out / "runs" / spec.name
    config_path = run_dir / "config.json"
    cfg = {"arch": spec.arch, "alpha": spec.alpha, "resolution": spec.resolution, "num_classes": 10, "dropout": 0.0,
           "seed": 0, "classes": None, "mean": (0, 0, 0), "std": (1, 1, 1)}  # until the run has its own
    if config_path.is_file():
        cfg = json.loads(config_path.read_text())
    counts = train.build_model(cfg).summary(show=False)
    state = manifest["runs"].get(spec.name, {}).get("state")
    if state != "diverged":
        state = run_state(run_dir, manifest["settings"]["epochs"])
    res = {"label": row.label, "run": spec.name, "arch": spec.arch, "alpha": spec.alpha,
           "resolution": spec.resolution, "seed": spec.seed, "state": {"new": "pending"}.get(state, state),
           "mult_adds": counts["mult_adds"], "params": counts["params"], "accuracy": None,
           "paper": None if row.paper is None else dict(zip(("model", "accuracy", "mult_adds_M", "params_M"),
                                                            (row.paper_label, *row.paper)))}
    if res["state"] == "done":
        metrics = read_metrics(run_dir)
        last = metrics[-1]
        res["accuracy"], res["accuracy_is"] = final_accuracy(last)
        res.update({"test_acc": last["test_acc"], "ema_test_acc": last.get("ema_test_acc"),
                    "train_time_s": sum(m["train_time"] for m in metrics), "wall_time_s": last["wall_time"],
                    "epochs": last["epoch"],
                    # where the training time was measured (epochs written before the trainer recorded it: unknown)
                    "train_machines": sorted({m.get("machine", "unknown") for m in metrics}),
                    "shared_epochs": sum(1 for m in metrics if m.get("cpu_share", 1.0) < SHARED_BELOW)})
        lat = manifest["runs"].get(spec.name, {}).get("latency") or {}
        res.update({k: lat.get(k) for k in ("batch_1_ms", "batch_128_ms", "engine", "threads")})
        res["latency_rounds"] = lat.get("rounds", 1)
        res["latency_machine"] = lat.get("machine", "unknown")
    return res


def noise_band(results):
    """{"accuracies", "spread" (max - min), "std"} of the noise table's finished runs, None below 2."""
    accs = [r["accuracy"] for r in results if r["accuracy"] is not None]
    if len(accs) < 2:
        return None
    return {"accuracies": accs, "spread": max(accs) - min(accs), "std": statistics.stdev(accs)}


def compare(results, noise):
    """Adds "delta" (accuracy minus the first row's) and "within_noise" to every finished row but the first."""
    base = results[0]["accuracy"]
    for r in results[1:]:
        if base is not None and r["accuracy"] is not None:
            r["delta"] = r["accuracy"] - base
            r["within_noise"] = None if noise is None else abs(r["delta"]) < noise["spread"]


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f}%"


def _millions(n):
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _ms(x):
    return "—" if x is None else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def _minutes(s):
    return "—" if s is None else f"{s / 60:.1f} min"


def not_one_quiet_machine(r):
    """True when a finished run's training time was not measured on one quiet machine: trained
    on several CPUs or builds, with the cores shared in some epoch, or before the trainer said."""
    machines = r.get("train_machines") or ["unknown"]
    return len(machines) > 1 or "unknown" in machines or r.get("shared_epochs", 0) > 0


def markdown_table(results, accuracy="test accuracy"):
    lines = [f"| model | {accuracy} | Δ vs first row | mult-adds | params | latency, batch 1 | latency, batch 128 "
             "| training time | paper (ImageNet): model, top-1, Δ, mult-adds, params |",
             "|---|--:|---|--:|--:|--:|--:|--:|---|"]
    paper0 = results[0]["paper"]
    for r in results:
        delta = "" if r.get("delta") is None else f"{100 * r['delta']:+.2f} pts"
        if r.get("within_noise"):
            delta += " (within noise)"
        acc = _pct(r["accuracy"]) if r["state"] == "done" else r["state"]
        p = r["paper"]
        paper = ""
        if p:
            pd = "" if r is results[0] else f", {p['accuracy'] - paper0['accuracy']:+.1f} pts"
            paper = f"{p['model']}: {p['accuracy']}%{pd}, {p['mult_adds_M']}M, {p['params_M']}M"
        lines.append(f"| {r['label']} | {acc} | {delta} | {_millions(r['mult_adds'])} | {_millions(r['params'])} | "
                     f"{_ms(r.get('batch_1_ms'))} | {_ms(r.get('batch_128_ms'))} | {_minutes(r.get('train_time_s'))}{' †' if r['state'] == 'done' and not_one_quiet_machine(r) else ''} "
                     f"| {paper} |")
    return lines


def grid_table(results, settings):
    """Accuracy and mult-adds of the α x ρ grid, one row per α."""
    res = resolutions(settings)
    by = {(r["alpha"], r["resolution"]): r for r in results}
    lines = ["| α \\ input | " + " | ".join(f"{r} px" for r in res) + " |", "|---|" + "--:|" * len(res)]
    for alpha in sorted({r["alpha"] for r in results}, reverse=True):
        cells = [by[alpha, s] for s in res]
        lines.append(f"| {alpha:g} | " + " | ".join(
            f"{_pct(c['accuracy']) if c['state'] == 'done' else c['state']}, {_millions(c['mult_adds'])}"
            for c in cells) + " |")
    return lines


def write_figures(out, grid, measured, accuracy="test accuracy"):
    """The three PNGs (FIGURES) from the finished runs of the grid and all measured runs."""
    from .plot import plot_points

    done = [r for r in grid if r["accuracy"] is not None]

    def by_alpha(x):
        series = {}
        for r in done:
            series.setdefault(f"α={r['alpha']:g}", []).append((r[x], 100 * r["accuracy"], f"{r['resolution']}px"))
        return series

    plot_points(by_alpha("mult_adds"), out / FIGURES["fig4"], xlabel="mult-adds per image (log scale)",
                ylabel=f"CIFAR-10 {accuracy} (%)", title="Figure 4 on CIFAR-10: accuracy vs mult-adds")
    plot_points(by_alpha("params"), out / FIGURES["fig5"], xlabel="parameters (log scale)",
                ylabel=f"CIFAR-10 {accuracy} (%)", title="Figure 5 on CIFAR-10: accuracy vs parameters")
    timed = {}  # one point per network: the noise band's seeds and recipe variants are the same network
    for r in measured:
        if r.get("batch_1_ms") is not None:
            timed.setdefault((r["arch"], r["alpha"], r["resolution"]), r)
    timed = list(timed.values())
    notes = {r["run"]: "" if r["arch"] == "mobilenet" else r["arch"] for r in timed}  # the models off the grid
    series = {"batch 1": [(r["mult_adds"], r["batch_1_ms"], notes[r["run"]]) for r in timed],
              "batch 128, per image": [(r["mult_adds"], r["batch_128_ms"] / 128, notes[r["run"]]) for r in timed]}
    engine = timed[0]["engine"] if timed else "?"
    threads = timed[0]["threads"] if timed else "?"
    plot_points(series, out / FIGURES["latency"], xlabel="mult-adds per image (log scale)",
                ylabel="latency per image (ms, log scale)", logy=True, join=False, proportional=True,
                title=f"Latency vs mult-adds ({engine}, {threads} threads; dashed: proportional)")


def latency_method(done, settings):
    """How the finished runs' latencies were measured, for the report."""
    calls = f"{' and '.join(f'{n} calls at batch {b}' for b, n in latency_repeats(settings).items())} after one untimed call"
    rounds = sorted({r.get("latency_rounds") or 1 for r in done})
    if rounds in ([], [1]):
        return f"median of {calls}, measured after each run's training"
    once = "" if 1 not in rounds else " (not all runs: results.json's latency_rounds 1 is one round after training)"
    return (f"median over {max(rounds)} rounds of the median of {calls}; each round timed every run in turn "
            f"(`--measure-latency`){once}")


def write_report(out, settings, tables, manifest):
    """results.json, results.md and the figures, from whatever runs are finished."""
    from . import _C
    from ._native import cpu_name

    names = manifest["tables"]
    results = {name: [row_result(out, row, manifest) for row in tables[name].rows] for name in names}
    noise = noise_band(results["noise"]) if "noise" in results else None
    for name in names:
        if name not in ("figures", "noise"):
            compare(results[name], noise)
    every = {r["run"]: r for rows in results.values() for r in rows}
    machine = {"cpu": cpu_name(), "simd": _C.build_info().get("simd"), "threads": settings["threads"]}
    doc = {"settings": settings, "machine": machine, "recipe": recipe(settings), "noise": noise,
           "tables": {name: {"title": tables[name].title, "rows": results[name]} for name in names}}
    write_text(out / "results.json", dumps(doc, indent=1) + "\n")

    done = [r for r in every.values() if r["accuracy"] is not None]
    what = done[0]["accuracy_is"] if done else "EMA + flip TTA"
    engines = sorted({r["engine"] for r in done if r.get("engine")}) or ["—"]
    acc, acc_note = accuracy_name(settings)
    md = [f"# The paper's trade-offs on CIFAR-10{' (--tiny: a smoke test, not results)' if settings['tiny'] else ''}",
          "",
          f"Recipe: `python -m mbnet.train {shlex.join(recipe(settings))}` (the trainer's defaults otherwise) for "
          f"every run. {acc.capitalize()}{acc_note}: the final epoch, {what} (no epoch chosen by test score). Mult-adds and "
          f"parameters: `summary()` at the run's input size, 10 classes. Latency: {latency_method(done, settings)}, "
          f"{', '.join(engines)}, {settings['threads']} thread(s), "
          f"{machine['cpu']} ({machine['simd']}); "
          "batch 128 is the time of the whole batch. Training time: the training steps of all epochs "
          "(evaluation excluded); † marks a run whose training time was not measured on one quiet machine "
          "(several CPUs, the cores shared in some epoch, or epochs from before the trainer recorded it; "
          "results.json has train_machines and shared_epochs). Paper: ImageNet, 224 px unless named.", ""]
    lat_machines = sorted({r["latency_machine"] for r in done if r.get("latency_machine")})
    if len(lat_machines) > 1:
        md += [f"Latency was measured on more than one machine: {'; '.join(lat_machines)} "
               "(runs/<run>/latency.json says which; delete those files and run again to measure all on one).", ""]
    if noise:
        md += [f"**Noise band** ({tables['noise'].title.split(': ', 1)[1]}): "
               f"{', '.join(_pct(a) for a in noise['accuracies'])}: spread {100 * noise['spread']:.2f} points "
               f"(max − min), standard deviation {100 * noise['std']:.2f}. A difference smaller than the spread is "
               "marked \"within noise\": it may be chance.", ""]
    else:
        md += ["**Noise band**: not run yet (table `noise`); differences below cannot be told from chance.", ""]
    for name in names:
        if name in ("figures", "noise"):
            continue
        md += [f"## {tables[name].title}", ""] + markdown_table(results[name], acc) + [""]
    if "figures" in names:
        md += [f"## {tables['figures'].title}", "", f"{acc.capitalize()}, mult-adds:", ""]
        md += grid_table(results["figures"], settings) + [""]
        md += [f"![Figure 4]({FIGURES['fig4']}) ![Figure 5]({FIGURES['fig5']})", ""]
    md += ["## Latency against mult-adds", "",
           "Every measured network (the grid, the conv and shallow models; one point per network: the "
           "noise band's seeds and the recipe variants are the grid's α=1 network); dashed lines are proportional to the "
           "mult-adds: points above them run slower than their count predicts (the memory-bound depthwise "
           "layers weigh more in small and narrow models).", "", f"![latency]({FIGURES['latency']})", ""]
    if "noise" in names:
        md += [f"## {tables['noise'].title}", ""] + markdown_table(results["noise"], acc) + [""]
    write_text(out / "results.md", "\n".join(md))
    write_figures(out, results.get("figures", []), list(every.values()), acc)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mbnet.experiments",
                                description="The MobileNet paper's accuracy-cost tables and figures on CIFAR-10.")
    a = p.add_argument
    a("tables", nargs="*", metavar="TABLE", help=f"any of {', '.join(TABLES)} (default: all)")
    a("--epochs", type=int_in(1), default=None,
      help=f"epochs of every run (default {DEFAULT_EPOCHS}; --tiny {TINY_EPOCHS})")
    a("--out", default=None, help="sweep directory (default sweeps/cifar10, --tiny sweeps/tiny)")
    a("--tiny", action="store_true",
      help="the whole pipeline in seconds: widths x 1/8, 16/14/12/10 px, 256 training images, one epoch (a test)")
    a("--seeds", type=int_in(0), nargs="+", default=[0, 1, 2],
      help="seeds of the noise band (default 0 1 2); every other run uses the first")
    a("--threads", type=int_in(1, max_threads), default=None,
      help="kernel threads for training and latency (default: every core this process may use)")
    a("--data-dir", default=None, help="as python -m mbnet.train --data-dir")
    a("--upscaled", action="store_true",
      help="Table 7 and the grid at 224/192/160/128 px (CIFAR upscaled, stem stride 2) instead of 32/28/24/20: "
           "about 12x the cost, and a 7.5 GB image cache at 224 px")
    a("--table4-alpha", type=float_in(1 / 32, 1), default=0.5, help="α of both Table 4 models (default 0.5)")
    a("--noise-alpha", type=float_in(1 / 32, 1), default=1.0, help="α of the noise band's model (default 1)")
    a("--train-args", default="", metavar="'OPTIONS'",
      help="more python -m mbnet.train options for every run, one quoted string (e.g. '--dw-weight-decay 0')")
    a("--report-only", action="store_true", help="train nothing: rewrite the report from the finished runs")
    a("--measure-latency", action="store_true",
      help=f"train nothing: measure every finished run's latency again, all in one pass ({ROUNDS} rounds over "
           "the runs, each run's median of its rounds), then rewrite the report; run it with the cores otherwise idle")
    p.__class__ = Parser
    return p


def main(argv=None, *, on_step=None):
    """-> the exit status (module docstring). on_step(step) is passed to every run's trainer (tests)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    bad = [t for t in args.tables if t not in TABLES]
    if bad:
        parser.error(f"unknown table {bad[0]!r} (choose from {', '.join(TABLES)})")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    if args.out == "":
        parser.error("--out is empty (leave it out for sweeps/cifar10, or sweeps/tiny with --tiny)")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    settings = {"epochs": args.epochs or (TINY_EPOCHS if args.tiny else DEFAULT_EPOCHS), "tiny": args.tiny,
                "upscaled": args.upscaled, "table4_alpha": args.table4_alpha, "noise_alpha": args.noise_alpha,
                "seeds": args.seeds, "threads": threads, "train_args": args.train_args}
    if not _recipe_ok(settings):
        return 2
    out = Path(args.out or ("sweeps/tiny" if args.tiny else "sweeps/cifar10"))
    try:
        set_threads(threads)
        out.mkdir(parents=True, exist_ok=True)
        with RunLock(out):
            return sweep(out, settings, args.tables or None, args.data_dir, on_step, args.report_only,
                         args.measure_latency)
    except OSError as e:
        print(f"mbnet.experiments: {out}: [Errno {e.errno}] {e.strerror}", file=sys.stderr)
        return 1
    except RunError as e:
        print(f"mbnet.experiments: {e}", file=sys.stderr)
        return e.status


def _recipe_ok(settings):
    """False (after the trainer's one-line error) when the trainer refuses the recipe (--train-args)."""
    from . import train

    parser = train.build_parser()
    spec = Spec("mobilenet", 1.0, 32, 0)
    try:
        argv = spec.options(settings)
    except ValueError as e:  # shlex: unbalanced quotes
        print(f"mbnet.experiments: --train-args {settings['train_args']!r}: {e}", file=sys.stderr)
        return False
    try:
        train.check_args(parser, train.parse_args(parser, argv))
        # The sweep sets these per run, before --train-args: given there too, they would win over
        # the run's own and the tables would label every row with the wrong setting.
        given = set(vars(train._given_args(parser, shlex.split(settings["train_args"]))))
        own = sorted(given & set(vars(train._given_args(parser, spec.own_options() + ["--epochs", "1"]))))
    except SystemExit:
        print(f"mbnet.experiments: --train-args {settings['train_args']!r}: refused by the trainer (above)",
              file=sys.stderr)
        return False
    if own:
        print(f"mbnet.experiments: --train-args {settings['train_args']!r}: sets "
              f"{', '.join('--' + k.replace('_', '-') for k in own)}, which the sweep sets for each run "
              "(use the sweep's own options)", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
