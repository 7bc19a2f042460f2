"""Inference latency and throughput: mbnet's autograd forward (eval, no_grad) against the compiled
inference plan (mbnet.plan: BatchNorm folded, one call into the extension), and PyTorch when installed.

    python -m benchmarks.bench_plan [--alphas 1.0,0.75,0.5,0.25] [--sizes 32,128,224] [--batches 1,128]
                                    [--threads T] [--no-torch] [--tiny] [--json out.json]

Batch 1 runs at every size; larger batches only at sizes up to --large-batch-max-size (CIFAR-sized
inputs: batch 128 at 224 px needs gigabytes in the autograd path). All engines run in this
process with the same thread count; PyTorch runs a channels_last eval model under
torch.inference_mode (weights differ: only the times are compared). Measurements belong on a quiet
machine, under `flock /tmp/mbnet-bench.lock`.
"""
import numpy as np

from . import common


def _mbnet_fns(alpha, size, batch):
    from mbnet import models, no_grad
    from mbnet import plan as mbplan

    model = models.MobileNetV1(alpha, num_classes=10, input_size=size, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)

    def autograd():
        with no_grad():
            return model(x)

    plan = mbplan.compile(model, batch=batch)
    return autograd, lambda: plan(x)


def _torch_fn(alpha, size, batch, threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = common.torch_model(alpha, size).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)

    def infer():
        with torch.inference_mode():
            return model(x)

    return infer


def run(alphas=(1.0, 0.75, 0.5, 0.25), sizes=(32, 128, 224), batches=(1, 128), large_batch_max_size=64, repeat=20,
        threads=None, tiny=False, use_torch=True):
    from mbnet import _C

    if threads is not None:
        _C.set_num_threads(threads)
    threads = _C.get_num_threads()
    pause = None
    if tiny:
        alphas, sizes, batches, repeat, pause = (0.25,), (32,), (1, 2), 1, 0
    have_torch = use_torch and common.optional_import("torch") is not None
    rows = []
    for alpha in alphas:
        for size in sizes:
            for batch in batches:
                if batch > 1 and size > large_batch_max_size:
                    continue
                reps = max(3, repeat // batch) if batch > 1 else repeat
                autograd, plan = _mbnet_fns(alpha, size, batch)
                row = {"alpha": alpha, "size": size, "batch": batch, "repeat": reps,
                       "autograd_s": common.measure(autograd, reps, 1, pause)["median"],
                       "plan_s": common.measure(plan, reps, 1, pause)["median"], "torch_s": None}
                if have_torch:
                    row["torch_s"] = common.measure(_torch_fn(alpha, size, batch, threads), reps, 1, pause)["median"]
                rows.append(row)
    return {"benchmark": "plan", **common.machine_info(), "threads": threads,
            "torch": common.optional_import("torch").__version__ if have_torch else None, "rows": rows}


def markdown(res):
    rows = []
    for r in res["rows"]:
        torch_s = r["torch_s"]
        rows.append((r["alpha"], r["size"], r["batch"], r["autograd_s"] * 1e3, r["plan_s"] * 1e3,
                     None if torch_s is None else torch_s * 1e3, r["autograd_s"] / r["plan_s"],
                     None if torch_s is None else torch_s / r["plan_s"], r["batch"] / r["plan_s"]))
    torch_note = f"PyTorch {res['torch']} (channels_last, inference_mode)" if res["torch"] else "no PyTorch rows"
    lines = ["## Inference: autograd forward vs compiled plan", ""] + common.header(res) + [
        "",
        f"MobileNetV1, 10 classes, {res['threads']} threads, median of the timed calls after one warm-up; "
        f"{torch_note}. plan speedup = autograd ms / plan ms; vs torch = torch ms / plan ms (> 1: the plan "
        "is faster).",
        "",
        common.table(["α", "size", "batch", "autograd ms", "plan ms", "torch ms", "plan speedup", "vs torch",
                      "plan images/s"], rows),
    ]
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"tiny": "alpha 0.25, 32 px, batch 1 and 2, one call: a smoke run"})


if __name__ == "__main__":
    main()
