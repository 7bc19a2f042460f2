"""Trains MobileNetV1 on CIFAR-10, CIFAR-100 or an image folder: `python -m mbnet.train [options]` (see --help).

A run directory (--out) receives metrics.jsonl (one JSON object per epoch), curves.png, config.json
and the checkpoint last.npz (every epoch, and on Ctrl-C/SIGTERM). No checkpoint is chosen by its
test accuracy: the test split only measures. --resume continues from last.npz at the exact step it was saved; with the same thread
count the resumed run ends with bit-identical weights to an unbroken one, because every random
choice (shuffle, augmentation, mixup/CutMix, dropout) is a pure function of (seed, epoch, batch / step).
--init WEIGHTS starts a new run from any weights file mbnet.models.load reads. --recipe NAME sets a
group of options (RECIPES; explicit options win), and config.json records the resolved values.

Checkpoint: mbnet's weights file (mbnet/checkpoint.py: "model/<name>" arrays, the architecture,
class names and normalization in "meta") plus "optim/<key>" and "ema/<key>" arrays and, in "meta",
the config, position (epoch, batch, step), per-epoch metrics so far, and the running sums of the
epoch in progress.

`mpirun -n R python -m mbnet.train ...` trains the same model on R processes (mbnet.distributed):
--batch-size stays the global batch, each rank takes its shard of every batch, the gradients are
summed with MPI allreduce, rank 0 alone writes the run directory; --sync-bn for BatchNorm
statistics over the global batch. SIGUSR1 to mpirun (or SIGINT/SIGTERM to any rank) saves at the
current step on every rank; a rank that dies or hangs ends the job (--mpi-timeout).

Failures (exit status): 0 done; 1 a file could not be written (full disk, permissions: the message
names the file and errno, the previous checkpoint is intact); 2 a bad option, data, checkpoint, or
a run directory in use by another run; 3 the run diverged (a non-finite loss, gradient or weight:
nothing non-finite is ever saved); 130 Ctrl-C and 143 SIGTERM, after saving last.npz at the
current step.
"""
import argparse
import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint, optim
from . import data as D
from . import distributed as dist
from .run import (EVAL_BATCH, Interrupt, Parser, Progress, RunError, RunLock, all_finite, dropout_modules, dumps,
                  eval_split, evaluate, float_in, fmt_time, int_in, live_arrays, load_checkpoint, machine_name,
                  max_threads, remove_orphans, save_checkpoint, set_threads, swapped_weights, write_metrics,
                  write_text)

SKIP_LIMIT = 20  # non-finite steps in a row after which --on-nan skip stops too
DEFAULT_LR = {"sgd": 0.1, "rmsprop": 0.045, "adam": 1e-3}  # at batch size 128; scaled linearly

# --recipe NAME: option values (argparse dests) set unless given on the command line. fast's two runs
# reached 90.16% (EMA + TTA, seeds 0 and 1) in 52-55 min on a Zen 5; record's 300-epoch runs 90.31% and
# 90.92% (README). The default recipe (50 epochs) reached 88.50% (89.37% EMA + flip TTA) in 73 min on
# 2 Zen 5 cores, at 96.6% train accuracy: it overfits, so both add regularization. Neither
# drops the depthwise weight decay: on a held-out tenth of train, 15 epochs, dropping it cost 0.98
# points (EMA + TTA; docs/experiments/heldout).
RECIPES = {
    "default": {},
    # <= 60 min: as many epochs as fit with a margin: on a Zen 5 (2 cores) an epoch of the current build
    # takes 56-57 s, so 55 epochs take about 53 min (40 fitted the 72-78 s epochs of an older build);
    # regularized by what costs nothing per step: cutout 8 px; evaluated after every 10th epoch only
    "fast": {"epochs": 55, "cutout": 0.25, "eval_every": 10, "tta_shift": 2},
    # hours: a long cosine schedule (the published 92.35% used 350 epochs) with CutMix, which trades
    # train fit for test accuracy over long runs, off for the last tenth of the epochs (+1.0 point on
    # held-out images in 60-epoch trials; its 300-epoch run then ended 0.6 below the first run's on
    # test: README), and a slower EMA to match the longer run. Both
    # evaluate with 2 px shifts added to flip TTA (free in training; held-out gain in --tta-shift's help)
    "record": {"epochs": 300, "schedule": "cosine", "cutmix": 1.0, "mix_until": 0.9, "ema_decay": 0.9995,
               "eval_every": 5, "tta_shift": 2},
}


# Options a --branch may change: none of them acts on the epochs already trained (mix_until: see branch_config).
BRANCH_KEYS = ("mix_until", "eval_every", "tta", "tta_shift")


def _flag(key):
    """The command-line option of config key: mix_until -> --mix-until."""
    return "--" + key.replace("_", "-")


def _recipe_help():
    def opts(values):
        return ", ".join(f"{_flag(k)} {v:g}" if isinstance(v, float) else f"{_flag(k)} {v}"
                         for k, v in values.items()) or "the defaults of the options below"
    return ("a named group of option values; an option given on the command line wins, and config.json records "
            "the resolved values. " + "; ".join(f"{name}: {opts(v)}" for name, v in RECIPES.items()) +
            ". fast reached 90.16%% (EMA + TTA; seeds 0 and 1) in 52-55 min on 2 Zen 5 cores; record's runs "
            "reached 90.31%% (this preset; --mix-until 0.9 was chosen on 60-epoch held-out trials) and 90.92%% "
            "(--mix-until 1), README "
            "(default: default)")


