"""GEMM family (matmul, pointwise convolution, linear) against mbnet.reference in float64.

Shapes cover channel counts 1, 3, 17, 100, sizes that are not multiples of the register tile
(MR x NR: 8 x 32 for AVX-512, 4 x 24 for AVX2), more than one cache block along every axis, K
long enough to be split across threads, and transposed operands.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import _C
from mbnet import reference as ref

CHANNELS = st.sampled_from([1, 3, 17, 32, 100])
DIM = st.one_of(st.sampled_from([1, 3, 17, 33, 100]), st.integers(1, 150))


def rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def assert_close(got, want, k):
    """float32 products summed over k terms of unit variance: error grows like sqrt(k)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.sqrt(k) + 1e-6)


@pytest.fixture
def threads():
    """Runs a test body at 1 and 2 threads, restoring the setting afterwards."""
    before = _C.get_num_threads()
    yield lambda n: _C.set_num_threads(n)
    _C.set_num_threads(before)


@given(m=DIM, k=DIM, n=DIM, trans_a=st.booleans(), trans_b=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul(m, k, n, trans_a, trans_b, seed):
    rng = np.random.default_rng(seed)
    a = rand(rng, (k, m) if trans_a else (m, k))
    b = rand(rng, (n, k) if trans_b else (k, n))
    want = ref.matmul(*f64(a, b), trans_a, trans_b)
    assert_close(_C.matmul(a, b, trans_a, trans_b), want, k)
    assert_close(_C.matmul(a, b, trans_a=trans_a, trans_b=trans_b), want, k)


@pytest.mark.parametrize(
    "m, k, n",
    [
        (130, 260, 2060),  # more than one MC, KC and NC block
        (1, 2000, 1),  # a dot product
        (5, 40000, 7),  # small C, long K: fixed chunks of K, added in order
        (2000, 1, 3),
        (70, 300, 48),  # columns past the last full register tile in narrow panels:
        (70, 300, 32),  # 32 + 16 (AVX-512), 24 + 8 (AVX2), 24 + 8 + 8 (AVX2)
        (70, 300, 40),
    ],
)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, True)])
def test_matmul_blocks(m, k, n, trans_a, trans_b, threads):
    """Against the reference, and bitwise the same at 1 and 2 threads."""
    rng = np.random.default_rng(m + k + n)
    a = rand(rng, (k, m) if trans_a else (m, k))
    b = rand(rng, (n, k) if trans_b else (k, n))
    want = ref.matmul(*f64(a, b), trans_a, trans_b)
    got = []
    for t in (1, 2):
        threads(t)
        got.append(_C.matmul(a, b, trans_a, trans_b))
        assert_close(got[-1], want, k)
    np.testing.assert_array_equal(got[0], got[1])



@pytest.mark.parametrize("m, k, n", [(32, 20000, 64), (24, 9000, 48), (13, 9000, 48), (8, 12000, 40), (16, 9000, 17)])
def test_matmul_long_k_reads_row_major_b_in_place_bitwise(m, k, n, threads):
    """A weight gradient's shape (a.T @ b, K long against C): where every register panel of b's
    n columns is full, the depth chunks read b in place instead of packing it (n = 17 always packs;
    m = 13 ends in a short row panel).
    The same bits as b packed (b given transposed, so it must be), at 1 and 2 threads."""
    rng = np.random.default_rng(m + n)
    a, b = rand(rng, (k, m)), rand(rng, (k, n))
    want = ref.matmul(*f64(a, b), True, False)
    bt = np.ascontiguousarray(b.T)
    for t in (1, 2):
        threads(t)
        got = _C.matmul(a, b, True, False)
        assert_close(got, want, k)
        np.testing.assert_array_equal(got, _C.matmul(a, bt, True, True), err_msg=f"{t} threads")

# --- the inference plan's GEMM: B packed once, columns [n0, n1) of a @ b ----------------------

