"""dwconv2d_fwd / _bwd_input / _bwd_weight against mbnet.reference (float64).

Shapes: x (n, h, w, c), w (kh, kw, c), dy (n, ho, wo, c). The kernels block channels by 16 and take
a fast path for the interior of 3x3 convolutions, so the cases cover channel counts below, at and
above the block, tiny images that are all border, stride 2 and 3 on odd sizes, and every padding.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import check_family, make_problem, restore_threads, run_1_and_2_threads  # noqa: F401 (a fixture)
from mbnet import _C


def make(n, h, w, c, k, s, p, seed=0):
    return make_problem((n, h, w, c), (k, k, c), c, k, s, p, seed)


def check_all(n, h, w, c, k, s, p, seed=0):
    """Forward and both gradients equal the float64 reference; out-of-range shapes raise."""
    x, wt, dy = make(n, h, w, c, k, s, p, seed)
    where = f"n={n} h={h} w={w} c={c} k={k} stride={s} padding={p}"
    results = check_family("dwconv2d", x, wt, dy, s, p, where, atol_y=1e-4 * k, atol_dx=1e-4 * k)
    if results is None:
        return
    y, dx, dw = results
    x64, w64, dy64 = x.astype(np.float64), wt.astype(np.float64), dy.astype(np.float64)

    # The three are one bilinear form: <dy, y(x, w)> = <dx, x> = <dw, w>.
    form = float(np.vdot(dy64, y))
    tol = 1e-4 * np.sqrt(y.size) * k + 1e-4 * abs(form)
    assert abs(float(np.vdot(dx.astype(np.float64), x64)) - form) < tol, where
    assert abs(float(np.vdot(dw.astype(np.float64), w64)) - form) < tol, where


@given(
    n=st.sampled_from([1, 2, 3]),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    c=st.sampled_from([1, 3, 8, 15, 16, 17, 33, 100]),
    k=st.sampled_from([1, 3, 5]),
    s=st.sampled_from([1, 2, 3]),
    p=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_matches_reference(n, h, w, c, k, s, p, seed):
    check_all(n, h, w, c, k, s, p, seed)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("c_lt_block", (2, 7, 7, 15, 3, 1, 1)),
        ("c_eq_block", (2, 7, 7, 16, 3, 1, 1)),
        ("c_gt_block", (2, 7, 7, 17, 3, 1, 1)),
        ("c_half_block", (2, 7, 7, 8, 3, 1, 1)),  # 3x3 rows: one block of 8
        ("c_block_half_block_1", (2, 7, 6, 25, 3, 2, 1)),  # 16, then 8, then 1 channel
        ("c_div_block", (2, 6, 5, 48, 3, 1, 1)),
        ("c_1", (3, 5, 6, 1, 3, 1, 1)),
        ("batch_1", (1, 9, 9, 24, 3, 1, 1)),
        ("stride2_odd", (2, 9, 7, 20, 3, 2, 1)),
        ("stride2_even", (2, 8, 8, 32, 3, 2, 1)),
        ("stride2_unpadded", (1, 9, 9, 17, 3, 2, 0)),
        ("stride3", (1, 11, 10, 19, 3, 3, 1)),
        ("wide_padding", (1, 4, 3, 17, 3, 1, 3)),
        ("kernel_larger_than_image", (2, 2, 3, 9, 5, 1, 2)),
        ("image_1x1", (2, 1, 1, 33, 3, 1, 1)),
        ("k5", (2, 9, 8, 21, 5, 1, 2)),
        ("k5_stride2", (2, 9, 8, 21, 5, 2, 2)),
        ("k1_stride2", (2, 7, 8, 5, 1, 2, 0)),
        ("larger_s1", (2, 32, 32, 40, 3, 1, 1)),
        ("larger_s2", (2, 31, 32, 40, 3, 2, 1)),
        ("mobilenet_last", (4, 2, 2, 1024, 3, 1, 1)),
    ],
)
def test_named_cases(name, shape):
    check_all(*shape)


@pytest.mark.parametrize("shape", [(3, 13, 11, 37, 3, 1, 1), (4, 12, 9, 20, 3, 2, 1), (2, 8, 8, 7, 5, 1, 2)])
def test_thread_count_agreement(shape, restore_threads):
    n, h, w, c, k, s, p = shape
    x, wt, dy = make(n, h, w, c, k, s, p, seed=1)
    # Each output element is summed in the same order whatever the thread count.
    for one, two in zip(*run_1_and_2_threads("dwconv2d", x, wt, dy, s, p)):
        np.testing.assert_array_equal(one, two)


def test_bad_arguments():
    x, wt, dy = make(2, 6, 6, 4, 3, 1, 1)
    with pytest.raises(TypeError, match="x"):
        _C.dwconv2d_fwd(x.astype(np.float64), wt, 1, 1)
    with pytest.raises(TypeError, match="w"):
        _C.dwconv2d_fwd(x, wt.astype(np.float16), 1, 1)
    with pytest.raises(TypeError, match="x"):
        _C.dwconv2d_fwd(x.tolist(), wt, 1, 1)
    with pytest.raises(TypeError, match="dy"):
        _C.dwconv2d_bwd_input(dy.astype(np.float64), wt, (6, 6), 1, 1)
    with pytest.raises(ValueError, match="x .* w"):
        _C.dwconv2d_fwd(x, wt[:, :, :3].copy(), 1, 1)
    with pytest.raises(ValueError, match="x"):
        _C.dwconv2d_fwd(x[0], wt, 1, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _C.dwconv2d_fwd(x[:, :, ::2], wt, 1, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _C.dwconv2d_bwd_weight(x, dy[:, ::-1], (3, 3), 1, 1)
    with pytest.raises(ValueError, match="stride"):
        _C.dwconv2d_fwd(x, wt, 0, 1)
    with pytest.raises(ValueError, match="padding"):
        _C.dwconv2d_fwd(x, wt, 1, -1)
    with pytest.raises(ValueError, match="stride"):
        _C.dwconv2d_bwd_weight(x, dy, (3, 3), -2, 1)
    with pytest.raises(ValueError, match="output"):
        _C.dwconv2d_fwd(x[:, :1, :1].copy(), wt, 1, 0)
    with pytest.raises(ValueError, match="dy"):
        _C.dwconv2d_bwd_input(dy, wt, (7, 6), 2, 1)
    with pytest.raises(ValueError, match="dy"):
        _C.dwconv2d_bwd_weight(x, dy[:1].copy(), (3, 3), 1, 1)
    with pytest.raises(ValueError, match="input_hw"):
        _C.dwconv2d_bwd_input(dy, wt, (6, 6, 1), 1, 1)
    with pytest.raises(ValueError, match="kernel_hw"):
        _C.dwconv2d_bwd_weight(x, dy, (0, 3), 1, 1)
    with pytest.raises(TypeError, match="kernel_hw"):
        _C.dwconv2d_bwd_weight(x, dy, 3, 1, 1)
    with pytest.raises(ValueError, match="input_hw"):
        _C.dwconv2d_bwd_input(dy, wt, (2**63, 2), 1, 1)
    with pytest.raises(ValueError, match="padding"):
        _C.dwconv2d_fwd(x, wt, 1, 2**40)
    with pytest.raises(ValueError, match="2\\^31 elements"):
        _C.dwconv2d_fwd(x, wt, 1, 10**6)