def build_parser():
    p = Parser(prog="python -m mbnet.train",
                                description="Train MobileNetV1 on CIFAR-10, CIFAR-100 or an image folder.")
    a = p.add_argument
    a("--recipe", choices=tuple(RECIPES), default="default", help=_recipe_help())
    a("--alpha", type=float_in(1 / 32, 4), default=1.0,  # below 1/32 the 32-channel stem has no channel
      help="width multiplier (default 1.0)")
    a("--arch", choices=("mobilenet", "conv", "shallow"), default="mobilenet",
      help="mobilenet (default); conv: every separable block a full 3x3 convolution (the paper's Table 4); "
           "shallow: without the five repeated 512-channel blocks (Table 5)")
    a("--act", choices=("relu", "relu6"), default="relu", help="activation after every BatchNorm (default relu)")
    a("--stem-stride", type=int, choices=(1, 2), default=None,
      help="stride of the first convolution (default: 2 above 64 px, else 1)")
    a("--resolution", type=int_in(8, 512), default=32,
      help="input side S in pixels (default 32): every image is converted to RGB, its shorter side resized to S "
           "(bilinear) and the center SxS cropped, once, into the data cache")
    a("--epochs", type=int_in(1), default=50, help="passes over the training split (default 50)")
    a("--batch-size", type=int_in(1), default=128, help="images per step (default 128)")
    a("--optimizer", choices=("sgd", "rmsprop", "adam"), default="sgd",
      help="sgd = Nesterov momentum 0.9; rmsprop = TF-style (decay 0.9, momentum 0.9, eps 1.0); adam")
    a("--lr", type=float_in(0, lo_open=True), default=None,
      help="peak learning rate (default: sgd 0.1, rmsprop 0.045, adam 1e-3, times batch-size/128)")
    a("--schedule", choices=("onecycle", "cosine", "step"), default="onecycle",
      help="learning-rate schedule after the linear warm-up (default onecycle)")
    a("--milestones", type=float_in(0, 1, lo_open=True, hi_open=True), nargs="+", default=None, metavar="F",
      help="--schedule step: multiply the lr by --gamma at these fractions of the steps after the warm-up "
           "(default 0.5 0.75)")
    a("--gamma", type=float_in(0, lo_open=True), default=None,
      help="--schedule step: the factor at each milestone (default 0.1)")
    a("--warmup", type=float_in(0), default=None,
      help="warm-up length in epochs (default: 20%% of the epochs for onecycle, 5%% otherwise)")
    a("--weight-decay", type=float_in(0), default=5e-4, help="L2, not applied to BN parameters and biases")
    a("--dw-weight-decay", type=float_in(0), default=None,
      help="L2 on the depthwise filters (default: --weight-decay; the paper advises little or none, but 0 "
           "cost 0.98 points on a held-out tenth of CIFAR-10's train split, README)")
    a("--label-smoothing", type=float_in(0, 1, hi_open=True), default=0.1, help="default 0.1")
    a("--dropout", type=float_in(0, 1, hi_open=True), default=0.0, help="dropout before the classifier")
    a("--ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights (default on)")
    a("--ema-decay", type=float_in(0, 1, hi_open=True), default=0.999,
      help="per step: ema = d * ema + (1 - d) * weights, d = min(decay, (1 + n) / (10 + n)) after n steps "
           "(default 0.999)")
    a("--tta", action=argparse.BooleanOptionalAction, default=True,
      help="horizontal-flip test-time augmentation in the final evaluation (default on)")
    a("--tta-shift", type=int_in(0, 8), default=0, metavar="PX",
      help="with --tta, also average over the image and its mirror moved diagonally by +PX and -PX pixels "
           "(6 views; the border black, as the crop's padding; default 0). On a held-out tenth of train, "
           "four 15-epoch runs: 2 px added 0.38-0.92 points to flip TTA, 1 px 0.34-0.50 (README)")
    a("--eval-every", type=int_in(1), default=1, metavar="N",
      help="evaluate on the test split after every N-th epoch and after the last (default 1): the weights "
           "are the same either way, and the test and EMA passes take about 10%% of an alpha=1 32 px epoch")
    a("--seed", type=int_in(0), default=0, help="initial weights, shuffle and augmentation draws (default 0)")
    a("--threads", type=int_in(1, max_threads), default=None, help="kernel threads (mbnet._C.set_num_threads)")
    # data: source, held-out split, augmentation, subsets
    a("--data-dir", default=None,
      help="cifar-10-batches-py/, cifar-100-python/, or an image tree train/<class>/*.png|jpg with test/<class>/ "
           "or val/<class>/ (else $MBNET_DATA, else the cache dir, where CIFAR-10/100 is downloaded)")
    a("--dataset", choices=D.DATASETS, default=None, help="default: detected from --data-dir")
    a("--val-split", type=float_in(0, 1, lo_open=True, hi_open=True), default=None, metavar="F",
      help="hold out the fraction F of each class of the train split (a fixed choice) and evaluate on it: required "
           "for image folders without test/ or val/; on data with a test split, that split is then not read "
           "(for choosing options without it)")
    a("--crop-padding", type=float_in(0, 0.5, hi_open=True), default=4 / 32, metavar="F",
      help="random crop of the image zero-padded by F x the resolution on each side (default 0.125: 4 px at 32)")
    a("--random-resized-crop", type=float_in(0, 1, lo_open=True), default=None,
      metavar="MIN_AREA", help="instead of the padded crop: a random box of area fraction in [MIN_AREA, 1] and "
                               "aspect ratio in [3/4, 4/3], resized back to the resolution (off by default)")
    a("--cutout", type=float_in(0, 1, hi_open=True), default=0.0, metavar="F",
      help="zero (the mean colour, after normalization) one square of side F x the resolution inside each "
           "training image (default 0: off)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True,
      help="mirror half the training images left-right (default on; off for digits or text)")
    a("--trivial-augment", action=argparse.BooleanOptionalAction, default=False,
      help="TrivialAugment (Mueller & Hutter 2021, torchvision's wide magnitudes) after the crop and flip: each "
           "training image through one of 14 operations (identity, shear, translate, rotate, brightness, colour, "
           "contrast, sharpness, posterize, solarize, autocontrast, equalize) at a random strength (default off; "
           "with the record recipe it cost 3.2 points on held-out images in 60 epochs, README)")
    a("--mixup", type=float_in(0), default=0.0, metavar="ALPHA",
      help="mixup: every training batch becomes lambda x itself + (1 - lambda) x a shuffle of itself, one "
           "lambda ~ Beta(ALPHA, ALPHA) per batch, the loss lambda CE(labels) + (1 - lambda) CE(shuffled "
           "labels) (default 0: off)")
    a("--cutmix", type=float_in(0), default=0.0, metavar="ALPHA",
      help="CutMix: one box per training batch, of area fraction 1 - lambda (lambda ~ Beta(ALPHA, ALPHA), then "
           "clipped to the image), pasted from a shuffle of the batch, labels weighted by area (default 0: off); "
           "with --mixup too, each batch is one or the other. Train accuracy of a mixed batch: lambda x "
           "(hits of the first labels) + (1 - lambda) x (hits of the second)")
    a("--mix-prob", type=float_in(0, 1, lo_open=True), default=1.0, metavar="P",
      help="with --mixup or --cutmix: mix each batch with probability P, the rest unmixed (default 1: every batch)")
    a("--mix-until", type=float_in(0, 1, lo_open=True), default=1.0, metavar="F",
      help="with --mixup or --cutmix: mix the batches of the first round(F x epochs) epochs only, the rest "
           "train on unmixed images (default 1: every epoch)")
    a("--progressive-resize", type=int_in(1), default=None, metavar="MIN_PX",
      help="progressive resizing: train the first epochs on smaller images (each batch made at the resolution, "
           "then area-averaged down), from MIN_PX px in steps of 8 px up to the resolution, reached after the "
           "fraction --progressive-until of the epochs; evaluation always at the resolution (default: off)")
    a("--progressive-until", type=float_in(0, 1, lo_open=True), default=0.5, metavar="F",
      help="with --progressive-resize: the fraction of the epochs after which training is at the full resolution "
           "(default 0.5)")
    a("--limit-train", type=int_in(1), default=None, help="use N training images (a fixed subset; smoke tests)")
    a("--limit-test", type=int_in(1), default=None, help="use N test images (a fixed subset)")
    a("--workers", type=int_in(1), default=None, help="processes decoding images into the cache (default: all cores)")
    a("--out", default=None, help="run directory (default runs/<name> or runs/<timestamp>)")
    a("--name", default=None, help="run name, for the default --out")
    a("--resume", action="store_true", help="continue from <out>/last.npz")
    a("--branch", metavar="CHECKPOINT", default=None,
      help="start a new run in --out from another run's training checkpoint (its weights, optimizer, EMA, "
           "position and metrics so far), with the options given here changed. Only options that leave the epochs "
           f"already trained as they were may change ({', '.join(map(_flag, BRANCH_KEYS))}; "
           "--mix-until only where the run has not yet reached either setting's switch): the branch then goes on as "
           "an unbroken run with those options would")
    a("--sync-bn", action="store_true",
      help="under MPI: BatchNorm uses the statistics of the global batch (default: each rank's shard's)")
    a("--overlap", action=argparse.BooleanOptionalAction, default=True,
      help="under MPI: start the gradient allreduce while backward runs (default on)")
    a("--mpi-timeout", type=float_in(0, lo_open=True), default=dist.DEFAULT_TIMEOUT,
      help=f"under MPI: seconds a rank waits for the others before aborting the job (default {dist.DEFAULT_TIMEOUT:g})")
    p.add_argument("--init", metavar="WEIGHTS", default=None,
                   help="start from these weights: an mbnet weights file, a training checkpoint (its EMA weights "
                        "when it has them) or a PyTorch .pt/.pth state_dict; the architecture (alpha, activation) "
                        "and input normalization come from the file, the classifier is re-made when the data's class "
                        "count differs")
    p.add_argument("--keep-epochs", type=int_in(1), nargs="+", default=(), metavar="N",
                   help="also keep the checkpoint of the end of epoch N as epoch-N.npz beside last.npz (a place "
                        "to --branch from later: a run's candidate ends; may be given again at --resume)")
    p.add_argument("--on-nan", choices=("stop", "skip"), default="stop",
                   help="on a non-finite loss or gradient: stop (default; exit 3) or skip the step "
                        f"(stop after {SKIP_LIMIT} in a row); non-finite weights are never saved")
    p.epilog = ("The checkpoint (last.npz) holds the raw weights and, with --ema, their EMA; every reader "
                "(--init, mbnet.evaluate, predict, export, mbnet.models.load) yields the EMA weights when the file has "
                "them (mbnet.evaluate --no-ema: the raw ones). Exit status: 0 done, 1 a file could not be written, "
                "2 bad options, data or run directory, 3 diverged (non-finite), 130 Ctrl-C, 143 SIGTERM.")
    return p


