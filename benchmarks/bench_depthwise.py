"""Times the depthwise 3x3 layers of MobileNetV1 (alpha=1, 32x32 CIFAR input, stride-1 stem) and
the stem convolution, forward and both gradients, at the training batch size.

    python -m benchmarks.bench_depthwise [--batch 128] [--repeat 10] [--threads T] [--json out.json]

Layer shapes (mbnet.models.layer_shapes) follow Table 1 of Howard et al. (2017) with the first stride removed, so every
spatial size is the ImageNet one divided by 7 (112 -> 32 ... 7 -> 2). Table 1 prints the last
depthwise layer as "s2" on a 7x7 input although its output stays 7x7; it is stride 1, as here.
GB/s counts the bytes of the op's input plus output activation (x + y, or dy + dx, or x + dy) once.
Every call allocates its output, as in training: "fwd+bwd" (the three in a row, all outputs alive)
includes the page faults of outputs glibc maps fresh each time (>= 32 MB, or when the heap was
trimmed), which the single-op columns mostly avoid by reusing the block freed the call before.
Run timings under `flock /tmp/mbnet-bench.lock` on a shared machine.
"""
import numpy as np

from mbnet import _C
from mbnet.models import layer_shapes

from . import common

SHAPES = layer_shapes(1.0, 32)
# (channels, input size, stride) of each depthwise layer, in network order.
DEPTHWISE_LAYERS = [(L.cin, L.size, L.stride) for L in SHAPES if L.kind == "dw"]
STEM = tuple(SHAPES[0][2:])  # cin, cout, input size, stride


def median_time(fn, repeat):
    return common.measure(fn, repeat, warmup=1, pause=0)["median"]


def bench_op(fwd, bwd_input, bwd_weight, repeat):
    t = {
        "fwd": median_time(fwd, repeat),
        "bwd_input": median_time(bwd_input, repeat),
        "bwd_weight": median_time(bwd_weight, repeat),
    }
    t["total"] = median_time(lambda: (fwd(), bwd_input(), bwd_weight()), repeat)
    return t


def bench_layer(layer, kernels, x, w, stride, flops_per_output, repeat, rng):
    """Times the (fwd, bwd_input, bwd_weight) kernels of a 3x3 convolution, padding 1, on x
    (n, size, size, c) and w; returns the layer's row."""
    fwd, bwd_input, bwd_weight = kernels
    size = x.shape[1]
    y = fwd(x, w, stride, 1)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    t = bench_op(
        lambda: fwd(x, w, stride, 1),
        lambda: bwd_input(dy, w, (size, size), stride, 1),
        lambda: bwd_weight(x, dy, (3, 3), stride, 1),
        repeat,
    )
    moved = x.nbytes + y.nbytes
    return {
        "layer": layer,
        "shape": list(x.shape),
        "stride": stride,
        "bytes": moved,
        "flops": flops_per_output * y.size,
        **{f"{k}_s": v for k, v in t.items()},
        **{f"{k}_gbs": moved / t[k] / 1e9 for k in ("fwd", "bwd_input", "bwd_weight")},
    }


def bench_depthwise(c, size, stride, batch, repeat, rng):
    x = rng.standard_normal((batch, size, size, c), dtype=np.float32)
    w = rng.standard_normal((3, 3, c), dtype=np.float32)
    kernels = (_C.dwconv2d_fwd, _C.dwconv2d_bwd_input, _C.dwconv2d_bwd_weight)
    return bench_layer(f"dw {c}@{size} s{stride}", kernels, x, w, stride, 2 * 9, repeat, rng)


def bench_stem(batch, repeat, rng):
    cin, cout, size, stride = STEM
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    kernels = (_C.conv2d_fwd, _C.conv2d_bwd_input, _C.conv2d_bwd_weight)
    return bench_layer(f"stem conv {cin}->{cout}@{size} s{stride}", kernels, x, w, stride, 2 * 9 * cin, repeat, rng)


def run(batch=128, repeat=10, threads=None, tiny=False):
    """Returns {"cpu", "simd", "threads", ... (common.machine_info()), "batch", "layers": [row per layer]}."""
    if threads is not None:
        _C.set_num_threads(threads)
    if tiny:
        batch, repeat = 2, 1
    rng = np.random.default_rng(0)
    layers = DEPTHWISE_LAYERS[:2] if tiny else DEPTHWISE_LAYERS
    rows = [bench_stem(batch, repeat, rng)]
    rows += [bench_depthwise(c, size, s, batch, repeat, rng) for c, size, s in layers]
    return {
        "benchmark": "depthwise",
        **common.machine_info(),
        "batch": batch,
        "repeat": repeat,
        "layers": rows,
    }


def markdown(result):
    ms = lambda t: f"{t * 1e3:.2f}"  # noqa: E731
    rows = []
    total = {"fwd_s": 0.0, "bwd_input_s": 0.0, "bwd_weight_s": 0.0, "total_s": 0.0}
    for r in result["layers"]:
        rows.append((r["layer"], *(ms(r[k]) for k in total),
                     *(f"{r[k]:.1f}" for k in ("fwd_gbs", "bwd_input_gbs", "bwd_weight_gbs")),
                     f"{r['flops'] / r['fwd_s'] / 1e9:.1f}"))
        if r["layer"].startswith("dw"):
            for k in total:
                total[k] += r[k]
    rows.append(("all depthwise", *(ms(t) for t in total.values()), "", "", "", ""))
    return "\n".join([
        f"CPU: {result['cpu']} ({result['simd']}), {result['threads']} threads, "
        f"batch {result['batch']}, median of {result['repeat']}",
        "",
        common.table(["layer", "fwd ms", "bwd_input ms", "bwd_weight ms", "fwd+bwd ms", "fwd GB/s", "bwd_in GB/s",
                      "bwd_w GB/s", "fwd GFLOP/s"], rows),
    ])


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"tiny": "batch 2, 1 repeat, 2 layers: a smoke run"})


if __name__ == "__main__":
    main()
