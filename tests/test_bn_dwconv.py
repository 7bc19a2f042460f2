"""Depthwise convolution of a training BatchNorm's output formed as the kernel loads its input
rows (dwconv2d_bn_act_fwd, dwconv2d_bn_act_fwd_stats, dwconv2d_bn_act_bwd_weight), its input
gradient through that BatchNorm (dwconv2d_bwd_input_bn, any kernel size and stride), and both
gradients in one pass (dwconv2d_bn_act_bwd), against
mbnet.reference, against the unfused kernels, and at 1 vs 2 threads.

Shapes: x (n, h, w, c) (the BatchNorm's input), w (3, 3, c), gamma/beta/mean/invstd (c,),
z = act((x - mean) * invstd * gamma + beta) (n, h, w, c), y = dwconv(z, w) (n, ho, wo, c), dy like
y, dw (3, 3, c). Against the unfused kernels (batchnorm_act_train_fwd_from_stats's z, then
dwconv2d_*): z is formed by the same float operations, so the weight gradient (which reads z's
zero-padded rows in both) is bitwise the same; the forward reads every row zero-padded where the
unfused one sums a border pixel's in-bounds taps only, and GCC may contract a different pair of
those products into an FMA: y, mean and var agree within a few ulp (UNFUSED_TOL). Against the
float64 reference within float32 tolerances (tests/test_dwconv.py's); 1 vs 2 threads bitwise.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as R
from test_bn_pwconv import ACTS, check_bwd_input_bn, f64, threads, unfused_z  # noqa: F401 (threads: a fixture)


def problem(n, h, w, c, stride, padding, seed):
    """x, w, dy and the BatchNorm arguments (gamma, beta, mean, var) of x's batch statistics."""
    rng = np.random.default_rng(seed)
    x = (0.5 + rng.standard_normal((n, h, w, c))).astype(np.float32)
    wt = rng.standard_normal((3, 3, c)).astype(np.float32)
    ho, wo = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
    dy = rng.standard_normal((n, ho, wo, c)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = (0.3 * rng.standard_normal(c)).astype(np.float32)
    _, mean, var = R._with_stats(x.astype(np.float64))
    return x, wt, dy, gamma, beta, mean.astype(np.float32), var.astype(np.float32)


UNFUSED_TOL = dict(rtol=1e-5, atol=1e-6)


def assert_like_unfused(got, want, where):
    """(y, mean, var, dw) of the fused kernels against the unfused ones (module docstring)."""
    for one, other, what in zip(got[:3], want[:3], ("y", "mean", "var")):
        np.testing.assert_allclose(one, other, **UNFUSED_TOL, err_msg=f"{what} vs unfused, {where}")
    np.testing.assert_array_equal(got[3], want[3], err_msg=f"dw vs unfused, {where}")


def fused(x, wt, dy, bn, geometry):
    stride, padding = geometry
    y = _C.dwconv2d_bn_act_fwd(x, wt, *bn, stride, padding)
    ys, mean, var = _C.dwconv2d_bn_act_fwd_stats(x, wt, *bn, stride, padding)
    np.testing.assert_array_equal(y, ys, err_msg="fwd vs fwd_stats")
    return y, mean, var, _C.dwconv2d_bn_act_bwd_weight(x, dy, *bn, (3, 3), stride, padding)


def unfused(z, wt, dy, geometry):
    return (*_C.dwconv2d_fwd_stats(z, wt, *geometry), _C.dwconv2d_bwd_weight(z, dy, (3, 3), *geometry))


@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from([1, 3, 8, 17, 33]),
       stride=st.integers(1, 3), padding=st.integers(0, 2), act=st.sampled_from(ACTS), seed=st.integers(0, 2**16))
def test_matches_reference_and_the_unfused_kernels(n, h, w, c, stride, padding, act, seed):
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        return  # no output (the kernels' shape errors are tests/test_dwconv.py's)
    x, wt, dy, gamma, beta, mean, var = problem(n, h, w, c, stride, padding, seed)
    z, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn, geometry = (gamma, beta, mean, invstd, act), (stride, padding)
    got = fused(x, wt, dy, bn, geometry)
    assert_like_unfused(got, unfused(z, wt, dy, geometry), f"x={x.shape} s={stride} p={padding} {act}")
    bn64 = (*f64(gamma, beta, mean, invstd), act)
    y64, mean64, var64 = R.dwconv2d_bn_act_fwd_stats(*f64(x, wt), *bn64, *geometry)
    dw64 = R.dwconv2d_bn_act_bwd_weight(*f64(x, dy), *bn64, (3, 3), *geometry)
    y, ymean, yvar, dw = got
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ymean, mean64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(yvar, var64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw64, **dw_tol(dy, c))


