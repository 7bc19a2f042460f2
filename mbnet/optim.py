"""Optimizers (SGD, RMSprop, Adam), learning-rate schedules, and an exponential moving average of weights.

Optimizers take a list of parameters (objects with `.data` and `.grad` float32 ndarrays) and update
`p.data` in place: SGD and the EMA through one kernel pass each (``mbnet._C.sgd_update``,
``ema_update``: bitwise the NumPy operations of ``mbnet.reference``, which float64 arrays run),
RMSprop and Adam with NumPy ufuncs writing into preallocated buffers. `lr` is an attribute the
training loop sets every step from a schedule. Parameters whose `.grad` is None are skipped.

Weight decay is L2 added to the gradient (PyTorch's `weight_decay`): one factor for all parameters or
a sequence of one per parameter (the trainer's --dw-weight-decay); with `decay_1d=False` it is not
applied to parameters with ndim == 1 (BatchNorm scales and shifts, biases).

state_dict() is a flat dict of ndarrays ("step", "<i>.<slot>" with i the parameter's position), so
it goes straight into an .npz checkpoint.
"""
import math

import numpy as np

from . import _C, reference


def _update_kernel(name, dtype):
    """The in-place update ``name`` for arrays of dtype: mbnet._C's for float32 (C-contiguous
    arrays: the kernel refuses others, where a contiguous copy would be updated instead), NumPy's
    (mbnet.reference) otherwise."""
    return getattr(_C if dtype == np.float32 else reference, name)


class Optimizer:
    slots = ()
    needs_scratch = True  # a scratch buffer per parameter (for _grad)
    needs_tmp = False  # a second scratch buffer per parameter

    def __init__(self, params, lr, weight_decay=0.0, decay_1d=True):
        self.params = list(params)
        self.lr = lr
        factors = [weight_decay] * len(self.params) if np.isscalar(weight_decay) else list(weight_decay)
        if len(factors) != len(self.params):
            raise ValueError(f"weight_decay: {len(factors)} factors for {len(self.params)} parameters")
        self.decays = [wd if (decay_1d or p.data.ndim > 1) else 0.0 for p, wd in zip(self.params, factors)]
        self.step_count = 0
        self.state = [{s: self._init_slot(s, p.data) for s in self.slots} for p in self.params]
        self._scratch = [np.empty_like(p.data) if self.needs_scratch else None for p in self.params]
        self._tmp = [np.empty_like(p.data) for p in self.params] if self.needs_tmp else [None] * len(self.params)

    def _init_slot(self, slot, data):
        return np.zeros_like(data)

    def _grad(self, p, g, wd):
        """Writes grad + wd * p into g (the scratch buffer) and returns it."""
        if wd:
            np.multiply(p.data, wd, out=g)
            g += p.grad
        else:
            g[...] = p.grad
        return g

    def step(self):
        self.step_count += 1
        for p, wd, st, g, tmp in zip(self.params, self.decays, self.state, self._scratch, self._tmp):
            if p.grad is not None:
                self._update(p.data, self._grad(p, g, wd), st, tmp)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self):
        d = {"step": np.array(self.step_count, dtype=np.int64)}
        for i, st in enumerate(self.state):
            for k, v in st.items():
                d[f"{i}.{k}"] = v.copy()
        return d

    def load_state_dict(self, d):
        self.step_count = int(d["step"])
        for i, st in enumerate(self.state):
            for k, v in st.items():
                src = np.asarray(d[f"{i}.{k}"])
                if src.shape != v.shape:
                    raise ValueError(f"optimizer slot {i}.{k}: shape {src.shape}, expected {v.shape}")
                v[...] = src


class SGD(Optimizer):
    """PyTorch's SGD (dampening 0): buf = m·buf + g; p -= lr·(g + m·buf if nesterov else buf), with
    g = grad + weight_decay·p; one ``sgd_update`` kernel call per parameter."""
    needs_scratch = False

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, decay_1d=True):
        if nesterov and momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov
        self.slots = ("momentum",) if momentum else ()
        super().__init__(params, lr, weight_decay, decay_1d)

    def step(self):
        self.step_count += 1
        for p, wd, st in zip(self.params, self.decays, self.state):
            if p.grad is not None:
                _update_kernel("sgd_update", p.data.dtype)(p.data, np.ascontiguousarray(p.grad), st.get("momentum"),
                                                           self.lr, self.momentum, wd, self.nesterov)


class RMSprop(Optimizer):
    """RMSprop as TensorFlow 1 (tf.train.RMSPropOptimizer) and the MobileNet paper use it:

        ms  = decay·ms + (1 - decay)·g²          (ms starts at 1, as in TF)
        mom = momentum·mom + lr·g / sqrt(ms + eps)
        p  -= mom

    eps sits inside the square root (TF's convention), and the paper's recipe uses eps = 1.0, which
    is our default; decay 0.9, momentum 0.9.
    """

    slots = ("ms", "mom")
    needs_tmp = True

    def __init__(self, params, lr, decay=0.9, momentum=0.9, eps=1.0, weight_decay=0.0, decay_1d=True):
        self.decay, self.momentum, self.eps = decay, momentum, eps
        super().__init__(params, lr, weight_decay, decay_1d)

    def _init_slot(self, slot, data):
        return np.ones_like(data) if slot == "ms" else np.zeros_like(data)

    def _update(self, p, g, st, tmp):
        ms, mom = st["ms"], st["mom"]
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.decay
        ms *= self.decay
        ms += tmp
        np.add(ms, self.eps, out=tmp)
        np.sqrt(tmp, out=tmp)
        g *= self.lr
        g /= tmp
        mom *= self.momentum
        mom += g
        p -= mom


