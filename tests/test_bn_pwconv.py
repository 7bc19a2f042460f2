"""Pointwise convolution of a training BatchNorm's output formed as the GEMM packs its input
(pwconv2d_bn_act_fwd, pwconv2d_bn_act_fwd_stats, pwconv2d_bn_act_bwd_weight), and its input
gradient through that BatchNorm (pwconv2d_bwd_input_bn), against mbnet.reference, against the
unfused kernels, and at 1 vs 2 threads.

Shapes: x (n, h, w, ci) (the BatchNorm's input), w (ci, co), gamma/beta/mean/invstd (ci,),
z = act((x - mean) * invstd * gamma + beta) (n, h, w, ci), y = z @ w (n, h, w, co), dy like y,
dw = z.T @ dy (ci, co). Tolerances as tests/test_gemm.py (float32 sums of k unit terms); against
the unfused kernels (batchnorm_act_train_fwd_from_stats's z, then pwconv2d_*) bitwise: z is formed
by the same float operations and every element summed in the same order. pwconv2d_bwd_input_bn
against pwconv2d_bwd_input + batchnorm_act_train_bwd within a few float32 ulp (BN_BWD_TOL): its two
per-channel sums (in double) take the rows in other groups.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as R

ACTS = ["none", "relu", "relu6"]


@pytest.fixture
def threads():
    before = _C.get_num_threads()
    yield _C.set_num_threads
    _C.set_num_threads(before)


def problem(n, h, w, ci, co, seed):
    """x, w, dy and the BatchNorm arguments (gamma, beta, mean, invstd) of x's batch statistics,
    with the z of batchnorm_act_train_fwd_from_stats for each act."""
    rng = np.random.default_rng(seed)
    x = (0.5 + rng.standard_normal((n, h, w, ci))).astype(np.float32)
    wt = rng.standard_normal((ci, co)).astype(np.float32)
    dy = rng.standard_normal((n, h, w, co)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, ci).astype(np.float32)
    beta = (0.3 * rng.standard_normal(ci)).astype(np.float32)
    _, mean, var = R._with_stats(x.astype(np.float64))
    return x, wt, dy, gamma, beta, mean.astype(np.float32), var.astype(np.float32)


def unfused_z(x, gamma, beta, mean, var, act):
    """(z, mean, invstd) of the unfused BatchNorm kernel."""
    c = x.shape[-1]
    return _C.batchnorm_act_train_fwd_from_stats(x, mean, var, gamma, beta, np.zeros(c, np.float32),
                                                 np.ones(c, np.float32), 0.1, 1e-5, act)


def f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


@given(n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), ci=st.sampled_from([1, 3, 8, 17, 33]),
       co=st.sampled_from([1, 3, 17, 40]), act=st.sampled_from(ACTS), seed=st.integers(0, 2**16))
def test_matches_reference_and_the_unfused_kernels(n, h, w, ci, co, act, seed):
    x, wt, dy, gamma, beta, mean, var = problem(n, h, w, ci, co, seed)
    z, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn = (gamma, beta, mean, invstd, act)
    where = f"x={x.shape} co={co} act={act}"
    y = _C.pwconv2d_bn_act_fwd(x, wt, *bn)
    ys, ymean, yvar = _C.pwconv2d_bn_act_fwd_stats(x, wt, *bn)
    dw = _C.pwconv2d_bn_act_bwd_weight(x, dy, *bn)
    np.testing.assert_array_equal(y, ys, err_msg="fwd vs fwd_stats, " + where)
    np.testing.assert_array_equal(y, _C.pwconv2d_fwd(z, wt), err_msg="fwd vs unfused, " + where)
    np.testing.assert_array_equal(dw, _C.pwconv2d_bwd_weight(z, dy), err_msg="bwd_weight vs unfused, " + where)
    _, want_mean, want_var = _C.pwconv2d_fwd_stats(z, wt)
    np.testing.assert_array_equal(ymean, want_mean, err_msg="mean vs unfused, " + where)
    np.testing.assert_array_equal(yvar, want_var, err_msg="var vs unfused, " + where)
    bn64 = (*f64(gamma, beta, mean, invstd), act)
    rows = n * h * w
    np.testing.assert_allclose(y, R.pwconv2d_bn_act_fwd(*f64(x, wt), *bn64), rtol=1e-4,
                               atol=1e-5 * np.sqrt(ci) + 1e-6, err_msg="fwd vs reference, " + where)
    _, mean64, var64 = R.pwconv2d_bn_act_fwd_stats(*f64(x, wt), *bn64)
    np.testing.assert_allclose(ymean, mean64, rtol=1e-4, atol=1e-5 * np.sqrt(ci) + 1e-6, err_msg=where)
    np.testing.assert_allclose(yvar, var64, rtol=1e-4, atol=1e-5 * ci + 1e-6, err_msg=where)
    np.testing.assert_allclose(dw, R.pwconv2d_bn_act_bwd_weight(*f64(x, dy), *bn64), rtol=1e-4,
                               atol=1e-5 * np.sqrt(rows) + 1e-6, err_msg="bwd_weight vs reference, " + where)


# (n, h, w, ci, co): tall dw (threads split its rows), wide y and dw (columns), more than one
# KC = 256 block of ci and of rows, a short last MR panel, MobileNet's 13th block at batch 8, and
# dw over 9216 rows (two fixed chunks of the rows, their partial sums added in order).
BIG = [(4, 16, 17, 24, 40), (2, 2, 3, 64, 2100), (16, 4, 4, 300, 37), (8, 2, 2, 1024, 1024), (3, 5, 7, 517, 70),
       (4, 48, 48, 32, 64)]


@pytest.mark.parametrize("case", BIG, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_threads_agree_bitwise(case, act, threads):
    x, wt, dy, gamma, beta, mean, var = problem(*case, seed=3)
    z, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn = (gamma, beta, mean, invstd, act)
    results = []
    for t in (1, 2):
        threads(t)
        results.append((*_C.pwconv2d_bn_act_fwd_stats(x, wt, *bn), _C.pwconv2d_bn_act_bwd_weight(x, dy, *bn),
                        *_C.pwconv2d_bwd_input_bn(dy, wt, x, *bn)))
        if t == 1:
            unfused = (_C.pwconv2d_fwd(z, wt), _C.pwconv2d_bwd_weight(z, dy))
    for one, two, what in zip(*results, ("y", "mean", "var", "dw", "dx", "dgamma", "dbeta")):
        np.testing.assert_array_equal(one, two, err_msg=f"{what} at 1 vs 2 threads, {case}")
    y, _, _, dw = results[1][:4]
    np.testing.assert_array_equal(y, unfused[0], err_msg=f"y vs unfused, {case}")
    np.testing.assert_array_equal(dw, unfused[1], err_msg=f"dw vs unfused, {case}")
    rows = x.size // x.shape[-1]
    np.testing.assert_allclose(dw, R.pwconv2d_bwd_weight(*f64(z, dy)), rtol=1e-4, atol=1e-5 * np.sqrt(rows),
                               err_msg=f"dw vs reference, {case}")
    gz = _C.pwconv2d_bwd_input(dy, wt)
    reference = R.pwconv2d_bwd_input_bn(*f64(dy, wt, x), *f64(*bn[:4]), act)
    check_bwd_input_bn(results[1][4:], _C.batchnorm_act_train_bwd(gz, x, *bn), reference, gz, gamma, invstd, str(case))


def test_nan_statistics_propagate():
    """A diverged network's NaN invstd: NaN in z's channel (so in every output, as the unfused
    kernels give) and in that row of dw only; no crash."""
    x, wt, dy, gamma, beta, mean, var = problem(2, 3, 3, 5, 4, seed=4)
    invstd = np.ones(5, np.float32)
    invstd[2] = np.nan
    y = _C.pwconv2d_bn_act_fwd(x, wt, gamma, beta, mean, invstd, "none")
    assert np.isnan(y).all()
    dw = _C.pwconv2d_bn_act_bwd_weight(x, dy, gamma, beta, mean, invstd, "none")
    assert np.isnan(dw[2]).all() and np.isfinite(np.delete(dw, 2, axis=0)).all()


BN_BWD_TOL = dict(rtol=1e-5, atol=1e-6)


def check_bwd_input_bn(fused, unfused, reference, gz, gamma, invstd, where):
    """(dx, dgamma, dbeta) of a *_bwd_input_bn kernel against the unfused kernels' and the float64
    reference's; gz is the convolution's input gradient. dx cancels terms of size
    gamma * invstd * gz (tests/test_batchnorm.py), the sums add m = gz.size / c terms."""
    m = gz.size // gz.shape[-1]
    terms = float(np.abs(gamma * invstd).max() * np.abs(gz).max())
    for got, want, ref, what, scale in zip(fused, unfused, reference, ("dx", "dgamma", "dbeta"),
                                           (terms, np.sqrt(m), np.sqrt(m))):
        assert got.dtype == np.float32 and got.shape == want.shape, what
        big = max(1.0, float(np.abs(ref).max()), scale)
        np.testing.assert_allclose(got, want, rtol=BN_BWD_TOL["rtol"], atol=BN_BWD_TOL["atol"] * big,
                                   err_msg=f"{what} vs unfused, {where}")
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * big, err_msg=f"{what} vs reference, {where}")


@given(n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), ci=st.sampled_from([1, 3, 8, 17, 33]),
       co=st.sampled_from([1, 3, 17, 40]), act=st.sampled_from(ACTS), seed=st.integers(0, 2**16))
def test_bwd_input_bn_matches_the_unfused_kernels_and_reference(n, h, w, ci, co, act, seed):
    x, wt, _, gamma, beta, mean, var = problem(n, h, w, ci, co, seed)
    dy = np.random.default_rng(seed + 1).standard_normal((n, h, w, co)).astype(np.float32)
    _, mean, invstd = unfused_z(x, gamma, beta, mean, var, act)
    bn = (gamma, beta, mean, invstd, act)
    fused = _C.pwconv2d_bwd_input_bn(dy, wt, x, *bn)
    gz = _C.pwconv2d_bwd_input(dy, wt)
    unfused = _C.batchnorm_act_train_bwd(gz, x, *bn)
    reference = R.pwconv2d_bwd_input_bn(*f64(dy, wt, x), *f64(gamma, beta, mean, invstd), act)
    check_bwd_input_bn(fused, unfused, reference, gz, gamma, invstd, f"x={x.shape} co={co} act={act}")