# Options that do not change the computed weights; everything else is frozen in the checkpoint.
RUNTIME_KEYS = ("threads", "data_dir", "out", "name", "resume", "branch", "on_nan", "workers", "overlap",
                "mpi_timeout", "keep_epochs")


def make_config(args):
    cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME_KEYS}
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR[cfg["optimizer"]] * cfg["batch_size"] / 128
    if cfg["warmup"] is None:
        cfg["warmup"] = (0.2 if cfg["schedule"] == "onecycle" else 0.05) * cfg["epochs"]
    if cfg["stem_stride"] is None:
        from .models import default_stem_stride

        cfg["stem_stride"] = default_stem_stride(cfg["resolution"])
    if cfg["schedule"] == "step":
        cfg["milestones"] = list(STEP_DEFAULTS["milestones"] if cfg["milestones"] is None else cfg["milestones"])
        cfg["gamma"] = STEP_DEFAULTS["gamma"] if cfg["gamma"] is None else cfg["gamma"]
    if cfg["dw_weight_decay"] is None:
        cfg["dw_weight_decay"] = cfg["weight_decay"]
    return cfg


STEP_DEFAULTS = {"milestones": (0.5, 0.75), "gamma": 0.1}


def build_model(cfg):
    """A fresh model for cfg (configs saved before --arch, --act and --stem-stride existed: MobileNetV1, relu, auto)."""
    from .models import ARCHS

    return ARCHS[cfg.get("arch", "mobilenet")](
        alpha=cfg["alpha"], num_classes=cfg["num_classes"], input_size=cfg["resolution"],
        stem_stride=cfg.get("stem_stride"), act=cfg.get("act", "relu"), dropout=cfg["dropout"], seed=cfg["seed"],
        classes=cfg["classes"], mean=cfg["mean"], std=cfg["std"])


def weight_decays(model, cfg):
    """The L2 factor of each of model.parameters(): dw_weight_decay for depthwise filters, weight_decay
    for the others (the optimizer leaves BN parameters and biases undecayed)."""
    from .nn import DepthwiseConv2d

    dw = {id(m.weight) for _, m in model.named_modules() if isinstance(m, DepthwiseConv2d)}
    wd, dw_wd = cfg["weight_decay"], cfg.get("dw_weight_decay", cfg["weight_decay"])
    return [dw_wd if id(p) in dw else wd for p in model.parameters()]