class Adam(Optimizer):
    """PyTorch's Adam: m = b1·m + (1-b1)·g, v = b2·v + (1-b2)·g², p -= lr/(1-b1^t) · m / (sqrt(v/(1-b2^t)) + eps)."""

    slots = ("m", "v")
    needs_tmp = True

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_1d=True):
        self.beta1, self.beta2 = betas
        self.eps = eps
        super().__init__(params, lr, weight_decay, decay_1d)

    def _update(self, p, g, st, tmp):
        t = self.step_count
        b1, b2 = self.beta1, self.beta2
        m, v = st["m"], st["v"]
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        np.sqrt(v, out=g)
        g *= 1.0 / math.sqrt(1.0 - b2 ** t)
        g += self.eps
        np.divide(m, g, out=g)
        g *= self.lr / (1.0 - b1 ** t)
        p -= g


def make_optimizer(name, params, lr, weight_decay=0.0, decay_1d=False, momentum=0.9, nesterov=True):
    if name == "sgd":
        return SGD(params, lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                   weight_decay=weight_decay, decay_1d=decay_1d)
    if name == "rmsprop":
        return RMSprop(params, lr, momentum=momentum, weight_decay=weight_decay, decay_1d=decay_1d)
    if name == "adam":
        return Adam(params, lr, weight_decay=weight_decay, decay_1d=decay_1d)
    raise ValueError(f"unknown optimizer {name!r}")


# ----------------------------------------------------------------------------------------------
# Schedules: lr as a function of the global step (0-based), each with a linear warm-up.


class Schedule:
    """lr(step) for step in [0, total). Warm-up: lr rises linearly over the first `warmup` steps
    from `start` to `peak`, reaching `peak` at step `warmup`; the decay follows."""

    def __init__(self, peak, total, warmup=0, start=0.0):
        self.peak, self.total, self.warmup, self.start = peak, max(1, total), max(0, warmup), start

    def __call__(self, step):
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / self.warmup
        return self.decay(step - self.warmup, max(1, self.total - self.warmup))

    def decay(self, t, n):
        raise NotImplementedError


class StepSchedule(Schedule):
    """peak · gamma^(number of milestones passed); milestones are fractions of the post-warm-up steps."""

    def __init__(self, peak, total, warmup=0, milestones=(0.5, 0.75), gamma=0.1):
        super().__init__(peak, total, warmup)
        self.milestones, self.gamma = milestones, gamma

    def decay(self, t, n):
        return self.peak * self.gamma ** sum(t >= f * n for f in self.milestones)


class CosineSchedule(Schedule):
    """Cosine from peak down to `final` at the last step."""

    def __init__(self, peak, total, warmup=0, final=0.0):
        super().__init__(peak, total, warmup)
        self.final = final

    def decay(self, t, n):
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * min(t / n, 1.0)))


class OneCycleSchedule(CosineSchedule):
    """One cycle (Smith 2018, PyTorch's OneCycleLR with linear ramp): up linearly from peak/div to
    peak during the warm-up, then cosine down to peak/(div·final_div)."""

    def __init__(self, peak, total, warmup=0, div=25.0, final_div=1e4):
        super().__init__(peak, total, warmup, final=peak / (div * final_div))
        self.start = peak / div


def make_schedule(name, peak, total, warmup, **options):
    """options: the schedule's own keywords (step: milestones, gamma)."""
    kinds = {"step": StepSchedule, "cosine": CosineSchedule, "onecycle": OneCycleSchedule}
    if name not in kinds:
        raise ValueError(f"unknown schedule {name!r}")
    return kinds[name](peak, total, warmup, **options)


# ----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of named float arrays (parameters and BN running statistics).

    ema = d·ema + (1 - d)·value with d = min(decay, (1 + n) / (10 + n)) after n updates (TF's
    ExponentialMovingAverage with num_updates), so early averages are not dominated by the
    random initialization.
    """

    def __init__(self, arrays, decay=0.999):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}

    def update(self, arrays):
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, s in self.shadow.items():
            _update_kernel("ema_update", arrays[k].dtype)(s, arrays[k], d)

    def state_dict(self):
        d = {"updates": np.array(self.updates, dtype=np.int64)}
        d.update({"w." + k: v.copy() for k, v in self.shadow.items()})
        return d

    def load_state_dict(self, d):
        self.updates = int(d["updates"])
        for k, v in self.shadow.items():
            v[...] = d["w." + k]
