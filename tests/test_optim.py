"""Optimizer steps against hand-computed updates on a few scalars; schedules at chosen steps; EMA."""
import math

import numpy as np
import pytest

from mbnet import optim


class P:
    """A stand-in parameter: .data and .grad arrays."""

    def __init__(self, data, grad):
        self.data = np.array(data, dtype=np.float32)
        self.grad = None if grad is None else np.array(grad, dtype=np.float32)


def _params():
    # a "weight" (ndim 2) and a "BN/bias" (ndim 1)
    return [P([[1.0, -2.0]], [[0.5, 0.25]]), P([3.0], [-1.0])]


def _run(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = np.array(gi, dtype=np.float32)
        opt.step()
    return [p.data.astype(np.float64) for p in params]


def _close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.array(w, dtype=np.float64), rtol=1e-6, atol=1e-7)


GRADS = [([[0.5, 0.25]], [-1.0]), ([[-0.1, 0.3]], [2.0])]


def test_sgd_plain():
    ps = _params()
    got = _run(optim.SGD(ps, lr=0.1), ps, GRADS)
    _close(got, [[[1 - 0.1 * (0.5 - 0.1), -2 - 0.1 * (0.25 + 0.3)]], [3 - 0.1 * (-1 + 2)]])


def test_sgd_momentum_and_nesterov():
    lr, m = 0.1, 0.9
    for nesterov in (False, True):
        ps = _params()
        got = _run(optim.SGD(ps, lr=lr, momentum=m, nesterov=nesterov), ps, GRADS)
        want = []
        for k, x0 in enumerate([np.array([[1.0, -2.0]]), np.array([3.0])]):
            x, buf = x0.copy(), 0 * x0
            for g in GRADS:
                g = np.array(g[k])
                buf = m * buf + g
                x = x - lr * (g + m * buf if nesterov else buf)
            want.append(x)
        _close(got, want)
    # by hand, second step of the scalar with nesterov: buf1 = -1, buf2 = -0.9 + 2 = 1.1
    x = 3 - 0.1 * (-1 + 0.9 * -1)
    x = x - 0.1 * (2 + 0.9 * 1.1)
    np.testing.assert_allclose(got[1], [x], rtol=1e-6)


def test_sgd_weight_decay_and_skipping_1d():
    lr, wd = 0.1, 0.01
    for decay_1d in (True, False):
        ps = _params()
        got = _run(optim.SGD(ps, lr=lr, weight_decay=wd, decay_1d=decay_1d), ps, GRADS[:1])
        w = [1 - lr * (0.5 + wd * 1), -2 - lr * (0.25 + wd * -2)]
        b = 3 - lr * (-1 + (wd * 3 if decay_1d else 0))
        _close(got, [[w], [b]])


def test_sgd_skips_params_without_grad():
    ps = [P([1.0], None)]
    opt = optim.SGD(ps, lr=0.1, momentum=0.9)
    opt.step()
    np.testing.assert_array_equal(ps[0].data, [1.0])


def test_rmsprop_tf_style():
    lr, rho, mom, eps = 0.01, 0.9, 0.9, 1.0
    ps = [P([2.0], None)]
    got = _run(optim.RMSprop(ps, lr=lr), ps, [([0.5],), ([-1.0],)])
    ms1 = rho * 1.0 + (1 - rho) * 0.25
    m1 = lr * 0.5 / math.sqrt(ms1 + eps)
    ms2 = rho * ms1 + (1 - rho) * 1.0
    m2 = mom * m1 + lr * -1.0 / math.sqrt(ms2 + eps)
    _close(got, [[2.0 - m1 - m2]])


