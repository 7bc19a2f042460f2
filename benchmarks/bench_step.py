"""Time one training step (forward + loss + backward, no optimizer) of MobileNetV1 in mbnet and,
if it is installed, in PyTorch (channels_last, same thread count), and break mbnet's step down by
kernel.

    flock /tmp/mbnet-bench.lock python benchmarks/bench_step.py [--batch 128 --size 32 --alpha 1.0]

Prints Markdown tables: the step times (median of --steps after --warmup; the engines' steps
alternate) with the ratio, and the per-kernel time of one mbnet step (the rest is Python, NumPy and
allocation outside the kernels).
"""
import argparse
import platform
import statistics
import time

import numpy as np

import mbnet
from mbnet import _C
from mbnet import functional as F
from mbnet.models import MobileNetV1


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def mbnet_step_fn(args):
    model = MobileNetV1(args.alpha, num_classes=10, input_size=args.size, dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch)

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(mbnet.Tensor(x)), labels)
        loss.backward()
        return loss

    return model, step


def torch_step_fn(args, threads):
    import torch
    from torch import nn

    torch.set_num_threads(threads)

    def conv_bn(cin, cout, k, stride, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    a = args.alpha
    c = int(32 * a)
    layers = conv_bn(3, c, 3, 2 if args.size > 64 else 1)
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                         (512, 1), (512, 1), (1024, 2), (1024, 1)]:
        cout = int(cout * a)
        layers += conv_bn(c, c, 3, stride, groups=c) + conv_bn(c, cout, 1, 1)
        c = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    model = model.to(memory_format=torch.channels_last).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        return loss

    return step, torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: mbnet's current thread count")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    if args.threads is not None:
        _C.set_num_threads(args.threads)
    threads = _C.get_num_threads()

    model, step = mbnet_step_fn(args)
    torch_step, torch_version = None, None
    if not args.no_torch:
        try:
            torch_step, torch_version = torch_step_fn(args, threads)
        except ImportError:
            print("(PyTorch is not installed: skipping the comparison)\n")

    # The two engines' steps alternate, so a neighbour's load on the shared cores hits both alike.
    for _ in range(args.warmup):
        step()
        if torch_step:
            torch_step()
    # Kernel timers cost ~100 perf_counter() calls a step, so every mbnet step is profiled and the
    # breakdown shown is the median step's own.
    our_times, their_times, our_kernels = [], [], []
    for _ in range(args.steps):
        with F.profile() as kernels:
            our_times.append(timed(step))
        our_kernels.append(dict(kernels))
        if torch_step:
            their_times.append(timed(torch_step))
    median_step = sorted(range(args.steps), key=our_times.__getitem__)[args.steps // 2]
    ours, kernels = our_times[median_step], our_kernels[median_step]
    theirs = statistics.median(their_times) if their_times else None

    macs = model.summary(args.size, show=False)["mult_adds"] * args.batch  # forward multiply-adds
    print(f"MobileNetV1 alpha={args.alpha}, batch {args.batch}, {args.size}x{args.size}x3, float32, "
          f"{threads} threads, one training step = forward + cross-entropy + backward (no optimizer)")
    print(f"CPU: {cpu_name()}; mbnet {mbnet.__version__} ({_C.build_info() if hasattr(_C, 'build_info') else ''})"
          + (f"; torch {torch_version}" if torch_version else ""))
    print(f"Forward mult-adds per step: {macs / 1e9:.2f} G (a training step is about 3x that)\n")
    print("| engine | median step (ms) | min (ms) | all steps (ms) | GMAC/s (3x fwd, median) | vs PyTorch |")
    print("|---|---:|---:|---|---:|---:|")
    ratio = "n/a"
    if theirs:
        ratio = f"{ours / theirs:.2f}x slower" if ours >= theirs else f"{theirs / ours:.2f}x faster"
    print(f"| mbnet | {ours * 1e3:.1f} | {min(our_times) * 1e3:.1f} | {', '.join(f'{t * 1e3:.0f}' for t in our_times)} | "
          f"{3 * macs / ours / 1e9:.1f} | {ratio} |")
    if theirs:
        print(f"| PyTorch {torch_version} channels_last | {theirs * 1e3:.1f} | {min(their_times) * 1e3:.1f} | "
              f"{', '.join(f'{t * 1e3:.0f}' for t in their_times)} | {3 * macs / theirs / 1e9:.1f} | 1.00 |")

    total = sum(t for _, t in kernels.values())
    print(f"\nPer-kernel time of the median mbnet step ({ours * 1e3:.1f} ms):\n")
    print("| kernel | calls | ms | % of step |")
    print("|---|---:|---:|---:|")
    for name, (calls, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {calls} | {t * 1e3:.1f} | {100 * t / ours:.1f} |")
    rest = ours - total
    print(f"| (outside kernels: Python, NumPy, allocation) | | {rest * 1e3:.1f} | {100 * rest / ours:.1f} |")


if __name__ == "__main__":
    main()
