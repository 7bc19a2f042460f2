"""conv2d_fwd / _bwd_input / _bwd_weight (im2col + sgemm) against mbnet.reference (float64).

Shapes: x (n, h, w, ci), w (kh, kw, ci, co) HWIO, dy (n, ho, wo, co). Cases cover the stem
(ci=3, co=32), ci and co of 1 and non-multiples of the vector width, the 1x1 stride-1 path that
skips im2col, stride 2 and 3 on odd sizes, wide padding, and an input big enough to be split into
several im2col chunks.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import check_family, make_problem, restore_threads, run_1_and_2_threads  # noqa: F401 (a fixture)
from mbnet import _C


def make(n, h, w, ci, co, k, s, p, seed=0):
    return make_problem((n, h, w, ci), (k, k, ci, co), co, k, s, p, seed)


def check_all(n, h, w, ci, co, k, s, p, seed=0):
    """Forward and both gradients equal the float64 reference; out-of-range shapes raise."""
    x, wt, dy = make(n, h, w, ci, co, k, s, p, seed)
    check_family("conv2d", x, wt, dy, s, p, f"n={n} h={h} w={w} ci={ci} co={co} k={k} stride={s} padding={p}",
                 atol_y=1e-4 * np.sqrt(k * k * ci), atol_dx=1e-4 * np.sqrt(k * k * co))


@given(
    n=st.sampled_from([1, 2, 3]),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    ci=st.sampled_from([1, 3, 8, 17, 100]),
    co=st.sampled_from([1, 5, 16, 32]),
    k=st.sampled_from([1, 3, 5]),
    s=st.sampled_from([1, 2, 3]),
    p=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_matches_reference(n, h, w, ci, co, k, s, p, seed):
    check_all(n, h, w, ci, co, k, s, p, seed)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("stem_cifar", (2, 8, 8, 3, 32, 3, 1, 1)),
        ("stem_imagenet_odd", (1, 9, 11, 3, 32, 3, 2, 1)),
        ("ci_1_co_1", (2, 5, 6, 1, 1, 3, 1, 1)),
        ("co_not_multiple", (2, 6, 5, 17, 19, 3, 1, 1)),
        ("pointwise_s1", (2, 5, 7, 17, 9, 1, 1, 0)),
        ("pointwise_s2", (2, 7, 7, 17, 9, 1, 2, 0)),
        ("pointwise_padded", (1, 4, 4, 6, 5, 1, 1, 1)),
        ("stride2_odd", (2, 9, 7, 20, 12, 3, 2, 1)),
        ("stride3", (1, 11, 10, 5, 6, 3, 3, 1)),
        ("wide_padding", (1, 4, 3, 7, 5, 3, 1, 3)),
        ("kernel_larger_than_image", (2, 2, 3, 4, 3, 5, 1, 2)),
        ("k5_stride2", (2, 9, 8, 6, 7, 5, 2, 2)),
        ("large_ci", (2, 4, 4, 256, 24, 3, 1, 1)),
        ("batch_1", (1, 9, 9, 8, 8, 3, 1, 1)),
        # stem-like columns (27 and 25 taps) with 47 and 24 output channels; 4,800 output pixels: the
        # weight gradient's depth in more than one 4096-row chunk
        ("stem_channel_tails", (2, 9, 9, 3, 47, 3, 1, 1)),
        ("stem_two_depth_chunks", (3, 40, 40, 3, 24, 3, 1, 1)),
        ("k5_ci1_stride2", (2, 11, 12, 1, 16, 5, 2, 2)),
    ],
)
def test_named_cases(name, shape):
    check_all(*shape)


def test_several_im2col_chunks():
    # 64x64 outputs with kh*kw*ci = 2304 columns (36 MB per image) overflow the 8 MB column budget,
    # so each of the 3 images is its own chunk and bwd_weight accumulates across chunks.
    check_all(3, 64, 64, 256, 2, 3, 1, 1)


def test_uneven_im2col_chunks():
    # 1024 x 639 columns (2.6 MB) per image: 3 images per 8 MB chunk, so 7 images go as 3 + 3 + 1.
    check_all(7, 32, 32, 71, 2, 3, 1, 1)


@pytest.mark.parametrize("shape", [(3, 13, 11, 3, 32, 3, 1, 1), (4, 12, 9, 20, 7, 3, 2, 1)])
def test_thread_count_agreement(shape, restore_threads):
    n, h, w, ci, co, k, s, p = shape
    x, wt, dy = make(n, h, w, ci, co, k, s, p, seed=1)
    for one, two in zip(*run_1_and_2_threads("conv2d", x, wt, dy, s, p)):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x, wt, dy = make(2, 6, 6, 4, 5, 3, 1, 1)
    with pytest.raises(TypeError, match="x"):
        _C.conv2d_fwd(x.astype(np.float64), wt, 1, 1)
    with pytest.raises(TypeError, match="w"):
        _C.conv2d_fwd(x, wt.astype(np.int32), 1, 1)
    with pytest.raises(TypeError, match="dy"):
        _C.conv2d_bwd_weight(x, dy.astype(np.float64), (3, 3), 1, 1)
    with pytest.raises(ValueError, match="x .* w"):
        _C.conv2d_fwd(x, wt[:, :, :3].copy(), 1, 1)
    with pytest.raises(ValueError, match="dy .* w"):
        _C.conv2d_bwd_input(dy, wt[..., :4].copy(), (6, 6), 1, 1)
    with pytest.raises(ValueError, match="w"):
        _C.conv2d_fwd(x, wt[..., 0].copy(), 1, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _C.conv2d_fwd(x[:, ::2], wt, 1, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _C.conv2d_bwd_input(dy, np.asfortranarray(wt), (6, 6), 1, 1)
    with pytest.raises(ValueError, match="stride"):
        _C.conv2d_fwd(x, wt, 0, 1)
    with pytest.raises(ValueError, match="padding"):
        _C.conv2d_bwd_input(dy, wt, (6, 6), 1, -1)
    with pytest.raises(ValueError, match="output"):
        _C.conv2d_fwd(x[:, :2, :2].copy(), wt, 1, 0)
    with pytest.raises(ValueError, match="dy"):
        _C.conv2d_bwd_input(dy, wt, (8, 6), 1, 1)
    with pytest.raises(ValueError, match="x .* dy"):
        _C.conv2d_bwd_weight(x[:1].copy(), dy, (3, 3), 1, 1)
    with pytest.raises(ValueError, match="input_hw"):
        _C.conv2d_bwd_input(dy, wt, (6,), 1, 1)
    with pytest.raises(ValueError, match="input_hw"):
        _C.conv2d_bwd_input(dy, wt, (2**70, 6), 1, 1)
    with pytest.raises(ValueError, match="padding"):
        _C.conv2d_fwd(x, wt, 1, 2**62)
    with pytest.raises(ValueError, match="2\\^31 elements"):
        _C.conv2d_fwd(x, wt, 1, 10**6)


def test_stem_weight_gradient_is_the_same_at_1_and_2_threads(restore_threads):
    """The stem's weight gradient (27 taps, a long depth of 9,248 output pixels) sums fixed chunks
    of the depth, so it is bitwise the same at any thread count."""
    x, wt, dy = make(2, 68, 68, 3, 32, 3, 1, 1, seed=2)
    got = []
    for threads in (1, 2):
        _C.set_num_threads(threads)
        got.append(_C.conv2d_bwd_weight(x, dy, (3, 3), 1, 1))
    np.testing.assert_array_equal(got[0], got[1])
