"""Convolutions that also return their output's batch statistics (pwconv2d_fwd_stats,
dwconv2d_fwd_stats, conv2d_fwd_stats) and the BatchNorm forward that takes them
(batchnorm_act_train_fwd_from_stats), against mbnet.reference and against the kernels without
statistics.

Shapes: x (n, h, w, c), y (n, ho, wo, co), mean and var (co,) over n, ho, wo (biased variance).
The kernels add y's rows in blocks of 256 (whole output rows for the depthwise kernel) while each
tile is in cache, in double less each block's first row, so the cases cover fewer rows than a
block, many blocks with a partial last one, more columns than one GEMM column block (NC), threads
splitting rows or columns, and outputs whose mean is 1000 times their spread. Tolerances: mean
and var within 1e-6 (relative; 1e-5 for var at mean/spread = 1000) of float64 statistics of the
kernel's own y; bitwise the same at 1 and 2 threads.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as R

ACTS = ["none", "relu", "relu6"]


def rand(rng, *shape, loc=0.0):
    return (loc + rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture
def threads():
    before = _C.get_num_threads()
    yield _C.set_num_threads
    _C.set_num_threads(before)


# name -> (x, w) -> (args of the kernel after x and w); the weight shape from (k, ci, co)
KERNELS = {
    "pwconv2d": (lambda k, ci, co: (ci, co), ()),
    "dwconv2d": (lambda k, ci, co: (k, k, ci), None),
    "conv2d": (lambda k, ci, co: (k, k, ci, co), None),
}


def problem(name, n, h, w, ci, co, k, s, p, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    wshape, fixed = KERNELS[name]
    if name == "pwconv2d":
        k = 1
    x, wt = rand(rng, n, h, w, ci, loc=loc), rand(rng, *wshape(k, ci, co))
    return x, wt, (() if fixed is not None else (s, p))


def call(name, x, wt, extra, stats):
    return getattr(_C, name + ("_fwd_stats" if stats else "_fwd"))(x, wt, *extra)


def check_stats(y, mean, var, where, rtol_var=1e-6):
    """mean and var are y's own float64 statistics, to float32 rounding."""
    y64 = y.astype(np.float64)
    axes = tuple(range(y.ndim - 1))
    want_mean, want_var = y64.mean(axis=axes), y64.var(axis=axes)
    assert mean.dtype == var.dtype == np.float32 and mean.shape == var.shape == y.shape[-1:], where
    spread = np.sqrt(want_var) + 1e-30
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6 * spread.max(), err_msg="mean, " + where)
    np.testing.assert_allclose(var, want_var, rtol=rtol_var, atol=1e-12, err_msg="var, " + where)


@given(name=st.sampled_from(sorted(KERNELS)), n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       ci=st.sampled_from([1, 3, 17, 32]), co=st.sampled_from([1, 3, 17, 40]), k=st.sampled_from([1, 3]),
       s=st.sampled_from([1, 2]), p=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_matches_reference(name, n, h, w, ci, co, k, s, p, seed):
    if name == "dwconv2d":
        co = ci
    if h + 2 * p < k or w + 2 * p < k:
        return
    x, wt, extra = problem(name, n, h, w, ci, co, k, s, p, seed)
    where = f"{name} x={x.shape} w={wt.shape} {extra}"
    y, mean, var = call(name, x, wt, extra, True)
    np.testing.assert_array_equal(y, call(name, x, wt, extra, False), err_msg="y, " + where)
    check_stats(y, mean, var, where)
    y64, mean64, var64 = getattr(R, name + "_fwd_stats")(x.astype(np.float64), wt.astype(np.float64), *extra)
    terms = wt.size // (1 if name == "dwconv2d" else co)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5 * np.sqrt(terms), err_msg="y vs reference, " + where)
    np.testing.assert_allclose(mean, mean64, rtol=1e-4, atol=1e-5 * np.sqrt(terms), err_msg="mean vs reference")
    np.testing.assert_allclose(var, var64, rtol=1e-4, atol=1e-5 * terms, err_msg="var vs reference, " + where)


# (name, n, h, w, ci, co, k, s, p): many blocks of rows; tall C (threads split rows), wide C
# (threads split columns), more than NC = 2048 columns, a partial last block, im2col in chunks.
BIG = [
    ("pwconv2d", 4, 16, 17, 24, 40, 1, 1, 0),
    ("pwconv2d", 2, 2, 3, 64, 2100, 1, 1, 0),
    ("pwconv2d", 16, 4, 4, 256, 512, 1, 1, 0),
    ("dwconv2d", 8, 16, 16, 40, 40, 3, 1, 1),
    ("dwconv2d", 5, 33, 31, 17, 17, 3, 2, 1),
    ("dwconv2d", 2, 3, 300, 8, 8, 3, 1, 1),
    ("conv2d", 16, 32, 32, 3, 32, 3, 1, 1),
    ("conv2d", 3, 17, 15, 5, 70, 3, 2, 1),
    ("conv2d", 9, 30, 30, 32, 16, 3, 1, 1),  # im2col in 2 chunks of 4500 rows: blocks span them
]


@pytest.mark.parametrize("case", BIG, ids=lambda c: "-".join(map(str, c)))
def test_threads_agree_bitwise(case, threads):
    name, *dims = case
    x, wt, extra = problem(name, *dims, seed=1)
    results = []
    for t in (1, 2):
        threads(t)
        results.append(call(name, x, wt, extra, True))
    where = f"{case}"
    for one, two, what in zip(*results, ("y", "mean", "var")):
        np.testing.assert_array_equal(one, two, err_msg=f"{what} at 1 vs 2 threads, {where}")
    check_stats(*results[1], where)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_large_mean(name):
    """y = 1000 + N(0, 1)-ish per channel: sums of y^2 less the squared mean would cancel."""
    rng = np.random.default_rng(2)
    ci, co = 8, 8
    x = (1.0 + 1e-3 * rng.standard_normal((8, 16, 16, ci))).astype(np.float32)
    wshape, fixed = KERNELS[name]
    k = 1 if name == "pwconv2d" else 3
    wt = np.full(wshape(k, ci, co), 1000.0 / (k * k * (1 if name == "dwconv2d" else ci)), np.float32)
    extra = () if fixed is not None else (1, 0)
    y, mean, var = call(name, x, wt, extra, True)
    assert abs(mean.mean() - 1000) < 1 and 1e-2 < var.min() and var.max() < 10, (mean, var)
    check_stats(y, mean, var, name, rtol_var=1e-5)


# --- BatchNorm with the statistics given ---------------------------------------------------------

def bn_inputs(rng, shape):
    c = shape[-1]
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c).astype(np.float32)
    beta = (3 * rng.standard_normal(c)).astype(np.float32)
    return gamma, beta, rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2.0, c).astype(np.float32)