def schedule_options(cfg):
    """make_schedule keywords from the config (runs saved before --milestones/--gamma: the defaults)."""
    if cfg["schedule"] != "step":
        return {}
    return {k: cfg.get(k) if cfg.get(k) is not None else v for k, v in STEP_DEFAULTS.items()}


def augmentation(cfg):
    """Loader keywords from the config (runs saved before these options existed used a 4-pixel pad)."""
    s = cfg["resolution"]
    return {"pad": round(cfg["crop_padding"] * s) if "crop_padding" in cfg else 4,
            "resized_crop_area": cfg.get("random_resized_crop"), "cutout": round(cfg.get("cutout", 0.0) * s),
            "hflip": cfg.get("hflip", True), "trivial": cfg.get("trivial_augment", False),
            "mixup": cfg.get("mixup", 0.0), "cutmix": cfg.get("cutmix", 0.0),
            "mix_prob": cfg.get("mix_prob", 1.0),
            "mix_epochs": None if cfg.get("mix_until", 1.0) == 1 else round(cfg["mix_until"] * cfg["epochs"])}


def branch_config(cfg, changes, pos, source):
    """The configuration of a run branched from checkpoint ``source``, saved at pos (its "epoch" and
    "batch"), with ``changes``: only BRANCH_KEYS may change, and --mix-until only where both settings
    mix the epochs already begun alike. The branch's record of where it came from goes in
    "branched_from" (a list: a branch of a branch keeps both)."""
    fixed = sorted(set(changes) - set(BRANCH_KEYS))
    if fixed:
        raise RunError(f"--branch: {', '.join(map(_flag, fixed))} would change the epochs already trained; a "
                       f"branch may change only {', '.join(map(_flag, BRANCH_KEYS))}")
    new = {**cfg, **changes}
    if "mix_until" in changes:
        if not (cfg.get("mixup") or cfg.get("cutmix")):
            raise RunError(f"--branch: --mix-until needs a run with --mixup or --cutmix; {source} has neither")
        begun = pos["epoch"] + (pos["batch"] > 0)  # epochs 0 .. begun-1 have (partly) been trained
        before, after = (augmentation(c)["mix_epochs"] for c in (cfg, new))  # mixing in epoch e < mix_epochs
        first_unmixed = min(m for m in (before, after) if m is not None)  # at least one is a number here
        if first_unmixed < begun:
            raise RunError(f"--branch: --mix-until {changes['mix_until']:g} and the run's {cfg.get('mix_until', 1.0):g} "
                           f"disagree from epoch {first_unmixed + 1} on, and {source} has begun epoch {begun}")
    where = {"checkpoint": str(source), "epoch": pos["epoch"], "batch": pos["batch"], "changed": changes}
    new["branched_from"] = list(cfg.get("branched_from", [])) + [where]
    return new


