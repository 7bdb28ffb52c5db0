"""Build and load a fused C decode step (an op's ``step.c``) with the system C compiler, once per machine.

Each op with a C step (``hedgehog_window``, ``ssm_step``) holds one ``CLibrary``.  The shared library goes to
``rnnify_kernels.dispatch.cache_dir()`` (``<rnnify cache>/kernels``), named by the op and a hash of the source,
the compiler and its version, its flags and this CPU's model and instruction-set flags (the build targets this
CPU: ``-march=native``), written under a temporary name and renamed, so concurrent processes never
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

from .dispatch import cache_dir

logger = logging.getLogger("rnnify.kernels")
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC"]
NATIVE = ["-march=native"]

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


def build_prefix(name: str) -> str:
    """The prefix of the temporary files of an op's build in progress."""
    return f".{name}-build-"


def _prune(folder: Path, keep: Path, name: str) -> None:
    """Remove the op's abandoned temporary builds and its libraries unused for ``UNUSED_LIBRARY_S``."""
    now, prefix = time.time(), build_prefix(name)
    for path in folder.glob(f"*{name}-*"):
        age = now - path.stat().st_mtime if path.exists() else 0
        stale = (path.name.startswith(prefix) and age > STALE_BUILD_S) or (
            path.suffix == ".so" and path != keep and not path.name.startswith(prefix) and age > UNUSED_LIBRARY_S)
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


def _build(cc: list[str], name: str, path: Path) -> Path:
    source, cpu = path.read_bytes(), _cpu_signature().encode()
    command, version = shlex.join(cc).encode(), compiler_version(cc).encode()
    last_error = None
    for flags in (FLAGS + NATIVE, FLAGS):   # a compiler without -march=native still gets a portable build
        key = hashlib.sha256(b"\0".join([source, command, version, " ".join(flags).encode(), cpu])).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        _prune(target.parent, keep=target, name=name)
        if target.exists():
            os.utime(target)   # in use: not pruned
            return target
        fd, tmp = tempfile.mkstemp(prefix=build_prefix(name), suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([*cc, *flags, str(path), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            last_error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{shlex.join(cc)} could not build {path.name}: {last_error[0]}")


class CLibrary:
    """One op's C step: ``library()`` builds (once per machine) and loads it, sets ``symbol``'s argument types
    (ctypes types, in order) and returns the library, or None, said once in the log, when it cannot be built:
    callers then run their PyTorch step.  ``library.cache_clear()`` forgets the loaded library (tests)."""

    def __init__(self, name: str, source: Path, symbol: str, argtypes: list):
        self.name, self.source, self.symbol, self.argtypes = name, source, symbol, argtypes
        self.library = functools.cache(self._load)

    def _load(self) -> ctypes.CDLL | None:
        cc = compiler()
        where = f"rnnify_kernels.{self.name}"
        if cc is None:
            logger.info("%s: no C compiler (set $CC): decoding runs the PyTorch step", where)
            return None
        try:
            path = _build(cc, self.name, self.source)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            logger.warning("%s: %s: decoding runs the PyTorch step", where, error)
            return None
        step = getattr(lib, self.symbol)
        step.argtypes = self.argtypes
        step.restype = None
        logger.info("%s: fused C step on cpu (%s)", where, path)
        return lib
