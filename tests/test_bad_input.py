"""Malformed calls to every binding of mbnet._C: each must return a correct float32 result or raise
TypeError / ValueError, and never crash.

Each binding in BINDINGS draws a small valid call; the test then breaks one argument at a time
(wrong dtype, rank, zero-size or mismatched dimension, non-contiguous, read-only or misaligned
view, a list or None instead of an array, zero / negative / huge stride and padding, bad (h, w)
pairs, unknown activations, out-of-range labels and hyper-parameters, too many or too few
arguments). A call that returns must agree with mbnet.reference. A crash kills the test process,
so run this file with the fault handler on to see where:

    python -X faulthandler -m pytest -q tests/test_bad_input.py
"""
import copy
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbnet
from mbnet import _C
from mbnet import reference as R

ALLOWED = (TypeError, ValueError)
FLOAT32_TWINS = ("sgd_update", "ema_update")  # checked against their reference on float32 arrays
# Under .ci/sanitize: AddressSanitizer reserves terabytes of address space (so RLIMIT_AS cannot
# bound a child) and its operator new aborts instead of throwing std::bad_alloc.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
MBNET_ROOT = Path(__file__).resolve().parents[1]
# Children import the mbnet this process imported (under .ci/sanitize, a copy holding the sanitized
# _C): with `python -c`, their working directory comes first on sys.path.
MBNET_HOME = Path(mbnet.__file__).resolve().parents[1]


# --- valid calls, one builder per binding -------------------------------------------------------
# A builder takes (draw, rng) and returns the argument list of a valid call, each argument tagged
# with its kind: ("f32", array), ("labels", array), ("stride", int), ("padding", int),
# ("hw", (h, w)), ("act", str), ("real", float), ("bool", bool), ("threads", int).

def f32(rng, *shape):
    return ("f32", rng.standard_normal(shape).astype(np.float32))


def dims(draw, ks=(1, 3)):
    """n, h, w, c, k, s, p of a small convolution (kernel size k in ks) whose output is at least 1x1."""
    k = draw(st.sampled_from(ks))
    s = draw(st.sampled_from([1, 2]))
    p = draw(st.sampled_from([0, 1]))
    h, w = draw(st.integers(max(1, k - 2 * p), 6)), draw(st.integers(max(1, k - 2 * p), 6))
    return draw(st.integers(1, 2)), h, w, draw(st.sampled_from([1, 3, 17])), k, s, p


def out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def b_matmul(draw, rng):
    m, k, n = (draw(st.integers(1, 5)) for _ in range(3))
    ta, tb = draw(st.booleans()), draw(st.booleans())
    return [f32(rng, *((k, m) if ta else (m, k))), f32(rng, *((n, k) if tb else (k, n))),
            ("bool", ta), ("bool", tb)]


def b_pw_fwd(draw, rng):
    n, h, w, ci, *_ = dims(draw)
    return [f32(rng, n, h, w, ci), f32(rng, ci, draw(st.sampled_from([1, 4])))]


def b_pw_bwd_input(draw, rng):
    n, h, w, ci, *_ = dims(draw)
    co = draw(st.sampled_from([1, 4]))
    return [f32(rng, n, h, w, co), f32(rng, ci, co)]


def b_pw_bwd_weight(draw, rng):
    n, h, w, ci, *_ = dims(draw)
    return [f32(rng, n, h, w, ci), f32(rng, n, h, w, draw(st.sampled_from([1, 4])))]


def bn_act_args(draw, rng, c):
    """gamma, beta, mean, invstd (c,) and act of the *_bn_act kernels."""
    gamma, beta, mean, var = bn_params(rng, c)
    return [gamma, beta, mean, ("f32", 1 / np.sqrt(var[1])), ("act", draw_act(draw))]


def b_pw_bn_act_fwd(draw, rng):
    x, w = b_pw_fwd(draw, rng)
    return [x, w, *bn_act_args(draw, rng, x[1].shape[-1])]


def b_pw_bn_act_bwd_weight(draw, rng):
    x, dy = b_pw_bwd_weight(draw, rng)
    return [x, dy, *bn_act_args(draw, rng, x[1].shape[-1])]


def b_pw_bwd_input_bn(draw, rng):
    x, w = b_pw_fwd(draw, rng)
    n, h, wd, ci = x[1].shape
    return [f32(rng, n, h, wd, w[1].shape[1]), w, x, *bn_act_args(draw, rng, ci)]


def b_linear_fwd(draw, rng):
    n, di, do = (draw(st.integers(1, 5)) for _ in range(3))
    return [f32(rng, n, di), f32(rng, di, do), f32(rng, do)]