SIMD = _C.build_info()["simd"]
NR = {"avx512": 32, "avx2": 24}.get(SIMD, 8)  # the register tile's width


def packed_panel(n):
    """The panel width PackedB chooses for a B of n columns."""
    return _C._matmul_packed_b(np.ones((1, 2), np.float32), np.ones((2, n), np.float32), 0, n)[1]


@given(m=DIM, k=st.one_of(DIM, st.sampled_from([256, 257, 600])),
       n=st.one_of(st.integers(1, 40), st.sampled_from([64, 100, 2100])), data=st.data())
def test_matmul_packed_b_is_matmul_bitwise(m, k, n, data):
    """Any panel-aligned column range, K over one KC slice (256), N over one NC block (2048 on
    AVX-512): the same bits as matmul on one thread (which does not split K), whichever panel."""
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    a, b = rand(rng, (m, k)), rand(rng, (k, n))
    panel = packed_panel(n)
    n0 = data.draw(st.sampled_from(range(0, n, panel)), label="n0")
    n1 = data.draw(st.integers(n0 + 1, n), label="n1")
    got, got_panel = _C._matmul_packed_b(a, b, n0, n1)
    assert got_panel == panel and got.shape == (m, n1 - n0)
    before = _C.get_num_threads()
    _C.set_num_threads(1)
    try:
        want = _C.matmul(a, b)[:, n0:n1]
    finally:
        _C.set_num_threads(before)
    np.testing.assert_array_equal(got, want, err_msg=f"m={m} k={k} n={n} [{n0}, {n1}) panel {panel}")
    assert_close(got, ref.matmul(*f64(a, b), False, False)[:, n0:n1], k)


@given(m=DIM, k=st.one_of(st.integers(1, 40), st.sampled_from([256, 300])),
       n=st.one_of(st.integers(1, 40), st.sampled_from([64, 100])), rsa=st.integers(0, 9),
       seed=st.integers(0, 2**31))
def test_packed_b_gathered_a_is_the_copied_a_bitwise(m, k, n, rsa, seed):
    """The plan's stem reads its taps in place: A(i, k) = src[i * rsa + koff[k]], rows overlapping
    (rsa below K), offsets in any order and repeated, K over one KC slice (256). The same bits as
    the same A copied out, in full register tiles and in the packed last panel alike."""
    rng = np.random.default_rng(seed)
    koff = rng.integers(0, 50, k)
    src = rand(rng, ((m - 1) * rsa + 50,))
    b = rand(rng, (k, n))
    a = src[np.arange(m)[:, None] * rsa + koff[None, :]]
    got = _C._matmul_packed_b_gather(src, m, rsa, koff.tolist(), b)
    np.testing.assert_array_equal(got, _C._matmul_packed_b(a, b, 0, n)[0],
                                  err_msg=f"m={m} k={k} n={n} rsa={rsa}")


def test_packed_b_gather_checks_its_offsets():
    b = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"koff must have one offset per row of b \(2\), got 3"):
        _C._matmul_packed_b_gather(np.ones(10, np.float32), 2, 1, [0, 1, 2], b)
    with pytest.raises(ValueError, match="offset 9 reads outside src"):
        _C._matmul_packed_b_gather(np.ones(10, np.float32), 2, 1, [0, 9], b)


@pytest.mark.parametrize("n", [8, 100])
def test_packed_b_rows_do_not_depend_on_the_panel(n):
    """A row of C has the same bits whether it is multiplied in a full register tile, read in
    place, or in a short last panel of 1..7 rows (the plan's tiles, hence its thread count,
    decide which)."""
    rng = np.random.default_rng(n)
    a, b = rand(rng, (37, 300)), rand(rng, (300, n))
    whole = _C._matmul_packed_b(a, b, 0, n)[0]
    for r0, r1 in [(0, 1), (3, 5), (8, 11), (30, 37), (36, 37), (5, 13)]:
        np.testing.assert_array_equal(_C._matmul_packed_b(a[r0:r1], b, 0, n)[0], whole[r0:r1],
                                      err_msg=f"rows [{r0}, {r1}) of 37, n={n}")


