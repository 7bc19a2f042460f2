"""mbnet.functional: finite-difference gradient checks of every op in float64 (the reference path),
float32 (kernels) against float64 for values and gradients, skipped input gradients, running
statistics, argument errors."""
import numpy as np
import pytest

from mbnet import Tensor, _C, no_grad
from mbnet import functional as F
from test_autograd import check_backward

ACTS = ["none", "relu", "relu6"]


def _conv_cases():
    # (n, h, w, ci, co, k, stride, padding): odd sizes, stride 2, padded and unpadded borders
    return [(2, 5, 5, 3, 4, 3, 1, 1), (1, 6, 7, 2, 3, 3, 2, 1), (2, 5, 4, 3, 2, 3, 1, 0), (1, 4, 4, 1, 1, 1, 1, 0)]


@pytest.mark.parametrize("n,h,w,ci,co,k,s,p", _conv_cases())
def test_conv2d_gradients(n, h, w, ci, co, k, s, p, rng):
    check_backward(lambda x, wt: F.conv2d(x, wt, s, p),
                   [rng.standard_normal((n, h, w, ci)), rng.standard_normal((k, k, ci, co))],
                   f"conv2d(s={s}, p={p})", rng, ["x", "w"])


@pytest.mark.parametrize("n,h,w,c,s,p", [(2, 5, 5, 3, 1, 1), (1, 6, 7, 4, 2, 1), (2, 5, 6, 1, 2, 0)])
def test_depthwise_conv2d_gradients(n, h, w, c, s, p, rng):
    check_backward(lambda x, wt: F.depthwise_conv2d(x, wt, s, p),
                   [rng.standard_normal((n, h, w, c)), rng.standard_normal((3, 3, c))],
                   f"depthwise_conv2d(s={s}, p={p})", rng, ["x", "w"])


def test_pointwise_conv2d_gradients(rng):
    check_backward(F.pointwise_conv2d, [rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((4, 6))],
                   "pointwise_conv2d", rng, ["x", "w"])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradients(act, training, rng):
    c = 5
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    def bn(x, gamma, beta):
        # fresh copies: training mode updates the running statistics in place
        return F.batch_norm(x, gamma, beta, mean.copy(), var.copy(), training, act=act)

    x = rng.standard_normal((3, 4, 3, c)) * 2 + 1
    check_backward(bn, [x, rng.uniform(0.5, 1.5, c), rng.standard_normal(c) * 0.5],
                   f"batch_norm(training={training}, act={act})", rng, ["x", "gamma", "beta"])


def _conv_bn(conv, act, mean, var):
    """(x, w, gamma, beta) -> batch_norm(conv(x, w)) in training, with the statistics from conv's
    kernel (stats=True), as mbnet.nn runs a convolution and its BatchNorm2d under F.FUSE."""
    def fn(x, w, gamma, beta):
        y, stats = conv(x, w, stats=True)
        assert stats[0].shape == stats[1].shape == y.shape[-1:] and stats[0].dtype == y.dtype
        return F.batch_norm(y, gamma, beta, mean.astype(x.dtype), var.astype(x.dtype), True, act=act, stats=stats)
    return fn


CONV_BN = [("conv2d", lambda x, w, stats: F.conv2d(x, w, 2, 1, stats=stats), (3, 3, 3, 5)),
           ("depthwise_conv2d", lambda x, w, stats: F.depthwise_conv2d(x, w, 1, 1, stats=stats), (3, 3, 3)),
           ("pointwise_conv2d", F.pointwise_conv2d, (3, 5))]


@pytest.mark.parametrize("name, conv, wshape", CONV_BN, ids=[c[0] for c in CONV_BN])
def test_conv_batch_norm_with_kernel_statistics_gradients(name, conv, wshape, rng):
    c = wshape[-1]
    fn = _conv_bn(conv, "relu", rng.standard_normal(c), rng.uniform(0.5, 2.0, c))
    check_backward(fn, [rng.standard_normal((3, 5, 4, 3)) + 1, rng.standard_normal(wshape), rng.uniform(0.5, 1.5, c),
                        rng.standard_normal(c) * 0.5], f"batch_norm({name}(stats=True))", rng,
                   ["x", "w", "gamma", "beta"])


def _dw_bn_pw(act, mean, var):
    """(x, w_dw, gamma, beta, w_pw) -> batch_norm_pointwise_conv2d(depthwise_conv2d(x, w_dw)):
    MobileNet's separable block under F.FUSE, up to its second BatchNorm."""
    def fn(x, w_dw, gamma, beta, w_pw):
        y, stats = F.depthwise_conv2d(x, w_dw, 1, 1, stats=True)
        return F.batch_norm_pointwise_conv2d(y, gamma, beta, mean.astype(x.dtype), var.astype(x.dtype), w_pw,
                                             stats, act=act)
    return fn