def b_linear_bwd(draw, rng):
    n, di, do = (draw(st.integers(1, 5)) for _ in range(3))
    return [f32(rng, n, di), f32(rng, di, do), f32(rng, n, do)]


def conv_builders(wshape, ks=(1, 3)):
    """fwd, bwd_input, bwd_weight builders for a weight of shape wshape(k, ci, co), k in ks."""
    def fwd(draw, rng):
        n, h, w, c, k, s, p = dims(draw, ks)
        return [f32(rng, n, h, w, c), f32(rng, *wshape(k, c, 2)), ("stride", s), ("padding", p)]

    def bwd_input(draw, rng):
        n, h, w, c, k, s, p = dims(draw, ks)
        co = wshape(k, c, 2)[-1]
        return [f32(rng, n, out(h, k, s, p), out(w, k, s, p), co), f32(rng, *wshape(k, c, 2)),
                ("hw", (h, w)), ("stride", s), ("padding", p)]

    def bwd_weight(draw, rng):
        n, h, w, c, k, s, p = dims(draw, ks)
        co = wshape(k, c, 2)[-1]
        return [f32(rng, n, h, w, c), f32(rng, n, out(h, k, s, p), out(w, k, s, p), co),
                ("hw", (k, k)), ("stride", s), ("padding", p)]

    return fwd, bwd_input, bwd_weight


b_dw_fwd, b_dw_bwd_input, b_dw_bwd_weight = conv_builders(lambda k, c, co: (k, k, c))
b_conv_fwd, b_conv_bwd_input, b_conv_bwd_weight = conv_builders(lambda k, c, co: (k, k, c, co))
b_dw3_fwd, _, b_dw3_bwd_weight = conv_builders(lambda k, c, co: (k, k, c), ks=(3,))  # the only k of *_bn_act


def b_sgd_update(draw, rng):
    shape = draw(st.sampled_from([(5,), (2, 3), (3, 3, 2, 4)]))
    return [f32(rng, *shape), f32(rng, *shape), f32(rng, *shape), ("real", 0.1), ("real", 0.9), ("real", 5e-4),
            ("bool", draw(st.booleans()))]


def b_ema_update(draw, rng):
    shape = draw(st.sampled_from([(5,), (2, 3)]))
    return [f32(rng, *shape), f32(rng, *shape), ("real", 0.99)]


def b_dw_bn_act_fwd(draw, rng):
    x, w, stride, padding = b_dw3_fwd(draw, rng)
    return [x, w, *bn_act_args(draw, rng, x[1].shape[-1]), stride, padding]


def b_dw_bn_act_bwd_weight(draw, rng):
    x, dy, hw, stride, padding = b_dw3_bwd_weight(draw, rng)
    return [x, dy, *bn_act_args(draw, rng, x[1].shape[-1]), hw, stride, padding]


def b_dw_bwd_input_bn(draw, rng, fwd=b_dw_fwd):
    x, w, stride, padding = fwd(draw, rng)
    n, h, wd, c = x[1].shape
    k, s, p = w[1].shape[0], stride[1], padding[1]
    return [f32(rng, n, out(h, k, s, p), out(wd, k, s, p), c), w, x, *bn_act_args(draw, rng, c), stride, padding]


def bn_shape(draw):
    c = draw(st.sampled_from([1, 3, 17]))
    return draw(st.sampled_from([(5, c), (2, 3, 2, c)]))


def bn_params(rng, c):
    gamma, beta = f32(rng, c), f32(rng, c)
    mean = f32(rng, c)
    var = ("f32", rng.uniform(0.5, 2.0, c).astype(np.float32))
    return gamma, beta, mean, var


def draw_act(draw):
    return draw(st.sampled_from(["none", "relu", "relu6"]))


def bn_bwd_inputs(draw, rng):
    """shape, act, float32 x and bn_params of a BatchNorm backward call."""
    shape = bn_shape(draw)
    act = draw_act(draw)
    x = rng.standard_normal(shape).astype(np.float32)
    return shape, act, x, bn_params(rng, shape[-1])


def b_bn_train_fwd(draw, rng):
    shape = bn_shape(draw)
    gamma, beta, rm, rv = bn_params(rng, shape[-1])
    return [f32(rng, *shape), gamma, beta, rm, rv, ("real", 0.1), ("real", 1e-5), ("act", draw_act(draw))]


def b_bn_train_bwd(draw, rng):
    shape, act, x, (gamma, beta, rm, rv) = bn_bwd_inputs(draw, rng)
    _, mean, invstd = R.batchnorm_act_train_fwd(x, gamma[1], beta[1], rm[1].copy(), rv[1].copy(), 0.1, 1e-5, act)
    return [f32(rng, *shape), ("f32", x), gamma, beta, ("f32", mean.astype(np.float32)),
            ("f32", invstd.astype(np.float32)), ("act", act)]


