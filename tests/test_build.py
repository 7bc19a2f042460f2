"""The build switches of setup.py (MBNET_MARCH, MBNET_PORTABLE): the CPU flags a -march value implies,
the build directory key, and the import check that refuses a build made for instructions this CPU
lacks (an AVX-512 build on an AVX2-only CPU) but lets an x86-64-v3 (AVX2) build import anywhere."""
import importlib.util
import os
import platform
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from mbnet import _C, _native

ROOT = Path(__file__).resolve().parent.parent
# /proc/cpuinfo's float-relevant flags of an AVX2-only Zen 3 and of an AVX-512 CPU (with others around).
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = ZEN3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "amx_tile"}

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None,
                                    reason="no C++ compiler ($CXX or c++) to ask what a -march implies")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("mbnet_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def test_march_from_the_environment(setup_py):
    assert setup_py.march({}) == "native"
    assert setup_py.march({"MBNET_MARCH": "x86-64-v3"}) == "x86-64-v3"
    assert setup_py.march({"MBNET_PORTABLE": "1", "MBNET_MARCH": "x86-64-v3"}) is None
    assert setup_py.march({"MBNET_PORTABLE": "0", "MBNET_MARCH": ""}) == "native"
    tags = [setup_py.build_tag(a) for a in (None, "native", "x86-64-v3", "x86-64-v4", "znver3")]
    assert len(set(tags)) == 5 and tags[0] == "portable" and tags[2] == "march-x86_64_v3"


@needs_compiler
def test_required_flags_of_a_march(setup_py):
    assert setup_py.required_flags(None) == []
    assert setup_py.required_flags("x86-64") == []
    assert setup_py.required_flags("x86-64-v3") == ["avx", "avx2", "fma"]
    assert setup_py.required_flags("haswell") == ["avx", "avx2", "fma"]
    assert setup_py.required_flags("x86-64-v4") == ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"]
    with pytest.raises(SystemExit, match="MBNET_MARCH=no-such-cpu: .* does not accept -march=no-such-cpu"):
        setup_py.required_flags("no-such-cpu")


@needs_compiler
def test_import_check_refuses_avx512_on_an_avx2_cpu_and_takes_x86_64_v3_on_both(setup_py):
    def info(march):
        return types.SimpleNamespace(MARCH=march, CPU_FLAGS=setup_py.required_flags(march))

    with pytest.raises(ImportError, match=r"-march=x86-64-v4 for a CPU with avx512f, avx512bw, avx512dq, avx512vl"):
        _native._check_build(info("x86-64-v4"), have=ZEN3)
    _native._check_build(info("x86-64-v4"), have=AVX512)
    for cpu in (ZEN3, AVX512):
        _native._check_build(info("x86-64-v3"), have=cpu)
    with pytest.raises(ImportError, match="-march=x86-64-v3 for a CPU with avx2, fma"):
        _native._check_build(info("x86-64-v3"), have={"sse4_2", "avx"})  # Sandy Bridge


def test_loaded_extension_matches_its_build_record():
    """The SIMD level the compiled code reports is the one setup.py recorded for the import check."""
    record = pytest.importorskip("mbnet._build_info", reason="the extension was not built by setup.py")
    info = _C.build_info()
    flags = set(record.CPU_FLAGS)
    assert info["simd"] == ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else
                            "avx" if "avx" in flags else "sse2"), (info, record.CPU_FLAGS)
    if hasattr(record, "MARCH"):
        assert info["march"] == record.MARCH and info["native"] == (record.MARCH == "native")


ROUND_TRIP = """
import resource, numpy as np
import mbnet._C as C
def step():  # a training step's pattern: many large arrays alive at once, then all freed
    arrays = [np.ones(n << 20, np.float32) for n in (5, 10) for _ in range(15)]  # 15 x 20 MB, 15 x 40 MB
    del arrays
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(C.build_info()["keeps_freed_memory"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_freed_activation_memory_is_reused_by_the_next_step():
    """Importing the extension serves large blocks from the heap and keeps them (csrc/module.cpp):
    the second 'step' of 900 MB of arrays, some above glibc's 32 MB mmap ceiling, takes no new
    pages. MBNET_NO_MALLOPT leaves glibc's defaults."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                        "MBNET_NO_MALLOPT")}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", ROUND_TRIP], env={**env, **extra}, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    keeps, faults = run()
    assert keeps and faults < 100, faults  # arrays fresh from the kernel would be thousands of faults
    keeps, _ = run(MBNET_NO_MALLOPT="1")
    assert not keeps


def test_cpu_name_names_family_and_model(monkeypatch):
    """Guests often see a generic model name ("AMD EPYC" on Zen 4 and on Zen 5): the family and
    model numbers tell them apart in every figure; only the first processor's block is read."""
    two = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
           "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: Other CPU\n")
    assert _native.cpu_name(two) == "AMD EPYC (family 25 model 17)"
    assert _native.cpu_name("model name\t: Some CPU\n") == "Some CPU"
    import platform

    for processor, name in (("aarch64", "aarch64"), ("", "unknown CPU")):  # no model name: platform's, else this
        monkeypatch.setattr(platform, "processor", lambda: processor)
        assert _native.cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\n") == name


def test_kernel_outputs_are_aligned_owned_and_traced():
    """Every array a kernel returns starts on a 64-byte line (NumPy's start 16 bytes past one), is
    writeable, is not a view of another array (so autograd keeps a gradient without copying it),
    and is seen by tracemalloc while it lives."""
    import tracemalloc

    from mbnet import Tensor
    from mbnet import functional as F
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        x = rng.standard_normal((3, 5, 7, 24)).astype(np.float32)
        w = rng.standard_normal((3, 3, 24)).astype(np.float32)
        b = w.reshape(9, 24).T.copy()
        base = tracemalloc.get_traced_memory()[0]
        outs = [_C.dwconv2d_fwd(x, w, 1, 1) for _ in range(4)] + [_C.matmul(x.reshape(-1, 24), b)]
        traced = tracemalloc.get_traced_memory()[0] - base
        nbytes = sum(o.nbytes for o in outs)
        assert nbytes <= traced <= nbytes + 4 * 64 * len(outs) + 4096, (traced, nbytes)
        assert [o.ctypes.data % 64 for o in outs] == [0] * len(outs)
        del outs
        assert tracemalloc.get_traced_memory()[0] - base < 4096
    finally:
        tracemalloc.stop()
    y = _C.dwconv2d_fwd(x, w, 1, 1)
    assert y.ctypes.data % 64 == 0 and y.flags.writeable and y.flags.c_contiguous
    assert not isinstance(y.base, np.ndarray) and isinstance(y[1:].base, np.ndarray)
    np.testing.assert_array_equal(y, _C.dwconv2d_fwd(x.copy(), w, 1, 1))
    xt = Tensor(x, requires_grad=True)
    F.depthwise_conv2d(xt, Tensor(w), 1, 1).sum().backward()
    assert xt.grad.ctypes.data % 64 == 0 and not isinstance(xt.grad.base, np.ndarray)
