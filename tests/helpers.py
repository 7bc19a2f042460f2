"""Shared by the convolution kernel tests (test_conv2d.py, test_dwconv.py).

A family is the name prefix of three kernels of mbnet._C and mbnet.reference ("conv2d",
"dwconv2d"): {family}_fwd(x, w, stride, padding), {family}_bwd_input(dy, w, input_hw, stride,
padding) and {family}_bwd_weight(x, dy, kernel_hw, stride, padding). Shapes: x (n, h, w, c),
w (kh, kw, ...), dy (n, ho, wo, co).
"""
import numpy as np
import pytest

from mbnet import _C
from mbnet import reference as R


def out_size(size, k, s, p):
    """Output length along one axis; 0 where the padded input is shorter than the kernel."""
    return (size + 2 * p - k) // s + 1 if size + 2 * p - k >= 0 else 0


def make_problem(x_shape, w_shape, co, k, s, p, seed=0):
    """float32 x of x_shape, w of w_shape and dy (n, ho, wo, co), ho and wo at least 1."""
    n, h, w, _ = x_shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    wt = rng.standard_normal(w_shape).astype(np.float32)
    dy = rng.standard_normal((n, max(out_size(h, k, s, p), 1), max(out_size(w, k, s, p), 1), co))
    return x, wt, dy.astype(np.float32)


def run(lib, family, x, wt, dy, s, p):
    """(y, dx, dw) from the three kernels of family in lib (mbnet._C or mbnet.reference)."""
    return (getattr(lib, family + "_fwd")(x, wt, s, p),
            getattr(lib, family + "_bwd_input")(dy, wt, x.shape[1:3], s, p),
            getattr(lib, family + "_bwd_weight")(x, dy, wt.shape[:2], s, p))


def run_1_and_2_threads(family, x, wt, dy, s, p):
    """[(y, dx, dw) with 1 thread, (y, dx, dw) with 2 threads]; use with restore_threads."""
    results = []
    for threads in (1, 2):
        _C.set_num_threads(threads)
        results.append(run(_C, family, x, wt, dy, s, p))
    return results


@pytest.fixture
def restore_threads():
    before = _C.get_num_threads()
    yield
    _C.set_num_threads(before)


def check_family(family, x, wt, dy, s, p, where, atol_y, atol_dx):
    """The kernels of family equal the float64 reference (rtol 1e-4; absolute tolerances atol_y for
    y, atol_dx for dx, and for dw one growing with the n*ho*wo terms it sums); where the output
    would be empty, all three raise ValueError naming the output. Returns (y, dx, dw), or None."""
    (h, w), (kh, kw) = x.shape[1:3], wt.shape[:2]
    if out_size(h, kh, s, p) < 1 or out_size(w, kw, s, p) < 1:
        with pytest.raises(ValueError, match="output"):
            getattr(_C, family + "_fwd")(x, wt, s, p)
        with pytest.raises(ValueError, match="output"):
            getattr(_C, family + "_bwd_input")(dy, wt, (h, w), s, p)
        with pytest.raises(ValueError, match="output"):
            getattr(_C, family + "_bwd_weight")(x, dy, (kh, kw), s, p)
        return None
    y, dx, dw = run(_C, family, x, wt, dy, s, p)
    y64, dx64, dw64 = run(R, family, x.astype(np.float64), wt.astype(np.float64), dy.astype(np.float64), s, p)

    assert y.dtype == np.float32 and y.shape == dy.shape, where
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=atol_y, err_msg="forward, " + where)

    assert dx.shape == x.shape, where
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=atol_dx, err_msg="input gradient, " + where)

    assert dw.shape == wt.shape, where
    terms = x.shape[0] * dy.shape[1] * dy.shape[2]
    np.testing.assert_allclose(dw, dw64, rtol=1e-4, atol=1e-4 * np.sqrt(terms), err_msg="weight gradient, " + where)
    return y, dx, dw
