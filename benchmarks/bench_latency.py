"""Batch-1 inference latency of MobileNetV1, the paper's own concern: mbnet against ONNX Runtime
running mbnet's ONNX export of the same network and against PyTorch, with the same thread count.

    flock /tmp/mbnet-bench.lock python -m benchmarks.bench_latency [--configs 1@224,0.5@224,...]
        [--runs 100] [--rounds 5] [--warmup 10] [--threads T] [--no-torch] [--no-onnxruntime] [--tiny]
        [--json out.json]

A configuration α@s is MobileNetV1 of width α on one s x s x 3 image: 1000 classes and stem stride 2
at ImageNet sizes (s > 64: mbnet.models.default_stem_stride), 10 classes and stem stride 1 at CIFAR's
32 px. One network runs in all three engines: PyTorch's (benchmarks.common.torch_model, its own
random init; mbnet's own init when torch is not installed) with BN statistics measured on a random
batch, read into mbnet with mbnet.torch_import, and mbnet's model exported with mbnet.export (BN
folded into the convolutions) for ONNX Runtime. Each engine's logits are checked against mbnet's ("max rel. diff": max |other -
mbnet| / max |mbnet|).
- mbnet: the compiled inference plan (mbnet.plan.compile: BN folded, the whole network in one call),
  NHWC float32 (1, s, s, 3), mbnet._C's OpenMP threads = threads; "autograd" is the same model
  through the layer-by-layer autograd path in eval mode under no_grad, for comparison.
- ONNX Runtime: CPUExecutionProvider, intra_op_num_threads = threads, inter_op_num_threads = 1,
  sequential execution, all graph optimizations; NCHW input.
- PyTorch: channels_last, torch.set_num_threads(threads), inference_mode.
The engines take turns in this process: --rounds rounds, in each every engine times --runs/--rounds
calls after --warmup calls (common.measure, after a pause that lets the previous engine's worker
threads stop spinning). An engine's time is the median of its rounds' medians; a ratio is the
median of the rounds' ratios (the other engine's time / mbnet's in the same round, > 1: mbnet is
faster), with their range beside it. A slow spell of the machine (these guests' timings drift by
10-25% within minutes) then falls on every engine alike instead of on whichever ran during it.
"""
import math
import statistics

import numpy as np

from . import common

CONFIGS = ("1@224", "0.5@224", "0.25@224", "0.25@128", "1@32")


def parse_config(text):
    """'α@s' -> (alpha, size, num_classes, stem_stride)."""
    from mbnet.models import default_stem_stride

    alpha, _, size = text.partition("@")
    try:
        alpha, size = float(alpha), int(size)
    except ValueError:
        raise SystemExit(f"configuration {text!r}: expected α@size, for example 0.25@128") from None
    if not (0 < alpha and size > 0):
        raise SystemExit(f"configuration {text!r}: α and the size must be positive")
    stem_stride = default_stem_stride(size)
    return alpha, size, 1000 if stem_stride == 2 else 10, stem_stride


