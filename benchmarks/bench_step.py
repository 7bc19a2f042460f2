"""Time one training step (forward + loss + backward, no optimizer) of MobileNetV1 in mbnet and,
if it is installed, in PyTorch (channels_last, same thread count), and break mbnet's step down by
kernel.

    flock /tmp/mbnet-bench.lock python -m benchmarks.bench_step [--batch 128 --size 32 --alpha 1.0]
                                   [--steps 7] [--warmup 2] [--threads T] [--no-torch] [--tiny] [--json out.json]

Prints Markdown tables: the step times (median of --steps after --warmup; the engines' steps
alternate) with the ratio, and the per-kernel time of one mbnet step (the rest is Python, NumPy and
allocation outside the kernels). Each kernel call of one more step is then replayed alone with the
same arguments, back to back (warm caches) and after 10 ms of idling, and a 1 MB array is summed
right after the last sum and after idling: on a shared machine the private caches lose their data
within milliseconds even while this process spins, and that is the gap between a kernel alone and
the same kernel inside the step. Last, the ceiling: the step's pointwise GEMMs timed at the rate
mbnet's GEMM reaches on the network's largest pointwise layer (bench_e2e.gemm_rate, measured here),
with the other kernels as measured, and what ratio to PyTorch that would give.
"""
import statistics
import time

import numpy as np

import mbnet
from mbnet import _C
from mbnet import functional as F
from mbnet.models import MobileNetV1

from . import common
from .bench_e2e import gemm_rate


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def mbnet_step_fn(alpha, batch, size):
    model = MobileNetV1(alpha, num_classes=10, input_size=size, dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, batch)

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(mbnet.Tensor(x)), labels)
        loss.backward()
        return loss

    return model, step


def torch_step_fn(alpha, batch, size, threads):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    model = common.torch_model(alpha, size)
    model = model.to(memory_format=torch.channels_last).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        return loss

    return step, torch.__version__