def test_packed_b_narrow_panel():
    """A B far narrower than the register tile is packed in narrower panels (less zero padding)."""
    assert packed_panel(1) < packed_panel(1000) == NR
    if SIMD == "avx512":
        assert [packed_panel(n) for n in (4, 8, 16, 17, 24, 48, 100)] == [16, 16, 16, 32, 32, 32, 32]


def test_packed_b_bad_columns():
    with pytest.raises(ValueError, match=f"n0 must be a multiple of the panel width {NR}, got 1"):
        _C._matmul_packed_b(np.ones((2, 3), np.float32), np.ones((3, 100), np.float32), 1, 5)
    with pytest.raises(ValueError, match=r"columns \[n0, n1\) must lie in \[0, 100\), got \[0, 101\)"):
        _C._matmul_packed_b(np.ones((2, 3), np.float32), np.ones((3, 100), np.float32), 0, 101)


@given(n=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), ci=CHANNELS, co=CHANNELS,
       seed=st.integers(0, 2**16))
def test_pwconv2d(n, h, w, ci, co, seed):
    rng = np.random.default_rng(seed)
    x, wt, dy = rand(rng, (n, h, w, ci)), rand(rng, (ci, co)), rand(rng, (n, h, w, co))
    assert_close(_C.pwconv2d_fwd(x, wt), ref.pwconv2d_fwd(*f64(x, wt)), ci)
    assert_close(_C.pwconv2d_bwd_input(dy, wt), ref.pwconv2d_bwd_input(*f64(dy, wt)), co)
    assert_close(_C.pwconv2d_bwd_weight(x, dy), ref.pwconv2d_bwd_weight(*f64(x, dy)), n * h * w)


@pytest.mark.parametrize(
    "shape_x, co",
    [
        ((8, 32, 32, 3), 17),  # bwd_weight: C is 3 x 17, K = 8192 rows, split across threads
        ((2, 32, 32, 32), 64),  # the first MobileNet pointwise layer at batch 2
        ((4, 2, 2, 100), 300),
    ],
)
def test_pwconv2d_threads_agree(shape_x, co, threads):
    rng = np.random.default_rng(0)
    ci = shape_x[-1]
    x, wt, dy = rand(rng, shape_x), rand(rng, (ci, co)), rand(rng, shape_x[:3] + (co,))
    rows = x.size // ci
    results = []
    for t in (1, 2):
        threads(t)
        results.append((_C.pwconv2d_fwd(x, wt), _C.pwconv2d_bwd_input(dy, wt), _C.pwconv2d_bwd_weight(x, dy)))
    for got in results:
        assert_close(got[0], ref.pwconv2d_fwd(*f64(x, wt)), ci)
        assert_close(got[1], ref.pwconv2d_bwd_input(*f64(dy, wt)), co)
        assert_close(got[2], ref.pwconv2d_bwd_weight(*f64(x, dy)), rows)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-4, atol=1e-5 * np.sqrt(rows))


@given(n=st.sampled_from([1, 2, 17, 128]), din=CHANNELS, dout=st.sampled_from([1, 3, 10, 17, 100]),
       seed=st.integers(0, 2**16))
def test_linear(n, din, dout, seed):
    rng = np.random.default_rng(seed)
    x, w, b, dy = rand(rng, (n, din)), rand(rng, (din, dout)), rand(rng, (dout,)), rand(rng, (n, dout))
    assert_close(_C.linear_fwd(x, w, b), ref.linear_fwd(*f64(x, w, b)), din)
    got = _C.linear_bwd(x, w, dy)
    want = ref.linear_bwd(*f64(x, w, dy))
    assert isinstance(got, tuple) and len(got) == 3
    for g, r, k in zip(got, want, (dout, n, n)):
        assert_close(g, r, k)


