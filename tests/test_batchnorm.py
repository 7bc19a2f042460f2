"""BatchNorm + activation and the activations alone against mbnet.reference (float64).

Shapes: x, y, dy (..., c) viewed as (m, c), statistics and parameters (c,). The kernels walk rows
of at least 64 floats (several rows at once when c is small) and split them over threads, so the
cases cover c = 1, 3, 17, 100, ..., rank 2 and rank 4 inputs, a single row, inputs with a large
mean (the variance must not cancel away), and 1 vs 2 threads.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as R

ACTS = ["none", "relu", "relu6"]
CHANNELS = [1, 3, 8, 16, 17, 32, 64, 100]

shapes = st.one_of(
    st.tuples(st.integers(1, 300), st.sampled_from(CHANNELS)),
    st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.sampled_from(CHANNELS)),
)


def make(shape, loc, scale, seed):
    """x ~ loc + scale * N(0, 1), per-channel parameters and running statistics, dy."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (loc + scale * rng.standard_normal(shape)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c).astype(np.float32)
    beta = (3 * rng.standard_normal(c)).astype(np.float32)
    running_mean = rng.standard_normal(c).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, gamma, beta, running_mean, running_var, dy


def f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def close(actual, expected, what, rtol=1e-4, atol_scale=1e-4, terms=0.0):
    """Within rtol, or within atol_scale times the largest |expected| or of the terms that cancel
    to make it (sums cancel)."""
    atol = atol_scale * max(1.0, float(np.abs(expected).max()), terms)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@given(shape=shapes, act=st.sampled_from(ACTS), loc=st.sampled_from([0.0, 5.0, -3.0]),
       scale=st.sampled_from([1.0, 0.1]), momentum=st.sampled_from([0.0, 0.1, 1.0]),
       seed=st.integers(0, 2**31))
def test_train_fwd_matches_reference(shape, act, loc, scale, momentum, seed):
    x, gamma, beta, rm, rv, _ = make(shape, loc, scale, seed)
    where = f"shape={shape} act={act} loc={loc} scale={scale} momentum={momentum}"
    rm64, rv64 = f64(rm, rv)
    y, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, momentum, 1e-5, act)
    y64, mean64, invstd64 = R.batchnorm_act_train_fwd(*f64(x, gamma, beta), rm64, rv64, momentum, 1e-5, act)
    assert y.dtype == mean.dtype == invstd.dtype == np.float32, where
    assert y.shape == x.shape and mean.shape == invstd.shape == (shape[-1],), where
    close(y, y64, "y, " + where)
    close(mean, mean64, "mean, " + where, atol_scale=1e-6)
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-4, err_msg="invstd, " + where)
    close(rm, rm64, "running_mean, " + where, atol_scale=1e-6)
    np.testing.assert_allclose(rv, rv64, rtol=1e-4, err_msg="running_var, " + where)


def masked_dy(dy, y, act):
    """The inference kernel reads the activation's mask from y, the training kernel recomputes its
    float32 pre-activation (the forward's, bit for bit), the reference its float64 one. Masking dy
    by y here and running the reference with act='none' compares the same thing without ties at
    the kinks (z within float rounding of 0 or 6)."""
    return R.act_bwd(dy.astype(np.float64), y.astype(np.float64), act)


@given(shape=shapes, act=st.sampled_from(ACTS), loc=st.sampled_from([0.0, 5.0]),
       scale=st.sampled_from([1.0, 0.1]), seed=st.integers(0, 2**31))
def test_train_bwd_matches_reference(shape, act, loc, scale, seed):
    x, gamma, beta, rm, rv, dy = make(shape, loc, scale, seed)
    where = f"shape={shape} act={act} loc={loc} scale={scale}"
    y, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, 0.1, 1e-5, act)
    dx, dgamma, dbeta = _C.batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, act)
    dx64, dgamma64, dbeta64 = R.batchnorm_act_train_bwd(
        masked_dy(dy, y, act), *f64(x, gamma, beta, mean, invstd), "none")
    assert dx.shape == x.shape and dgamma.shape == dbeta.shape == gamma.shape, where
    assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float32, where
    m = x.size // shape[-1]
    # dx = gamma*invstd*(dz - mean(dz) - xhat*mean(dz*xhat)) cancels terms of size gamma*invstd*dy.
    close(dx, dx64, "dx, " + where, terms=float(np.abs(gamma * invstd).max() * np.abs(dy).max()))
    close(dgamma, dgamma64, "dgamma, " + where, atol_scale=1e-5 * np.sqrt(m))
    close(dbeta, dbeta64, "dbeta, " + where, atol_scale=1e-5 * np.sqrt(m))


