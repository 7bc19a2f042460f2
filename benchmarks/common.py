"""Helpers shared by the benchmarks of this package: timing, the machine's description, Markdown
tables, JSON output and the command line every bench_*.py module offers.

Timing is warm-up call(s), then the median of ``repeat`` timed calls (time.perf_counter). Before
each measurement we sleep briefly: the worker threads of another OpenMP runtime (PyTorch's, numba's,
OpenBLAS's) keep spinning for a moment after their last call and would steal one of the cores.
"""
import argparse
import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from mbnet._native import cpu_name  # noqa: F401  (part of this module's interface)

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")
PAUSE = 0.05  # seconds of sleep before each measurement; the --tiny smoke runs set it to 0


def measure(fn, repeat=5, warmup=1, pause=None):
    """Calls fn() ``warmup`` times, then times ``repeat`` calls. Returns {"median", "min", "times"}
    in seconds."""
    pause = PAUSE if pause is None else pause
    if pause:
        time.sleep(pause)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def optional_import(name):
    """The module, or None when it is not installed (torch and numba are not dependencies)."""
    try:
        return __import__(name)
    except ImportError:
        return None


def machine_info():
    """CPU, SIMD level of the build, thread count, library versions, OpenBLAS environment."""
    from mbnet import _C

    info = _C.build_info()
    return {
        "cpu": cpu_name(),
        "simd": info.get("simd"),
        "threads": _C.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "build": {k: v for k, v in info.items()},
        "env": {k: os.environ.get(k) for k in OPENBLAS_VARS},
    }


def openblas_note(env=None):
    """One line saying whether OPENBLAS_CORETYPE is set (it slows NumPy's BLAS on AVX-512)."""
    env = os.environ if env is None else env
    core = env.get("OPENBLAS_CORETYPE")
    if core:
        return (f"OPENBLAS_CORETYPE={core} is set (OPENBLAS_L2_SIZE={env.get('OPENBLAS_L2_SIZE')}): NumPy's BLAS is "
                "held to that core type. For a fair NumPy comparison run "
                "`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks ...`")
    return "OPENBLAS_CORETYPE is not set: NumPy's BLAS picks its kernels for this CPU."


def header(info):
    """Markdown lines describing the machine (from machine_info())."""
    return [
        f"CPU: {info['cpu']}; mbnet build: {info['simd']}, {info['threads']} threads; "
        f"Python {info['python']}, NumPy {info['numpy']}",
        "",
        openblas_note(info["env"]),
    ]


def table(headers, rows, align=None):
    """A Markdown table. align: a string of 'l'/'r' per column (default: first left, rest right).
    Cells that are floats print with 3 significant digits; None prints as an em dash."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "--:" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(v):
    if v is None:
        return "—"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def millions(n, digits=1):
    return f"{n / 1e6:.{digits}f}M"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path, data):
    """Writes data (dicts, lists, numbers, NumPy scalars/arrays) as indented JSON."""
    Path(path).write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def _list_of(kind):
    return lambda text: tuple(kind(v) for v in text.split(","))


def cli(doc, run, markdown, argv=None, help=None):
    """The command line of a benchmark module, read off run's keywords so the defaults live in one
    place: --threads, --tiny, --no-X for use_X, --NAME-WITH-DASHES of the default's type for the
    others (a tuple default takes a comma-separated list); then --json. help: {keyword: text}.
    Calls run(**options), prints markdown(result), writes the result as JSON if asked, returns it."""
    help = {"threads": "default: mbnet's current OpenMP setting", "tiny": "a smoke run", **(help or {})}
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name, param in inspect.signature(run).parameters.items():
        default, flag = param.default, "--" + name.replace("_", "-")
        if name.startswith("use_"):
            ap.add_argument("--no-" + name[4:], dest=name, action="store_false",
                            help=help.get(name, f"skip the {name[4:]} comparison"))
        elif name == "tiny":
            ap.add_argument(flag, action="store_true", help=help[name])
        elif name == "threads":
            ap.add_argument(flag, type=int, default=None, help=help[name])
        elif isinstance(default, tuple):
            ap.add_argument(flag, type=_list_of(type(default[0])), default=default,
                            help=help.get(name, f"comma-separated (default {','.join(map(str, default))})"))
        else:
            ap.add_argument(flag, type=type(default), default=default, help=help.get(name))
    ap.add_argument("--json", default=None, help="also write the results here")
    kwargs = vars(ap.parse_args(argv))
    path = kwargs.pop("json")
    result = run(**kwargs)
    print(markdown(result), flush=True)
    if path:
        write_json(path, result)
    return result


def mbnet_steps(model, batch, size, num_classes=10, seed=0):
    """(train_step, infer) closures over one random batch (batch, size, size, 3) for an mbnet
    model. train_step is zero_grad + forward + cross-entropy + backward + SGD update (momentum 0.9,
    weight decay 5e-4, as torch.optim.SGD in bench_e2e); infer is an eval-mode forward under
    no_grad (call model.train() / model.eval() yourself: train_step sets train mode, infer eval)."""
    from mbnet import Tensor, no_grad, optim
    from mbnet.functional import cross_entropy

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, num_classes, batch)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step():
        model.train()
        opt.zero_grad()
        loss = cross_entropy(model(Tensor(x)), labels)
        loss.backward()
        opt.step()
        return loss

    def infer():
        model.eval()
        with no_grad():
            return model(Tensor(x))

    return train_step, infer


def torch_model(alpha, size, num_classes=10, stem_stride=None):
    """MobileNetV1 in PyTorch for size x size inputs (NCHW modules; call
    .to(memory_format=torch.channels_last)): each convolution of mbnet.models.layer_shapes (the
    stem, then depthwise and pointwise of each block) + BN + ReLU, average pool, linear."""
    from torch import nn

    from mbnet.models import layer_shapes

    layers = []
    for L in layer_shapes(alpha, size, stem_stride):
        layers += [nn.Conv2d(L.cin, L.cout, L.kernel, L.stride, L.kernel // 2, groups=L.cin if L.kind == "dw" else 1,
                             bias=False), nn.BatchNorm2d(L.cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(L.cout, num_classes))