def test_linear_classifier_shape(threads):
    """The MobileNet head: 1024 features to 10 classes at batch 128, at 1 and 2 threads."""
    rng = np.random.default_rng(1)
    x, w, b, dy = rand(rng, (128, 1024)), rand(rng, (1024, 10)), rand(rng, (10,)), rand(rng, (128, 10))
    for t in (1, 2):
        threads(t)
        assert_close(_C.linear_fwd(x, w, b), ref.linear_fwd(*f64(x, w, b)), 1024)
        for g, r, k in zip(_C.linear_bwd(x, w, dy), ref.linear_bwd(*f64(x, w, dy)), (10, 128, 128)):
            assert_close(g, r, k)


def test_linear_long_input_accumulates_bias(threads):
    """x @ w is added onto the bias; with din this long the sum is split across threads."""
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, (3, 40000)), rand(rng, (40000, 3)), rand(rng, (3,)) * 100
    for t in (1, 2):
        threads(t)
        assert_close(_C.linear_fwd(x, w, b), ref.linear_fwd(*f64(x, w, b)), 40000)


def test_inputs_not_modified():
    rng = np.random.default_rng(2)
    x, w, dy = rand(rng, (2, 3, 3, 17)), rand(rng, (17, 5)), rand(rng, (2, 3, 3, 5))
    copies = [a.copy() for a in (x, w, dy)]
    _C.pwconv2d_fwd(x, w), _C.pwconv2d_bwd_input(dy, w), _C.pwconv2d_bwd_weight(x, dy)
    for a, c in zip((x, w, dy), copies):
        np.testing.assert_array_equal(a, c)


# --- bad arguments -----------------------------------------------------------------------------

def test_wrong_dtype_is_type_error():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="b"):
        _C.matmul(a, np.ones((4, 2), np.float64))
    with pytest.raises(TypeError, match="x"):
        _C.pwconv2d_fwd([[1.0]], np.ones((1, 1), np.float32))
    with pytest.raises(TypeError, match="b"):
        _C.linear_fwd(a, np.ones((4, 2), np.float32), np.ones(2, np.int64))


def test_non_contiguous_is_value_error():
    x = np.ones((2, 3, 3, 8), np.float32)
    with pytest.raises(ValueError, match="x.*contiguous"):
        _C.pwconv2d_fwd(x[..., ::2], np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="a.*contiguous"):
        _C.matmul(np.ones((4, 3), np.float32).T, np.ones((4, 2), np.float32))


def test_mismatched_inner_dims_name_the_arguments():
    a, b = np.ones((3, 4), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"a .*b .*4 vs 5"):
        _C.matmul(a, b)
    with pytest.raises(ValueError, match=r"a \(transposed\).*b"):
        _C.matmul(a, b, trans_a=True)
    with pytest.raises(ValueError, match=r"x .*w "):
        _C.pwconv2d_fwd(np.ones((1, 2, 2, 3), np.float32), np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"dy .*w "):
        _C.pwconv2d_bwd_input(np.ones((1, 2, 2, 3), np.float32), np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"x .*dy "):
        _C.pwconv2d_bwd_weight(np.ones((1, 2, 2, 3), np.float32), np.ones((1, 2, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"b .*w "):
        _C.linear_fwd(np.ones((2, 3), np.float32), np.ones((3, 5), np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"dy .*x "):
        _C.linear_bwd(np.ones((2, 3), np.float32), np.ones((3, 5), np.float32), np.ones((4, 5), np.float32))


def test_wrong_rank_is_value_error():
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        _C.pwconv2d_fwd(np.ones((4, 3), np.float32), np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="a must have 2 dimensions"):
        _C.matmul(np.ones(3, np.float32), np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="empty"):
        _C.matmul(np.ones((0, 3), np.float32), np.ones((3, 5), np.float32))