def b_bn_train_fwd_from_stats(draw, rng):
    shape = bn_shape(draw)
    gamma, beta, rm, rv = bn_params(rng, shape[-1])
    x = rng.standard_normal(shape).astype(np.float32)
    _, mean, var = R._with_stats(x)
    return [("f32", x), ("f32", mean), ("f32", var), gamma, beta, rm, rv, ("real", 0.1), ("real", 1e-5),
            ("act", draw_act(draw))]


def b_bn_infer_fwd(draw, rng):
    shape = bn_shape(draw)
    gamma, beta, mean, var = bn_params(rng, shape[-1])
    return [f32(rng, *shape), gamma, beta, mean, var, ("real", 1e-5), ("act", draw_act(draw))]


def b_bn_infer_bwd(draw, rng):
    shape, act, x, (gamma, beta, mean, var) = bn_bwd_inputs(draw, rng)
    y = R.batchnorm_act_infer_fwd(x, gamma[1], beta[1], mean[1], var[1], 1e-5, act)
    return [f32(rng, *shape), ("f32", x), ("f32", y.astype(np.float32)), gamma, beta, mean, var,
            ("real", 1e-5), ("act", act)]


def b_act_fwd(draw, rng):
    return [f32(rng, *bn_shape(draw)), ("act", draw_act(draw))]


def b_act_bwd(draw, rng):
    shape = bn_shape(draw)
    act = draw_act(draw)
    return [f32(rng, *shape), ("f32", R.act_fwd(3 * rng.standard_normal(shape).astype(np.float32), act)),
            ("act", act)]


def b_pool_fwd(draw, rng):
    n, h, w, c, *_ = dims(draw)
    return [f32(rng, n, h, w, c)]


def b_pool_bwd(draw, rng):
    n, h, w, c, *_ = dims(draw)
    return [f32(rng, n, c), ("hw", (h, w))]


def b_loss_fwd(draw, rng):
    n, k = draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 10]))
    return [f32(rng, n, k), ("labels", rng.integers(0, k, n)), ("real", draw(st.sampled_from([0.0, 0.1])))]


def b_loss_bwd(draw, rng):
    n, k = draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 10]))
    probs = rng.dirichlet(np.ones(k), n).astype(np.float32)
    return [("f32", probs), ("labels", rng.integers(0, k, n)), ("real", draw(st.sampled_from([0.0, 0.1]))),
            ("real", draw(st.sampled_from([1.0, 0.5])))]


def b_set_num_threads(draw, rng):
    return [("threads", draw(st.sampled_from([1, 2])))]


def b_no_args(draw, rng):
    return []


# Every binding of csrc/README.md (test_table_covers_every_binding keeps this in step).
BINDINGS = {
    "matmul": b_matmul,
    "pwconv2d_fwd": b_pw_fwd,
    "pwconv2d_fwd_stats": b_pw_fwd,
    "pwconv2d_bwd_input": b_pw_bwd_input,
    "pwconv2d_bwd_weight": b_pw_bwd_weight,
    "pwconv2d_bn_act_fwd": b_pw_bn_act_fwd,
    "pwconv2d_bn_act_fwd_stats": b_pw_bn_act_fwd,
    "pwconv2d_bn_act_bwd_weight": b_pw_bn_act_bwd_weight,
    "pwconv2d_bwd_input_bn": b_pw_bwd_input_bn,
    "linear_fwd": b_linear_fwd,
    "linear_bwd": b_linear_bwd,
    "dwconv2d_fwd": b_dw_fwd,
    "dwconv2d_fwd_stats": b_dw_fwd,
    "dwconv2d_bwd_input": b_dw_bwd_input,
    "dwconv2d_bwd_weight": b_dw_bwd_weight,
    "dwconv2d_bn_act_fwd": b_dw_bn_act_fwd,
    "dwconv2d_bn_act_fwd_stats": b_dw_bn_act_fwd,
    "dwconv2d_bn_act_bwd_weight": b_dw_bn_act_bwd_weight,
    "dwconv2d_bwd_input_bn": b_dw_bwd_input_bn,
    "dwconv2d_bn_act_bwd": lambda draw, rng: b_dw_bwd_input_bn(draw, rng, b_dw3_fwd),
    "conv2d_fwd": b_conv_fwd,
    "conv2d_fwd_stats": b_conv_fwd,
    "conv2d_bwd_input": b_conv_bwd_input,
    "conv2d_bwd_weight": b_conv_bwd_weight,
    "batchnorm_act_train_fwd": b_bn_train_fwd,
    "batchnorm_act_train_fwd_from_stats": b_bn_train_fwd_from_stats,
    "batchnorm_act_train_bwd": b_bn_train_bwd,
    "batchnorm_act_infer_fwd": b_bn_infer_fwd,
    "batchnorm_act_infer_bwd": b_bn_infer_bwd,
    "act_fwd": b_act_fwd,
    "act_bwd": b_act_bwd,
    "global_avg_pool_fwd": b_pool_fwd,
    "global_avg_pool_bwd": b_pool_bwd,
    "softmax_cross_entropy_fwd": b_loss_fwd,
    "softmax_cross_entropy_bwd": b_loss_bwd,
    "set_num_threads": b_set_num_threads,
    "sgd_update": b_sgd_update,
    "ema_update": b_ema_update,
    "get_num_threads": b_no_args,
    "build_info": b_no_args,
}


