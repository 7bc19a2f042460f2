"""ONNX export of an mbnet image classifier: `python -m mbnet.export WEIGHTS model.onnx`.

Shapes (ONNX's convention, NCHW, not mbnet's NHWC):
  input   "input"  float32 (n, 3, s, s), s = the model's input_size; n is the symbolic "batch"
                   (default) or fixed (--batch N). The image as the model sees it: RGB on the
                   [0, 1] pixel scale, minus mean, divided by std, per channel; mean and std are in
                   the file's metadata (metadata_props "mean", "std"), so are the class names
                   ("classes", a JSON list) and the whole ``model.config()`` ("mbnet_config").
  output  "logits" float32 (n, num_classes), before softmax.

Graph: Conv (+ Relu, or Clip(0, 6) for relu6) per layer of ``model.features``, depthwise
convolutions as Conv with group = channels, then GlobalAveragePool, Flatten, Gemm. Dropout is
the identity at inference and is left out. By default (``fold_bn=True``) each inference-mode
BatchNorm is folded into the convolution before it (weight·γ/√(var+ε), bias β − mean·γ/√(var+ε),
computed in float64), so every runtime gets conv + bias + activation without needing its own
Conv-BN fusion pass and the file is smaller; ``fold_bn=False`` (``--keep-bn``) emits
BatchNormalization nodes holding the stored statistics unchanged, for inspecting or retraining the
graph. Built with ``onnx.helper``; ``onnx.checker`` runs on every export. Needs the optional
``onnx`` package (``pip install "mbnet[onnx]"``), imported only here.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .nn import is_int_in
from .plan import conv_bn_pairs, fold_conv_bn

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Clip takes min/max as inputs from opset 11 on


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError('ONNX export needs the onnx package: pip install "mbnet[onnx]"') from None
    return onnx


def _oihw(kind, w):
    """A weight in mbnet's layout -> ONNX's (cout, cin / group, kh, kw), and the group count."""
    if kind == "conv":  # (kh, kw, cin, cout)
        return w.transpose(3, 2, 0, 1), 1
    if kind == "dw":  # (kh, kw, c)
        return w.transpose(2, 0, 1)[:, None], w.shape[2]
    return w.T[:, :, None, None], 1  # pw: (cin, cout)


def to_onnx(model, *, opset=DEFAULT_OPSET, dynamic_batch=True, batch_size=1, fold_bn=True):
    """The onnx.ModelProto of an mbnet image classifier (MobileNetV1 or ConvMobileNet) in eval
    mode; see the module docstring for its input, output and metadata."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if not is_int_in(opset, MIN_OPSET, onnx.defs.onnx_opset_version()):
        raise ValueError(f"export: opset must be an int in {MIN_OPSET}..{onnx.defs.onnx_opset_version()}, got {opset!r}")
    if not dynamic_batch and not is_int_in(batch_size, 1):
        raise ValueError(f"export: batch_size must be an int >= 1, got {batch_size!r}")
    if not hasattr(model, "config") or not hasattr(model, "features"):
        raise TypeError(f"export: expected an mbnet image classifier, got {type(model).__name__}")
    nodes, inits = [], {}

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name + ".out"], name=name, **attrs))
        return name + ".out"

    def const(name, array):
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)
        return name

    x = "input"
    for name, conv, bn_name, bn in conv_bn_pairs(model):
        folded = fold_conv_bn(conv, bn)  # float64, BN in the weights and bias
        w, group = _oihw(folded.kind, folded.weight if fold_bn else conv.weight.data)
        attrs = dict(kernel_shape=list(w.shape[2:]), strides=[folded.stride] * 2, pads=[folded.padding] * 4,
                     group=group)
        if fold_bn:
            x = node("Conv", [x, const(name + ".weight", w), const(name + ".bias", folded.bias)], name, **attrs)
        else:
            x = node("Conv", [x, const(name + ".weight", w)], name, **attrs)
            stats = [const(f"{bn_name}.{k}", v) for k, v in (("gamma", bn.gamma.data), ("beta", bn.beta.data),
                                                              ("running_mean", bn.running_mean),
                                                              ("running_var", bn.running_var))]
            x = node("BatchNormalization", [x, *stats], bn_name, epsilon=bn.eps)
        if bn.act == "relu":
            x = node("Relu", [x], bn_name + ".relu")
        elif bn.act == "relu6":
            x = node("Clip", [x, const("relu6.min", np.float32(0)), const("relu6.max", np.float32(6))],
                     bn_name + ".relu6")

    x = node("GlobalAveragePool", [x], "pool")
    x = node("Flatten", [x], "flatten", axis=1)
    nodes.append(helper.make_node("Gemm", [x, const("classifier.weight", model.classifier.weight.data),
                                           const("classifier.bias", model.classifier.bias.data)],
                                  ["logits"], name="classifier"))
    n, s = ("batch" if dynamic_batch else batch_size), model.input_size
    cfg = model.config()
    graph = helper.make_graph(
        nodes, f"mbnet_{cfg['arch']}", initializer=list(inits.values()),
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, s, s])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, model.num_classes])])
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="mbnet", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              doc_string="mbnet image classifier. input: float32 NCHW (batch, 3, H, W), RGB on "
                                         "[0, 1] minus metadata 'mean', divided by 'std'; output: logits.")
    helper.set_model_props(proto, {"classes": json.dumps(cfg["classes"]), "mean": json.dumps(cfg["mean"]),
                                   "std": json.dumps(cfg["std"]), "input_layout": "NCHW",
                                   "mbnet_config": json.dumps(cfg)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, *, opset=DEFAULT_OPSET, dynamic_batch=True, batch_size=1, fold_bn=True):
    """Writes ``to_onnx(model, ...)`` to ``path`` and returns the onnx.ModelProto."""
    from .checkpoint import atomic_write

    proto = to_onnx(model, opset=opset, dynamic_batch=dynamic_batch, batch_size=batch_size, fold_bn=fold_bn)
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))  # all of it or nothing; the error names path
    return proto


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mbnet.export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exports WEIGHTS to an ONNX file (checked with onnx.checker).",
        epilog="The graph takes NCHW input, ONNX's convention (mbnet itself runs NHWC): float32 (batch, 3, s, s),\n"
               "s = the model's resolution, RGB on [0, 1] minus mean, divided by std; it outputs logits\n"
               "(batch, classes). mean, std and the class names are in the file's metadata_props.")
    p.add_argument("weights", help="an mbnet weights file or training checkpoint (its EMA weights when it has them), "
                                   "or a PyTorch MobileNetV1 state_dict (.pt/.pth)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}, at least {MIN_OPSET})")
    p.add_argument("--batch", default="dynamic",
                   help="'dynamic' (default: a symbolic batch dimension) or a fixed batch size")
    p.add_argument("--keep-bn", action="store_true",
                   help="emit BatchNormalization nodes instead of folding BN into the convolutions")
    from .torch_import import add_import_arguments, import_options

    add_import_arguments(p)
    args = p.parse_args(argv)
    if args.batch != "dynamic" and not (args.batch.isdigit() and 1 <= int(args.batch) <= 2**31 - 1):
        p.error(f"--batch: expected 'dynamic' or a positive integer below 2^31, got {args.batch!r}")
    if Path(args.out).suffix.lower() != ".onnx":  # not over a checkpoint given by mistake (copy.npz)
        p.error(f"OUT must end in .onnx, got {args.out!r}")
    from .checkpoint import CheckpointError, WriteError
    from .models import load

    try:
        model = load(args.weights, **import_options(args))
        export_onnx(model, args.out, opset=args.opset, dynamic_batch=args.batch == "dynamic",
                    batch_size=1 if args.batch == "dynamic" else int(args.batch), fold_bn=not args.keep_bn)
    except (CheckpointError, WriteError, ImportError, OSError, TypeError, ValueError) as e:
        print(f"mbnet: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {model.config()['arch']} alpha={model.alpha} {model.input_size}x{model.input_size} "
          f"{model.num_classes} classes, input NCHW (batch={args.batch}, 3, {model.input_size}, {model.input_size}), "
          f"opset {args.opset}, BN {'kept' if args.keep_bn else 'folded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