def _pw_bn_dw(act, mean, var, stride):
    """(x, w_pw, gamma, beta, w_dw) -> batch_norm_depthwise_conv2d(pointwise_conv2d(x, w_pw)):
    two separable blocks' boundary under F.FUSE (the first's second BatchNorm, the next one's
    depthwise convolution)."""
    def fn(x, w_pw, gamma, beta, w_dw):
        y, stats = F.pointwise_conv2d(x, w_pw, stats=True)
        return F.batch_norm_depthwise_conv2d(y, gamma, beta, mean.astype(x.dtype), var.astype(x.dtype), w_dw,
                                             stats, stride, 1, act=act)
    return fn


@pytest.mark.parametrize("act", ACTS)
def test_batch_norm_pointwise_conv2d_gradients(act, rng):
    fn = _dw_bn_pw(act, rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))
    check_backward(fn, [rng.standard_normal((3, 5, 4, 3)) + 1, rng.standard_normal((3, 3, 3)),
                        rng.uniform(0.5, 1.5, 3), rng.standard_normal(3) * 0.5, rng.standard_normal((3, 4))],
                   f"batch_norm_pointwise_conv2d(act={act})", rng, ["x", "w_dw", "gamma", "beta", "w_pw"])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("act", ACTS)
def test_batch_norm_depthwise_conv2d_gradients(act, stride, rng):
    fn = _pw_bn_dw(act, rng.standard_normal(4), rng.uniform(0.5, 2.0, 4), stride)
    check_backward(fn, [rng.standard_normal((3, 5, 4, 3)) + 1, rng.standard_normal((3, 4)),
                        rng.uniform(0.5, 1.5, 4), rng.standard_normal(4) * 0.5, rng.standard_normal((3, 3, 4))],
                   f"batch_norm_depthwise_conv2d(act={act}, stride={stride})", rng,
                   ["x", "w_pw", "gamma", "beta", "w_dw"])


# (fused op, its kernel, the unfused convolution, w's shape, geometry): the fused op's own
# arguments after x_stats, and w (5, 6) or (3, 3, 5); a 5x5 depthwise w runs the two ops.
BN_CONVS = {
    "pw": (F.batch_norm_pointwise_conv2d, "pwconv2d_bn_act_fwd_stats", F.pointwise_conv2d, (5, 6), ()),
    "dw": (F.batch_norm_depthwise_conv2d, "dwconv2d_bn_act_fwd_stats", F.depthwise_conv2d, (3, 3, 5), (2, 1)),
    "dw5x5": (F.batch_norm_depthwise_conv2d, None, F.depthwise_conv2d, (5, 5, 5), (1, 2)),
}


@pytest.mark.parametrize("sync", [False, True], ids=["local", "allreduce"])
@pytest.mark.parametrize("conv", list(BN_CONVS))
def test_batch_norm_conv2d_is_the_two_ops(conv, sync, rng):
    """Output, its statistics and the running statistics are those of batch_norm then the
    convolution (float64: to rounding); with set_batch_norm_allreduce, or a w its kernels do not
    take, it runs exactly those."""
    fused_op, kernel, conv_op, w_shape, geometry = BN_CONVS[conv]
    x = Tensor(rng.standard_normal((2, 4, 3, 5)) * 2 + 1)
    gamma, beta, w = Tensor(rng.uniform(0.5, 1.5, 5)), Tensor(rng.standard_normal(5)), Tensor(rng.standard_normal(w_shape))
    x_stats = (x.data.mean((0, 1, 2)), x.data.var((0, 1, 2)))
    buffers = [[np.zeros(5), np.ones(5)] for _ in range(2)]
    F.set_batch_norm_allreduce((lambda a: a) if sync else None)
    try:
        with F.profile() as calls:
            y, y_stats = fused_op(x, gamma, beta, *buffers[0], w, x_stats, *geometry, momentum=0.2, eps=1e-3,
                                  act="relu6", stats=True)
        z = F.batch_norm(x, gamma, beta, *buffers[1], True, 0.2, 1e-3, "relu6", stats=x_stats)
        want, want_stats = conv_op(z, w, *geometry, stats=True)
    finally:
        F.set_batch_norm_allreduce(None)
    assert (kernel in calls) == (kernel is not None and not sync), dict(calls)
    np.testing.assert_allclose(y.data, want.data, rtol=1e-12, atol=1e-12)
    for got, exp in zip([*y_stats, *buffers[0]], [*want_stats, *buffers[1]]):
        np.testing.assert_allclose(got, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [F.relu, F.relu6], ids=["relu", "relu6"])
