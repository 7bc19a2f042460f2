"""End to end: MobileNetV1 training-step and inference throughput and peak memory, mbnet against
the same network in PyTorch, at alpha 1, 0.75, 0.5, 0.25, batch 128, 32x32x3 input (CIFAR).

    python -m benchmarks.bench_e2e [--alphas 1,0.75,0.5,0.25] [--batch 128] [--steps 10]
                                   [--threads T] [--no-torch] [--tiny] [--json out.json]

Each (engine, alpha, mode) runs in its own fresh subprocess (`--worker`), so one engine's memory and
thread pool never touch the other's. A training step is zero_grad + forward + cross-entropy +
backward + SGD update (lr 0.01, momentum 0.9, weight decay 5e-4); inference is an eval-mode forward
under no_grad; "plan" (mbnet only) is the same inference through the compiled plan (mbnet.plan: BN
folded, one call into the extension), compared with PyTorch's eval forward. images/s = batch /
median step time over --steps after --warmup steps.

GFLOP/s counts 2 x the model's mult-adds per image (summary()) for inference and 3x that for a
training step (forward, input gradient, weight gradient; the SGD update and BatchNorm are not
counted). "of GEMM" divides it by the rate mbnet's own GEMM sustains, measured in this process
before and after the width's rows, on the largest pointwise layer of that width at this batch (the
most mult-adds, then the most weights: 1024 -> 1024 at 2x2 for alpha 1 at 32 px, forward; the
fastest of 20 calls each time):
how close the whole step comes to the engine's FP32 bound.

Memory (tracemalloc cannot see C++ or PyTorch allocations): the worker imports its engine (NumPy +
mbnet, or PyTorch), reads its resident size ("libs": interpreter and libraries), resets the
high-water mark (writing 5 to /proc/self/clear_refs), then builds the model, optimizer and input
batch and runs the warm-up and timed steps; VmHWM from /proc/self/status is then the peak resident
size, and "need" = peak - libs is what the engine used for weights, gradients, optimizer state, the
input, activations, workspaces and what its allocator kept. (Measuring only after warm-up would
miss most of it: glibc keeps freed activation memory mapped, so the next step's peak hides under
it.) If the reset is not allowed, getrusage's ru_maxrss is the peak and also covers the imports.
Resident memory counts pages touched, not bytes allocated.

PyTorch's model is built here: conv 3x3 + BN + ReLU stem, the 13 depthwise-separable blocks (3x3
depthwise + BN + ReLU, 1x1 + BN + ReLU), global average pool, linear, channels_last memory format,
torch.set_num_threads equal to mbnet's; its parameter count is checked against mbnet's.
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import common

ROOT = Path(__file__).resolve().parent.parent
ALPHAS = (1.0, 0.75, 0.5, 0.25)


# --- memory -------------------------------------------------------------------------------------

def _status_kb(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak():
    """Resets VmHWM to the current resident size; returns the method name for the report."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM reset after the imports"
    except OSError:
        return "ru_maxrss (no reset: includes the imports)"


def peak_kb():
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the two engines ----------------------------------------------------------------------------

def mbnet_fns(alpha, batch, size, threads, plan=False):
    from mbnet import _C
    from mbnet.models import MobileNetV1

    _C.set_num_threads(threads)
    model = MobileNetV1(alpha, num_classes=10, input_size=size, seed=0)
    train_step, infer = common.mbnet_steps(model, batch, size)
    if plan:
        from mbnet import plan as mbplan
        x = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)
        compiled = mbplan.compile(model.eval(), batch=batch)
        infer = lambda: compiled(x)  # noqa: E731
    return train_step, infer, model.summary(show=False)["params"], "mbnet"


def largest_pointwise(alpha, size):
    """The pointwise layer of MobileNetV1(alpha) at this input size with the most mult-adds (then
    the most weights): its LayerShape."""
    from mbnet.models import layer_shapes

    return max((r for r in layer_shapes(alpha, size) if r.kind == "pw"),
               key=lambda r: (r.cin * r.cout * r.size ** 2, r.cin * r.cout))