@given(shape=shapes, act=st.sampled_from(ACTS), loc=st.sampled_from([0.0, 5.0]),
       seed=st.integers(0, 2**31))
def test_infer_matches_reference(shape, act, loc, seed):
    x, gamma, beta, rm, rv, dy = make(shape, loc, 1.0, seed)
    rm += np.float32(loc)
    where = f"shape={shape} act={act} loc={loc}"
    y = _C.batchnorm_act_infer_fwd(x, gamma, beta, rm, rv, 1e-3, act)
    assert y.dtype == np.float32 and y.shape == x.shape, where
    close(y, R.batchnorm_act_infer_fwd(*f64(x, gamma, beta, rm, rv), 1e-3, act), "y, " + where)

    dx, dgamma, dbeta = _C.batchnorm_act_infer_bwd(dy, x, y, gamma, beta, rm, rv, 1e-3, act)
    dx64, dgamma64, dbeta64 = R.batchnorm_act_infer_bwd(
        masked_dy(dy, y, act), *f64(x, y, gamma, beta, rm, rv), 1e-3, "none")
    m = x.size // shape[-1]
    close(dx, dx64, "dx, " + where)
    close(dgamma, dgamma64, "dgamma, " + where, atol_scale=1e-5 * np.sqrt(m))
    close(dbeta, dbeta64, "dbeta, " + where, atol_scale=1e-5 * np.sqrt(m))


@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), act=st.sampled_from(ACTS),
       seed=st.integers(0, 2**31))
def test_act_matches_reference(shape, act, seed):
    rng = np.random.default_rng(seed)
    x = (4 * rng.standard_normal(shape)).astype(np.float32)
    x.flat[: min(3, x.size)] = [0.0, 6.0, -0.0][: min(3, x.size)]  # the kinks
    dy = rng.standard_normal(shape).astype(np.float32)
    y = _C.act_fwd(x, act)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, R.act_fwd(x, act), err_msg=f"act_fwd {act} {shape}")
    dx = _C.act_bwd(dy, y, act)
    np.testing.assert_array_equal(dx, R.act_bwd(dy, y, act), err_msg=f"act_bwd {act} {shape}")


@pytest.mark.parametrize("loc, scale", [(5.0, 0.1), (100.0, 0.01), (-1000.0, 1.0)])
@pytest.mark.parametrize("c", [1, 3])
def test_variance_survives_large_mean(loc, scale, c):
    """m = 131072 rows with |mean| >> std: E[x^2] - E[x]^2 in float32 would lose every digit."""
    rng = np.random.default_rng(1)
    x = (loc + scale * rng.standard_normal((32, 64, 64, c))).astype(np.float32)
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, 1.0, 0.0, "none")
    var64 = x.astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var64), rtol=1e-5)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(rv, var64 * x.size / c / (x.size / c - 1), rtol=1e-5)
    np.testing.assert_allclose(y.astype(np.float64).std(axis=(0, 1, 2)), 1.0, rtol=1e-4)


def test_running_stats_updated_in_place():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]], np.float32)
    rm, rv = np.array([1.0, 2.0], np.float32), np.array([4.0, 8.0], np.float32)
    ids = id(rm), id(rv)
    _C.batchnorm_act_train_fwd(x, np.ones(2, np.float32), np.zeros(2, np.float32), rm, rv, 0.25, 1e-5, "relu")
    assert (id(rm), id(rv)) == ids
    # batch means (3, 11), unbiased variances (4, 3).
    np.testing.assert_allclose(rm, [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 11], rtol=1e-6)
    np.testing.assert_allclose(rv, [0.75 * 4 + 0.25 * 4, 0.75 * 8 + 0.25 * 3], rtol=1e-6)


def test_single_row():
    """m = 1: zero variance, the unbiased factor falls back to 1 as in the reference."""
    x = np.array([[2.0, -1.0, 0.5]], np.float32)
    g, b = np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = _C.batchnorm_act_train_fwd(x, g, b, rm, rv, 0.1, 1e-5, "relu6")
    y64, _, invstd64 = R.batchnorm_act_train_fwd(*f64(x, g, b), rm64, rv64, 0.1, 1e-5, "relu6")
    np.testing.assert_allclose(y, y64, rtol=1e-6)
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-6)
    np.testing.assert_allclose(rv, rv64, rtol=1e-6)
    dx, dg, db = _C.batchnorm_act_train_bwd(np.ones_like(x), x, g, b, mean, invstd, "relu6")
    np.testing.assert_allclose(dx, 0.0, atol=1e-6)
    np.testing.assert_allclose(db, 1.0)