# --- ways to break one argument -----------------------------------------------------------------

def unaligned(a):
    """A C-contiguous float32 copy of a whose data pointer is 1 byte off 4-byte alignment."""
    buf = np.zeros(a.nbytes + 16, np.uint8)
    start = (-buf.ctypes.data) % 16 + 1
    out = buf[start:start + a.nbytes].view(np.float32).reshape(a.shape)
    out[...] = a
    return out


def zero_dim(a, axis):
    shape = list(a.shape)
    shape[axis] = 0
    return np.zeros(shape, a.dtype)


def mismatched(a, axis, delta):
    shape = list(a.shape)
    shape[axis] = shape[axis] + delta if shape[axis] + delta >= 1 else shape[axis] + 1
    return np.ones(shape, a.dtype)


def strided(a, axis):
    """Same shape and values, every other element of a twice-as-long axis (not contiguous)."""
    shape = list(a.shape)
    shape[axis] *= 2
    big = np.zeros(shape, a.dtype)
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(None, None, 2)
    big[tuple(idx)] = a
    return big[tuple(idx)]


def zero_stride(a, axis):
    """Same shape, every entry along `axis` aliasing the first (stride 0)."""
    strides = list(a.strides)
    strides[axis] = 0
    return np.lib.stride_tricks.as_strided(a.copy(), a.shape, strides, writeable=False)


def read_only(a):
    b = a.copy()
    b.setflags(write=False)
    return b


def array_options(a, axis):
    """{description: thunk making the replacement} for a float32 array argument."""
    options = {
        "float64": lambda: a.astype(np.float64),
        "float16": lambda: a.astype(np.float16),
        "int32": lambda: a.astype(np.int32),
        "int64": lambda: a.astype(np.int64),
        "bool": lambda: a > 0,
        "complex64": lambda: a.astype(np.complex64),
        "object": lambda: a.astype(object),
        "big-endian float32": lambda: a.astype(">f4"),
        "extra leading axis": lambda: a[None],
        "extra trailing axis": lambda: a[..., None],
        "one axis fewer": lambda: a[0] if a.ndim else a[None],
        "rank 0": lambda: np.array(1.0, np.float32),
        "rank 5": lambda: a.reshape((1,) * (5 - a.ndim) + a.shape) if a.ndim <= 5 else a[None],
        f"zero-size axis {axis}": lambda: zero_dim(a, axis),
        f"axis {axis} + 1": lambda: mismatched(a, axis, 1),
        f"axis {axis} - 1": lambda: mismatched(a, axis, -1),
        f"axis {axis} x 3": lambda: mismatched(a, axis, 2 * a.shape[axis] if a.ndim else 1),
        f"every other element along axis {axis}": lambda: strided(a, axis),
        "Fortran order": lambda: np.asfortranarray(a),
        "transposed": lambda: a.T,
        f"reversed axis {axis} (negative stride)": lambda: np.flip(a, axis),
        f"zero stride along axis {axis}": lambda: zero_stride(a, axis),
        "read-only": lambda: read_only(a),
        "misaligned": lambda: unaligned(a),
        "nested list": lambda: a.tolist(),
        "None": lambda: None,
        "float scalar": lambda: 1.0,
        "string": lambda: "array",
        "numpy float32 scalar": lambda: np.float32(1.0),
    }
    return options