def idle(seconds):
    """Spins for `seconds` without touching memory (the core stays ours, its caches are left alone)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def replay(step, repeat=3, idle_s=0.01):
    """{kernel: [calls, in-step s, alone warm s, alone after idle_s s]} over one step: one step times
    each kernel call; the next (the same calls: bench_step's step does not update the weights)
    keeps a copy of each call's arguments, and each call is then made alone with them: `repeat`
    times back to back after one untimed call (median), and `repeat` times each after idling
    idle_s (median). The copies would take the step's memory (its outputs would land in fresh,
    faulting pages), so the step that is timed copies nothing."""
    orig = F._run

    def recorded(keep):
        calls = []

        def run(name, dtype, *args):
            start = time.perf_counter()
            out = orig(name, dtype, *args)
            calls.append((name, dtype, [a.copy() if isinstance(a, np.ndarray) else a for a in args] if keep
                          else None, time.perf_counter() - start))
            return out

        F._run = run
        try:
            step()
        finally:
            F._run = orig
        return calls

    timed_calls, kept = recorded(False), recorded(True)
    if [c[0] for c in timed_calls] != [c[0] for c in kept]:
        raise RuntimeError("replay: the two steps called different kernels")
    out = {}
    for (name, dtype, args, _), (_, _, _, t_step) in zip(kept, timed_calls):
        call = lambda: orig(name, dtype, *args)  # noqa: E731
        call()
        warm = statistics.median(timed(call) for _ in range(repeat))
        cold = []
        for _ in range(repeat):
            idle(idle_s)
            cold.append(timed(call))
        e = out.setdefault(name, [0, 0.0, 0.0, 0.0])
        e[0] += 1
        e[1] += t_step
        e[2] += warm
        e[3] += statistics.median(cold)
    return out


def cache_decay(idles=(0.0, 0.001, 0.01, 0.03), repeat=15, mb=1):
    """{idle seconds: median seconds of summing an mb-MB float32 array} when the sum follows the
    previous one after spinning that long (the array fits the private L2)."""
    a = np.ones(mb * (1 << 18), np.float32)
    out = {}
    for d in idles:
        ts = []
        for _ in range(repeat):
            a.sum()
            idle(d)
            ts.append(timed(a.sum))
        out[d] = statistics.median(ts)
    return out


def run(batch=128, size=32, alpha=1.0, steps=7, warmup=2, threads=None, tiny=False, use_torch=True):
    if threads is not None:
        _C.set_num_threads(threads)
    threads = _C.get_num_threads()
    if tiny:
        batch, steps, warmup = 2, 1, 0

    # Measured before the steps and after them, the faster kept: one burst has read half the rate.
    gemm_before = gemm_rate(alpha, batch, size, threads, repeat=1 if tiny else 20)
    model, step = mbnet_step_fn(alpha, batch, size)
    torch_step, torch_version, note = None, None, None
    if use_torch:
        try:
            torch_step, torch_version = torch_step_fn(alpha, batch, size, threads)
        except ImportError:
            note = "(PyTorch is not installed: skipping the comparison)"

    # The two engines' steps alternate, so a neighbour's load on the shared cores hits both alike.
    for _ in range(warmup):
        step()
        if torch_step:
            torch_step()
    # Kernel timers cost ~100 perf_counter() calls a step, so every mbnet step is profiled and the
    # breakdown shown is the median step's own.
    our_times, their_times, our_kernels = [], [], []
    for _ in range(steps):
        with F.profile() as kernels:
            our_times.append(timed(step))
        our_kernels.append(dict(kernels))
        if torch_step:
            their_times.append(timed(torch_step))
    median_step = sorted(range(steps), key=our_times.__getitem__)[steps // 2]
    alone = replay(step, repeat=1 if tiny else 3)
    decay = cache_decay(repeat=1 if tiny else 15)
    gemm = max(gemm_before, gemm_rate(alpha, batch, size, threads, repeat=1 if tiny else 20),
               key=lambda g: g["gflops"])
    return {"benchmark": "step", **common.machine_info(), "mbnet": mbnet.__version__, "torch": torch_version,
            "torch_note": note, "alpha": alpha, "batch": batch, "size": size, "steps": steps, "warmup": warmup,
            "mult_adds": model.summary(size, show=False)["mult_adds"] * batch,  # forward multiply-adds
            "mbnet_s": our_times[median_step], "mbnet_times": our_times, "kernels": our_kernels[median_step],
            "torch_s": statistics.median(their_times) if their_times else None, "torch_times": their_times,
            "alone": alone, "decay": {str(k): v for k, v in decay.items()}, "gemm": gemm,
            "pw_flops": 3 * 2 * batch * pointwise_mult_adds(alpha, size)}


def pointwise_mult_adds(alpha, size):
    """Forward multiply-adds of one image through MobileNetV1(alpha)'s pointwise layers at this size."""
    from mbnet.models import layer_shapes

    return sum(r.cin * r.cout * r.out_size ** 2 for r in layer_shapes(alpha, size) if r.kind == "pw")


def ceiling(res):
    """-> (pw_s, rest_s, pw_at_gemm_s): the median step's time in the pointwise kernels, in everything
    else, and the pointwise GEMMs' (fwd + both gradients) FLOPs at the GEMM's measured rate."""
    pw = sum(t for name, (_, t) in res["kernels"].items() if name.startswith("pwconv2d"))
    return pw, res["mbnet_s"] - pw, res["pw_flops"] / (res["gemm"]["gflops"] * 1e9)