def gemm_rate(alpha, batch, size, threads, repeat=20):
    """GFLOP/s of mbnet's pointwise GEMM (forward) on largest_pointwise(alpha, size) at this batch."""
    from mbnet import _C

    _C.set_num_threads(threads)
    r = largest_pointwise(alpha, size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, r.size, r.size, r.cin), dtype=np.float32)
    w = rng.standard_normal((r.cin, r.cout), dtype=np.float32)
    # The fastest of the calls: a steady rate the GEMM reaches, not one noisy moment's (on a shared
    # guest a median of this short burst has read 30% low while the steps around it did not).
    t = common.measure(lambda: _C.pwconv2d_fwd(x, w), repeat, 3, pause=0)["min"]
    return {"layer": f"{r.cin}->{r.cout}@{r.size}", "gflops": 2 * batch * r.size ** 2 * r.cin * r.cout / t / 1e9}


def mult_adds(alpha, size):
    from mbnet.models import MobileNetV1

    return MobileNetV1(alpha, num_classes=10, input_size=size, seed=0).summary(show=False)["mult_adds"]


def torch_fns(alpha, batch, size, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = common.torch_model(alpha, size).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, size, size, 3), dtype=np.float32)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(rng.integers(0, 10, batch))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    def infer():
        model.eval()
        with torch.no_grad():
            return model(x)

    params = sum(p.numel() for p in model.parameters())
    return train_step, infer, params, f"PyTorch {torch.__version__}"


def worker(engine, alpha, mode, batch, size, steps, warmup, threads):
    """Runs in the subprocess: returns the measurements of one configuration."""
    if engine == "mbnet":
        import mbnet  # noqa: F401
        fns = mbnet_fns
    else:
        import torch  # noqa: F401
        import mbnet.models  # noqa: F401  (common.torch_model reads the block table)
        fns = torch_fns
    libs = _status_kb("VmRSS")
    method = reset_peak()
    train_step, infer, params, name = fns(alpha, batch, size, threads, **({"plan": True} if mode == "plan" else {}))
    fn = train_step if mode == "train" else infer
    t = common.measure(fn, steps, warmup, pause=0)
    peak = peak_kb()
    return {"engine": engine, "name": name, "alpha": alpha, "mode": mode, "batch": batch, "size": size,
            "threads": threads, "params": params, "median_s": t["median"], "min_s": t["min"], "times": t["times"],
            "images_per_s": batch / t["median"], "libs_rss_mb": libs / 1024 if libs else None, "peak_rss_mb": peak / 1024,
            "need_mb": (peak - libs) / 1024 if libs else None, "memory_method": method}


def run_worker(engine, alpha, mode, batch, size, steps, warmup, threads):
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--worker", engine, str(alpha), mode, str(batch), str(size),
           str(steps), str(warmup), str(threads)]
    time.sleep(0.1)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(alphas=ALPHAS, batch=128, size=32, steps=10, warmup=2, threads=None, tiny=False, use_torch=True):
    from mbnet import _C

    if threads is None:
        threads = _C.get_num_threads()
    if tiny:
        alphas, batch, steps, warmup = (0.25,), 2, 1, 1
    have_torch = use_torch and common.optional_import("torch") is not None
    engines = ["mbnet"] + (["torch"] if have_torch else [])
    t0 = time.perf_counter()
    rows, gemm = [], {}
    for alpha in alphas:
        before = gemm_rate(alpha, batch, size, threads, repeat=3 if tiny else 20)
        flops = 2 * mult_adds(alpha, size) * batch
        width = []
        for mode in ("train", "infer", "plan"):
            for engine in engines if mode != "plan" else ["mbnet"]:
                row = run_worker(engine, alpha, mode, batch, size, steps, warmup, threads)
                row["gflops"] = flops * (3 if mode == "train" else 1) / row["median_s"] / 1e9
                width.append(row)
        # the GEMM's rate before and after the width's rows, the faster: one noisy burst of calls
        # (a shared guest's) would otherwise set the "of GEMM" of a whole width
        after = gemm_rate(alpha, batch, size, threads, repeat=3 if tiny else 20)
        gemm[alpha] = max(before, after, key=lambda g: g["gflops"])
        for row in width:
            row["of_gemm"] = row["gflops"] / gemm[alpha]["gflops"] if row["engine"] == "mbnet" else None
        rows += width
    return {"gemm": gemm, "benchmark": "e2e", **common.machine_info(), "threads": threads, "batch": batch, "size": size,
            "steps": steps, "warmup": warmup, "torch": have_torch or None, "rows": rows,
            "seconds": time.perf_counter() - t0}