def test_activation_gradients(fn, rng):
    x = rng.uniform(-3, 9, (3, 7))
    x[np.abs(x) < 0.01] = 0.5  # away from the kinks
    x[np.abs(x - 6) < 0.01] = 5.0
    check_backward(fn, [x], fn.__name__, rng)
    np.testing.assert_array_equal(F.relu6(Tensor(np.array([-1.0, 3.0, 7.0]))).data, [0.0, 3.0, 6.0])


def test_global_avg_pool_gradient(rng):
    check_backward(F.global_avg_pool, [rng.standard_normal((2, 3, 5, 4))], "global_avg_pool", rng)


def test_linear_gradients(rng):
    check_backward(F.linear, [rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)],
                   "linear", rng, ["x", "w", "b"])
    check_backward(lambda x, w: F.linear(x, w), [rng.standard_normal((3, 5)), rng.standard_normal((5, 4))],
                   "linear without bias", rng, ["x", "w"])


def test_dropout_gradient_and_semantics(rng):
    check_backward(lambda x: F.dropout(x, 0.3, True, np.random.default_rng(7)), [rng.standard_normal((4, 6))],
                   "dropout", rng)
    x = Tensor(np.ones((200, 50), np.float32))
    y = F.dropout(x, 0.25, True, np.random.default_rng(1)).data
    kept = y != 0
    assert y.dtype == np.float32 and abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    assert F.dropout(x, 0.25, False, np.random.default_rng(1)) is x
    a = F.dropout(x, 0.5, True, np.random.default_rng(3)).data
    b = F.dropout(x, 0.5, True, np.random.default_rng(3)).data
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="p must be"):
        F.dropout(x, 1.0, True, rng)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient_and_value(smoothing, rng):
    labels = np.array([0, 3, 1, 3])
    logits = rng.standard_normal((4, 5)) * 3
    check_backward(lambda z: F.cross_entropy(z, labels, smoothing), [logits], f"cross_entropy({smoothing})", rng)
    loss = F.cross_entropy(Tensor(logits), labels, smoothing)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.full((4, 5), smoothing / 5)
    target[np.arange(4), labels] += 1 - smoothing
    assert loss.shape == () and abs(loss.item() - (-(target * logp).sum() / 4)) < 1e-12


def test_cross_entropy_rejects_bad_labels():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        F.cross_entropy(logits, np.array([0, 1, 2]))


def test_mixed_dtypes_are_rejected_naming_the_argument():
    with pytest.raises(TypeError, match="w is float32"):
        F.conv2d(Tensor(np.zeros((1, 3, 3, 1))), Tensor(np.zeros((3, 3, 1, 1), np.float32)))
    with pytest.raises(TypeError, match="running_var"):
        F.batch_norm(Tensor(np.zeros((1, 2))), Tensor(np.ones(2)), Tensor(np.zeros(2)), np.zeros(2),
                     np.ones(2, np.float32), True)


# --- what backward computes and keeps -----------------------------------------------------------

def test_input_gradient_is_skipped_when_the_input_needs_none(rng):
    x = Tensor(rng.standard_normal((2, 5, 5, 3)))  # an image: never needs a gradient
    w = Tensor(rng.standard_normal((3, 3, 3, 4)), requires_grad=True)
    y = F.conv2d(x, w, 1, 1)
    assert y.creator.w is None  # the weight is not kept for an input gradient nobody needs
    with F.profile() as calls:
        y.sum().backward()
    assert set(calls) == {"conv2d_bwd_weight"}
    assert x.grad is None and w.grad is not None

    x = Tensor(rng.standard_normal((2, 5, 5, 3)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 3)))  # a frozen pointwise weight
    y = F.pointwise_conv2d(x, w)
    with F.profile() as calls:
        y.sum().backward()
    assert set(calls) == {"pwconv2d_bwd_input"} and w.grad is None


def test_batch_norm_running_statistics(rng):
    x = rng.standard_normal((4, 3, 3, 2)) * 3 + 5
    gamma, beta = Tensor(np.ones(2), requires_grad=True), Tensor(np.zeros(2), requires_grad=True)
    mean, var = np.zeros(2), np.ones(2)
    rm, rv = mean, var
    with no_grad():  # statistics update in training mode even without a graph
        F.batch_norm(Tensor(x), gamma, beta, mean, var, training=True, momentum=0.1)
    assert mean is rm and var is rv  # updated in place
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(mean, 0.1 * flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-12)
    before = mean.copy(), var.copy()
    y = F.batch_norm(Tensor(x), gamma, beta, mean, var, training=False, eps=1e-5, act="relu")
    np.testing.assert_array_equal(mean, before[0])
    np.testing.assert_allclose(y.data, np.maximum((x - mean) / np.sqrt(var + 1e-5), 0), rtol=1e-12)