@pytest.mark.parametrize("shape", [(64, 8, 8, 17), (40000, 1), (2, 16, 16, 100)])
@pytest.mark.parametrize("act", ACTS)
def test_thread_counts_agree(shape, act):
    x, gamma, beta, rm, rv, dy = make(shape, 2.0, 0.5, 3)
    results = []
    before = _C.get_num_threads()
    try:
        for threads in (1, 2):
            _C.set_num_threads(threads)
            rm_t, rv_t = rm.copy(), rv.copy()
            y, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm_t, rv_t, 0.1, 1e-5, act)
            results.append([y, mean, invstd, rm_t, rv_t,
                            *_C.batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, act),
                            _C.batchnorm_act_infer_fwd(x, gamma, beta, rm, rv, 1e-5, act),
                            *_C.batchnorm_act_infer_bwd(dy, x, y, gamma, beta, rm, rv, 1e-5, act),
                            _C.act_fwd(x, act), _C.act_bwd(dy, y, act)])
    finally:
        _C.set_num_threads(before)
    for i, (one, two) in enumerate(zip(*results)):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-5 * np.abs(one).max(),
                                   err_msg=f"output {i}, shape={shape} act={act}")


@pytest.mark.parametrize("act", ["relu", "relu6"])
@pytest.mark.parametrize("threads", [1, 2])
def test_train_bwd_mask_is_the_forward_output_mask(act, threads):
    """Training backward recomputes the pre-activation from x instead of reading y: bit for bit
    the forward's, so its mask is exactly y's. 2^20 elements, a tenth of them (16 values repeated)
    placed by beta within rounding of the kink: the same dx, dgamma, dbeta bits as masking dy by
    y first."""
    rng = np.random.default_rng(7)
    c, kink = 64, (6.0 if act == "relu6" else 0.0)
    x = rng.standard_normal((256, 64, c)).astype(np.float32)
    x[::10] = rng.choice(rng.standard_normal(16).astype(np.float32), x[::10].shape)
    gamma = rng.uniform(0.5, 6.0, c).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    before = _C.get_num_threads()
    try:
        _C.set_num_threads(threads)
        # The statistics do not depend on beta: put (v - mean) * scale + beta within rounding of
        # the kink for v = the first repeated value of each channel.
        _, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, np.zeros(c, np.float32), rm, rv, 0.1, 1e-5, act)
        scale = (invstd.astype(np.float64) * gamma).astype(np.float32)
        beta = (np.float32(kink) - (x[0, 0] - mean) * scale).astype(np.float32)
        y, mean, invstd = _C.batchnorm_act_train_fwd(x, gamma, beta, rm, rv, 0.1, 1e-5, act)
        z = (x.astype(np.float64) - mean) * scale + beta
        assert np.mean(np.abs(z - kink) < 1e-5) > 0.005
        got = _C.batchnorm_act_train_bwd(dy, x, gamma, beta, mean, invstd, act)
        want = _C.batchnorm_act_train_bwd(_C.act_bwd(dy, y, act), x, gamma, beta, mean, invstd, "none")
    finally:
        _C.set_num_threads(before)
    for g, w, what in zip(got, want, ("dx", "dgamma", "dbeta")):
        np.testing.assert_array_equal(g, w, err_msg=f"{what}, act={act}")


def test_reference_backward_matches_finite_differences():
    """The oracle itself: train backward = directional derivative of train forward (float64)."""
    rng = np.random.default_rng(5)
    x, g, b, dy, dx_dir = (rng.standard_normal(s) for s in [(6, 4), 4, 4, (6, 4), (6, 4)])
    dg_dir, db_dir = rng.standard_normal(4), rng.standard_normal(4)
    for act in ACTS:
        def loss(t):
            y, _, _ = R.batchnorm_act_train_fwd(x + t * dx_dir, g + t * dg_dir, b + t * db_dir,
                                                np.zeros(4), np.ones(4), 0.1, 1e-5, act)
            return float((y * dy).sum())
        h = 1e-6
        numeric = (loss(h) - loss(-h)) / (2 * h)
        _, mean, invstd = R.batchnorm_act_train_fwd(x, g, b, np.zeros(4), np.ones(4), 0.1, 1e-5, act)
        dx, dg, db = R.batchnorm_act_train_bwd(dy, x, g, b, mean, invstd, act)
        analytic = (dx * dx_dir).sum() + (dg * dg_dir).sum() + (db * db_dir).sum()
        assert abs(numeric - analytic) < 1e-5 * (1 + abs(analytic)), act


