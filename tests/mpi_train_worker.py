"""Run by tests/test_distributed.py under `mpirun`: `python -m mbnet.train` with a test action on
rank 1, and a guard that fails any rank but 0 that writes into the run directory.

    mpi_train_worker.py ACTION TRAIN-OPTIONS...

ACTION: "none", or KIND@STEP: after global step STEP, rank 1 sends itself SIGTERM ("term": the
ranks save and stop together), SIGKILL ("kill": a dead rank) or SIGSTOP ("stop": a hung rank).
"""
import os
import signal
import sys
from pathlib import Path

from mbnet import distributed as dist
from mbnet import train

SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL, "stop": signal.SIGSTOP}

action, argv = sys.argv[1], sys.argv[2:]
kind, _, at = action.partition("@")
world = dist.world()
out = Path(argv[argv.index("--out") + 1]).resolve()


def inside_the_run_dir(path):
    return isinstance(path, (str, bytes, os.PathLike)) and out in Path(os.fsdecode(path)).resolve().parents


def refuse_writes_into_the_run_dir(event, args):
    """An audit hook: opening for writing, creating, renaming into or deleting a file of --out fails."""
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        target = path if writes else None
    else:
        target = {"os.rename": 1, "os.replace": 1, "os.mkdir": 0, "os.remove": 0}.get(event)
        target = None if target is None else args[target]
    if target is not None and inside_the_run_dir(target):
        raise PermissionError(f"rank {world.rank} tried to write {os.fsdecode(target)} ({event})")


if world.rank != 0:
    sys.addaudithook(refuse_writes_into_the_run_dir)


def on_step(step):
    if kind in SIGNALS and step == int(at) and world.rank == 1:
        os.kill(os.getpid(), SIGNALS[kind])


sys.exit(train.main(argv, on_step=on_step))