LABEL_MUTATIONS = {
    "float labels": lambda l, k: l.astype(np.float64),
    "bool labels": lambda l, k: l > 0,
    "object labels": lambda l, k: l.astype(object),
    "2-D labels": lambda l, k: l[None],
    "one label too many": lambda l, k: np.append(l, 0),
    "one label too few": lambda l, k: l[1:],
    "label == K": lambda l, k: np.where(np.arange(l.size) == 0, k, l),
    "label -1": lambda l, k: np.where(np.arange(l.size) == l.size - 1, -1, l),
    "label 2**40": lambda l, k: np.where(np.arange(l.size) == 0, 2**40, l),
    "uint64 label 2**64-1": lambda l, k: np.where(np.arange(l.size) == 0, 2**64 - 1, l).astype(np.uint64),
    "int8 labels": lambda l, k: l.astype(np.int8),
    "uint16 labels": lambda l, k: l.astype(np.uint16),
    "labels every other element": lambda l, k: np.repeat(l, 2)[::2],
    "list labels": lambda l, k: l.tolist(),
    "None labels": lambda l, k: None,
    "empty labels": lambda l, k: l[:0],
}

# Paddings from 2**31 up make outputs of more than 2**63 bytes (numpy: ValueError); between 10**5
# and 10**9 numpy would try to allocate them: test_huge_padding_is_a_value_error covers those.
INTS = [0, -1, -2, -(2**31), 2**31, 2**40, 2**62, 2**63, 2**64, -(2**63) - 1, None, 1.5, "1",
        np.int64(2), np.int32(1), True, np.float64(1.0)]
HUGE_PADDING = 10**6  # a call that returns with a larger padding must be wrong: outputs would be enormous
HWS = [(0, 3), (3, 0), (-1, 3), (3, -5), (1,), (3, 3, 3), (), None, "hw", (1.5, 2), ("a", "b"),
       (2**63, 2), (2**70, 2), (10**9, 10**9), (2**62, 2**62), (-(2**63), 1), (None, 2)]
ACTS = ["gelu", "", "RELU", "relu ", None, 1, b"relu", "identity"]
REALS = [float("nan"), float("inf"), float("-inf"), -1.0, -1e-9, 0.0, 1.0, 2.0, 1e30, None, "0.1",
         np.float64(0.5), 1, [0.1]]
BOOLS = [None, "yes", 2, np.bool_(True), 1.5, [], [1]]
THREADS = [0, -1, -(2**31), 2**31, 2**63, None, 1.5, "2", np.int64(1)]


def all_mutations(kinds_values):
    """Every way to break one argument (or the arity) of a valid call: a list of
    (description, thunk making the new argument list)."""
    args = [v for _, v in kinds_values]
    out = [("too many arguments", lambda: args + [args[-1] if args else 1])]
    if args:
        out.append(("too few arguments", lambda: args[:-1]))

    def replaced(i, make):
        return lambda: args[:i] + [make()] + args[i + 1:]

    for i, (kind, value) in enumerate(kinds_values):
        if kind == "f32":
            options = {}
            for axis in range(max(value.ndim, 1)):
                options.update(array_options(value, axis))
        elif kind == "labels":
            k = next(v for kd, v in kinds_values if kd == "f32").shape[1]
            options = {name: (lambda f=f, l=value: f(l, k)) for name, f in LABEL_MUTATIONS.items()}
        else:
            if kind == "hw":
                h, w = value
                pool = HWS + [(h + 1, w), (h, w + 7), [h, w], np.array([h, w]), (w, h)]
            else:
                pool = {"stride": INTS + [3, 10**9], "padding": INTS + [5, 40, 2**33], "act": ACTS,
                        "real": REALS, "bool": BOOLS, "threads": THREADS}[kind]
            options = {f"{v!r} ({type(v).__name__})": (lambda v=v: v) for v in pool}
        out += [(f"arg {i} ({kind}): {name}", replaced(i, make)) for name, make in options.items()]
    return out


# --- checking what came back --------------------------------------------------------------------

def as_reference_arg(v):
    """float32 arrays become float64 copies; act names as parse_act reads them (pybind11 passes
    bytes as str); everything else as given (copied)."""
    if isinstance(v, np.ndarray) and v.dtype == np.float32:
        return np.array(v, np.float64)
    if isinstance(v, bytes):
        v = v.decode()
    return copy.deepcopy(v)


