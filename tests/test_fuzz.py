"""Hypothesis drives every binding of mbnet._C (test_bad_input.BINDINGS) with malformed arguments
in a child process: each call must raise TypeError, ValueError or MemoryError, or return outputs
of the right shape, and the child must never die from a signal or hang.

Each example is one call: a valid call from BINDINGS with up to two arguments broken (wrong dtype,
rank, layout or strides from test_bad_input.array_options, dimensions of up to 2^62 through
zero-stride views, NaN/Inf/huge/denormal values, huge stride/padding/(h, w), bools as ints, bad
labels, one argument too many or too few). Arrays are broken in the child, so that a view with a
2^62-element axis never has to be pickled. The child caps its address space at 4 GiB (not under
ASan), so a runaway allocation is a quick MemoryError.

CI runs a few hundred calls; `pytest tests/test_fuzz.py --fuzz-long` runs 10,000.
"""
import math
import os
import pickle
import select
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbnet import reference as R
from test_bad_input import (ACTS, BINDINGS, BOOLS, HWS, INTS, LABEL_MUTATIONS, MBNET_HOME, MBNET_ROOT, REALS,
                            THREADS, UNDER_ASAN, array_options, as_reference_arg, call)

CI_CALLS, LONG_CALLS = 500, 10_000  # over all bindings
CALL_TIMEOUT = 120  # seconds; a call that takes longer counts as a hang

HUGE_DIMS = [2**31, 2**32 + 1, 2**40, 2**62]
SPECIAL_VALUES = [math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, -0.0]
# The pools of test_bad_input, with huge values that still give small outputs together (stride and
# padding of 2^26 or 2^30 on a few pixels) and bools where ints belong.
SCALARS = {
    "stride": INTS + [False, 3, 7, 2**26, 2**30, 2**30 + 1],
    "padding": INTS + [False, 5, 40, 2**26, 2**30, 2**30 + 1],
    "hw": HWS + [(True, 2), (2, False), (2**16, 3), (3, 2**16), (2**30 + 1, 1), (np.int64(3), np.int32(3))],
    "act": ACTS,
    "real": REALS + [1e39, -1e39, 3.4e38, 5e-324, -0.0],
    "bool": BOOLS + [True, False, np.False_, 0, 1],
    "threads": THREADS + [True, 8, 9, 2**30],
}


# --- in the child: break the arguments, call, check the shapes ----------------------------------

def huge_dim(a, axis, size):
    """A read-only view of a with axis `axis` stretched to `size` entries that all alias its first."""
    shape, strides = list(a.shape), list(a.strides)
    shape[axis], strides[axis] = size, 0
    return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=False)


def filled(a, value, where):
    b = a.copy()
    if where == "all":
        b[...] = value
    else:
        b.flat[b.size // 2] = value
    return b


def broken(kinds_values, specs):
    """The argument list of the valid call kinds_values with each (index, op, *params) of specs applied."""
    args = [v for _, v in kinds_values]
    for i, op, *params in specs:
        value = kinds_values[i][1] if op != "arity" else None
        if op == "option":
            args[i] = array_options(value, params[0])[params[1]]()
        elif op == "huge_dim":
            args[i] = huge_dim(value, *params)
        elif op == "fill":
            args[i] = filled(value, *params)
        elif op == "label":
            k = next(v for kind, v in kinds_values if kind == "f32").shape[1]
            args[i] = LABEL_MUTATIONS[params[0]](value, k)
        elif op == "scalar":
            args[i] = params[0]
    for i, op, *params in specs:
        if op == "arity":
            args = args + [args[-1] if args else 1] if params[0] > 0 else args[:-1]
    return args


def expected_shapes(name, args):
    """Output shapes of a call that returned: from the convolution arithmetic for the kernels whose
    output size comes from their int arguments (huge padding would not fit the reference), from
    mbnet.reference otherwise."""
    if name in ("dwconv2d_bwd_input_bn", "dwconv2d_bn_act_bwd"):
        # dx like x (its third argument), dgamma and dbeta (c,); dw like w (the second)
        dx = [args[2].shape, args[2].shape[-1:], args[2].shape[-1:]]
        return dx + [args[1].shape] if name == "dwconv2d_bn_act_bwd" else dx
    if name.startswith(("conv2d", "dwconv2d")):
        a, b, *_, stride, padding = args
        if name.endswith(("_fwd", "_fwd_stats")):
            n, h, w, _ = a.shape
            kh, kw = b.shape[:2]
            y = (n, R.conv_out_size(h, kh, int(stride), int(padding)),
                 R.conv_out_size(w, kw, int(stride), int(padding)), b.shape[-1])
            return [y] if name.endswith("_fwd") else [y, y[-1:], y[-1:]]
        h, w = (int(v) for v in args[-3])  # input_hw or kernel_hw, before stride and padding
        if name.endswith("_bwd_input"):
            return [(a.shape[0], h, w, b.shape[2])]
        return [(h, w) + a.shape[3:] + ((b.shape[3],) if name.startswith("conv2d") else ())]
    if name == "global_avg_pool_bwd":
        h, w = (int(v) for v in args[1])
        return [(args[0].shape[0], h, w, args[0].shape[1])]
    big = [a for a in args if isinstance(a, np.ndarray) and a.size > 2**24]
    assert not big, f"returned for an argument of shape {big[0].shape} (a zero-stride view)"
    with np.errstate(all="ignore"):
        want = getattr(R, name)(*[as_reference_arg(a) for a in args])
    return [np.shape(w) for w in (want if isinstance(want, tuple) else (want,))]


def check_returned(name, args, result):
    if name == "set_num_threads":
        assert result is None
    elif name == "get_num_threads":
        assert isinstance(result, int) and result >= 1
    elif name == "build_info":
        assert isinstance(result, dict)
    else:
        got = result if isinstance(result, tuple) else (result,)
        want = expected_shapes(name, args)
        assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            if w == ():  # the loss: a Python float
                assert isinstance(g, float), f"output {i} is {type(g).__name__}, expected float"
                continue
            assert isinstance(g, np.ndarray) and g.dtype == np.float32, f"output {i} is {type(g).__name__}"
            assert g.shape == tuple(w), f"output {i} has shape {g.shape}, expected {tuple(w)}"


def run_one(name, kinds_values, specs):
    """("raised", type, message), ("returned",), ("skip", why) or ("wrong", what)."""
    try:
        args = broken(kinds_values, specs)
    except (ValueError, OverflowError) as e:  # numpy refuses the view itself (more than 2^63 bytes)
        return ("skip", f"numpy cannot build it: {e}")
    try:
        result = call(name, args)
    except (TypeError, ValueError, MemoryError) as e:
        return ("raised", type(e).__name__, str(e)[:300])
    except BaseException as e:
        return ("wrong", f"raised {type(e).__name__}: {e}")
    try:
        check_returned(name, args, result)
    except BaseException as e:
        return ("wrong", f"returned, but {type(e).__name__}: {e}")
    return ("returned",)


def worker_main():
    """The child: reads pickled (name, kinds_values, specs) from stdin, writes run_one's outcome."""
    if not UNDER_ASAN:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # replies only on the real stdout
    while True:
        try:
            request = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        pickle.dump(run_one(*request), out)
        out.flush()


# --- in the test process ------------------------------------------------------------------------

class Worker:
    """The child process, started again after it died."""

    def __init__(self):
        self.proc = None
        self.log = tempfile.TemporaryFile()

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(MBNET_ROOT / "tests"))
        self.log.seek(0)
        self.log.truncate()
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-c", "import test_fuzz; test_fuzz.worker_main()"],
            cwd=MBNET_HOME, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, request):
        if self.proc is None:
            self.start()
        try:
            pickle.dump(request, self.proc.stdin)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
            if not ready:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                return ("hung", CALL_TIMEOUT)
            return pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            rc = self.proc.wait()
            self.proc = None
            self.log.seek(0)
            return ("died", rc, self.log.read().decode(errors="replace")[-3000:])

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


