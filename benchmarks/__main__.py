"""Runs the benchmarks, prints their Markdown tables and optionally writes all results as JSON.

    python -m benchmarks [--tiny] [--json out.json] [--only NAME[,NAME]] [--threads T]
                         [--no-torch] [--no-numba] [--no-onnxruntime]

NAME is one of: separable, kernels, e2e, depthwise, pointwise, step, latency, layers, data, plan, mpi.
Each is the module benchmarks/bench_NAME.py (also runnable alone: `python -m benchmarks.bench_NAME
--help`), run in this process through its run(...) and markdown(result); e2e spawns one process per configuration,
mpi one process or `mpirun` job per configuration (skipped without mpi4py).

--tiny runs everything once on tiny sizes (batch 2, few layers, 1 repeat): a check that the
benchmarks still run (CI), not a measurement. Timings belong under `flock /tmp/mbnet-bench.lock`.
Exits 1 if any benchmark failed (after running the others).
"""
import argparse
import importlib
import inspect
import os
import sys
import time
import traceback
from datetime import datetime, timezone

from . import common

ALL = ("separable", "kernels", "e2e", "depthwise", "pointwise", "step", "latency", "layers", "data", "plan", "mpi")


def run_one(name, args):
    """Runs benchmarks/bench_NAME.py with the options its run() takes; prints its tables."""
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    options = {"threads": args.threads, "tiny": args.tiny, "use_torch": not args.no_torch,
               "use_numba": not args.no_numba, "use_onnxruntime": not args.no_onnxruntime}
    takes = inspect.signature(mod.run).parameters
    res = mod.run(**{k: v for k, v in options.items() if k in takes})
    print(mod.markdown(res), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="every benchmark once on tiny sizes (CI smoke run)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--only", action="append", default=None, help=f"comma-separated subset of {', '.join(ALL)}")
    ap.add_argument("--threads", type=int, default=None, help="default: mbnet's current OpenMP setting")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    ap.add_argument("--no-numba", action="store_true", help="skip the numba comparisons")
    ap.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime comparisons (latency, layers)")
    args = ap.parse_args(argv)
    names = ALL
    if args.only:
        names = [n.strip() for part in args.only for n in part.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
        if not names:
            ap.error(f"--only names no benchmark; choose from {', '.join(ALL)}")
    from mbnet.run import max_threads

    if args.threads is not None and not 1 <= args.threads <= max_threads():
        ap.error(f"--threads {args.threads}: must be in [1, {max_threads()}]")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: no such directory (checked before the benchmarks run, not after)")
    if args.threads is not None:
        from mbnet import _C
        _C.set_num_threads(args.threads)

    info = common.machine_info()
    started = datetime.now(timezone.utc)
    print(f"# mbnet benchmarks{' (--tiny: a smoke run, not a measurement)' if args.tiny else ''}\n")
    print(f"{started:%Y-%m-%d %H:%M} UTC; " + "\n".join(common.header(info)))
    print(f"\nOptional comparisons: torch {getattr(common.optional_import('torch'), '__version__', 'not installed')}"
          f"{' (disabled)' if args.no_torch else ''}, numba "
          f"{getattr(common.optional_import('numba'), '__version__', 'not installed')}"
          f"{' (disabled)' if args.no_numba else ''}, onnxruntime "
          f"{getattr(common.optional_import('onnxruntime'), '__version__', 'not installed')}"
          f"{' (disabled)' if args.no_onnxruntime else ''}\n", flush=True)

    results, seconds, failed = {}, {}, []
    t_all = time.perf_counter()
    for name in names:
        print(f"\n<!-- {name} -->\n", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run_one(name, args)
        except Exception as e:  # report, run the others, fail at the end
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        seconds[name] = time.perf_counter() - t0
    total = time.perf_counter() - t_all

    print("\n## Run time\n")
    print(common.table(["benchmark", "seconds"], [(n, f"{s:.1f}") for n, s in seconds.items()] +
                       [("total", f"{total:.1f}")]))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    if args.json:
        common.write_json(args.json, {"started": started.isoformat(), "tiny": args.tiny, "machine": info,
                                      "seconds": seconds, "total_seconds": total, "failed": failed,
                                      "benchmarks": results})
        print(f"\nWrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
