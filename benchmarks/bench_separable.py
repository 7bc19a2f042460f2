"""Standard KxK convolution against depthwise separable (depthwise KxK + pointwise 1x1): counts and
measured time, per layer of MobileNetV1 and for the whole network against Table 4's conv MobileNet.

    python -m benchmarks.bench_separable [--alpha 1] [--input-size 32] [--batch 32] [--repeat 5]
                                         [--threads T] [--tiny] [--json out.json]

Counts (Howard et al. 2017, section 3.1): a KxK convolution from M to N channels on a D_F x D_F
output costs D_K·D_K·M·N·D_F·D_F mult-adds and D_K·D_K·M·N weights; depthwise + pointwise cost
D_K·D_K·M·D_F·D_F + M·N·D_F·D_F mult-adds and D_K·D_K·M + M·N weights; their ratio is exactly
1/N + 1/D_K². Weights only (no BatchNorm) per layer, as in the paper's Table 3, whose rows are
printed and asserted here; the whole-network counts come from ``model.summary()`` (all trainable
parameters, conv + FC mult-adds).

Times (median of --repeat after one warm-up, our kernels only): standard = conv2d_fwd, and for
forward+backward also conv2d_bwd_input + conv2d_bwd_weight; separable = dwconv2d_fwd +
pwconv2d_fwd, and for forward+backward also pwconv2d_bwd_input + pwconv2d_bwd_weight +
dwconv2d_bwd_input + dwconv2d_bwd_weight. The BatchNorm + ReLU that the real block has between its
two convolutions is not timed. Whole network: forward (eval, no_grad) and a training step (forward
+ cross-entropy + backward + SGD update) of MobileNetV1 and ConvMobileNet at --net-batch.
"""
import time

import numpy as np

from mbnet import _C
from mbnet.models import ConvMobileNet, MobileNetV1, layer_shapes

from . import common

# Table 3 of the paper: (row, printed mult-adds in millions, printed parameters in millions).
TABLE3 = [
    ("Conv MobileNet layer (standard 3x3)", "462", "2.36"),
    ("Depthwise Separable Conv", "52.3", "0.27"),
    ("α = 0.75", "29.6", "0.15"),
    ("ρ = 0.714", "15.1", "0.15"),
]
# Table 4: (model, printed mult-adds M, printed params M) at 224x224, 1000 classes.
TABLE4 = {"ConvMobileNet": (4866, 29.3), "MobileNetV1": (569, 4.2)}


def block_shapes(alpha, input_size):
    """{i: (cin, cout, input size, stride)} of the 13 separable blocks of MobileNetV1 (depthwise
    then pointwise), from mbnet.models.layer_shapes."""
    shapes = layer_shapes(alpha, input_size)
    return {dw.block: (dw.cin, pw.cout, dw.size, dw.stride) for dw, pw in zip(shapes[1::2], shapes[2::2])}


# Shapes people quote when explaining the idea: the stride-1 blocks of MobileNetV1 at 224x224 (ImageNet).
IMAGENET = block_shapes(1.0, 224)


def textbook(i, k=3, name=None):
    """(name, cin, cout, input size, stride, kernel) of ImageNet block i with a k x k kernel."""
    cin, cout, s, stride = IMAGENET[i]
    return (name or f"ImageNet block {i}: {s}x{s}x{cin}->{cout}", cin, cout, s, stride, k)


TEXTBOOK = [textbook(7, name="Table 3 layer 14x14x512"), textbook(7, 5, "same, 5x5 kernel"),
            *map(textbook, (1, 3, 5, 13))]


