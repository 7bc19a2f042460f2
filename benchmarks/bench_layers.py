"""Inference layer by layer (batch 1 by default): mbnet's compiled plan against ONNX Runtime's own profile of
the same network (mbnet's ONNX export, the same weights and thread count).

    flock /tmp/mbnet-bench.lock python -m benchmarks.bench_layers [--config 1@224] [--batch 1]
        [--calls 300] [--threads T] [--no-onnxruntime] [--plot layers.png] [--tiny] [--json out.json]

The network is bench_latency's (α@size: 1000 classes and stem stride 2 above 64 px, BN statistics
of a random batch). mbnet: Plan.timed, the plan's own clock (thread 0's wall clock between the
barriers that end each layer), the median over --calls calls of each layer. ONNX Runtime: each
node's kernel time from its profiler (SessionOptions.enable_profiling), the median over as many
calls, the nodes of a layer (a block's depthwise and pointwise convolutions, after ONNX Runtime's
own fusions) summed; ONNX Runtime's nodes leave out its work between nodes, so they sum to less
than its calls take. The two engines run one after the other, so a slow spell of the machine can
fall on one; the whole-call medians of both are printed beside the table.
"""
import os
import re
import statistics
import time

import numpy as np

from . import bench_latency, common


def _group(name):
    """'features.3' for 'features.3.bn2' or ONNX Runtime's 'features.3.bn2.relu.out_nchwc': the plan
    layer (a block, or the stem's BatchNorm) a node belongs to; None for the pooling and classifier."""
    m = re.match(r"features\.\d+", name)
    return m.group(0) if m else None


def _onnxruntime_nodes(model, x, threads, calls, warmup):
    """({group: median ms over calls}, whole-call median ms, version) from ONNX Runtime's profiler."""
    import json

    import onnxruntime as ort

    session = bench_latency.onnxruntime_session(model, threads, profile=True)
    feed = {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
    for _ in range(warmup):
        session.run(["logits"], feed)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(["logits"], feed)
        times.append(time.perf_counter() - t0)
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.remove(path)
    per_node = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][:-len("_kernel_time")], []).append(e["dur"])
    groups = {}
    for node, durs in per_node.items():
        durs = durs[-calls:]  # the timed calls, not the warm-up
        key = _group(node)
        groups[key] = groups.get(key, 0.0) + statistics.median(durs) / 1e3
    return groups, statistics.median(times) * 1e3, ort.__version__


def run(config="1@224", batch=1, calls=300, threads=None, tiny=False, use_onnxruntime=True, plot=""):
    from mbnet import _C
    from mbnet.plan import compile as compile_plan
    from mbnet.plan import conv_bn_pairs

    if threads is not None:
        _C.set_num_threads(threads)
    threads = _C.get_num_threads()
    if tiny:
        config, batch, calls = "0.25@32", 1, 1
    if calls < 1 or batch < 1:
        raise SystemExit(f"--calls {calls}, --batch {batch}: both must be >= 1")
    if plot and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise SystemExit(f"--plot {plot}: no such directory (checked before measuring)")
    alpha, size, num_classes, stem_stride = bench_latency.parse_config(config)
    model, _ = bench_latency.build(alpha, size, num_classes, stem_stride, False)
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    plan = compile_plan(model, batch)
    for _ in range(10):
        plan(x)
    whole, per_layer = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        _, seconds = plan.timed(x)
        whole.append(time.perf_counter() - t0)
        per_layer.append(seconds)
    mbnet_ms = [statistics.median(col) * 1e3 for col in zip(*per_layer)]
    # each compiled layer's last BatchNorm names its ONNX nodes' group (the stem's, a block's second)
    groups, bns = [], [bn_name for _, _, bn_name, _ in conv_bn_pairs(model)]
    labels, i = [], 0
    for layer in plan.info()["layers"]:
        i += 2 if layer["kind"] == "dwpw" else 1
        groups.append(_group(bns[i - 1]))
        (h, w, c), (ho, wo, co) = layer["input"], layer["output"]
        labels.append(f"{layer['kind']} {h}x{w}x{c} -> {ho}x{wo}x{co}, stride {layer['stride']}")
    groups.append(None)
    labels.append("pool + classifier")
    ort_groups, ort_ms, version, absent = None, None, None, None
    if not use_onnxruntime:
        absent = "disabled"
    elif common.optional_import("onnx") is None or common.optional_import("onnxruntime") is None:
        absent = "not installed"
    else:
        ort_groups, ort_ms, version = _onnxruntime_nodes(model, x, threads, calls, 10)
    rows = []
    for label, group, ms in zip(labels, groups, mbnet_ms):
        row = {"layer": label, "mbnet_ms": ms}
        if ort_groups is not None:
            row["onnxruntime_ms"] = ort_groups.get(group, 0.0)
        rows.append(row)
    res = {"benchmark": "layers", **common.machine_info(), "threads": threads, "config": config, "batch": batch,
            "calls": calls, "mbnet_call_ms": statistics.median(whole) * 1e3, "mbnet_layers_ms": sum(mbnet_ms),
            "onnxruntime_call_ms": ort_ms,
            "onnxruntime_nodes_ms": None if ort_groups is None else sum(ort_groups.values()),
            "onnxruntime": version, "absent": absent, "rows": rows}
    if plot:
        _plot(res, plot)
    return res


def _plot(res, path):
    """The table as bars, one group per layer (mbnet.plot.plot_bars)."""
    from mbnet.plot import plot_bars

    rows = res["rows"]
    series = {"mbnet (plan)": [r["mbnet_ms"] for r in rows]}
    if res["absent"] is None:
        series[f"ONNX Runtime {res['onnxruntime']}"] = [r["onnxruntime_ms"] for r in rows]
    plot_bars([r["layer"] for r in rows], series, path, xlabel="ms (median)",
              title=f"MobileNetV1 α@size {res['config']}, batch {res['batch']}, {res['threads']} threads\n{res['cpu']}, "
                    f"{res['simd']} build")


def markdown(res):
    ort = res["absent"] is None
    rows = [[r["layer"], r["mbnet_ms"], r["onnxruntime_ms"] if ort else res["absent"]] for r in res["rows"]]
    rows.append(["sum of the layers", res["mbnet_layers_ms"], res["onnxruntime_nodes_ms"] if ort else None])
    rows.append(["whole call (median)", res["mbnet_call_ms"], res["onnxruntime_call_ms"] if ort else None])
    lines = ["## Inference layer by layer (MobileNetV1)", ""] + common.header(res) + [
        "",
        f"MobileNetV1 α@size {res['config']}, batch {res['batch']}, {res['threads']} threads in both engines, medians of "
        f"{res['calls']} calls. mbnet: the compiled plan's own clock per layer (Plan.timed); ONNX Runtime "
        f"{res['onnxruntime'] or ''}: its profiler's kernel time per node, a layer's nodes summed (its work "
        "between nodes is in no row). The engines ran one after the other.",
        "",
        common.table(["layer", "mbnet ms", "ONNX Runtime ms"], rows),
    ]
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {
        "config": "α@size, as bench_latency's (default 1@224)",
        "calls": "calls timed in each engine (default 300)", "batch": "images per call (default 1)",
        "plot": "also draw the table as bars into this PNG file",
        "tiny": "α=0.25 at 32 px, 1 call: a smoke run", "use_onnxruntime": "skip the ONNX Runtime profile"})


if __name__ == "__main__":
    main()