# --- bad arguments ------------------------------------------------------------------------------

def valid_args(c=3):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, c)).astype(np.float32)
    p = {k: np.ones(c, np.float32) for k in ["gamma", "beta", "rm", "rv"]}
    return x, p


@pytest.mark.parametrize("change, error, match", [
    (dict(x=np.zeros((2, 3), np.float64)), TypeError, "x"),
    (dict(x=np.zeros(3, np.float32)), ValueError, "x"),
    (dict(x=np.zeros((3, 4), np.float32).T), ValueError, "x"),
    (dict(x=[[1.0, 2.0, 3.0]]), TypeError, "x"),
    (dict(gamma=np.ones(4, np.float32)), ValueError, "gamma"),
    (dict(beta=np.ones((1, 3), np.float32)), ValueError, "beta"),
    (dict(rm=np.ones(3, np.int32)), TypeError, "running_mean"),
    (dict(rv=None), TypeError, "running_var"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps=float("inf")), ValueError, "eps"),
    (dict(act="gelu"), ValueError, "act"),
    (dict(act=None), TypeError, None),
])
def test_train_fwd_rejects(change, error, match):
    x, p = valid_args()
    args = dict(x=x, gamma=p["gamma"], beta=p["beta"], rm=p["rm"], rv=p["rv"], momentum=0.1,
                eps=1e-5, act="relu")
    args.update(change)
    with pytest.raises(error, match=match):
        _C.batchnorm_act_train_fwd(*args.values())


def test_running_stats_of_their_own():
    """running_mean and running_var are both written: one array for both would keep only one."""
    x, p = valid_args()
    both = np.zeros(6, np.float32)
    for rm, rv in [(p["rm"], p["rm"]), (both[:3], both[2:5])]:
        with pytest.raises(ValueError, match="running_mean and running_var must not share memory"):
            _C.batchnorm_act_train_fwd(x, p["gamma"], p["beta"], rm, rv, 0.1, 1e-5, "none")
    _C.batchnorm_act_train_fwd(x, p["gamma"], p["beta"], both[:3], both[3:], 0.1, 1e-5, "none")  # apart: fine


def test_inference_refuses_a_negative_variance():
    """As the training forward from statistics does: a negative var gave all-NaN outputs."""
    x, p = valid_args()
    g, neg = p["gamma"], np.array([1.0, -0.5, 1.0], np.float32)
    with pytest.raises(ValueError, match="var must be >= 0"):
        _C.batchnorm_act_infer_fwd(x, g, g, g, neg, 1e-5, "relu")
    with pytest.raises(ValueError, match="var must be >= 0"):
        _C.batchnorm_act_infer_bwd(x, x, x, g, g, g, neg, 1e-5, "relu")
    nan = np.full(3, np.nan, np.float32)  # a diverged network's statistics pass on as NaN
    assert np.isnan(_C.batchnorm_act_infer_fwd(x, g, g, g, nan, 1e-5, "none")).all()


def test_read_only_running_stats_rejected():
    x, p = valid_args()
    p["rm"].setflags(write=False)
    with pytest.raises(ValueError, match="running_mean"):
        _C.batchnorm_act_train_fwd(x, p["gamma"], p["beta"], p["rm"], p["rv"], 0.1, 1e-5, "none")


def test_backward_rejects_mismatched_shapes():
    x, p = valid_args()
    g = p["gamma"]
    with pytest.raises(ValueError, match="dy"):
        _C.batchnorm_act_train_bwd(x[:1], x, g, g, g, g, "relu")
    with pytest.raises(ValueError, match="y"):
        _C.batchnorm_act_infer_bwd(x, x, x.reshape(4, 2, 3), g, g, g, g, 1e-5, "relu")
    with pytest.raises(ValueError, match="invstd"):
        _C.batchnorm_act_train_bwd(x, x, g, g, g, np.ones(2, np.float32), "relu")
    with pytest.raises(ValueError, match="var"):
        _C.batchnorm_act_infer_fwd(x, g, g, g, np.ones(5, np.float32), 1e-5, "relu")
    with pytest.raises(ValueError, match="dy"):
        _C.act_bwd(x[:, :2], x, "relu6")
    with pytest.raises(TypeError, match="x"):
        _C.act_fwd(x.astype(np.float16), "relu")
    with pytest.raises(ValueError, match="act"):
        _C.act_fwd(x, "RELU")
