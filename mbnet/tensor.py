"""A small reverse-mode autograd over NumPy arrays (DeZero/Chainer style).

A ``Tensor`` wraps an ndarray (float32 normally; float64 for gradient checks). Calling a
``Function`` on tensors runs its ``forward`` on their arrays and, while recording is on and some
input requires a gradient, links the output to the function so ``Tensor.backward`` can walk the
graph back in topological order. Each function keeps only the arrays its backward needs and drops
them once its backward has run, so a training step does not hold activations twice.
"""
import contextlib

import numpy as np

_recording = True


@contextlib.contextmanager
def no_grad():
    """Within this block, operations build no graph (inference, evaluation)."""
    global _recording
    old, _recording = _recording, False
    try:
        yield
    finally:
        _recording = old


def is_grad_enabled():
    return _recording


def _as_array(value, like=None):
    """ndarray for a Tensor's data: float32/float64 arrays are kept as they are; anything else
    (lists, Python numbers, ints) becomes ``like``'s dtype, or float32."""
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype in (np.float32, np.float64):
        return np.asarray(value)  # 0-d results of NumPy arithmetic come back as NumPy scalars
    dtype = like.dtype if like is not None else np.float32
    return np.asarray(value, dtype=dtype)


class Tensor:
    """An ndarray ``data`` with an optional gradient ``grad`` of the same shape.

    ``creator`` is the Function that produced it (None for leaves). ``backward`` fills ``grad``
    on every leaf that requires it, adding to what is there (call ``zero_grad`` between steps).
    """

    __array_priority__ = 1000  # ndarray (op) Tensor defers to Tensor's reflected operators
    grad_hook = None  # on a leaf: called as grad_hook(leaf) by backward once leaf.grad is final
    batch_stats = None  # per-channel (mean, var) of data, from a training convolution (mbnet.nn)

    def __init__(self, data, requires_grad=False):
        self.data = _as_array(data.data if isinstance(data, Tensor) else data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None
        self.output_index = 0

    # --- array-like properties ---
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def detach(self):
        return Tensor(self.data)

    def set_creator(self, func, index=0):
        self.creator = func
        self.output_index = index

    # --- backward ---
    def backward(self, grad=None):
        """Accumulates d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires a gradient.
        ``grad`` defaults to ones (a scalar loss). The graph is freed as it is walked.

        A leaf with a ``grad_hook`` has it called as soon as every function that uses the leaf has
        run its backward (its gradient is final), while the rest of the graph is still being
        walked: mbnet.distributed starts the gradient allreduce from there."""
        if grad is None:
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape}, tensor has {self.shape}")
        seen = {id(grad)}  # arrays already handed out: a leaf must not share one with another tensor
        if self.creator is None:
            if self.requires_grad:
                _accumulate_leaf(self, grad, seen)
                if self.grad_hook is not None:
                    self.grad_hook(self)
            return

        # Output gradients waiting for their function, by id(function); the order list keeps
        # every function alive (and its id unique) for the whole walk.
        order = _topological_order(self.creator)
        uses = _hooked_leaf_uses(order)
        pending = {id(self.creator): [None] * len(self.creator.output_shapes)}
        pending[id(self.creator)][self.output_index] = grad
        for func in order:
            gys = pending.pop(id(func), None)
            if gys is None:  # nothing reached it (an unused output of a multi-output function)
                _leaf_uses_done(func, uses)
                func.release()
                continue
            gys = [g if g is not None else np.zeros(s, func.output_dtype) for g, s in zip(gys, func.output_shapes)]
            gxs = func.backward(*gys)
            if not isinstance(gxs, tuple):
                gxs = (gxs,)
            for x, gx in zip(func.inputs, gxs):
                if gx is None or not x.requires_grad:
                    continue
                if x.creator is None:
                    _accumulate_leaf(x, gx, seen)
                else:
                    slots = pending.setdefault(id(x.creator), [None] * len(x.creator.output_shapes))
                    old = slots[x.output_index]
                    slots[x.output_index] = gx if old is None else old + gx
                seen.add(id(gx))
            _leaf_uses_done(func, uses)
            func.release()

    # --- operators (defined in terms of the Function classes below) ---
    def __add__(self, other):
        return add(self, other)

    def __radd__(self, other):
        return add(other, self)

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __mul__(self, other):
        return mul(self, other)

    def __rmul__(self, other):
        return mul(other, self)

    def __truediv__(self, other):
        return div(self, other)

    def __rtruediv__(self, other):
        return div(other, self)

    def __neg__(self):
        return neg(self)

    def sum(self, axis=None, keepdims=False):
        return sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return mean(self, axis, keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return reshape(self, tuple(shape))


def _accumulate_leaf(x, gx, seen):
    if gx.dtype != x.dtype:
        gx = gx.astype(x.dtype)
    if x.grad is None:
        # An optimizer may update .grad in place: never let it alias another tensor's gradient.
        # (a kernel's output has a capsule as its base, holding its aligned memory: not a view)
        x.grad = gx.copy() if (id(gx) in seen or isinstance(gx.base, np.ndarray)) else gx
    else:
        x.grad = x.grad + gx


def _hooked_leaf_uses(order):
    """id(leaf) -> how many inputs of the functions in ``order`` are that leaf, for the leaves
    with a grad_hook."""
    uses = {}
    for func in order:
        for x in func.inputs:
            if x.creator is None and x.grad_hook is not None:
                uses[id(x)] = uses.get(id(x), 0) + 1
    return uses


def _leaf_uses_done(func, uses):
    """Counts ``func``'s backward as done for its hooked leaf inputs; calls the hook of each
    leaf that has no use left."""
    if not uses:
        return
    for x in func.inputs:
        if id(x) in uses:
            uses[id(x)] -= 1
            if uses[id(x)] == 0:
                x.grad_hook(x)


def _topological_order(root):
    """Functions reachable from ``root``, each before the functions that made its inputs
    (reverse post-order of a depth-first walk; iterative, so deep graphs do not recurse)."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        func, expanded = stack.pop()
        if expanded:
            order.append(func)
            continue
        if id(func) in visited:
            continue
        visited.add(id(func))
        stack.append((func, True))
        for x in func.inputs:
            if x.creator is not None and id(x.creator) not in visited:
                stack.append((x.creator, False))
    return order[::-1]


class Function:
    """One differentiable operation: ``forward(*arrays)`` returns an array (or a tuple of them),
    ``backward(*grads)`` returns one gradient per input, None where ``needs_input_grad`` is False.

    ``needs_input_grad`` is set before ``forward`` runs, so forward keeps (as attributes) only
    what the needed gradients use; ``release`` drops all of it once backward has run. Inputs that
    are not Tensors (arrays, Python numbers) are constants of the first Tensor input's dtype.
    """

    inputs = ()

    def __call__(self, *inputs):
        like = next((x.data for x in inputs if isinstance(x, Tensor)), None)
        inputs = [x if isinstance(x, Tensor) else Tensor(_as_array(x, like)) for x in inputs]
        self.needs_input_grad = tuple(_recording and x.requires_grad for x in inputs)
        ys = self.forward(*[x.data for x in inputs])
        single = not isinstance(ys, tuple)
        ys = (ys,) if single else ys
        outputs = [Tensor(y) for y in ys]
        if any(self.needs_input_grad):
            self.inputs = inputs
            self.output_shapes = [y.shape for y in ys]
            self.output_dtype = ys[0].dtype
            for i, y in enumerate(outputs):
                y.requires_grad = True
                y.set_creator(self, i)
        else:
            self.release()
        return outputs[0] if single else tuple(outputs)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def release(self):
        """Drops the inputs and everything forward kept (after backward, or at once when no graph
        is recorded)."""
        needs = self.needs_input_grad
        vars(self).clear()
        self.needs_input_grad = needs


def unbroadcast(g, shape):
    """Sums ``g`` down to ``shape``: the adjoint of NumPy broadcasting."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


# --- arithmetic ----------------------------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy, sa) if self.needs_input_grad[0] else None,
                unbroadcast(gy, sb) if self.needs_input_grad[1] else None)