def dw_tol(dy, c):
    """Tolerance of a float32 weight gradient (sums of dy.size / c products) against another
    summation order."""
    return dict(rtol=1e-4, atol=1e-5 * np.sqrt(dy.size / c) + 1e-6)


@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from([1, 3, 8, 17, 33]),
       stride=st.integers(1, 3), padding=st.integers(0, 2), act=st.sampled_from(ACTS), seed=st.integers(0, 2**16))
def test_one_pass_backward_matches_the_two_kernels_and_reference(n, h, w, c, stride, padding, act, seed):
    """dwconv2d_bn_act_bwd: dwconv2d_bwd_input_bn's (dx, dgamma, dbeta) bitwise (the same rows, the
    same blocks of sums) and dwconv2d_bn_act_bwd_weight's dw within rounding (partial sums cut per
    block of input rows instead of 32 chunks of output rows), both against the float64 reference."""
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        return
    x, wt, dy, gamma, beta, mean, var = problem(n, h, w, c, stride, padding, seed)
    _, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn, geometry = (gamma, beta, mean, invstd, act), (stride, padding)
    where = f"x={x.shape} s={stride} p={padding} {act}"
    dx, dgamma, dbeta, dw = _C.dwconv2d_bn_act_bwd(dy, wt, x, *bn, *geometry)
    for got, want, what in zip((dx, dgamma, dbeta), _C.dwconv2d_bwd_input_bn(dy, wt, x, *bn, *geometry),
                               ("dx", "dgamma", "dbeta")):
        np.testing.assert_array_equal(got, want, err_msg=f"{what} vs dwconv2d_bwd_input_bn, {where}")
    assert dw.shape == wt.shape and dw.dtype == np.float32
    np.testing.assert_allclose(dw, _C.dwconv2d_bn_act_bwd_weight(x, dy, *bn, (3, 3), *geometry), **dw_tol(dy, c),
                               err_msg=f"dw vs dwconv2d_bn_act_bwd_weight, {where}")
    dw64 = R.dwconv2d_bn_act_bwd(*f64(dy, wt, x), *f64(gamma, beta, mean, invstd), act, *geometry)[3]
    np.testing.assert_allclose(dw, dw64, **dw_tol(dy, c), err_msg=f"dw vs reference, {where}")


# (n, h, w, c, stride): MobileNet's 32x32 and 16x16 maps at α = 0.25 (8 channels) and 1, a
# remainder channel count, more rows than the weight gradient's 32 chunks.
BIG = [(4, 32, 32, 8, 1), (2, 16, 16, 128, 2), (3, 13, 11, 37, 1), (16, 4, 4, 512, 1), (5, 9, 9, 24, 3)]


@pytest.mark.parametrize("case", BIG, ids=lambda c: "-".join(map(str, c)))
def test_threads_agree_bitwise(case, threads):
    *shape, stride = case
    x, wt, dy, gamma, beta, mean, var = problem(*shape, stride, 1, seed=5)
    z, mean, invstd = unfused_z(x, gamma, beta, mean, var, "relu")
    bn = (gamma, beta, mean, invstd, "relu")
    results = []
    for t in (1, 2):
        threads(t)
        results.append((*fused(x, wt, dy, bn, (stride, 1)), *_C.dwconv2d_bwd_input_bn(dy, wt, x, *bn, stride, 1),
                        *_C.dwconv2d_bn_act_bwd(dy, wt, x, *bn, stride, 1)))
    for one, two, what in zip(*results, ("y", "mean", "var", "dw", "dx", "dgamma", "dbeta",
                                         "one-pass dx", "one-pass dgamma", "one-pass dbeta", "one-pass dw")):
        np.testing.assert_array_equal(one, two, err_msg=f"{what} at 1 vs 2 threads, {case}")
    assert_like_unfused(results[0][:4], unfused(z, wt, dy, (stride, 1)), str(case))
    gz = _C.dwconv2d_bwd_input(dy, wt, x.shape[1:3], stride, 1)
    reference = R.dwconv2d_bwd_input_bn(*f64(dy, wt, x), *f64(*bn[:4]), "relu", stride, 1)
    check_bwd_input_bn(results[1][4:], _C.batchnorm_act_train_bwd(gz, x, *bn), reference, gz, bn[0], bn[3], str(case))


