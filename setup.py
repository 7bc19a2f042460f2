"""Builds the extension ``mbnet._C`` by driving CMake (the layout of pybind11's cmake_example).

Environment switches:
  MBNET_MARCH=X      compile for -march=X instead of -march=native, e.g. x86-64-v3 (AVX2 + FMA: what
                     an AVX2-only CPU such as Zen 3 runs, built on any machine) or znver3
  MBNET_PORTABLE=1   build without any -march (a wheel that runs on any x86-64 CPU); wins over MBNET_MARCH
  MBNET_BUILD_TYPE   CMake build type (default Release)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: number of CPUs)
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cpu_flags():
    """The flags line of /proc/cpuinfo, as a list (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_tag():
    """A short tag of this CPU's flags: a -march=native build is only reused on the same kind of CPU."""
    return hashlib.sha1(" ".join(cpu_flags()).encode()).hexdigest()[:10]


def march(env=os.environ):
    """The -march value of this build: None for MBNET_PORTABLE=1, else MBNET_MARCH, else "native"."""
    if env.get("MBNET_PORTABLE", "0") not in ("", "0"):
        return None
    return env.get("MBNET_MARCH") or "native"


def build_tag(arch):
    """The build directory's key: one per CPU for native, one per -march value, one portable."""
    if arch is None:
        return "portable"
    return cpu_tag() if arch == "native" else "march-" + "".join(ch if ch.isalnum() else "_" for ch in arch)


# The instruction sets that matter for float kernels: the macro GCC and Clang predefine for each,
# and the name /proc/cpuinfo gives it.
ISA_MACROS = (("__AVX__", "avx"), ("__AVX2__", "avx2"), ("__FMA__", "fma"), ("__AVX512F__", "avx512f"),
              ("__AVX512BW__", "avx512bw"), ("__AVX512DQ__", "avx512dq"), ("__AVX512VL__", "avx512vl"))


def required_flags(arch, compiler=None):
    """The CPU flags (as /proc/cpuinfo names them) that code compiled with -march=arch may use: the
    ones whose macro the compiler ($CXX, else c++) predefines for it. [] for a portable build."""
    if arch is None:
        return []
    cxx = compiler or os.environ.get("CXX") or "c++"
    run = subprocess.run([cxx, f"-march={arch}", "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise SystemExit(f"MBNET_MARCH={arch}: {cxx} does not accept -march={arch} ({run.stderr.strip()[:200]})")
    defined = {line.split()[1] for line in run.stdout.splitlines() if line.startswith("#define ")}
    return [flag for macro, flag in ISA_MACROS if macro in defined]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        arch = march()
        flags = required_flags(arch)  # first: a -march the compiler rejects stops here, in one line
        build_type = os.environ.get("MBNET_BUILD_TYPE", "Release")
        tag = build_tag(arch)
        build_dir = ROOT / "build" / f"cmake-{build_type.lower()}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DMBNET_NATIVE={'OFF' if arch is None else 'ON'}",
            f"-DMBNET_MARCH={arch or 'native'}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        # Record what the binary was compiled for, so importing it on a CPU without those
        # instructions fails with a message instead of SIGILL.
        info = f"PORTABLE = {arch is None!r}\nMARCH = {arch!r}\nCPU_TAG = {tag!r}\nCPU_FLAGS = {flags!r}\n"
        for where in {out_dir, ROOT / "mbnet"}:  # the installed package and, for -e, the source tree
            (where / "_build_info.py").write_text(info)


if __name__ == "__main__":  # pip and `python setup.py` run it so; tests import its functions
    setup(ext_modules=[CMakeExtension("mbnet._C")], cmdclass={"build_ext": CMakeBuild})