def markdown(res):
    ours, theirs, macs = res["mbnet_s"], res["torch_s"], res["mult_adds"]
    all_ms = lambda times: ", ".join(f"{t * 1e3:.0f}" for t in times)  # noqa: E731
    lines = [res["torch_note"], ""] if res["torch_note"] else []
    lines += [
        f"MobileNetV1 alpha={res['alpha']}, batch {res['batch']}, {res['size']}x{res['size']}x3, float32, "
        f"{res['threads']} threads, one training step = forward + cross-entropy + backward (no optimizer)",
        f"CPU: {res['cpu']}; mbnet {res['mbnet']} ({res['build']})" + (f"; torch {res['torch']}" if res["torch"] else ""),
        f"Forward mult-adds per step: {macs / 1e9:.2f} G (a training step is about 3x that)",
        "",
    ]
    ratio = "n/a"
    if theirs:
        ratio = f"{ours / theirs:.2f}x slower" if ours >= theirs else f"{theirs / ours:.2f}x faster"
    rows = [("mbnet", f"{ours * 1e3:.1f}", f"{min(res['mbnet_times']) * 1e3:.1f}", all_ms(res["mbnet_times"]),
             f"{3 * macs / ours / 1e9:.1f}", ratio)]
    if theirs:
        rows.append((f"PyTorch {res['torch']} channels_last", f"{theirs * 1e3:.1f}",
                     f"{min(res['torch_times']) * 1e3:.1f}", all_ms(res["torch_times"]),
                     f"{3 * macs / theirs / 1e9:.1f}", "1.00"))
    lines.append(common.table(["engine", "median step (ms)", "min (ms)", "all steps (ms)", "GMAC/s (3x fwd, median)",
                               "vs PyTorch"], rows, "lrrlrr"))

    kernels = res["kernels"]
    rows = [(name, calls, f"{t * 1e3:.1f}", f"{100 * t / ours:.1f}")
            for name, (calls, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
    rest = ours - sum(t for _, t in kernels.values())
    rows.append(("(outside kernels: Python, NumPy, allocation)", "", f"{rest * 1e3:.1f}", f"{100 * rest / ours:.1f}"))
    lines += ["", f"Per-kernel time of the median mbnet step ({ours * 1e3:.1f} ms):", "",
              common.table(["kernel", "calls", "ms", "% of step"], rows)]

    alone = res["alone"]
    rows = [(name, calls, f"{t * 1e3:.1f}", f"{w * 1e3:.1f}", f"{c * 1e3:.1f}", f"{t / max(w, 1e-9):.2f}")
            for name, (calls, t, w, c) in sorted(alone.items(), key=lambda kv: -kv[1][1])]
    tot = [sum(v[i] for v in alone.values()) for i in (1, 2, 3)]
    rows.append(("all", "", *(f"{t * 1e3:.1f}" for t in tot), f"{tot[0] / max(tot[1], 1e-9):.2f}"))
    decay = res["decay"]
    base = decay[min(decay, key=float)]
    lines += ["", "Each kernel call of one more step replayed alone with the same arguments: back to back "
              "(warm caches) and after spinning 10 ms:", "",
              common.table(["kernel", "calls", "in the step (ms)", "alone, warm (ms)", "alone after 10 ms (ms)",
                            "step / warm"], rows),
              "", "Summing a 1 MB array (fits the private L2) right after the previous sum, and after spinning "
              "without touching memory: " + ", ".join(
                  f"{float(d) * 1e3:g} ms idle {t * 1e6:.0f} us ({t / base:.1f}x)" for d, t in decay.items()) + "."]

    pw, rest, pw_best = ceiling(res)
    vs = (lambda s: f"{theirs / s:.2f}") if theirs else (lambda s: "n/a")  # noqa: E731
    rows = [("this step", f"{ours * 1e3:.1f}", f"{100 * pw / ours:.0f}%", vs(ours)),
            ("pointwise at the GEMM's rate, the rest as measured", f"{(pw_best + rest) * 1e3:.1f}",
             f"{100 * pw_best / (pw_best + rest):.0f}%", vs(pw_best + rest)),
            ("pointwise at the GEMM's rate, nothing else", f"{pw_best * 1e3:.1f}", "100%", vs(pw_best))]
    gemm = res["gemm"]
    lines += ["", f"Ceiling: the pointwise kernels do {res['pw_flops'] / 1e9:.1f} GFLOP a step, "
              f"in {pw * 1e3:.1f} ms ({res['pw_flops'] / max(pw, 1e-12) / 1e9:.0f} GFLOP/s) in the median step; "
              f"mbnet's GEMM reached {gemm['gflops']:.0f} GFLOP/s on {gemm['layer']} (the fastest of its calls "
              "before and after the steps, this process):", "",
              common.table(["step", "ms", "pointwise share", "PyTorch / mbnet"], rows, "lrrr")]
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"tiny": "batch 2, 1 step, no warm-up: a smoke run"})


if __name__ == "__main__":
    main()
