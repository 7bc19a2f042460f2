"""Times the pointwise (1x1) layers of MobileNetV1 (alpha=1, 32x32 CIFAR input, stride-1 stem),
forward and both gradients, against NumPy's matmul (its BLAS) on the same shapes, in one process.

    python -m benchmarks.bench_pointwise [--batch 128] [--repeat 10] [--threads T] [--json out.json]

Layer shapes come from mbnet.models.layer_shapes (Table 1 of Howard et al. 2017): pointwise layer i
maps the previous block's channels to BLOCKS[i]'s at the size left after the depthwise strides so
far, 32x32 halved at blocks 2, 4, 6 and 12: 32->64@32, 64->128@16, 128->128@16, 128->256@8, 256->256@8,
256->512@4, 5x 512->512@4, 512->1024@2, 1024->1024@2. Each op is an (n*h*w, cin) x (cin, cout)
GEMM, so GFLOP/s counts 2*n*h*w*cin*cout for all three. The NumPy twins are `x @ w`, `dy @ w.T`
and `x.T @ dy` on the (n*h*w, c) views.

OpenBLAS picks its kernels from OPENBLAS_CORETYPE; this environment sets it to Haswell (AVX2),
which slows NumPy on AVX-512 machines. For the fair comparison run
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.bench_pointwise`; the script
prints what was set. Run timings under `flock /tmp/mbnet-bench.lock` on a shared machine.
"""
import numpy as np

from mbnet import _C
from mbnet.models import layer_shapes

from . import common

OPS = ("fwd", "bwd_input", "bwd_weight")


def pointwise_layers(input_size=32):
    """[(cin, cout, size)] of the 13 pointwise layers of MobileNetV1 (alpha 1), in network order."""
    return [(L.cin, L.cout, L.size) for L in layer_shapes(1.0, input_size) if L.kind == "pw"]


def median_time(fn, repeat):
    # A long pause: the other library's worker threads (OpenMP or OpenBLAS) keep spinning for a
    # moment after their last call and would steal a core from this one on a 2-core machine.
    return common.measure(fn, repeat, warmup=1, pause=0.2)["median"]


def bench_layer(cin, cout, size, batch, repeat, rng):
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((cin, cout), dtype=np.float32)
    dy = rng.standard_normal((batch, size, size, cout), dtype=np.float32)
    x2, dy2 = x.reshape(-1, cin), dy.reshape(-1, cout)
    ours = {
        "fwd": lambda: _C.pwconv2d_fwd(x, w),
        "bwd_input": lambda: _C.pwconv2d_bwd_input(dy, w),
        "bwd_weight": lambda: _C.pwconv2d_bwd_weight(x, dy),
    }
    numpy = {
        "fwd": lambda: x2 @ w,
        "bwd_input": lambda: dy2 @ w.T,
        "bwd_weight": lambda: x2.T @ dy2,
    }
    flops = 2 * batch * size * size * cin * cout
    row = {"layer": f"{cin}->{cout}@{size}", "cin": cin, "cout": cout, "size": size, "flops": flops}
    for op in OPS:
        t_ours, t_np = median_time(ours[op], repeat), median_time(numpy[op], repeat)
        row[f"{op}_s"], row[f"{op}_numpy_s"] = t_ours, t_np
        row[f"{op}_gflops"], row[f"{op}_numpy_gflops"] = flops / t_ours / 1e9, flops / t_np / 1e9
        row[f"{op}_ratio"] = t_np / t_ours
    return row


def run(batch=128, repeat=10, threads=None, tiny=False):
    """Returns {"cpu", "simd", "threads", "numpy", "env", ... (common.machine_info()), "batch",
    "layers": [row per layer]}."""
    if threads is not None:
        _C.set_num_threads(threads)
    if tiny:
        batch, repeat = 2, 1
    rng = np.random.default_rng(0)
    layers = pointwise_layers()
    rows = [bench_layer(ci, co, s, batch, repeat, rng) for ci, co, s in (layers[:2] if tiny else layers)]
    return {
        "benchmark": "pointwise",
        **common.machine_info(),
        "batch": batch,
        "repeat": repeat,
        "layers": rows,
    }


def markdown(result):
    coretype = result["env"]["OPENBLAS_CORETYPE"]
    rows = []
    for r in result["layers"]:
        cells = [r["layer"], f"{r['fwd_s'] * 1e3:.2f}"]
        for op in OPS:
            cells += [f"{r[f'{op}_gflops']:.0f}", f"{r[f'{op}_numpy_gflops']:.0f}", f"{r[f'{op}_ratio']:.2f}"]
        rows.append(cells)
    flops = sum(r["flops"] for r in result["layers"])
    cells = ["all", f"{sum(r['fwd_s'] for r in result['layers']) * 1e3:.2f}"]
    for op in OPS:
        t = sum(r[f"{op}_s"] for r in result["layers"])
        t_np = sum(r[f"{op}_numpy_s"] for r in result["layers"])
        cells += [f"{flops / t / 1e9:.0f}", f"{flops / t_np / 1e9:.0f}", f"{t_np / t:.2f}"]
    rows.append(cells)
    return "\n".join([
        f"CPU: {result['cpu']} ({result['simd']}), {result['threads']} threads, "
        f"batch {result['batch']}, median of {result['repeat']}; NumPy {result['numpy']}, "
        + (f"OPENBLAS_CORETYPE={coretype} (set: NumPy's BLAS is held to that core type)"
           if coretype else "OPENBLAS_CORETYPE not set"),
        "",
        "GFLOP/s, ours / NumPy (ratio = NumPy time / our time; > 1 means we are faster)",
        "",
        common.table(["layer", "fwd ms", "fwd", "fwd NumPy", "ratio", "bwd_input", "NumPy", "ratio", "bwd_weight",
                      "NumPy", "ratio"], rows),
    ])


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"tiny": "batch 2, 1 repeat, 2 layers: a smoke run"})


if __name__ == "__main__":
    main()