def huge_dims(a, axis):
    """The sizes of HUGE_DIMS that axis `axis` of `a` can be stretched to (numpy refuses views of
    2^63 bytes or more)."""
    rest = a.size // a.shape[axis] if a.ndim else 1
    return [d for d in HUGE_DIMS if d * rest * a.itemsize < 2**63]


def draw_spec(draw, i, kind, value):
    """One way to break argument i (of `kind`, valid value `value`)."""
    if kind == "f32":
        axis = draw(st.integers(0, max(value.ndim, 1) - 1))
        return draw(st.one_of(
            st.sampled_from(sorted(array_options(value, axis))).map(lambda n: (i, "option", axis, n)),
            st.sampled_from(huge_dims(value, axis)).map(lambda size: (i, "huge_dim", axis, size)),
            st.tuples(st.sampled_from(SPECIAL_VALUES), st.sampled_from(["one", "all"])).map(lambda t: (i, "fill", *t)),
        ))
    if kind == "labels":
        return (i, "label", draw(st.sampled_from(sorted(LABEL_MUTATIONS))))
    return (i, "scalar", draw(st.sampled_from(SCALARS[kind])))


def describe(name, specs):
    return f"{name} with " + ("; ".join(f"arg {s[0]} {s[1]} {s[2:]!r}" for s in specs) or "valid arguments")


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_fuzz(name, worker, request):
    budget = -(-(LONG_CALLS if request.config.getoption("--fuzz-long") else CI_CALLS) // len(BINDINGS))
    outcomes = {}

    @settings(max_examples=budget, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=not request.config.getoption("--fuzz-long"))
    @given(data=st.data(), seed=st.integers(0, 2**16))
    def fuzz(data, seed):
        kinds_values = BINDINGS[name](data.draw, np.random.default_rng(seed))
        specs = []
        for _ in range(data.draw(st.sampled_from([1, 2, 1, 2, 0]))):  # a valid call now and then
            if kinds_values and data.draw(st.integers(0, 19)):
                i = data.draw(st.integers(0, len(kinds_values) - 1))
                specs.append(draw_spec(data.draw, i, *kinds_values[i]))
            else:
                specs.append((0, "arity", data.draw(st.sampled_from([-1, 1]))))
        outcome = worker.run((name, kinds_values, specs))
        where = describe(name, specs)
        assert outcome[0] != "died" or outcome[1] >= 0, f"{where}: child killed by signal {-outcome[1]}:\n{outcome[2]}"
        assert outcome[0] != "died", f"{where}: child exited with {outcome[1]}:\n{outcome[2]}"
        assert outcome[0] != "hung", f"{where}: no answer within {CALL_TIMEOUT} s"
        assert outcome[0] != "wrong", f"{where}: {outcome[1]}"
        outcomes[outcome[0]] = outcomes.get(outcome[0], 0) + 1

    fuzz()
    calls = outcomes.get("raised", 0) + outcomes.get("returned", 0)
    print(f"fuzz {name}: {calls} calls: {outcomes}")
    assert calls >= budget * 0.95, f"only {calls} calls were made (budget {budget}): {outcomes}"
    assert outcomes.get("returned", 0) >= calls // 20, f"too few calls returned to test much: {outcomes}"
