"""Builds the extension ``mbnet._C`` by driving CMake (the layout of pybind11's cmake_example).

Environment switches:
  MBNET_PORTABLE=1   build without -march=native (a wheel that runs on any x86-64 CPU)
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


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        portable = os.environ.get("MBNET_PORTABLE", "0") not in ("", "0")
        build_type = os.environ.get("MBNET_BUILD_TYPE", "Release")
        tag = "portable" if portable else cpu_tag()
        build_dir = ROOT / "build" / f"cmake-{build_type.lower()}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DMBNET_NATIVE={'OFF' if portable else 'ON'}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        # Record what the binary was compiled for, so importing it on a CPU without those
        # instructions fails with a message instead of SIGILL.
        info = f"PORTABLE = {portable!r}\nCPU_TAG = {tag!r}\nCPU_FLAGS = {required_flags(portable)!r}\n"
        for where in {out_dir, ROOT / "mbnet"}:  # the installed package and, for -e, the source tree
            (where / "_build_info.py").write_text(info)


def required_flags(portable):
    """The CPU flags a -march=native build may use (the ones that matter for float kernels)."""
    if portable:
        return []
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")
    have = set(cpu_flags())
    return [f for f in wanted if f in have]


setup(ext_modules=[CMakeExtension("mbnet._C")], cmdclass={"build_ext": CMakeBuild})
