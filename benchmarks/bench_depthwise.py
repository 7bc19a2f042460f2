"""Times the depthwise 3x3 layers of MobileNetV1 (alpha=1, 32x32 CIFAR input, stride-1 stem) and
the stem convolution, forward and both gradients, at the training batch size.

    python -m benchmarks.bench_depthwise [--batch 128] [--repeat 10] [--threads T] [--json out.json]

Layer shapes follow Table 1 of Howard et al. (2017) with the first stride removed, so every
spatial size is the ImageNet one divided by 7 (112 -> 32 ... 7 -> 2). Table 1 prints the last
depthwise layer as "s2" on a 7x7 input although its output stays 7x7; it is stride 1, as here.
GB/s counts the bytes of the op's input plus output activation (x + y, or dy + dx, or x + dy) once.
Every call allocates its output, as in training: "fwd+bwd" (the three in a row, all outputs alive)
includes the page faults of outputs glibc maps fresh each time (>= 32 MB, or when the heap was
trimmed), which the single-op columns mostly avoid by reusing the block freed the call before.
Run timings under `flock /tmp/mbnet-bench.lock` on a shared machine.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from mbnet import _C

# (channels, input size, stride) of each depthwise layer, in network order.
DEPTHWISE_LAYERS = [
    (32, 32, 1),
    (64, 32, 2),
    (128, 16, 1),
    (128, 16, 2),
    (256, 8, 1),
    (256, 8, 2),
    *[(512, 4, 1)] * 5,
    (512, 4, 2),
    (1024, 2, 1),
]
STEM = (3, 32, 32, 1)  # cin, cout, input size, stride


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, repeat):
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_op(fwd, bwd_input, bwd_weight, repeat):
    t = {
        "fwd": median_time(fwd, repeat),
        "bwd_input": median_time(bwd_input, repeat),
        "bwd_weight": median_time(bwd_weight, repeat),
    }
    t["total"] = median_time(lambda: (fwd(), bwd_input(), bwd_weight()), repeat)
    return t


def bench_depthwise(c, size, stride, batch, repeat, rng):
    x = rng.standard_normal((batch, size, size, c), dtype=np.float32)
    w = rng.standard_normal((3, 3, c), dtype=np.float32)
    y = _C.dwconv2d_fwd(x, w, stride, 1)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    t = bench_op(
        lambda: _C.dwconv2d_fwd(x, w, stride, 1),
        lambda: _C.dwconv2d_bwd_input(dy, w, (size, size), stride, 1),
        lambda: _C.dwconv2d_bwd_weight(x, dy, (3, 3), stride, 1),
        repeat,
    )
    moved = x.nbytes + y.nbytes
    return {
        "layer": f"dw {c}@{size} s{stride}",
        "shape": [batch, size, size, c],
        "stride": stride,
        "bytes": moved,
        "flops": 2 * 9 * y.size,
        **{f"{k}_s": v for k, v in t.items()},
        **{f"{k}_gbs": moved / t[k] / 1e9 for k in ("fwd", "bwd_input", "bwd_weight")},
    }


def bench_stem(batch, repeat, rng):
    cin, cout, size, stride = STEM
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    y = _C.conv2d_fwd(x, w, stride, 1)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    t = bench_op(
        lambda: _C.conv2d_fwd(x, w, stride, 1),
        lambda: _C.conv2d_bwd_input(dy, w, (size, size), stride, 1),
        lambda: _C.conv2d_bwd_weight(x, dy, (3, 3), stride, 1),
        repeat,
    )
    moved = x.nbytes + y.nbytes
    return {
        "layer": f"stem conv {cin}->{cout}@{size} s{stride}",
        "shape": [batch, size, size, cin],
        "stride": stride,
        "bytes": moved,
        "flops": 2 * 9 * cin * y.size,
        **{f"{k}_s": v for k, v in t.items()},
        **{f"{k}_gbs": moved / t[k] / 1e9 for k in ("fwd", "bwd_input", "bwd_weight")},
    }


def run(batch=128, repeat=10, threads=None, tiny=False):
    """Returns {"cpu", "simd", "threads", "batch", "layers": [row per layer]}."""
    if threads is not None:
        _C.set_num_threads(threads)
    rng = np.random.default_rng(0)
    layers = DEPTHWISE_LAYERS[:2] if tiny else DEPTHWISE_LAYERS
    rows = [bench_stem(batch, repeat, rng)]
    rows += [bench_depthwise(c, size, s, batch, repeat, rng) for c, size, s in layers]
    return {
        "benchmark": "depthwise",
        "cpu": cpu_name(),
        "simd": _C.build_info()["simd"],
        "threads": _C.get_num_threads(),
        "batch": batch,
        "repeat": repeat,
        "layers": rows,
    }


def markdown(result):
    lines = [
        f"CPU: {result['cpu']} ({result['simd']}), {result['threads']} threads, "
        f"batch {result['batch']}, median of {result['repeat']}",
        "",
        "| layer | fwd ms | bwd_input ms | bwd_weight ms | fwd+bwd ms | fwd GB/s | bwd_in GB/s | bwd_w GB/s | fwd GFLOP/s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    total = {"fwd_s": 0.0, "bwd_input_s": 0.0, "bwd_weight_s": 0.0, "total_s": 0.0}
    for r in result["layers"]:
        lines.append(
            f"| {r['layer']} | {r['fwd_s'] * 1e3:.2f} | {r['bwd_input_s'] * 1e3:.2f} | "
            f"{r['bwd_weight_s'] * 1e3:.2f} | {r['total_s'] * 1e3:.2f} | {r['fwd_gbs']:.1f} | "
            f"{r['bwd_input_gbs']:.1f} | {r['bwd_weight_gbs']:.1f} | {r['flops'] / r['fwd_s'] / 1e9:.1f} |"
        )
        if r["layer"].startswith("dw"):
            for k in total:
                total[k] += r[k]
    lines.append(
        f"| all depthwise | {total['fwd_s'] * 1e3:.2f} | {total['bwd_input_s'] * 1e3:.2f} | "
        f"{total['bwd_weight_s'] * 1e3:.2f} | {total['total_s'] * 1e3:.2f} | | | | |"
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="default: the current OpenMP setting")
    ap.add_argument("--tiny", action="store_true", help="batch 2, 1 repeat, 2 layers: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.repeat = 2, 1
    result = run(args.batch, args.repeat, args.threads, args.tiny)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