def test_adam():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    ps = [P([2.0], None)]
    got = _run(optim.Adam(ps, lr=lr), ps, [([0.5],), ([-1.0],)])
    x, m, v = 2.0, 0.0, 0.0
    for t, g in enumerate([0.5, -1.0], 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
    _close(got, [[x]])
    # the first Adam step moves every coordinate by ~lr regardless of the gradient's scale
    np.testing.assert_allclose(2.0 - 0.01, _run(optim.Adam([q := P([2.0], None)], lr=lr), [q], [([1e-3],)])[0],
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam"])
def test_state_dict_round_trip_continues_identically(name, rng):
    def make():
        ps = [P(rng_w.standard_normal((3, 2)), None), P(rng_w.standard_normal(2), None)]
        return ps, optim.make_optimizer(name, ps, lr=0.05, weight_decay=1e-3)

    grads = [[rng.standard_normal((3, 2)), rng.standard_normal(2)] for _ in range(5)]
    rng_w = np.random.default_rng(1)
    ps, opt = make()
    full = _run(opt, ps, grads)

    rng_w = np.random.default_rng(1)
    ps, opt = make()
    _run(opt, ps, grads[:2])
    state = opt.state_dict()
    weights = [p.data.copy() for p in ps]
    ps2, opt2 = make()
    for p, w in zip(ps2, weights):
        p.data[...] = w
    opt2.load_state_dict(state)
    resumed = _run(opt2, ps2, grads[2:])
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a, b)
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_updates_are_in_place_and_float32():
    ps = _params()
    before = [p.data for p in ps]
    for name in ("sgd", "rmsprop", "adam"):
        _run(optim.make_optimizer(name, ps, lr=0.1, weight_decay=1e-2), ps, GRADS)
    assert all(p.data is b and p.data.dtype == np.float32 for p, b in zip(ps, before))


# ----------------------------------------------------------------------------------------------


def test_step_schedule():
    s = optim.StepSchedule(0.1, total=110, warmup=10, milestones=(0.5, 0.75), gamma=0.1)
    np.testing.assert_allclose([s(0), s(5), s(10), s(59), s(60), s(84), s(85), s(109)],
                               [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule():
    s = optim.CosineSchedule(0.2, total=104, warmup=4)
    np.testing.assert_allclose([s(0), s(2), s(4), s(54), s(104)], [0.0, 0.1, 0.2, 0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(s(29), 0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert optim.CosineSchedule(0.2, total=10)(0) == 0.2


def test_onecycle_schedule():
    s = optim.OneCycleSchedule(0.1, total=100, warmup=20)
    np.testing.assert_allclose([s(0), s(10), s(20), s(60)], [0.004, 0.052, 0.1, 0.05 + 0.5 * 0.004e-4], rtol=1e-9)
    np.testing.assert_allclose(s(100), 0.1 / 25e4)
    lrs = [s(i) for i in range(100)]
    assert np.argmax(lrs) == 20 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_make_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="linear"):
        optim.make_schedule("linear", 0.1, 10, 0)


def test_ema():
    w = {"a": np.array([1.0, 2.0], np.float32), "bn.mean": np.array([0.0], np.float32)}
    ema = optim.EMA(w, decay=0.9)
    w["a"][...] = [3.0, 2.0]
    ema.update(w)  # d = min(0.9, 2/11)
    d = 2 / 11
    np.testing.assert_allclose(ema.shadow["a"], [d * 1 + (1 - d) * 3, 2.0], rtol=1e-6)
    for _ in range(200):
        ema.update(w)
    np.testing.assert_allclose(ema.shadow["a"], [3.0, 2.0], rtol=1e-6)
    assert ema.shadow["a"] is not w["a"]
    e2 = optim.EMA(w, decay=0.9)
    e2.load_state_dict(ema.state_dict())
    assert e2.updates == 201
    np.testing.assert_array_equal(e2.shadow["a"], ema.shadow["a"])


# --- the update kernels (mbnet._C.sgd_update, ema_update) against their NumPy twins ---------------

SGD_MODES = [(0.0, 0.0, False), (0.0, 5e-4, False), (0.9, 0.0, False), (0.9, 5e-4, False), (0.9, 1e-3, True)]


@pytest.mark.parametrize("momentum, wd, nesterov", SGD_MODES)
@pytest.mark.parametrize("shape", [(7,), (3, 3, 40, 33)], ids=["small", "threaded"])  # 47,520 >= 2^15: threads
@pytest.mark.parametrize("threads", [1, 2])
def test_sgd_kernel_is_bitwise_numpy(momentum, wd, nesterov, shape, threads, rng):
    """Three steps of mbnet._C.sgd_update give bitwise the p and buf of mbnet.reference's NumPy
    operations (the optimizer's float64 path, and this optimizer before the kernel), at 1 and 2
    threads; it updates in place and returns p."""
    from mbnet import _C
    from mbnet import reference as R

    before = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        p = rng.standard_normal(shape).astype(np.float32)
        bufs = [np.zeros_like(p) if momentum else None for _ in range(2)]
        ps = [p.copy(), p.copy()]
        for step, lr in enumerate((0.1, 0.05, 0.3)):
            g = rng.standard_normal(shape).astype(np.float32)
            assert _C.sgd_update(ps[0], g, bufs[0], lr, momentum, wd, nesterov) is ps[0]
            R.sgd_update(ps[1], g, bufs[1], lr, momentum, wd, nesterov)
            np.testing.assert_array_equal(ps[0], ps[1], err_msg=f"p after step {step + 1}")
            if momentum:
                np.testing.assert_array_equal(bufs[0], bufs[1], err_msg=f"buf after step {step + 1}")
        assert not np.array_equal(ps[0], p)
    finally:
        _C.set_num_threads(before)


def test_ema_kernel_is_bitwise_numpy(rng):
    from mbnet import _C
    from mbnet import reference as R

    s = rng.standard_normal((3, 3, 40, 33)).astype(np.float32)
    twin = s.copy()
    for d in (0.5, 0.999, 0.9999):
        v = rng.standard_normal(s.shape).astype(np.float32)
        assert _C.ema_update(s, v, d) is s
        R.ema_update(twin, v, d)
        np.testing.assert_array_equal(s, twin, err_msg=f"decay {d}")


@pytest.mark.parametrize("call, message", [
    (lambda C, p, g, b: C.sgd_update(p[:3], g, b, 0.1, 0.9, 0.0, False), "grad must have p's shape"),
    (lambda C, p, g, b: C.sgd_update(p, g, None, 0.1, 0.9, 0.0, False), "buf must be the momentum buffer"),
    (lambda C, p, g, b: C.sgd_update(p, g, p, 0.1, 0.9, 0.0, False), "buf and p must not share memory"),
    (lambda C, p, g, b: C.sgd_update(p, p, b, 0.1, 0.9, 0.0, False), "p and grad must not share memory"),
    (lambda C, p, g, b: C.sgd_update(p, g, g, 0.1, 0.9, 0.0, False), "buf and grad must not share memory"),
    # overlapping, not equal: a momentum buffer one float into p's memory used to update both wrongly
    (lambda C, p, g, b: (lambda big: C.sgd_update(big[:4], g, big[1:5], 0.1, 0.9, 0.0, False))(
        np.ones(5, np.float32)), "buf and p must not share memory"),
    (lambda C, p, g, b: C.ema_update(p, p, 0.9), "shadow and value must not share memory"),
    (lambda C, p, g, b: C.sgd_update(p, g, b, 0.1, 0.0, 0.0, True), "nesterov needs momentum > 0"),
    (lambda C, p, g, b: C.sgd_update(p, g, b, float("nan"), 0.9, 0.0, False), "lr must be finite"),
    (lambda C, p, g, b: C.sgd_update(p, g, b, 0.1, -0.5, 0.0, False), r"momentum must be finite and in \[0.0+, 1.0+\]"),
    (lambda C, p, g, b: C.sgd_update(p, g, b, -0.1, 0.9, 0.0, False), "lr must be finite and >= 0"),
    (lambda C, p, g, b: C.sgd_update(p, g, b, 0.1, 0.9, float("inf"), False), "weight_decay must be finite"),
    (lambda C, p, g, b: C.sgd_update(p.astype(np.float64), g, b, 0.1, 0.9, 0.0, False), "p must have dtype float32"),
    (lambda C, p, g, b: C.sgd_update(np.broadcast_to(p, (2, 4)), g, b, 0.1, 0.9, 0.0, False), "p must"),
    (lambda C, p, g, b: C.ema_update(p, g[:2], 0.9), "value must have shadow's shape"),
    (lambda C, p, g, b: C.ema_update(p, g, 1.5), "decay must be finite and in"),
])
def test_update_kernels_name_bad_arguments(call, message):
    from mbnet import _C

    p, g, b = np.ones(4, np.float32), np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises((TypeError, ValueError), match=message):
        call(_C, p, g, b)
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="p must be writeable"):
        _C.sgd_update(ro, g, b, 0.1, 0.9, 0.0, False)