def add(a, b):
    return Add()(a, b)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy, sa) if self.needs_input_grad[0] else None,
                unbroadcast(-gy, sb) if self.needs_input_grad[1] else None)


def sub(a, b):
    return Sub()(a, b)


class Mul(Function):
    def forward(self, a, b):
        # Each gradient needs the other operand only.
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy * self.b, sa) if self.needs_input_grad[0] else None,
                unbroadcast(gy * self.a, sb) if self.needs_input_grad[1] else None)


def mul(a, b):
    return Mul()(a, b)


class Div(Function):
    def forward(self, a, b):
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if any(self.needs_input_grad) else None
        self.shapes = a.shape, b.shape
        return a / b

    def backward(self, gy):
        sa, sb = self.shapes
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(gy / self.b, sa)
        if self.needs_input_grad[1]:
            gb = unbroadcast(-gy * self.a / (self.b * self.b), sb)
        return ga, gb


def div(a, b):
    return Div()(a, b)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


def neg(x):
    return Neg()(x)


# --- reductions and shape ------------------------------------------------------------------------

def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % ndim for a in axes)


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        return np.asarray(x.sum(axis=self.axis, keepdims=self.keepdims))

    def backward(self, gy):
        if not self.keepdims:
            gy = np.expand_dims(gy, _norm_axes(self.axis, len(self.x_shape)))
        return np.broadcast_to(gy, self.x_shape)


def sum(x, axis=None, keepdims=False):  # noqa: A001  (Tensor.sum's functional form)
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    x = x if isinstance(x, Tensor) else Tensor(x)
    count = 1
    for a in _norm_axes(axis, x.ndim):
        count *= x.shape[a]
    return sum(x, axis, keepdims) * (1.0 / count)


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.x_shape)


def reshape(x, shape):
    return Reshape(shape)(x)