def train_side(cfg, epoch):
    """The side in pixels of epoch's (0-based) training images: the resolution S, or with
    --progressive-resize MIN_PX, MIN_PX + (S - MIN_PX) e / E' rounded down to a multiple of 8 px (at
    least MIN_PX) for the first E' = round(progressive_until x epochs) epochs, then S."""
    s, lo = cfg["resolution"], cfg.get("progressive_resize")
    ramp = round(cfg.get("progressive_until", 0.5) * cfg["epochs"])
    if lo is None or epoch >= ramp:
        return s
    return min(s, max(lo, int(lo + (s - lo) * epoch / ramp) // 8 * 8))


# ----------------------------------------------------------------------------------------------
# Command line




def parse_args(parser, argv):
    """parser.parse_args(argv) with --recipe's values set where the option is not given in argv."""
    args = parser.parse_args(argv)
    preset = RECIPES[args.recipe]
    if preset:
        given = vars(_given_args(parser, argv))
        for key, value in preset.items():
            if key not in given:
                setattr(args, key, value)
    return args


def _given_args(parser, argv):
    """A namespace of only the options given in argv (every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return parser.parse_args(argv)
    finally:
        for a, default in saved:
            a.default = default


def check_args(parser, args):
    """Checks between options (parser.error: one line, exit 2)."""
    if args.resume and (args.init or args.branch):
        parser.error(f"--{'init' if args.init else 'branch'} starts a new run; it cannot be combined with --resume")
    if args.branch and args.init:
        parser.error("--branch starts from its checkpoint's weights; it cannot be combined with --init")
    if args.out == "" or args.name == "":
        parser.error("--out and --name must not be empty (leave them out for runs/<timestamp>)")
    if args.resume and not (args.out or args.name):
        parser.error("--resume needs the run's --out (or --name)")
    if args.warmup is not None and args.warmup > args.epochs:
        parser.error(f"--warmup {args.warmup} is longer than --epochs {args.epochs}")
    if args.schedule != "step" and (args.milestones is not None or args.gamma is not None):
        parser.error(f"--milestones and --gamma apply to --schedule step, not {args.schedule}")
    if args.progressive_resize is not None and args.progressive_resize >= args.resolution:
        parser.error(f"--progressive-resize {args.progressive_resize} must be smaller than --resolution "
                     f"{args.resolution}")
    for opt in ("mix_prob", "mix_until"):
        if getattr(args, opt) != 1 and not (args.mixup or args.cutmix or args.branch):  # a branch: branch_config
            parser.error(f"{_flag(opt)} {getattr(args, opt)} needs --mixup or --cutmix")
    if args.milestones is not None and list(args.milestones) != sorted(set(args.milestones)):
        parser.error(f"--milestones must increase, got {' '.join(map(str, args.milestones))}")


def _explicit_args(parser, argv):
    """Names of options given on the command line with a value other than the default."""
    defaults = vars(parser.parse_args([]))
    given = vars(parser.parse_args(argv))
    return {k for k, v in given.items() if v != defaults[k]}


# ----------------------------------------------------------------------------------------------
# A run in stages: start_run (new or resumed), Run.train_epoch, Run.finish_epoch


def _fresh_sums():
    return {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "cpu_time": 0.0, "skipped": 0}


class Run:
    """A training run in its directory ``out``: cfg, loaders, model, optimizer, EMA (or None) and
    the position ``pos`` (epoch, batch, metrics, running sums of the epoch in progress, elapsed
    time), which is what a checkpoint saves besides the arrays.

    On R ranks (``world``, mbnet.distributed): the loaders hold this rank's shard, the loss is
    scaled so that the gradients summed by ``reducer`` are the global batch's, the step's loss
    and accuracy counts are summed with them (``pos`` is the same on every rank), evaluation
    sums the ranks' counts, and rank 0 alone writes."""

    def __init__(self, out, cfg, train_loader, test_loader, model, opt, ema, pos, on_nan="stop", world=None,
                 overlap=True, keep_epochs=()):
        self.out, self.cfg, self.on_nan, self.keep_epochs = out, cfg, on_nan, set(keep_epochs)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.model, self.opt, self.ema, self.pos = model, opt, ema, pos
        self.spe = len(train_loader)
        self.schedule = optim.make_schedule(cfg["schedule"], cfg["lr"], cfg["epochs"] * self.spe,
                                            round(cfg["warmup"] * self.spe), **schedule_options(cfg))
        self.dropouts = dropout_modules(model)
        self.bad_in_a_row = 0
        self.progress = Progress()
        self.world = world or dist.World()
        self.loss_scale = dist.loss_scale(self.world, cfg["batch_size"])
        self.reducer = None
        if self.world.size > 1:
            # values summed with the gradients: stop signal, loss sum, correct, images
            self.reducer = dist.GradReducer(self.world, model.parameters(), overlap=overlap, n_values=4)
            if cfg.get("sync_bn"):
                dist.enable_sync_batch_norm(self.world)
            for m in self.dropouts:
                m.rows = (dist.shard_bounds(cfg["batch_size"], self.world.rank, self.world.size)[0], cfg["batch_size"])
            self.world.broadcast(list(model.named_state().values()), "the initial weights")

    def meta(self):
        from . import _C

        return dict(self.pos, config=self.cfg, step=self.pos["epoch"] * self.spe + self.pos["batch"],
                    threads=_C.get_num_threads(), ranks=self.world.size, machine=machine_name())

    def save(self, name):
        """Writes the checkpoint ``name`` (last.npz), never with non-finite weights."""
        path = self.out / name
        states = [self.model.named_state().values()] + ([self.ema.shadow.values()] if self.ema else [])
        if not all(all_finite(s) for s in states):
            raise RunError(f"the weights became non-finite by step {self.meta()['step']} (an overflow: the "
                           f"learning rate, peak {self.cfg['lr']:.3g}, is likely too high); "
                           f"{self._kept(name)}", status=3)
        if self.world.rank != 0:
            return
        try:
            save_checkpoint(path, self.model, self.opt, self.ema, self.meta())
        except checkpoint.WriteError as e:
            raise RunError(f"{e}; {self._kept(name)}", status=1) from None

    def _kept(self, name):
        path = self.out / name
        return f"{path} is intact" if path.exists() else f"nothing was saved to {path}"

    def train_epoch(self, interrupt, on_step=None):
        """Trains from the saved position to the end of the epoch; -> False when a signal stopped
        it mid-epoch. A non-finite loss or gradient raises RunError (status 3) or, with
        on_nan "skip", leaves the weights and the optimizer as they were."""
        from . import Tensor

        cfg, pos, model, opt, spe = self.cfg, self.pos, self.model, self.opt, self.spe
        epoch, sums = pos["epoch"], pos["sums"]
        sums.setdefault("skipped", 0)
        sums.setdefault("cpu_time", 0.0)
        params = model.parameters()
        model.train()
        t_epoch = t_last = time.perf_counter()
        cpu_last = time.process_time()
        stop = False  # under MPI, the ranks stop together when the step's sum of their flags says so
        for i, x, y in self.train_loader.epoch(epoch, pos["batch"]):
            step = epoch * spe + i
            opt.lr = self.schedule(step)
            for k, m in enumerate(self.dropouts):
                m.rng = np.random.default_rng([cfg["seed"], 3, step, k])
            model.zero_grad()
            logits = model(Tensor(x))
            loss, correct = batch_loss(logits, y, cfg["label_smoothing"])
            loss_sum, seen = float(loss.data) * len(x), len(x)
            bad = None if np.isfinite(loss.data).all() else "loss"
            if bad is None:
                loss.backward(self.loss_scale)
            if self.reducer is not None:  # every rank takes part, also one whose loss is not finite
                stop, loss_sum, correct, seen = self.reducer.reduce([interrupt.requested, loss_sum, correct, seen])
                if stop and not interrupt.requested:  # another rank got a signal: all stop after this step
                    interrupt.signum = signal.SIGTERM
                bad = None if np.isfinite(loss_sum) else "loss"  # the same decision on every rank
            if bad is None:
                bad = None if grads_finite(params) else "gradient"
            if bad:
                self._diverged(bad, epoch, i)
                sums["skipped"] += 1
            else:
                self.bad_in_a_row = 0
                opt.step()
                if self.ema is not None:
                    self.ema.update(live_arrays(model))
                sums["loss"] += loss_sum
                sums["correct"] += float(correct) if isinstance(y, D.Mixed) else int(correct)
                sums["seen"] += int(seen)
            now, cpu_now = time.perf_counter(), time.process_time()
            sums["time"] += now - t_last
            sums["cpu_time"] += cpu_now - cpu_last
            t_last, cpu_last = now, cpu_now
            pos["batch"] = i + 1
            seen = max(1, sums["seen"])
            ips = sums["seen"] / max(sums["time"], 1e-9)
            eta = (spe - i - 1) * cfg["batch_size"] / max(ips, 1e-9)
            self.progress.update(f"epoch {epoch + 1}/{cfg['epochs']} step {i + 1}/{spe} "
                                 f"loss {sums['loss'] / seen:.4f} acc {100 * sums['correct'] / seen:.2f}% "
                                 f"lr {opt.lr:.4g} {ips:.0f} img/s ETA {fmt_time(eta)}", final=i + 1 == spe)
            if on_step is not None:
                on_step(step)
            if stop if self.reducer is not None else interrupt.requested:
                break
        pos["elapsed"] += time.perf_counter() - t_epoch
        return pos["batch"] == spe

    def _diverged(self, what, epoch, i):
        """A non-finite ``what`` at batch i: RunError (stop), or a note and the step skipped."""
        self.bad_in_a_row += 1
        where = f"epoch {epoch + 1}, step {i + 1}/{self.spe} (global step {epoch * self.spe + i + 1})"
        if self.on_nan == "skip" and self.bad_in_a_row < SKIP_LIMIT:
            print(f"mbnet: skipped {where}: non-finite {what}", file=sys.stderr)
            return
        in_a_row = f"{self.bad_in_a_row} steps in a row, the last at " if self.bad_in_a_row > 1 else ""
        raise RunError(f"non-finite {what} at {in_a_row}{where}; likely cause: the learning rate "
                       f"({self.opt.lr:.3g} at this step, peak {self.cfg['lr']:.3g}) is too high for this model and "
                       f"batch size; {self._kept('last.npz')}; lower --lr, or pass --on-nan skip to step over "
                       "rare bad batches", status=3)

    def evaluate(self, tta=False, label_smoothing=0.0, shift=0, what=""):
        """-> (mean loss, accuracy) over the test set, each rank evaluating its shard; the status line
        says "epoch E/N evaluating <what>: done/total images" meanwhile."""
        head = f"epoch {self.pos['epoch'] + 1}/{self.cfg['epochs']} evaluating {what}".rstrip()
        loss, acc, preds = evaluate(self.model, self.test_loader, tta=tta, label_smoothing=label_smoothing, shift=shift,
                                    progress=lambda done, total: self.progress.update(f"{head}: {done}/{total} images"))
        if self.world.size == 1:
            return loss, acc
        n = len(preds)
        loss_sum, correct, n = self.world.allreduce(np.array([loss * n, round(acc * n), n]), "evaluation counts")
        return loss_sum / max(n, 1), correct / max(n, 1)

    def finish_epoch(self):
        """Evaluates, appends the epoch's metrics, saves last.npz, metrics.jsonl and
        curves.png, prints the epoch's line; -> True after the last epoch."""
        cfg, pos, model, ema = self.cfg, self.pos, self.model, self.ema
        epoch, sums = pos["epoch"], pos["sums"]
        t_eval = time.perf_counter()
        ls = cfg["label_smoothing"]
        final = epoch + 1 == cfg["epochs"]
        # the ranks' BatchNorm statistics (their own shards' without --sync-bn) become rank 0's
        self.world.broadcast(model.buffers() + (list(ema.shadow.values()) if ema else []), "the BatchNorm statistics")
        m = {"epoch": epoch + 1, "lr": self.opt.lr,
             "train_loss": sums["loss"] / max(1, sums["seen"]), "train_acc": sums["correct"] / max(1, sums["seen"])}
        side = train_side(cfg, epoch)
        if cfg.get("progressive_resize"):
            m["train_side"] = side
        if final or (epoch + 1) % cfg.get("eval_every", 1) == 0:
            m["test_loss"], m["test_acc"] = self.evaluate(label_smoothing=ls)
            if ema is not None:
                with swapped_weights(model, ema.shadow):
                    m["ema_test_loss"], m["ema_test_acc"] = self.evaluate(label_smoothing=ls, what="EMA")
        primary = None if ema is None else ema.shadow  # weights that count: EMA if on
        if final and cfg["tta"]:
            with swapped_weights(model, primary):
                m["tta_test_loss"], m["tta_test_acc"] = self.evaluate(tta=True, label_smoothing=ls,
                                                                      shift=cfg.get("tta_shift", 0), what="TTA")
            if cfg.get("tta_shift"):
                m["tta_shift"] = cfg["tta_shift"]
        if sums.get("skipped"):
            m["skipped_steps"] = sums["skipped"]
        pos["elapsed"] += time.perf_counter() - t_eval
        m["train_time"] = sums["time"]
        from . import _C
        # where the time was measured: the CPU and build, and the share of the kernel threads' time
        # this process got (about 1 on a quiet machine; well below when other work shared the cores)
        m["machine"] = machine_name()
        m["cpu_share"] = sums["cpu_time"] / max(sums["time"] * _C.get_num_threads(), 1e-9)
        m["images_per_s"] = sums["seen"] / max(sums["time"], 1e-9)
        m["epoch_time"] = time.perf_counter() - t_eval + sums["time"]
        m["wall_time"] = pos["elapsed"]
        pos["metrics"].append(m)
        pos["epoch"], pos["batch"] = epoch + 1, 0
        pos["sums"] = _fresh_sums()
        self.save("last.npz")
        if epoch + 1 in self.keep_epochs:
            self.save(f"epoch-{epoch + 1}.npz")
        try:
            if self.world.rank == 0:
                write_metrics(self.out, pos["metrics"])
                from .plot import plot_curves

                plot_curves(pos["metrics"], self.out / "curves.png")
        except ImportError as e:
            print(f"mbnet: no curves.png ({e})", file=sys.stderr)
        except checkpoint.WriteError as e:
            raise RunError(f"{e} (last.npz holds epoch {epoch + 1})", status=1) from None
        line = f"epoch {epoch + 1}/{cfg['epochs']}: train loss {m['train_loss']:.4f} acc {100 * m['train_acc']:.2f}%"
        if side != cfg["resolution"]:
            line += f" at {side} px"
        if "test_acc" in m:
            line += f" | {eval_split(cfg)} loss {m['test_loss']:.4f} acc {100 * m['test_acc']:.2f}%"
        if "ema_test_acc" in m:
            line += f" | EMA {100 * m['ema_test_acc']:.2f}%"
        if "tta_test_acc" in m:
            line += f" | TTA {100 * m['tta_test_acc']:.2f}%"
        line += f" | {m['images_per_s']:.0f} img/s, {fmt_time(m['epoch_time'])}"
        if not final:
            # the run's time to go at the pace of its last five epochs at this side (evaluations included);
            # epochs at other sides (--progressive-resize) scaled by their pixels
            recent = [r["epoch_time"] for r in pos["metrics"][-5:]
                      if "epoch_time" in r and r.get("train_side") == m.get("train_side")]
            pace = sum(recent) / len(recent)
            left = sum(pace * (train_side(cfg, e) / side) ** 2 for e in range(epoch + 1, cfg["epochs"]))
            line += f", {fmt_time(left)} to go"
        self.progress.clear()
        print(line, file=sys.stderr)
        return final

    def train(self, on_step=None):
        """Trains to the last epoch; -> the exit status (0, or 130/143 after saving on a signal)."""
        cfg, out = self.cfg, self.out
        mpirun = f"mpirun -n {self.world.size} " if self.world.size > 1 else ""
        resume = f"continue with: {mpirun}python -m mbnet.train --out {out} --resume"
        interrupt = Interrupt()
        if self.world.size > 1:  # mpirun forwards SIGUSR1 to every rank (and ends them all on SIGINT/SIGTERM)
            interrupt.SIGNALS = Interrupt.SIGNALS + (signal.SIGUSR1,)
        with interrupt:
            while self.pos["epoch"] < cfg["epochs"]:
                if not self.train_epoch(interrupt, on_step):
                    self.save("last.npz")
                    print(f"mbnet: saved {out / 'last.npz'} at epoch {self.pos['epoch'] + 1}, "
                          f"step {self.pos['batch']}/{self.spe}; {resume}", file=sys.stderr)
                    return interrupt.status
                final = self.finish_epoch()
                if self.world.size > 1:  # a signal may have reached some ranks only, during the evaluation
                    stop = self.world.allreduce(np.array([float(interrupt.requested)]), "the stop flag")[0]
                    if stop and not interrupt.requested:
                        interrupt.signum = signal.SIGTERM
                if interrupt.requested and not final:
                    print(f"mbnet: saved {out / 'last.npz'} after epoch {self.pos['epoch']}; {resume}", file=sys.stderr)
                    return interrupt.status
        m = self.pos["metrics"][-1]
        accs = [f"{name} {100 * m[key]:.2f}%" for name, key in ((f"{eval_split(cfg)} accuracy", "test_acc"), ("EMA", "ema_test_acc"),
                                                                 (f"EMA + {tta_name(cfg)}", "tta_test_acc")) if key in m]
        print(f"mbnet: done; final epoch: {', '.join(accs)}; run dir {out}", file=sys.stderr)
        return 0


def tta_name(cfg):
    """The final evaluation's TTA in words: "flip TTA", or "flip + 2 px shift TTA"."""
    return f"flip + {cfg['tta_shift']} px shift TTA" if cfg.get("tta_shift") else "flip TTA"


def batch_loss(logits, y, label_smoothing):
    """-> (mean cross-entropy Tensor, correct) of a training batch: y the labels (B,), correct the
    argmax hits; or D.Mixed(a, b, lam): lam CE(a) + (1 - lam) CE(b), correct lam hits(a) + (1 - lam) hits(b)."""
    from .functional import cross_entropy

    pred = logits.data.argmax(1)
    if not isinstance(y, D.Mixed):
        return cross_entropy(logits, y, label_smoothing=label_smoothing), int((pred == y).sum())
    lam = np.float32(y.lam)
    loss = lam * cross_entropy(logits, y.a, label_smoothing) + (1 - lam) * cross_entropy(logits, y.b, label_smoothing)
    return loss, float(y.lam * (pred == y.a).sum() + (1 - y.lam) * (pred == y.b).sum())


def grads_finite(params):
    """False when a gradient holds NaN or an infinity (one sum per gradient: they propagate into it;
    an overflow of the sum counts too)."""
    return bool(np.isfinite(sum(float(p.grad.sum()) for p in params if p.grad is not None)))


def _load_init(path):
    """The model of --init WEIGHTS (models.load: EMA weights of a checkpoint); RunError naming the file."""
    from .models import load

    try:
        return load(path)
    except checkpoint.CheckpointError as e:
        raise RunError(f"--init: {e}") from None
    except (OSError, ValueError, ImportError) as e:
        raise RunError(f"--init {path}: {type(e).__name__}: {e}") from None


def init_model(model, source, seed=0):
    """``model`` (fresh, this run's classes) with the weights of ``source``: all of them when the
    class counts agree, else all but the classifier, which keeps its fresh initialization.
    Rebuilt first when source's architecture or activation differs. -> (model, kept_classifier)."""
    from .models import from_config

    want = {k: source.config()[k] for k in ("arch", "act")}
    if any(model.config()[k] != v for k, v in want.items()):
        model = from_config({**model.config(), **want}, seed=seed)
    state = source.state_dict()
    keep_head = source.num_classes == model.num_classes
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=keep_head)
    missing = set(model.state_dict()) - set(state)
    if missing - {"classifier.weight", "classifier.bias"}:
        raise ValueError(f"missing keys: {', '.join(sorted(missing))}")
    return model, keep_head


def start_run(args, argv, parser, out, world=None):
    """Stage 1: a Run in ``out`` (created and locked by the caller), new or resumed (--resume);
    under MPI (``world``) each rank loads the data and holds its shards."""
    world = world or dist.World()
    from . import _C
    from .models import from_config

    ckpt, source = None, None
    if args.resume or args.branch:
        path = out / "last.npz" if args.resume else Path(args.branch)
        ckpt = load_checkpoint(path)
        if "config" not in ckpt["meta"]:
            raise RunError(f"{path}: a weights file, not a training checkpoint (it has no run configuration); "
                           f"start a run from it with --init instead of --{'resume' if args.resume else 'branch'}")
        cfg = ckpt["meta"]["config"]
        if args.resume:
            ignored = sorted(k for k in _explicit_args(parser, argv) - set(RUNTIME_KEYS) if vars(args)[k] != cfg.get(k))
            if ignored:
                print(f"mbnet: --resume uses the run's saved configuration; ignoring {', '.join(ignored)}",
                      file=sys.stderr)
        else:
            if (out / "last.npz").exists():
                raise RunError(f"{out} already holds a run; --branch starts a new one: choose another --out")
            given = vars(_given_args(parser, argv))
            changes = {k: v for k, v in given.items() if k not in RUNTIME_KEYS and v != cfg.get(k)}
            cfg = branch_config(cfg, changes, ckpt["meta"], path)
    else:
        if (out / "last.npz").exists():
            raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = make_config(args)
        if cfg["init"]:
            source = _load_init(cfg["init"])
            given, arch = _explicit_args(parser, argv), source.config()
            for key in ("alpha", "arch", "act"):
                if key in given and cfg[key] != arch[key]:
                    raise RunError(f"--{key} {cfg[key]} disagrees with --init {cfg['init']} ({key} {arch[key]}); "
                                   f"leave --{key} out")
                cfg[key] = arch[key]
            cfg["mean"], cfg["std"] = list(source.mean), list(source.std)
            cfg["classes"] = None  # the data's, which may differ from the source's (its classifier is then re-made)

    try:
        xtr, ytr, xte, yte = world.in_turn(lambda: D.prepare_data(cfg, args.data_dir, workers=args.workers),
                                           "waiting for another rank to fill the data cache")
    except D.DataError as e:
        raise RunError(str(e)) from None
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    if cfg["batch_size"] < world.size:
        raise RunError(f"--batch-size {cfg['batch_size']} is smaller than the {world.size} MPI ranks")
    train_loader = D.Loader(xtr, ytr, cfg["batch_size"], mean, std, train=True, seed=cfg["seed"], **augmentation(cfg),
                            shard=(world.rank, world.size),
                            side=functools.partial(train_side, cfg) if cfg.get("progressive_resize") else None)
    lo, hi = dist.shard_bounds(len(yte), world.rank, world.size)
    test_loader = D.Loader(xte[lo:hi], yte[lo:hi], EVAL_BATCH, mean, std, train=False)

    if ckpt is not None:
        model = from_config(checkpoint.model_config(ckpt, out / "last.npz"), seed=cfg["seed"])
    else:
        model = build_model(cfg)
        if source is not None:
            try:
                model, kept = init_model(model, source, cfg["seed"])
            except ValueError as e:
                raise RunError(f"--init {cfg['init']}: does not fit this model ({e})") from None
            print(f"mbnet: starting from {cfg['init']}; "
                  + ("classifier kept" if kept else f"classifier re-made for {model.num_classes} classes "
                                                    f"(the weights have {source.num_classes})"), file=sys.stderr)
    opt = optim.make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], weight_decay=weight_decays(model, cfg))
    ema = optim.EMA(model.state_dict(), cfg["ema_decay"]) if cfg["ema"] else None
    pos = {"epoch": 0, "batch": 0, "metrics": [], "sums": _fresh_sums(), "elapsed": 0.0}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optim"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
        except (KeyError, ValueError) as e:
            raise RunError(f"{out / 'last.npz'}: does not fit its own configuration "
                           f"({type(e).__name__}: {e})") from None
        pos = {k: ckpt["meta"][k] for k in pos}
        saved_threads = ckpt["meta"].get("threads")
        if saved_threads is not None and saved_threads != _C.get_num_threads():
            print(f"mbnet: note: this run used {saved_threads} kernel threads, now {_C.get_num_threads()}; "
                  "the result will not be bit-identical to an unbroken run (pass --threads)", file=sys.stderr)
        saved_machine = ckpt["meta"].get("machine")
        if saved_machine is not None and saved_machine != machine_name():
            print(f"mbnet: note: this run was saved on {saved_machine}, now {machine_name()}; another CPU or "
                  "build may round the sums differently, so the result may not be bit-identical to an unbroken run",
                  file=sys.stderr)
        saved_ranks = ckpt["meta"].get("ranks", 1)
        if saved_ranks != world.size:
            print(f"mbnet: note: this run used {saved_ranks} MPI rank(s), now {world.size}; it goes on with the same "
                  "global batch, but the result will not be bit-identical to an unbroken run", file=sys.stderr)
    if ckpt is None or args.branch:
        try:
            if world.rank == 0:
                write_text(out / "config.json", dumps(cfg, indent=1) + "\n")
        except checkpoint.WriteError as e:
            raise RunError(str(e), status=1) from None
    run = Run(out, cfg, train_loader, test_loader, model, opt, ema, pos, on_nan=args.on_nan, world=world,
              overlap=args.overlap, keep_epochs=args.keep_epochs)
    if args.branch:
        changed = cfg["branched_from"][-1]["changed"]
        print(f"mbnet: branching {args.branch} at epoch {pos['epoch'] + 1}, step {pos['batch']}/{run.spe} into {out}, "
              f"changed: {', '.join(f'{k} {v}' for k, v in changed.items()) or 'nothing'}", file=sys.stderr)
    elif ckpt is not None:
        print(f"mbnet: resuming {out} at epoch {pos['epoch'] + 1}, step {pos['batch']}/{run.spe}", file=sys.stderr)
    nparams = sum(p.data.size for p in model.parameters())
    print(f"mbnet: {type(model).__name__} alpha={cfg['alpha']} {cfg['resolution']}px, {nparams:,} parameters; "
          f"{len(ytr)} train / {len(yte)} {eval_split(cfg)} images, {run.spe} steps/epoch; run dir {out}", file=sys.stderr)
    return run


