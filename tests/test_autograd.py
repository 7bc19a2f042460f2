"""The autograd core (mbnet.tensor): arithmetic with broadcasting, reductions, graph walking,
accumulation, no_grad, memory release. ``check_backward`` is shared by the other test files."""
import numpy as np
import pytest

import mbnet
from mbnet import Tensor, no_grad


def check_backward(fn, inputs, name, rng=None, argnames=None, eps=1e-6, rtol=1e-6, atol=1e-9):
    """Chainer-style gradient check in float64, one argument at a time.

    ``fn`` maps Tensors to a Tensor; ``inputs`` are float64 arrays. Against a random output
    gradient gy, the analytic directional derivative <grad_i, d> of <fn(...), gy> along a random
    direction d of argument i must match the central difference
    (<fn(x_i + eps d), gy> - <fn(x_i - eps d), gy>) / (2 eps), within atol + rtol * scale, where
    scale is the size of the derivative's terms."""
    rng = rng if rng is not None else np.random.default_rng(0)
    argnames = argnames or [f"x{i}" for i in range(len(inputs))]
    inputs = [np.asarray(a, np.float64) for a in inputs]
    xs = [Tensor(a.copy(), requires_grad=True) for a in inputs]
    y = fn(*xs)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    for i, (x, argname) in enumerate(zip(xs, argnames)):
        assert x.grad is not None, f"{name}: no gradient reached argument {argname}"
        assert x.grad.shape == x.shape and x.grad.dtype == np.float64, f"{name}: bad gradient for {argname}"
        d = rng.standard_normal(x.shape)

        def f(t):
            shifted = [Tensor(a + t * d if j == i else a) for j, a in enumerate(inputs)]
            with no_grad():
                return float(np.sum(fn(*shifted).data * gy))

        numeric = (f(eps) - f(-eps)) / (2 * eps)
        analytic = float(np.sum(x.grad * d))
        scale = float(np.sum(np.abs(x.grad * d))) + abs(numeric)
        assert abs(analytic - numeric) <= atol + rtol * scale, (
            f"{name}: gradient w.r.t. {argname} is wrong: analytic {analytic!r}, numeric {numeric!r}, "
            f"difference {abs(analytic - numeric):.3g}, scale {scale:.3g}")


# --- arithmetic, reductions, shapes ----------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4)), ((4,), (2, 3, 4)),
                                    ((2, 1, 4), (2, 3, 1))], ids=str)
def test_binary_ops_gradients_with_broadcasting(op, shapes, rng):
    a = rng.standard_normal(shapes[0])
    b = rng.standard_normal(shapes[1])
    if op == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)  # away from 0
    fns = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
           "div": lambda x, y: x / y}
    check_backward(fns[op], [a, b], f"{op}{shapes}", rng, ["a", "b"])


def test_ops_with_python_numbers_and_arrays(rng):
    a = rng.standard_normal((2, 3))
    check_backward(lambda x: 2.0 - x * 3 + 1 / (x * x + 1) - (-x) / 4.0, [a], "scalar arithmetic", rng)
    c = rng.standard_normal(3)
    check_backward(lambda x: c * x + c - x / (c * c + 1), [a], "ndarray constants", rng)


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_and_mean_gradients(axis, keepdims, rng):
    a = rng.standard_normal((2, 3, 4))
    check_backward(lambda x: x.sum(axis, keepdims), [a], f"sum(axis={axis})", rng)
    check_backward(lambda x: x.mean(axis, keepdims), [a], f"mean(axis={axis})", rng)
    np.testing.assert_allclose(Tensor(a).mean(axis, keepdims).data, a.mean(axis=axis, keepdims=keepdims))


def test_reshape_gradient(rng):
    a = rng.standard_normal((2, 3, 4))
    check_backward(lambda x: x.reshape(6, 4) * x.reshape((6, 4)), [a], "reshape", rng)
    assert Tensor(a).reshape(4, -1).shape == (4, 6)


# --- graph walking and accumulation ---------------------------------------------------------------

def test_tensor_used_twice_gets_the_sum():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 1)

    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_diamond_graph_processes_each_node_after_all_its_consumers(rng):
    # y feeds z directly and through w: y's function must wait for both gradients.
    def f(x):
        y = x * x
        w = y * 3.0 + x
        z = (y * w - w / (y + 2.0)).sum()
        return z

    check_backward(f, [rng.standard_normal((3, 2))], "diamond", rng)


def test_gradients_accumulate_across_backward_calls_until_cleared():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])
    x.grad = None
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_leaf_gradients_never_alias_each_other_or_the_seed():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    seed = np.array([1.0, 2.0, 3.0])
    y = a + b
    y.backward(seed)
    np.testing.assert_array_equal(a.grad, seed)
    a.grad *= 10  # an optimizer may scale gradients in place
    np.testing.assert_array_equal(b.grad, seed)
    np.testing.assert_array_equal(seed, [1.0, 2.0, 3.0])
    c = Tensor(np.ones((2, 3)), requires_grad=True)
    c.sum().backward()
    c.grad += 1  # the broadcast gradient must be a writable array of its own
    np.testing.assert_array_equal(c.grad, np.full((2, 3), 2.0))


def test_only_leaves_that_require_grad_get_gradients():
    x = Tensor(np.ones(2), requires_grad=True)
    c = Tensor(np.ones(2))
    y = x * c
    z = (y * 2.0).sum()
    z.backward()
    assert c.grad is None and y.grad is None and x.grad is not None
    assert y.requires_grad and not c.requires_grad


def test_backward_of_a_leaf_and_of_a_non_scalar():
    x = Tensor(np.ones(3), requires_grad=True)
    x.backward()
    np.testing.assert_array_equal(x.grad, np.ones(3))
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 40.0])
    with pytest.raises(ValueError, match="shape"):
        (x * x).backward(np.ones(3))


def test_no_grad_records_nothing():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        assert not mbnet.is_grad_enabled()
        y = x * 2.0 + 1.0
    assert mbnet.is_grad_enabled()
    assert y.creator is None and not y.requires_grad
    y.sum().backward()
    assert x.grad is None


def test_backward_releases_what_functions_kept():
    x = Tensor(np.ones((4, 4)), requires_grad=True)
    c = Tensor(np.full((4, 4), 2.0))
    y = x * c
    func = y.creator
    assert func.b is not None and func.a is None  # only the other operand of the one needed gradient
    y.sum().backward()
    assert not hasattr(func, "b") and func.inputs == ()


def test_long_chain_does_not_recurse():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.backward()
    np.testing.assert_array_equal(x.grad, [1.0])


# --- dtypes -------------------------------------------------------------------------------------

def test_dtypes_are_kept():
    assert Tensor([1, 2]).dtype == np.float32
    assert Tensor(3.0).dtype == np.float32
    assert Tensor(np.zeros(2)).dtype == np.float64  # float64 is never cast down
    a = Tensor(np.ones(3, np.float32), requires_grad=True)
    y = (a * 2.5 + 1 - a / 3.0).mean()
    assert y.dtype == np.float32
    y.backward()
    assert a.grad.dtype == np.float32
    b = Tensor(np.ones(3), requires_grad=True)
    (b * 2.5).sum().backward()
    assert b.grad.dtype == np.float64


def test_tensor_properties():
    t = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert t.shape == (2, 3) and t.ndim == 2 and t.dtype == np.float32 and t.size == 6
    assert t.numpy() is t.data and t.sum().item() == 15.0
    assert "Tensor(" in repr(t)