def test_other_kernels_and_strides_are_refused_by_name():
    x, wt, dy, gamma, beta, mean, var = problem(1, 8, 8, 4, 4, 1, seed=6)
    bn = (gamma, beta, mean, 1 / np.sqrt(var + 1e-5), "relu")
    with pytest.raises(ValueError, match=r"3x3 w and stride <= 3, got w \(5, 5, 4\)"):
        _C.dwconv2d_bn_act_fwd(x, np.ones((5, 5, 4), np.float32), *bn, 1, 2)
    with pytest.raises(ValueError, match="stride 4"):
        _C.dwconv2d_bn_act_fwd_stats(x, wt, *bn, 4, 1)
    with pytest.raises(ValueError, match=r"kernel_hw \(3, 3\) and stride <= 3, got \(3, 3\) and stride 4"):
        _C.dwconv2d_bn_act_bwd_weight(x, dy, *bn, (3, 3), 4, 1)
    with pytest.raises(ValueError, match=r"3x3 w and stride <= 3, got w \(3, 3, 4\) and stride 4"):
        _C.dwconv2d_bn_act_bwd(dy, wt, x, *bn, 4, 1)
    with pytest.raises(ValueError, match=r"dy \(1, 2, 2, 4\) does not match the output size \(8, 8\)"):
        _C.dwconv2d_bn_act_bwd(dy, wt, x, *bn, 1, 1)
    with pytest.raises(ValueError, match="gamma"):
        _C.dwconv2d_bn_act_fwd(x, wt, gamma[:3], *bn[1:], 1, 1)


def test_nan_statistics_propagate():
    """A diverged network's NaN invstd: NaN in that channel of y and dw only (as the unfused
    kernels give); no crash."""
    x, wt, dy, gamma, beta, mean, var = problem(2, 5, 5, 6, 1, 1, seed=4)
    invstd = np.ones(6, np.float32)
    invstd[2] = np.nan
    y = _C.dwconv2d_bn_act_fwd(x, wt, gamma, beta, mean, invstd, "none", 1, 1)
    dw = _C.dwconv2d_bn_act_bwd_weight(x, dy, gamma, beta, mean, invstd, "none", (3, 3), 1, 1)
    for a in (y, dw):
        assert np.isnan(a[..., 2]).all() and np.isfinite(np.delete(a, 2, axis=-1)).all()


@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from([1, 3, 8, 17, 33]),
       k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), padding=st.integers(0, 2), act=st.sampled_from(ACTS),
       seed=st.integers(0, 2**16))
def test_bwd_input_bn_matches_the_unfused_kernels_and_reference(n, h, w, c, k, stride, padding, act, seed):
    if h + 2 * padding < k or w + 2 * padding < k:
        return
    x, _, _, gamma, beta, mean, var = problem(n, h, w, c, 1, 2, seed)  # (its 3x3 w and dy unused)
    rng = np.random.default_rng(seed + 1)
    wt = rng.standard_normal((k, k, c)).astype(np.float32)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    dy = rng.standard_normal((n, ho, wo, c)).astype(np.float32)
    _, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn, geometry = (gamma, beta, mean, invstd, act), (stride, padding)
    fused = _C.dwconv2d_bwd_input_bn(dy, wt, x, *bn, *geometry)
    gz = _C.dwconv2d_bwd_input(dy, wt, (h, w), *geometry)
    unfused = _C.batchnorm_act_train_bwd(gz, x, *bn)
    reference = R.dwconv2d_bwd_input_bn(*f64(dy, wt, x), *f64(gamma, beta, mean, invstd), act, *geometry)
    check_bwd_input_bn(fused, unfused, reference, gz, gamma, invstd, f"x={x.shape} k={k} s={stride} p={padding} {act}")