def out_size(size, k, stride):
    return (size + 2 * (k // 2) - k) // stride + 1


def standard_counts(cin, cout, out_hw, k=3):
    """(mult-adds, weights) of a k x k convolution cin -> cout with an out_hw x out_hw output."""
    return k * k * cin * cout * out_hw * out_hw, k * k * cin * cout


def separable_counts(cin, cout, out_hw, k=3):
    """(mult-adds, weights) of depthwise k x k + pointwise cin -> cout at an out_hw x out_hw output."""
    return (k * k * cin + cin * cout) * out_hw * out_hw, k * k * cin + cin * cout


def table3_rows():
    """[(row, mult-adds, params, printed mult-adds M, printed params M)] computed for the paper's
    14x14x512 -> 14x14x512 layer; asserts each rounds to the printed figure."""
    c75 = int(512 * 0.75)
    r = int(round(14 * 0.714))  # rho = 0.714 is 160/224: 14x14 -> 10x10
    counts = [standard_counts(512, 512, 14), separable_counts(512, 512, 14),
              separable_counts(c75, c75, 14), separable_counts(c75, c75, r)]
    rows = []
    for (name, pm, pp), (madds, params) in zip(TABLE3, counts):
        got_m = f"{madds / 1e6:.{len(pm.partition('.')[2])}f}"
        got_p = f"{params / 1e6:.{len(pp.partition('.')[2])}f}"
        assert (got_m, got_p) == (pm, pp), f"Table 3 '{name}': computed {got_m}M / {got_p}M, paper {pm}M / {pp}M"
        rows.append((name, madds, params, pm, pp))
    return rows


def mobilenet_layers(alpha, input_size):
    """[(name, cin, cout, input size, stride, 3)] of the 13 separable blocks of MobileNetV1."""
    return [(f"block {i}: {cin}->{cout} @{size} s{stride}", cin, cout, size, stride, 3)
            for i, (cin, cout, size, stride) in block_shapes(alpha, input_size).items()]


def time_layer(cin, cout, size, stride, k, batch, repeat, warmup, rng):
    """Median seconds of the standard and separable versions, forward and forward+backward."""
    p = k // 2
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((k, k, cin, cout), dtype=np.float32) * np.float32(1 / np.sqrt(k * k * cin))
    wd = rng.standard_normal((k, k, cin), dtype=np.float32) * np.float32(1 / k)
    wp = rng.standard_normal((cin, cout), dtype=np.float32) * np.float32(1 / np.sqrt(cin))
    ho = out_size(size, k, stride)
    dy = rng.standard_normal((batch, ho, ho, cout), dtype=np.float32)
    hw, khw = (size, size), (k, k)

    def std_fwd():
        return _C.conv2d_fwd(x, w, stride, p)

    def std_train():
        std_fwd()
        _C.conv2d_bwd_input(dy, w, hw, stride, p)
        _C.conv2d_bwd_weight(x, dy, khw, stride, p)

    def sep_fwd():
        h = _C.dwconv2d_fwd(x, wd, stride, p)
        return h, _C.pwconv2d_fwd(h, wp)

    def sep_train():
        h, _ = sep_fwd()
        dh = _C.pwconv2d_bwd_input(dy, wp)
        _C.pwconv2d_bwd_weight(h, dy)
        _C.dwconv2d_bwd_input(dh, wd, hw, stride, p)
        _C.dwconv2d_bwd_weight(x, dh, khw, stride, p)

    t = {name: common.measure(fn, repeat, warmup)["median"]
         for name, fn in (("std_fwd", std_fwd), ("sep_fwd", sep_fwd), ("std_train", std_train),
                          ("sep_train", sep_train))}
    return {f"{k}_s": v for k, v in t.items()}


def layer_row(name, cin, cout, size, stride, k, batch, repeat, warmup, rng):
    ho = out_size(size, k, stride)
    std_m, std_p = standard_counts(cin, cout, ho, k)
    sep_m, sep_p = separable_counts(cin, cout, ho, k)
    row = {"layer": name, "cin": cin, "cout": cout, "size": size, "stride": stride, "k": k, "batch": batch,
           "standard_mult_adds": std_m, "separable_mult_adds": sep_m, "standard_params": std_p,
           "separable_params": sep_p, "ratio": sep_m / std_m, "paper_ratio": 1 / cout + 1 / k ** 2}
    row.update(time_layer(cin, cout, size, stride, k, batch, repeat, warmup, rng))
    row["speedup_fwd"] = row["std_fwd_s"] / row["sep_fwd_s"]
    row["speedup_train"] = row["std_train_s"] / row["sep_train_s"]
    return row


def network_rows(alpha, input_size, batch, repeat, warmup):
    """Counts at the benchmark's size (10 classes) and at 224x224 (1000 classes, the paper's
    Table 4), and the measured forward / training-step time at ``batch``."""
    rows = []
    for cls in (MobileNetV1, ConvMobileNet):
        name = cls.__name__
        model = cls(alpha, num_classes=10, input_size=input_size, seed=0)
        here = model.summary(show=False)
        train_step, infer = common.mbnet_steps(model, batch, input_size)
        t_fwd = common.measure(infer, repeat, warmup)["median"]
        t_train = common.measure(train_step, repeat, warmup)["median"]
        del model, train_step, infer
        big = cls(alpha, num_classes=1000, input_size=224, seed=0).summary(show=False)
        rows.append({"model": name, "alpha": alpha, "input_size": input_size, "batch": batch,
                     "mult_adds": here["mult_adds"], "params": here["params"],
                     "mult_adds_224": big["mult_adds"], "params_224": big["params"],
                     "paper_224": TABLE4[name] if alpha == 1 else None,
                     "fwd_s": t_fwd, "train_s": t_train})
    return rows


def run(alpha=1.0, input_size=32, batch=32, textbook_batch=8, net_batch=16, repeat=5, threads=None,
        tiny=False):
    if threads is not None:
        _C.set_num_threads(threads)
    warmup = 0 if tiny else 1
    if tiny:
        common.PAUSE = 0
        batch = textbook_batch = net_batch = 2
        repeat = 1
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    t3 = table3_rows()
    layers = [layer_row(*L, batch, repeat, warmup, rng) for L in mobilenet_layers(alpha, input_size)]
    textbook = [layer_row(*L, textbook_batch, repeat, warmup, rng) for L in (TEXTBOOK[:2] if tiny else TEXTBOOK)]
    net = network_rows(alpha, input_size, net_batch, repeat, warmup)
    # The per-layer counts and the model's own summary must agree (stem + blocks + FC).
    shapes = layer_shapes(alpha, input_size)
    stem = shapes[0]
    total = (9 * stem.cin * stem.cout * stem.out_size ** 2 + sum(r["separable_mult_adds"] for r in layers)
             + shapes[-1].cout * 10)
    assert total == net[0]["mult_adds"], (total, net[0]["mult_adds"])
    return {"benchmark": "separable", **common.machine_info(), "alpha": alpha, "input_size": input_size,
            "repeat": repeat, "table3": [dict(zip(("row", "mult_adds", "params", "paper_mult_adds_M",
                                                   "paper_params_M"), r)) for r in t3],
            "layers": layers, "textbook": textbook, "network": net, "seconds": time.perf_counter() - t0}


def _layer_table(rows):
    out = []
    for r in rows:
        out.append((r["layer"], r["batch"], common.millions(r["standard_mult_adds"]),
                    common.millions(r["separable_mult_adds"]), f"{r['ratio']:.4f}", f"{r['paper_ratio']:.4f}",
                    r["std_fwd_s"] * 1e3, r["sep_fwd_s"] * 1e3, f"{r['speedup_fwd']:.2f}x",
                    r["std_train_s"] * 1e3, r["sep_train_s"] * 1e3, f"{r['speedup_train']:.2f}x"))
    return common.table(["layer", "batch", "std mult-adds", "sep mult-adds", "sep/std", "1/N+1/D_K²",
                         "std fwd ms", "sep fwd ms", "fwd speed-up", "std fwd+bwd ms", "sep fwd+bwd ms",
                         "fwd+bwd speed-up"], out)


def markdown(res):
    lines = ["## Standard vs depthwise separable convolution", ""] + common.header(res) + ["",
             "Table 3 of the paper, one 14x14x512 -> 14x14x512 layer, 3x3 kernel (weights only); the computed "
             "counts are asserted to round to the printed ones:", ""]
    lines.append(common.table(["layer", "mult-adds", "params", "paper mult-adds", "paper params"],
                              [(r["row"], f"{r['mult_adds']:,}", f"{r['params']:,}", r["paper_mult_adds_M"] + "M",
                                r["paper_params_M"] + "M") for r in res["table3"]]))
    lines += ["", f"MobileNetV1 α={res['alpha']} layers at {res['input_size']}x{res['input_size']} input "
              f"(mult-adds per image; times per batch, median of {res['repeat']}; speed-up = standard time / "
              "separable time; the BN + ReLU between depthwise and pointwise is not timed):", "",
              _layer_table(res["layers"]), "", "Textbook shapes, stride 1:", "", _layer_table(res["textbook"]), "",
              "Whole network (params = all trainable, mult-adds = conv + FC per image; training step = forward + "
              "cross-entropy + backward + SGD):", ""]
    rows = []
    for r in res["network"]:
        paper = r["paper_224"]
        rows.append((r["model"], common.millions(r["mult_adds"]), common.millions(r["params"], 2),
                     common.millions(r["mult_adds_224"]), common.millions(r["params_224"], 2),
                     f"{paper[0]}M / {paper[1]}M" if paper else None, r["batch"], r["fwd_s"] * 1e3,
                     r["train_s"] * 1e3, r["batch"] / r["train_s"]))
    a, b = res["network"]
    rows.append(("ConvMobileNet / MobileNetV1", f"{b['mult_adds'] / a['mult_adds']:.1f}x",
                 f"{b['params'] / a['params']:.1f}x", f"{b['mult_adds_224'] / a['mult_adds_224']:.1f}x",
                 f"{b['params_224'] / a['params_224']:.1f}x", None, None, f"{b['fwd_s'] / a['fwd_s']:.1f}x",
                 f"{b['train_s'] / a['train_s']:.1f}x", None))
    s = res["input_size"]
    lines.append(common.table(
        ["model", f"mult-adds @{s}", f"params @{s} (10 cls)", "mult-adds @224", "params @224 (1000 cls)",
         "paper Table 4", "batch", "fwd ms", "train step ms", "train img/s"], rows))
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"batch": "batch of the per-layer timings",
                                                     "net_batch": "batch of the whole-network timings",
                                                     "tiny": "batch 2, 1 repeat, fewer shapes: a smoke run"})


if __name__ == "__main__":
    main()