# --- float32 kernels against the float64 reference path ------------------------------------------

def _kernel_cases(rng):
    """(name, fn, float64 inputs, which inputs need gradients)"""
    c = 17  # not a multiple of the vector width
    mean, var = rng.standard_normal(c) * 0.1, rng.uniform(0.5, 1.5, c)
    labels = np.array([1, 0, 4, 2, 3])
    return [
        ("conv2d s2", lambda x, w: F.conv2d(x, w, 2, 1), [rng.standard_normal((2, 9, 7, 3)),
                                                            rng.standard_normal((3, 3, 3, c))]),
        ("depthwise_conv2d", lambda x, w: F.depthwise_conv2d(x, w, 1, 1), [rng.standard_normal((2, 7, 6, c)),
                                                                          rng.standard_normal((3, 3, c))]),
        ("depthwise_conv2d s2", lambda x, w: F.depthwise_conv2d(x, w, 2, 1), [rng.standard_normal((1, 9, 8, c)),
                                                                             rng.standard_normal((3, 3, c))]),
        ("pointwise_conv2d", F.pointwise_conv2d, [rng.standard_normal((2, 3, 5, c)), rng.standard_normal((c, 9))]),
        *[(f"batch_norm train {act}",
           lambda x, g, b, act=act: F.batch_norm(x, g, b, mean.astype(x.dtype), var.astype(x.dtype), True, act=act),
           [rng.standard_normal((3, 4, 5, c)) * 2 + 1, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)])
          for act in ACTS],
        *[(f"batch_norm eval {act}",
           lambda x, g, b, act=act: F.batch_norm(x, g, b, mean.astype(x.dtype), var.astype(x.dtype), False, act=act),
           [rng.standard_normal((3, 4, 5, c)) * 2, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)])
          for act in ACTS],
        *[(f"batch_norm({name}(stats=True))", _conv_bn(conv, "relu6", mean[:w[-1]], var[:w[-1]]),
           [rng.standard_normal((3, 6, 5, 3)) + 1, rng.standard_normal(w), rng.uniform(0.5, 1.5, w[-1]),
            rng.standard_normal(w[-1])])
          for name, conv, w in CONV_BN],
        *[(f"batch_norm_pointwise_conv2d {act}", _dw_bn_pw(act, mean, var),
           [rng.standard_normal((3, 6, 5, c)) + 1, rng.standard_normal((3, 3, c)), rng.uniform(0.5, 1.5, c),
            rng.standard_normal(c), rng.standard_normal((c, 9))])
          for act in ACTS],
        *[(f"batch_norm_depthwise_conv2d {act} s{stride}", _pw_bn_dw(act, mean, var, stride),
           [rng.standard_normal((3, 6, 5, 9)) + 1, rng.standard_normal((9, c)), rng.uniform(0.5, 1.5, c),
            rng.standard_normal(c), rng.standard_normal((3, 3, c))])
          for act in ACTS for stride in (1, 2)],
        ("relu6", F.relu6, [rng.uniform(-2, 8, (3, c))]),
        ("global_avg_pool", F.global_avg_pool, [rng.standard_normal((2, 3, 5, c))]),
        ("linear", F.linear, [rng.standard_normal((5, c)), rng.standard_normal((c, 6)), rng.standard_normal(6)]),
        ("cross_entropy", lambda z: F.cross_entropy(z, labels, 0.1), [rng.standard_normal((5, 6)) * 3]),
    ]


@pytest.mark.parametrize("case", range(len(_kernel_cases(np.random.default_rng(0)))))
def test_float32_kernels_match_float64_reference(case):
    name, fn, inputs = _kernel_cases(np.random.default_rng(case))[case]
    results = {}
    for dtype in (np.float64, np.float32):
        xs = [Tensor(a.astype(dtype), requires_grad=True) for a in inputs]
        y = fn(*xs)
        gy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        y.backward(gy)
        results[dtype] = [y.data] + [x.grad for x in xs]
    for i, (got, want) in enumerate(zip(results[np.float32], results[np.float64])):
        what = "output" if i == 0 else f"gradient of argument {i - 1}"
        assert got.dtype == np.float32, f"{name}: {what} is {got.dtype}"
        scale = np.abs(want).max() + 1e-30
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name}: {what}")


def test_kernels_are_what_float32_runs():
    assert hasattr(_C, "dwconv2d_fwd")
    x = Tensor(np.ones((1, 3, 3, 2), np.float32))
    with F.profile() as calls:
        F.depthwise_conv2d(x, Tensor(np.ones((3, 3, 2), np.float32)))
    assert calls["dwconv2d_fwd"][0] == 1