def check_result(name, args_before, result, where):
    if name == "set_num_threads":
        assert result is None, where
        return
    if name == "get_num_threads":
        assert isinstance(result, int) and result >= 1, where
        return
    if name == "build_info":
        assert isinstance(result, dict), where
        return
    if name.startswith(("conv2d", "dwconv2d")):  # padding is the last argument
        padding = args_before[-1]
        assert not isinstance(padding, (int, np.integer)) or abs(int(padding)) <= HUGE_PADDING, (
            f"{where}: returned for a padding whose output cannot exist")
    ref_args = [as_reference_arg(a) for a in args_before]
    if name in FLOAT32_TWINS:  # bitwise NumPy's float32 operations (a huge lr overflows in both)
        ref_args = [copy.deepcopy(a) for a in args_before]
    if name == "batchnorm_act_infer_bwd":
        # The kernel reads the activation's mask from y, the reference from the statistics: mask
        # dy here so that a y made with other statistics (a changed eps) means the same to both.
        ref_args[0], ref_args[-1] = R.act_bwd(ref_args[0], ref_args[2], ref_args[-1]), "none"
    try:
        with np.errstate(all="ignore"):  # a huge hyper-parameter overflows, as the kernel does
            expected = getattr(R, name)(*ref_args)
    except Exception as e:  # the kernel accepted what the reference cannot compute
        pytest.fail(f"{where}: kernel returned, but the reference raises {type(e).__name__}: {e}")
    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(want), where
    for i, (g, e) in enumerate(zip(got, want)):
        if isinstance(e, float):
            assert isinstance(g, float) and abs(g - e) <= 1e-3 * (1 + abs(e)), f"{where}: output {i}"
            continue
        assert isinstance(g, np.ndarray) and g.dtype == np.float32, f"{where}: output {i} is {type(g)}"
        assert g.shape == e.shape, f"{where}: output {i} has shape {g.shape}, expected {e.shape}"
        if name in FLOAT32_TWINS:
            np.testing.assert_array_equal(g, e, err_msg=f"{where}: output {i}")
            continue
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(e).max(initial=0))),
                                   err_msg=f"{where}: output {i}")


def call(name, args):
    fn = getattr(_C, name, None)
    assert fn is not None, f"mbnet._C.{name} is not bound (it is listed in csrc/README.md)"
    threads = _C.get_num_threads()
    try:
        return fn(*args)
    finally:
        if name == "set_num_threads":
            _C.set_num_threads(threads)


def check_call(name, args, where):
    before = [copy.deepcopy(a) for a in args]
    try:
        result = call(name, args)
    except ALLOWED:
        return
    except Exception as e:
        pytest.fail(f"{where}: raised {type(e).__name__} (wanted TypeError or ValueError): {e}")
    check_result(name, before, result, where)


@pytest.mark.parametrize("name", sorted(BINDINGS))
@settings(max_examples=4)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_every_malformed_call_raises_or_is_right(name, data, seed):
    """All of all_mutations, on a few valid calls of different shapes."""
    rng = np.random.default_rng(seed)
    for what, make in all_mutations(BINDINGS[name](data.draw, rng)):
        check_call(name, make(), f"{name}, {what}")


@pytest.mark.parametrize("name", sorted(BINDINGS))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_valid_call_is_right(name, data, seed):
    """The unbroken calls the mutations start from: they must work, or the test above proves little."""
    rng = np.random.default_rng(seed)
    args = [v for _, v in BINDINGS[name](data.draw, rng)]
    before = [copy.deepcopy(a) for a in args]
    check_result(name, before, call(name, args), f"{name}, valid call")


@pytest.mark.parametrize("name", sorted(BINDINGS))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_two_broken_arguments_raise_or_are_right(name, data, seed):
    rng = np.random.default_rng(seed)
    valid = BINDINGS[name](data.draw, rng)
    mutations = all_mutations(valid)
    what1, make1 = data.draw(st.sampled_from(mutations))
    what2, make2 = data.draw(st.sampled_from(mutations))
    args1, args2 = make1(), make2()
    if len(args1) == len(args2) == len(valid):  # both broke one argument: break both
        args1 = [b if b is not v else a for a, b, (_, v) in zip(args1, args2, valid)]
    check_call(name, args1, f"{name}, {what1}; {what2}")


@pytest.mark.parametrize("name", ["conv2d_fwd", "dwconv2d_fwd"])
@pytest.mark.parametrize("padding", [10**6, 10**9])
def test_huge_padding_is_a_value_error(name, padding):
    """Outputs of terabytes to exabytes: a clean ValueError, not numpy's MemoryError while
    allocating them (nor, worse, an allocation that succeeds)."""
    x = np.ones((1, 4, 4, 2), np.float32)
    w = np.ones((3, 3, 2, 2) if name == "conv2d_fwd" else (3, 3, 2), np.float32)
    with pytest.raises(ValueError):
        call(name, [x, w, 1, padding])


