"""Global average pooling and softmax cross-entropy against mbnet.reference (float64).

Shapes: pooling x (n, h, w, c) -> (n, c); loss logits / probs (n, k), labels (n,) int. Cases cover
c and k = 1, 3, 10, 17, 100, batch 1, 1x1 images, huge logits (the softmax must subtract the max),
label smoothing from 0 to nearly 1, and 1 vs 2 threads.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as R

CHANNELS = [1, 3, 10, 16, 17, 100]


@given(n=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from(CHANNELS),
       loc=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 2**31))
def test_global_avg_pool_matches_reference(n, h, w, c, loc, seed):
    rng = np.random.default_rng(seed)
    x = (loc + rng.standard_normal((n, h, w, c))).astype(np.float32)
    dy = rng.standard_normal((n, c)).astype(np.float32)
    where = f"n={n} h={h} w={w} c={c} loc={loc}"
    y = _C.global_avg_pool_fwd(x)
    assert y.dtype == np.float32 and y.shape == (n, c), where
    np.testing.assert_allclose(y, R.global_avg_pool_fwd(x.astype(np.float64)), rtol=1e-6, atol=1e-6,
                               err_msg="forward, " + where)
    dx = _C.global_avg_pool_bwd(dy, (h, w))
    assert dx.dtype == np.float32 and dx.shape == x.shape, where
    np.testing.assert_allclose(dx, R.global_avg_pool_bwd(dy.astype(np.float64), (h, w)), rtol=1e-6,
                               err_msg="backward, " + where)
    # Adjoint pair: <dy, pool(x)> = <unpool(dy), x>.
    lhs = float(np.vdot(dy.astype(np.float64), y))
    rhs = float(np.vdot(dx.astype(np.float64), x))
    assert abs(lhs - rhs) < 1e-5 * (1 + np.abs(x).max() * np.abs(dy).sum()), where


@given(n=st.integers(1, 40), k=st.sampled_from(CHANNELS), scale=st.sampled_from([1.0, 30.0, 1e4]),
       smoothing=st.sampled_from([0.0, 0.1, 0.5, 0.99]), grad_scale=st.sampled_from([1.0, 0.5, 128.0]),
       seed=st.integers(0, 2**31))
def test_softmax_cross_entropy_matches_reference(n, k, scale, smoothing, grad_scale, seed):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, k))).astype(np.float32)
    labels = rng.integers(0, k, n)
    where = f"n={n} k={k} scale={scale} smoothing={smoothing}"
    loss, probs = _C.softmax_cross_entropy_fwd(logits, labels, smoothing)
    loss64, probs64 = R.softmax_cross_entropy_fwd(logits.astype(np.float64), labels, smoothing)
    assert isinstance(loss, float) and np.isfinite(loss), where
    assert probs.dtype == np.float32 and probs.shape == (n, k), where
    # The loss sums terms as large as the logits' spread.
    assert abs(loss - loss64) <= 1e-5 * (abs(loss64) + scale), where
    np.testing.assert_allclose(probs, probs64, rtol=1e-5, atol=1e-6, err_msg="probs, " + where)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5, err_msg=where)

    dlogits = _C.softmax_cross_entropy_bwd(probs, labels, smoothing, grad_scale)
    expected = R.softmax_cross_entropy_bwd(probs.astype(np.float64), labels, smoothing, grad_scale)
    assert dlogits.dtype == np.float32 and dlogits.shape == (n, k), where
    np.testing.assert_allclose(dlogits, expected, rtol=1e-5, atol=1e-6 * grad_scale / n,
                               err_msg="dlogits, " + where)


def test_loss_defaults_and_known_value():
    logits = np.zeros((2, 4), np.float32)
    labels = np.array([0, 3])
    loss, probs = _C.softmax_cross_entropy_fwd(logits, labels)
    assert loss == pytest.approx(np.log(4), rel=1e-6)
    np.testing.assert_allclose(probs, 0.25)
    np.testing.assert_allclose(_C.softmax_cross_entropy_bwd(probs, labels),
                               (0.25 - np.eye(4)[labels]) / 2, rtol=1e-6)


@pytest.mark.parametrize("engine", ["mbnet", "reference"])
def test_a_class_without_target_mass_adds_nothing(engine):
    """0 * log 0 = 0: a masked class (a -inf logit) or logits further apart than float32 reaches
    leave the loss finite when smoothing gives those classes no mass (it was NaN), and make it
    +inf when it does (the target then has mass where the model puts none)."""
    fwd = _C.softmax_cross_entropy_fwd if engine == "mbnet" else R.softmax_cross_entropy_fwd
    masked = np.array([[0.0, -np.inf, 1.0]], np.float32)
    apart = np.array([[3e38, -3e38]], np.float32)
    assert fwd(masked, np.array([0]))[0] == pytest.approx(np.log(1 + np.e), rel=1e-6)
    assert fwd(masked, np.array([2]))[0] == pytest.approx(np.log(1 + np.exp(-1.0)), rel=1e-6)
    assert fwd(apart, np.array([0]))[0] == 0.0
    np.testing.assert_allclose(fwd(masked, np.array([0]))[1], np.array([[1, 0, np.e]]) / (1 + np.e), rtol=1e-6)
    assert fwd(masked, np.array([0]), 0.1)[0] == np.inf
    assert fwd(apart, np.array([1]))[0] == np.inf


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int16])
def test_label_dtypes(dtype):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 5)
    loss, probs = _C.softmax_cross_entropy_fwd(logits, labels.astype(dtype), 0.1)
    assert loss == pytest.approx(R.softmax_cross_entropy_fwd(logits.astype(np.float64), labels, 0.1)[0], rel=1e-5)
    np.testing.assert_allclose(_C.softmax_cross_entropy_bwd(probs, labels.astype(dtype), 0.1, 2.0),
                               R.softmax_cross_entropy_bwd(probs, labels, 0.1, 2.0), rtol=1e-6)


def test_reference_loss_gradient_matches_finite_differences():
    """The oracle itself: bwd = directional derivative of the mean loss (float64)."""
    rng = np.random.default_rng(4)
    logits, direction = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    labels = np.array([1, 4, 0])
    for smoothing in [0.0, 0.2]:
        h = 1e-6
        numeric = (R.softmax_cross_entropy_fwd(logits + h * direction, labels, smoothing)[0]
                   - R.softmax_cross_entropy_fwd(logits - h * direction, labels, smoothing)[0]) / (2 * h)
        probs = R.softmax_cross_entropy_fwd(logits, labels, smoothing)[1]
        analytic = (R.softmax_cross_entropy_bwd(probs, labels, smoothing) * direction).sum()
        assert abs(numeric - analytic) < 1e-6, smoothing


def test_thread_counts_agree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 8, 8, 17)).astype(np.float32)
    dy = rng.standard_normal((64, 17)).astype(np.float32)
    logits = (5 * rng.standard_normal((4000, 10))).astype(np.float32)
    labels = rng.integers(0, 10, 4000)
    before = _C.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            _C.set_num_threads(threads)
            loss, probs = _C.softmax_cross_entropy_fwd(logits, labels, 0.1)
            results.append([_C.global_avg_pool_fwd(x), _C.global_avg_pool_bwd(dy, (8, 8)), np.array(loss),
                            probs, _C.softmax_cross_entropy_bwd(probs, labels, 0.1, 3.0)])
    finally:
        _C.set_num_threads(before)
    for i, (one, two) in enumerate(zip(*results)):
        np.testing.assert_allclose(one, two, rtol=1e-6, err_msg=f"output {i}")


# --- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, error, match", [
    ((np.zeros((2, 3, 3), np.float32),), ValueError, "x"),
    ((np.zeros((2, 3, 3, 4), np.float64),), TypeError, "x"),
    ((np.zeros((2, 3, 0, 4), np.float32),), ValueError, "x"),
    ((np.zeros((2, 3, 3, 8), np.float32)[..., ::2],), ValueError, "x"),
    ((None,), TypeError, "x"),
])
def test_pool_fwd_rejects(args, error, match):
    with pytest.raises(error, match=match):
        _C.global_avg_pool_fwd(*args)


@pytest.mark.parametrize("dy, hw, error, match", [
    (np.zeros((2, 3), np.float32), (0, 2), ValueError, "input_hw"),
    (np.zeros((2, 3), np.float32), (2, -1), ValueError, "input_hw"),
    (np.zeros((2, 3), np.float32), (2**40, 2**40), ValueError, "input_hw"),
    (np.zeros((2, 3), np.float32), (2,), ValueError, "input_hw"),  # as conv2d_bwd_input
    (np.zeros((2, 3), np.float32), None, TypeError, None),
    (np.zeros((2, 3), np.float32), (2.5, 2), TypeError, None),
    (np.zeros((2, 3, 1), np.float32), (2, 2), ValueError, "dy"),
    (np.zeros((2, 3), np.int32), (2, 2), TypeError, "dy"),
])
def test_pool_bwd_rejects(dy, hw, error, match):
    with pytest.raises(error, match=match):
        _C.global_avg_pool_bwd(dy, hw)


LOGITS = np.zeros((3, 4), np.float32)


@pytest.mark.parametrize("labels, smoothing, error, match", [
    (np.array([0, 4, 1]), 0.0, ValueError, r"labels.*\b4\b"),
    (np.array([0, -1, 1]), 0.0, ValueError, r"labels.*-1"),
    (np.array([2**63 - 1, 0, 0], np.uint64) + np.uint64(5), 0.0, ValueError, "labels"),
    (np.array([0, 1]), 0.0, ValueError, "labels"),
    (np.array([[0, 1, 2]]), 0.0, ValueError, "labels"),
    (np.array([0.0, 1.0, 2.0]), 0.0, TypeError, "labels"),
    (np.array([True, False, True]), 0.0, TypeError, "labels"),
    ([0, 1, 2], 0.0, TypeError, "labels"),
    (np.array([0, 1, 2]), 1.0, ValueError, "label_smoothing"),
    (np.array([0, 1, 2]), -0.1, ValueError, "label_smoothing"),
    (np.array([0, 1, 2]), float("nan"), ValueError, "label_smoothing"),
])
def test_loss_rejects(labels, smoothing, error, match):
    with pytest.raises(error, match=match):
        _C.softmax_cross_entropy_fwd(LOGITS, labels, smoothing)
    with pytest.raises(error, match=match):
        _C.softmax_cross_entropy_bwd(LOGITS, labels, smoothing, 1.0)


def test_loss_rejects_bad_arrays():
    labels = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="logits"):
        _C.softmax_cross_entropy_fwd(LOGITS.astype(np.float64), labels, 0.0)
    with pytest.raises(ValueError, match="logits"):
        _C.softmax_cross_entropy_fwd(LOGITS[0], labels, 0.0)
    with pytest.raises(ValueError, match="probs"):
        _C.softmax_cross_entropy_bwd(np.zeros((4, 3), np.float32).T, labels, 0.0, 1.0)
    with pytest.raises(ValueError, match="grad_scale"):
        _C.softmax_cross_entropy_bwd(LOGITS, labels, 0.0, float("inf"))