def main(argv=None, *, on_step=None):
    """Returns the exit status (see the module docstring). on_step(step) is called after each
    optimizer step (tests use it to interrupt)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(parser, argv)
    check_args(parser, args)
    world = dist.world(args.mpi_timeout)
    lead = world.rank == 0  # under MPI rank 0 alone writes and prints; the others print their errors only
    started = np.array([time.time()])
    world.broadcast([started], "the start time")  # one default run name for all ranks
    out = Path(args.out or Path("runs") / (args.name or time.strftime("%Y%m%d-%H%M%S", time.localtime(started[0]))))
    created = False
    try:
        with contextlib.ExitStack() as stack:
            if not lead:
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
            set_threads(args.threads)
            if args.resume and not (out / "last.npz").is_file():
                raise RunError(f"--resume: {out / 'last.npz'}: no such file")
            if not lead:
                return start_run(args, argv, parser, out, world).train(on_step)
            created = not out.exists()
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(f"cannot create the run directory {out}: [Errno {e.errno}] {e.strerror}") from None
            with RunLock(out):
                removed = remove_orphans(out)
                if removed:
                    print(f"mbnet: removed {len(removed)} temp file(s) a killed run left in {out}: {', '.join(removed)}",
                          file=sys.stderr)
                return start_run(args, argv, parser, out, world).train(on_step)
    except RunError as e:
        if created and e.status == 2:  # a run that never started leaves no directory behind
            _remove_unused(out)
        if world.size > 1:  # the other ranks may be waiting for this one in a collective: end them all now
            world.abort(str(e), e.status)
        print(f"mbnet: {e}", file=sys.stderr)
        return e.status
    except (KeyboardInterrupt, SystemExit) as e:  # a second signal: no saving
        if world.size > 1:  # (else this rank would wait for the others in MPI's finalization)
            status = 130 if isinstance(e, KeyboardInterrupt) else 143
            world.abort(f"{type(e).__name__} {getattr(e, 'code', '')}".strip(), status)
        raise


def _remove_unused(out):
    """Deletes ``out`` if it holds nothing but an empty lock file."""
    try:
        if [p.name for p in out.iterdir()] == [RunLock.NAME] and not (out / RunLock.NAME).stat().st_size:
            (out / RunLock.NAME).unlink()
            out.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