def test_table_covers_every_binding():
    """BINDINGS lists every function of csrc/README.md's table and every public one of mbnet._C."""
    readme = (Path(__file__).resolve().parents[1] / "csrc" / "README.md").read_text()
    listed = set()
    for line in readme.splitlines():
        if line.startswith("|") and "`" in line:
            cells = line.split("|")
            if len(cells) > 2:
                listed |= set(re.findall(r"`([a-z_0-9]+)\(", cells[2]))
    assert listed, "found no bindings in csrc/README.md"
    public = {n for n in dir(_C) if not n.startswith("_")}
    assert listed - set(BINDINGS) == set(), "README bindings missing from BINDINGS"
    assert public - set(BINDINGS) == set(), "mbnet._C functions missing from BINDINGS"
    assert set(BINDINGS) - public == set(), "listed in csrc/README.md but not bound yet"


def run_child(code, address_space_gb=None, timeout=120):
    """Runs `code` in a fresh interpreter that imports this tree's mbnet (numpy as np and _C are
    imported), its address space capped at `address_space_gb` (except under ASan). Returns the
    CompletedProcess after asserting that the child exited 0 and was not killed by a signal."""
    cap = None if address_space_gb is None or UNDER_ASAN else address_space_gb << 30
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n" if cap else ""
    prelude = "import numpy as np\nfrom mbnet import _C\n"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", limit + prelude + textwrap.dedent(code)],
                          cwd=MBNET_HOME, capture_output=True, text=True, timeout=timeout)
    where = f"{proc.stdout[-500:]} {proc.stderr[-2000:]}"
    assert proc.returncode >= 0, f"child killed by signal {-proc.returncode}: {where}"
    assert proc.returncode == 0, f"child exit {proc.returncode}: {where}"
    return proc


@pytest.mark.skipif(UNDER_ASAN, reason="ASan reserves more address space than RLIMIT_AS allows")
def test_absurd_thread_count_does_not_kill_the_process():
    """set_num_threads(10**5) then a parallel kernel: libgomp exits the process when it cannot
    create the threads, so this runs in a child whose address space holds only a few hundred
    thread stacks."""
    proc = run_child("""
        try:
            _C.set_num_threads(10**5)
        except (TypeError, ValueError):
            raise SystemExit(0)
        x = np.ones((64, 32, 32, 16), np.float32)
        _C.act_fwd(x, "relu")
        _C.batchnorm_act_infer_fwd(x, *(np.ones(16, np.float32),) * 4, 1e-5, "relu")
        print("survived")
    """, address_space_gb=4)
    assert proc.returncode == 0


# --- issue 8, point 2: accepted arguments that aborted the process or allocated without bound ----
# Each runs in a child capped at 2 GiB of address space: the old kernels asked for 0.75 to 160 GiB
# of scratch inside an OpenMP region, where std::bad_alloc ends the process (rc 134).

@pytest.mark.parametrize("c, step", [(64, 2**26), (1, 2**30)])
def test_dwconv_huge_stride_and_padding_need_no_padded_rows(c, step):
    """x (1, 1, 1, c) with stride = padding = 2^26 (48 GiB of padded rows for c = 64) or 2^30 (12 GB
    for c = 1): a 2x2 output whose only nonzero pixel (1, 1) is x times the kernel's corner tap."""
    run_child(f"""
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 1, 1, {c})).astype(np.float32)
        w = rng.standard_normal((3, 3, {c})).astype(np.float32)
        y = _C.dwconv2d_fwd(x, w, {step}, {step})
        want = np.zeros((1, 2, 2, {c}), np.float32)
        want[0, 1, 1] = x[0, 0, 0] * w[0, 0]
        np.testing.assert_array_equal(y, want)
        dy = rng.standard_normal((1, 2, 2, {c})).astype(np.float32)
        dw = _C.dwconv2d_bwd_weight(x, dy, (3, 3), {step}, {step})
        want = np.zeros((3, 3, {c}), np.float32)
        want[0, 0] = x[0, 0, 0] * dy[0, 1, 1]
        np.testing.assert_array_equal(dw, want)
        dx = _C.dwconv2d_bwd_input(dy, w, (1, 1), {step}, {step})
        np.testing.assert_array_equal(dx, (dy[0, 1, 1] * w[0, 0])[None, None, None])
    """, address_space_gb=2)


