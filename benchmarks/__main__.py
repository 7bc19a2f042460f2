"""Runs the benchmarks, prints their Markdown tables and optionally writes all results as JSON.

    python -m benchmarks [--tiny] [--json out.json] [--only NAME[,NAME]] [--threads T]
                         [--no-torch] [--no-numba]

NAME is one of: separable, kernels, e2e (this package's suite, run in this process, e2e spawning
one process per configuration), depthwise, pointwise, step (the kernel and model engineers' own
benchmarks, each run as `python -m benchmarks.bench_NAME` in a subprocess with the flags its
--help offers: --tiny or the smallest sizes it takes, --json, --threads, --no-torch).

--tiny runs everything once on tiny sizes (batch 2, few layers, 1 repeat): a check that the
benchmarks still run (CI), not a measurement. Timings belong under `flock /tmp/mbnet-bench.lock`.
Exits 1 if any benchmark failed (after running the others).
"""
import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import common

ROOT = Path(__file__).resolve().parent.parent
OURS = ("separable", "kernels", "e2e")
THEIRS = ("depthwise", "pointwise", "step")
ALL = OURS + THEIRS


def run_ours(name, args):
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    if name == "separable":
        res = mod.run(threads=args.threads, tiny=args.tiny)
    elif name == "kernels":
        res = mod.run(threads=args.threads, tiny=args.tiny, use_numba=not args.no_numba, use_torch=not args.no_torch)
    else:
        res = mod.run(threads=args.threads, tiny=args.tiny, use_torch=not args.no_torch)
    print(mod.markdown(res), flush=True)
    return res


def _flags(help_text):
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))


def run_theirs(name, args):
    """Runs benchmarks/bench_NAME.py in a subprocess with the options its --help lists."""
    base = [sys.executable, "-m", f"benchmarks.bench_{name}"]
    helped = subprocess.run(base + ["--help"], cwd=ROOT, capture_output=True, text=True)
    if helped.returncode != 0:
        raise RuntimeError(f"bench_{name} --help failed:\n{helped.stderr[-3000:]}")
    flags = _flags(helped.stdout)
    cmd = list(base)
    if args.tiny:
        if "--tiny" in flags:
            cmd.append("--tiny")
        else:  # the smallest run its options allow
            small = {"--batch": "2", "--steps": "1", "--warmup": "0", "--repeat": "1"}
            for flag, value in small.items():
                if flag in flags:
                    cmd += [flag, value]
    if args.threads is not None and "--threads" in flags:
        cmd += ["--threads", str(args.threads)]
    if (args.no_torch or args.tiny) and "--no-torch" in flags:
        cmd.append("--no-torch")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        if "--json" in flags:
            cmd += ["--json", str(out)]
        print(f"`{' '.join(['python'] + cmd[1:]).replace(str(out), 'TMP.json')}`\n", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_{name} exited with {proc.returncode}")
        res = {"command": cmd[1:], "stdout": proc.stdout}
        if out.exists():
            res["result"] = json.loads(out.read_text())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="every benchmark once on tiny sizes (CI smoke run)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--only", action="append", default=None, help=f"comma-separated subset of {', '.join(ALL)}")
    ap.add_argument("--threads", type=int, default=None, help="default: mbnet's current OpenMP setting")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    ap.add_argument("--no-numba", action="store_true", help="skip the numba comparisons")
    args = ap.parse_args(argv)
    names = ALL
    if args.only:
        names = [n.strip() for part in args.only for n in part.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
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
          f"{' (disabled)' if args.no_numba else ''}\n", flush=True)

    results, seconds, failed = {}, {}, []
    t_all = time.perf_counter()
    for name in names:
        print(f"\n<!-- {name} -->\n", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run_ours(name, args) if name in OURS else run_theirs(name, args)
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
