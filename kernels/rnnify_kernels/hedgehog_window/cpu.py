"""Build and load the fused C step (``step.c``) with the system C compiler, once per machine.

The shared library goes to ``rnnify_kernels.dispatch.cache_dir()`` (``<rnnify cache>/kernels``), named by a hash
of the source, the compiler and its version, its flags and this CPU's model and instruction-set flags (the build
targets this CPU: ``-march=native``), written under a temporary name and renamed, so concurrent processes never
load half a file.  Builds left half-done by a killed process (over an hour old) and libraries unused for 30 days
are removed.  The compiler is ``$CC`` (a command, arguments allowed: ``ccache gcc``), else ``cc``/``gcc``/``clang``
on the PATH.  No compiler, or a failed build: ``library()`` returns None and says why once; callers then run the
PyTorch step.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..dispatch import cache_dir

logger = logging.getLogger("rnnify.kernels")
SOURCE = Path(__file__).with_name("step.c")
SYMBOL = "rnnify_hedgehog_window_step"
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC"]
NATIVE = ["-march=native"]


BUILD_PREFIX = ".hedgehog_window-build-"
STALE_BUILD_S = 3600            # a temporary build this old was left by a killed process
UNUSED_LIBRARY_S = 30 * 86400   # a library not loaded for this long (its mtime is refreshed on every load)


def compiler() -> list[str] | None:
    """The compiler command: ``$CC`` split like a shell would (``ccache gcc`` -> [ccache, gcc]), its program found
    on the PATH; else the first of cc, gcc, clang there; None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        words = shlex.split(cc)
        program = shutil.which(words[0]) if words else None
        return [program, *words[1:]] if program else None
    return next(([path] for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def compiler_version(cc: list[str]) -> str:
    """The first line the compiler prints for ``--version`` (part of the library's key)."""
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout.strip().splitlines() or [""])[0]


def _prune(folder: Path, keep: Path) -> None:
    """Remove abandoned temporary builds and libraries unused for ``UNUSED_LIBRARY_S``."""
    now = time.time()
    for path in folder.glob("*hedgehog_window-*"):
        age = now - path.stat().st_mtime if path.exists() else 0
        stale = (path.name.startswith(BUILD_PREFIX) and age > STALE_BUILD_S) or (
            path.suffix == ".so" and path != keep and not path.name.startswith(BUILD_PREFIX) and age > UNUSED_LIBRARY_S)
        if stale:
            path.unlink(missing_ok=True)


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags: /proc/cpuinfo (Linux), ``sysctl`` (macOS, BSDs), else the
    platform's description with the machine and processor names."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    if wanted:
        return "\n".join(dict.fromkeys(wanted))
    try:   # macOS: brand and features (Intel) or the brand (Apple silicon: the feature set follows the model)
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                               "hw.optional.arm64"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "\n".join([platform.platform(), platform.machine(), platform.processor()])


def _build(cc: list[str]) -> Path:
    source, cpu = SOURCE.read_bytes(), _cpu_signature().encode()
    command, version = shlex.join(cc).encode(), compiler_version(cc).encode()
    last_error = None
    for flags in (FLAGS + NATIVE, FLAGS):   # a compiler without -march=native still gets a portable build
        key = hashlib.sha256(b"\0".join([source, command, version, " ".join(flags).encode(), cpu])).hexdigest()[:16]
        target = cache_dir() / f"hedgehog_window-{key}.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        _prune(target.parent, keep=target)
        if target.exists():
            os.utime(target)   # in use: not pruned
            return target
        fd, tmp = tempfile.mkstemp(prefix=BUILD_PREFIX, suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            last_error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{shlex.join(cc)} could not build {SOURCE.name}: {last_error[0]}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library with the step's argument types, or None (logged once) when it cannot be built."""
    cc = compiler()
    if cc is None:
        logger.info("rnnify_kernels.hedgehog_window: no C compiler (set $CC): decoding runs the PyTorch step")
        return None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("rnnify_kernels.hedgehog_window: %s: decoding runs the PyTorch step", error)
        return None
    step = getattr(lib, SYMBOL)
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    step.argtypes = [i] * 7 + [p] * 6 + [i, ctypes.c_long] + [p] * 6 + [i, i, f, f, p]
    step.restype = None
    logger.info("rnnify_kernels.hedgehog_window: fused C step on cpu (%s)", path)
    return lib