def test_dwconv_bwd_input_wide_kernel_large_stride():
    """w (1, 46341, 1) with stride 10^5: one tap list of kh*kw entries per stride residue asked for
    46341^2 taps (32 GiB); each input pixel has one tap here, so dx = dy * w."""
    run_child("""
        w = np.arange(1, 46342, dtype=np.float32).reshape(1, 46341, 1)
        dx = _C.dwconv2d_bwd_input(np.full((1, 1, 1, 1), 2, np.float32), w, (1, 46341), 10**5, 0)
        np.testing.assert_array_equal(dx, 2 * w[None])
    """, address_space_gb=2)


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's operator new aborts instead of throwing std::bad_alloc")
def test_scratch_allocation_failure_is_a_memory_error():
    """A weight gradient whose partial sums (32 chunks of a 64 MB dw) do not fit a 1 GiB address
    space: MemoryError naming the output, and the process goes on."""
    proc = run_child("""
        x = np.ones((32, 1, 1, 1), np.float32)
        dy = np.ones((32, 2, 2, 1), np.float32)
        try:
            _C.dwconv2d_bwd_weight(x, dy, (4096, 4096), 1, 2048)
        except MemoryError as e:
            print("MemoryError:", e)
        print(_C.dwconv2d_fwd(np.ones((1, 3, 3, 2), np.float32), np.ones((3, 3, 2), np.float32), 1, 1).sum())
    """, address_space_gb=1)
    assert "MemoryError: dw" in proc.stdout, proc.stdout
    assert proc.stdout.split()[-1] == "98.0", proc.stdout  # (4*4 corner + 4*6 edge + 9) taps x 2 channels


@pytest.mark.parametrize("hw", [(2**15, 2**15), (2**20, 2**20), (2**30, 2**30)])
def test_global_avg_pool_bwd_shares_the_output_bound(hw):
    """dy (2, 3) at input_hw (2^15, 2^15) is 6 * 2^30 elements: over the 2^31 every binding shares
    (the old bound, 2^40, let it allocate 24 GiB)."""
    proc = run_child(f"""
        try:
            _C.global_avg_pool_bwd(np.ones((2, 3), np.float32), {hw})
        except ValueError as e:
            print(e)
    """, address_space_gb=2)
    assert "input_hw" in proc.stdout and "2^31" in proc.stdout, proc.stdout


@pytest.mark.parametrize("grad_scale", [1e39, -1e39, 1e300, float("inf"), float("nan")])
def test_loss_bwd_grad_scale_must_fit_float32(grad_scale):
    probs = np.full((2, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match="grad_scale"):
        _C.softmax_cross_entropy_bwd(probs, np.array([0, 2]), 0.0, grad_scale)
    got = _C.softmax_cross_entropy_bwd(probs, np.array([0, 2]), 0.0, 3e38)  # float32's max is fine
    assert np.isfinite(got).all()


@pytest.mark.parametrize("name, args, bad", [
    ("global_avg_pool_bwd", lambda v: [np.ones((1, 2), np.float32), (v, 2)], "input_hw"),
    ("dwconv2d_bwd_input", lambda v: [np.ones((1, 1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32),
                                      (1, v), 1, 0], "input_hw"),
    ("conv2d_bwd_weight", lambda v: [np.ones((1, 1, 1, 2), np.float32), np.ones((1, 1, 1, 3), np.float32),
                                     (v, 1), 1, 0], "kernel_hw"),
    ("dwconv2d_fwd", lambda v: [np.ones((1, 1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32), v, 0],
     "stride"),
    ("conv2d_fwd", lambda v: [np.ones((1, 1, 1, 2), np.float32), np.ones((1, 1, 2, 3), np.float32), 1, v],
     "padding"),
])
def test_bool_is_not_an_int(name, args, bad):
    """True was taken as 1 (and False as 0); numpy integers still are ints."""
    fn = getattr(_C, name)
    for v in (True, False):
        with pytest.raises(TypeError, match=bad):
            fn(*args(v))
    fn(*args(np.int64(1 if bad != "padding" else 0)))


def test_unpickled_float32_is_float32():
    """An array that came through pickle (multiprocessing, a worker process) has a float32 dtype that
    equals, but is not, numpy's own: it was refused with "must have dtype float32, got float32"."""
    import pickle
    x = pickle.loads(pickle.dumps(np.ones((2, 3), np.float32)))
    np.testing.assert_array_equal(_C.act_fwd(x, "relu"), x)
    with pytest.raises(TypeError, match="x must have dtype float32, got >f4"):
        _C.act_fwd(x.astype(">f4"), "relu")


def test_misaligned_arrays():
    """A float32 array 1 byte off alignment was read through float* (undefined behaviour, reported
    by UBSan under .ci/sanitize): now a ValueError naming it. Misaligned labels are copied."""
    x = unaligned(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="x must be aligned"):
        _C.act_fwd(x, "relu")
    buf = np.zeros(8 * 2 + 1, np.uint8)
    labels = buf[1:].view(np.int64)
    labels[:] = [2, 0]
    assert not labels.flags.aligned
    loss, probs = _C.softmax_cross_entropy_fwd(np.zeros((2, 3), np.float32), labels)
    assert loss == pytest.approx(np.log(3), rel=1e-6)
