"""Build and load the fused C step (``step.c``) with the system C compiler, once per machine.

The shared library goes to ``rnnify_kernels.dispatch.cache_dir()`` (``<rnnify cache>/kernels``), named by a hash
of the source, the compiler, its flags and this CPU's model and instruction-set flags (the build targets this CPU:
``-march=native``), written under a temporary name and renamed, so concurrent processes never load half a file.
The compiler is ``$CC``, else ``cc``/``gcc``/``clang`` on the PATH.  No compiler, or a failed build: ``library()``
returns None and says why once; callers then run the PyTorch step.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..dispatch import cache_dir

logger = logging.getLogger("rnnify.kernels")
SOURCE = Path(__file__).with_name("step.c")
SYMBOL = "rnnify_hedgehog_window_step"
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC"]
NATIVE = ["-march=native"]


def compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (Linux), else the platform's description."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.platform() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.platform()


def _build(cc: str) -> Path:
    source, cpu = SOURCE.read_bytes(), _cpu_signature().encode()
    last_error = None
    for flags in (FLAGS + NATIVE, FLAGS):   # a compiler without -march=native still gets a portable build
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), cpu])).hexdigest()[:16]
        target = cache_dir() / f"hedgehog_window-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            last_error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {last_error[0]}")


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