@given(shape=st.one_of(st.tuples(st.integers(1, 300), st.sampled_from([1, 3, 17, 64])),
                       st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.sampled_from([3, 17]))),
       act=st.sampled_from(ACTS), loc=st.sampled_from([0.0, 5.0]), momentum=st.sampled_from([0.0, 0.1, 1.0]),
       seed=st.integers(0, 2**16))
def test_bn_from_stats_is_bn(shape, act, loc, momentum, seed):
    """With x's own statistics, batchnorm_act_train_fwd_from_stats is batchnorm_act_train_fwd (and
    its reference twin)."""
    rng = np.random.default_rng(seed)
    x = rand(rng, *shape, loc=loc)
    gamma, beta, rm, rv = bn_inputs(rng, shape)
    _, mean, var = R._with_stats(x.astype(np.float64))
    mean, var = mean.astype(np.float32), var.astype(np.float32)
    where = f"shape={shape} act={act} loc={loc} momentum={momentum}"
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, mean_out, invstd = _C.batchnorm_act_train_fwd_from_stats(x, mean, var, gamma, beta, rm1, rv1, momentum,
                                                                1e-5, act)
    y0, mean0, invstd0 = _C.batchnorm_act_train_fwd(x, gamma, beta, rm2, rv2, momentum, 1e-5, act)
    np.testing.assert_array_equal(mean_out, mean, err_msg=where)
    for got, want, what in [(y, y0, "y"), (mean_out, mean0, "mean"), (invstd, invstd0, "invstd"),
                            (rm1, rm2, "running_mean"), (rv1, rv2, "running_var")]:
        assert got.dtype == np.float32 and got.shape == want.shape, what
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()),
                                   err_msg=f"{what} vs batchnorm_act_train_fwd, {where}")
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
    y64, _, invstd64 = R.batchnorm_act_train_fwd_from_stats(
        *[a.astype(np.float64) for a in (x, mean, var, gamma, beta)], rm64, rv64, momentum, 1e-5, act)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y64).max()), err_msg=where)
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-6, err_msg=where)
    np.testing.assert_allclose(rv1, rv64, rtol=1e-6, err_msg=where)


def test_conv_stats_into_bn_is_bn_large_mean():
    """The pipeline at a mean 1000 times the spread: conv statistics + from_stats = BatchNorm."""
    rng = np.random.default_rng(4)
    x = (1.0 + 1e-3 * rng.standard_normal((8, 16, 16, 8))).astype(np.float32)
    w = np.full((8, 16), 125.0, np.float32)
    y, mean, var = _C.pwconv2d_fwd_stats(x, w)
    gamma, beta, rm, rv = bn_inputs(rng, y.shape)
    z, _, invstd = _C.batchnorm_act_train_fwd_from_stats(y, mean, var, gamma, beta, rm.copy(), rv.copy(), 0.1,
                                                         0.0, "none")
    z0, _, invstd0 = _C.batchnorm_act_train_fwd(y, gamma, beta, rm.copy(), rv.copy(), 0.1, 0.0, "none")
    np.testing.assert_allclose(invstd, invstd0, rtol=1e-5)
    np.testing.assert_allclose(z, z0, rtol=1e-4, atol=1e-3)


def test_bn_from_stats_passes_nan_on():
    """A diverged network's statistics are NaN: the output is NaN (training notices), not an error."""
    x = np.ones((4, 3), np.float32)
    one = np.ones(3, np.float32)
    y, _, invstd = _C.batchnorm_act_train_fwd_from_stats(x, one, np.full(3, np.nan, np.float32), one, one, one.copy(),
                                                         one.copy(), 0.1, 1e-5, "relu")
    assert np.isnan(y).all() and np.isnan(invstd).all()


@pytest.mark.parametrize("bad, match", [
    (dict(var=np.full(3, -1.0, np.float32)), "var must be >= 0"),
    (dict(var=np.array([1.0, -1e-30, 1.0], np.float32)), "var must be >= 0"),
    (dict(var=np.ones(4, np.float32)), "var"),
    (dict(mean=np.ones((1, 3), np.float32)), "mean"),
    (dict(running_mean=np.ones(2, np.float32)), "running_mean"),
])
def test_bn_from_stats_rejects(bad, match):
    x = np.ones((4, 3), np.float32)
    args = dict(x=x, mean=np.ones(3, np.float32), var=np.ones(3, np.float32), gamma=np.ones(3, np.float32),
                beta=np.zeros(3, np.float32), running_mean=np.zeros(3, np.float32),
                running_var=np.ones(3, np.float32), momentum=0.1, eps=1e-5, act="relu")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        _C.batchnorm_act_train_fwd_from_stats(**args)
