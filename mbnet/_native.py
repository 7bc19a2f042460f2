"""Loads the compiled extension, refusing clearly when it was built for another CPU."""
from pathlib import Path


def _cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_name(cpuinfo=None):
    """The CPU's model name with its family and model numbers from /proc/cpuinfo (or the text
    ``cpuinfo``), e.g. "AMD EPYC (family 25 model 17)": guests often see only a generic name that
    Zen 4 and Zen 5 share. Else platform.processor(), else "unknown CPU"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        if "cpu family" in fields and "model" in fields:
            return f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
        return fields["model name"]
    import platform

    return platform.processor() or "unknown CPU"


def _check_build(build_info=None, have=None):
    """Raises ImportError when the extension was compiled for instructions this CPU lacks (instead of
    dying of SIGILL). build_info: what setup.py recorded (default: mbnet/_build_info.py; no check
    without it); have: this CPU's flags (default: /proc/cpuinfo's; no check without them)."""
    if build_info is None:
        try:
            from . import _build_info as build_info
        except ImportError:
            return
    have = _cpu_flags() if have is None else have
    missing = [f for f in build_info.CPU_FLAGS if have is not None and f not in have]
    if missing:
        march = getattr(build_info, "MARCH", "native")
        raise ImportError(
            f"mbnet._C was compiled with -march={march} for a CPU with "
            + ", ".join(missing)
            + ", which this CPU lacks. Rebuild here with `pip install -e .` (or build with "
            "MBNET_MARCH=x86-64-v3 for any AVX2 CPU, or MBNET_PORTABLE=1 for any x86-64 CPU)."
        )


_check_build()
try:
    from . import _C
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        f"mbnet's C++ extension is not built ({e}). Build it with `pip install -e .` from the checkout."
    ) from e