def build(alpha, size, num_classes, stem_stride, use_torch):
    """(mbnet model, PyTorch model or None) in eval mode, the same weights in both when torch is
    there. BN statistics are measured on a random batch: with the untrained default statistics the
    activations shrink layer after layer into denormal floats, which time like nothing real."""
    from mbnet import Tensor, nn, no_grad
    from mbnet.models import MobileNetV1

    batch = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    if not use_torch:
        model = MobileNetV1(alpha, num_classes, size, stem_stride, seed=0)
        bns = [m for _, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.momentum = 1.0  # running statistics = this batch's
        with no_grad():
            model.train()(Tensor(batch))
        for m in bns:
            m.momentum = 0.1
        return model.eval(), None
    import torch

    from mbnet.torch_import import load_torch_weights

    torch.manual_seed(0)
    net = common.torch_model(alpha, size, num_classes, stem_stride)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = the average over the batches seen
    with torch.no_grad():
        net.train()(torch.from_numpy(batch).permute(0, 3, 1, 2))
    model = load_torch_weights(net.eval().state_dict(), stem_stride=stem_stride, input_size=size)
    return model, net.to(memory_format=torch.channels_last)


def plan_fn(model, x):
    from mbnet.plan import compile as compile_plan

    plan = compile_plan(model, len(x))
    return lambda: plan(x)


def autograd_fn(model, x):
    from mbnet import Tensor, no_grad

    def infer():
        with no_grad():
            return model(Tensor(x)).data

    return infer


def onnxruntime_session(model, threads, profile=False):
    """An ONNX Runtime session on mbnet's export of model: CPU, `threads` intra-op threads, one
    inter-op thread, sequential, every graph optimization; with its profiler on if profile."""
    import onnxruntime as ort

    from mbnet.export import to_onnx

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = profile
    return ort.InferenceSession(to_onnx(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnxruntime_fn(model, x, threads):
    import onnxruntime as ort

    session = onnxruntime_session(model, threads)
    feed = {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
    return lambda: session.run(["logits"], feed)[0], ort.__version__


def torch_fn(net, x, threads):
    import torch

    torch.set_num_threads(threads)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def infer():
        with torch.inference_mode():
            return net(xt).numpy()

    return infer, torch.__version__


def run(configs=CONFIGS, runs=100, rounds=5, warmup=10, threads=None, tiny=False, use_torch=True,
        use_onnxruntime=True):
    from mbnet import _C

    if threads is not None:
        _C.set_num_threads(threads)
    threads = _C.get_num_threads()
    if tiny:
        configs, runs, rounds, warmup = ("0.25@32",), 1, 1, 1
    if runs < 1 or rounds < 1 or warmup < 0:
        raise SystemExit(f"--runs {runs}, --rounds {rounds}, --warmup {warmup}: need runs, rounds >= 1, warmup >= 0")
    per_round = math.ceil(runs / rounds)
    pause = 0 if tiny else 0.2
    absent = {}  # engine -> why it has no row
    for engine, wanted, modules in (("torch", use_torch, ("torch",)),
                                    ("onnxruntime", use_onnxruntime, ("onnx", "onnxruntime"))):
        if not wanted:
            absent[engine] = "disabled"
        elif any(common.optional_import(m) is None for m in modules):
            absent[engine] = "not installed"
    have = {engine: engine not in absent for engine in ("torch", "onnxruntime")}
    versions, rows = {}, []
    parsed = [(text, *parse_config(text)) for text in configs]  # every configuration checked first
    for text, alpha, size, num_classes, stem_stride in parsed:
        model, net = build(alpha, size, num_classes, stem_stride, have["torch"])
        x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
        fns = {"mbnet": plan_fn(model, x), "autograd": autograd_fn(model, x)}
        if have["onnxruntime"]:
            fns["onnxruntime"], versions["onnxruntime"] = onnxruntime_fn(model, x, threads)
        if have["torch"]:
            fns["torch"], versions["torch"] = torch_fn(net, x, threads)
        want = fns["mbnet"]()
        row = {"config": text, "alpha": alpha, "size": size, "num_classes": num_classes, "stem_stride": stem_stride}
        for engine, fn in fns.items():
            diff = float(np.abs(np.asarray(fn()) - want).max() / np.abs(want).max())
            row[engine] = {"max_rel_diff": diff, "round_ms": [], "min_ms": math.inf}
        for _ in range(rounds):
            for engine, fn in fns.items():
                t = common.measure(fn, per_round, warmup, pause=pause)
                row[engine]["round_ms"].append(t["median"] * 1e3)
                row[engine]["min_ms"] = min(row[engine]["min_ms"], t["min"] * 1e3)
        mine = row["mbnet"]["round_ms"]
        for engine in fns:
            e = row[engine]
            e["median_ms"] = statistics.median(e["round_ms"])
            e["ratio_rounds"] = [other / ours for other, ours in zip(e["round_ms"], mine)]  # other / mbnet
            e["ratio"] = statistics.median(e["ratio_rounds"])
        rows.append(row)
    return {"benchmark": "latency", **common.machine_info(), "threads": threads, "runs": per_round * rounds,
            "rounds": rounds, "warmup": warmup, "versions": versions, "absent": absent, "rows": rows}


def _ratio(e):
    """'0.97 (0.93-1.01)': the median of the rounds' ratios and their range."""
    lo, hi = min(e["ratio_rounds"]), max(e["ratio_rounds"])
    return f"{e['ratio']:.2f}" if len(e["ratio_rounds"]) == 1 else f"{e['ratio']:.2f} ({lo:.2f}-{hi:.2f})"


def markdown(res):
    rows = []
    for r in res["rows"]:
        ms = r["mbnet"]["median_ms"]
        cells = [f"α={r['alpha']:g}, {r['size']} px", ms, r["autograd"]["median_ms"]]
        for engine in ("onnxruntime", "torch"):
            e = r.get(engine)
            cells += [e["median_ms"], _ratio(e)] if e else [res["absent"][engine], None]
        cells.append(max((r[e]["max_rel_diff"] for e in ("autograd", "onnxruntime", "torch") if e in r), default=None))
        rows.append(cells)
    v = res["versions"]
    lines = ["## Batch-1 inference latency (MobileNetV1)", ""] + common.header(res) + [
        "",
        f"One image, {res['threads']} threads in every engine; the engines take turns for {res['rounds']} rounds "
        f"of {res['runs'] // res['rounds']} calls each (after {res['warmup']} warm-up calls a round); a time is the "
        f"median of an engine's round medians. ONNX Runtime {v.get('onnxruntime', '—')} runs mbnet's own export (BN "
        "folded); PyTorch "
        f"{v.get('torch', '—')} with channels_last. 1000 classes and stem stride 2 above 64 px, 10 classes and "
        "stride 1 at 32 px. mbnet runs its compiled inference plan (the autograd path beside it). "
        "Ratio = the other engine's time / mbnet's in the same round (> 1: mbnet is faster), the median "
        "over the rounds and their range; max rel. diff = "
        "the largest logit difference to mbnet over its largest logit (the engines run the same weights).",
        "",
        common.table(["configuration", "mbnet plan ms", "mbnet autograd ms", "ONNX Runtime ms", "ORT / mbnet", "PyTorch ms", "PyTorch / mbnet",
                      "max rel. diff"], rows),
    ]
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {
        "configs": f"comma-separated α@size (default {','.join(CONFIGS)})",
        "runs": "calls timed per engine, split over the rounds",
        "rounds": "the engines take turns this many times (default 5)",
        "tiny": "α=0.25 at 32 px, 1 run: a smoke run", "use_onnxruntime": "skip the ONNX Runtime comparison"})


if __name__ == "__main__":
    main()