def markdown(res):
    rows, by = [], {(r["engine"], r["alpha"], r["mode"]): r for r in res["rows"]}
    for r in res["rows"]:
        other = by.get(("torch", r["alpha"], "infer" if r["mode"] == "plan" else r["mode"])) if r["engine"] == "mbnet" \
            else None
        vs = None
        if r["engine"] == "mbnet" and other is not None:
            vs = f"{r['images_per_s'] / other['images_per_s']:.2f}"
            if other["params"] != r["params"]:
                vs += f" (params differ: {other['params']:,})"
        of_gemm = None if r.get("of_gemm") is None else f"{100 * r['of_gemm']:.0f}%"
        rows.append((r["name"], r["alpha"], r["mode"], f"{r['params'] / 1e6:.2f}M", r["median_s"] * 1e3,
                     r["images_per_s"], vs, r.get("gflops"), of_gemm, r["need_mb"], r["peak_rss_mb"], r["libs_rss_mb"]))
    method = sorted({r["memory_method"] for r in res["rows"]})
    lines = ["## End to end: MobileNetV1 training step and inference", ""] + common.header(res) + [
        "",
        f"Batch {res['batch']}, {res['size']}x{res['size']}x3, {res['threads']} threads for both engines, "
        f"median of {res['steps']} steps after {res['warmup']} warm-up, one fresh process per row. "
        "train = forward + cross-entropy + backward + SGD(momentum) update; infer = eval forward, no grad; "
        "plan = the same inference through the compiled plan (mbnet.plan), against PyTorch's infer. "
        "GFLOP/s = 2 x mult-adds x batch (x3 for train) / step time; of GEMM = that over the rate of mbnet's own "
        "GEMM on the width's largest pointwise layer, measured in this process before and after the width's rows, the fastest of its calls ("
        + ", ".join(f"α={a:g}: {g['layer']} {g['gflops']:.0f} GFLOP/s" for a, g in res.get("gemm", {}).items()) + "). "
        "vs torch = our images/s / PyTorch's (> 1: ours is faster). "
        f"Memory from /proc/self/status ({', '.join(method)}): libs = VmRSS after importing the engine, "
        "peak = VmHWM over model building, warm-up and timed steps, need = peak - libs (weights, gradients, "
        "optimizer state, input, activations, workspaces, allocator cache)." + ("" if res["torch"] else " No PyTorch rows (not installed, or --no-torch)."),
        "",
        common.table(["engine", "α", "mode", "params", "ms / step", "images/s", "vs torch", "GFLOP/s", "of GEMM",
                      "need MB", "peak RSS MB", "libs MB"], rows, "lrlrrrrrrrrr"),
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # run_worker's subprocess: ENGINE ALPHA MODE BATCH SIZE STEPS WARMUP THREADS
        engine, alpha, mode, *ints = argv[1:]
        res = worker(engine, float(alpha), mode, *map(int, ints))
        print(json.dumps(res))
        return res
    return common.cli(__doc__, run, markdown, argv, {"tiny": "alpha 0.25, batch 2, 1 step: a smoke run"})


if __name__ == "__main__":
    main()
