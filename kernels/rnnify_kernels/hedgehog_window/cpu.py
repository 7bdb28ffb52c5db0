"""The fused Hedgehog window step (``step.c``), built and loaded by ``rnnify_kernels.cpu_build``."""
from __future__ import annotations

import ctypes
from pathlib import Path

from ..cpu_build import CLibrary

_i, _p, _f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
STEP = CLibrary("hedgehog_window", Path(__file__).with_name("step.c"), "rnnify_hedgehog_window_step",
                [_i] * 7 + [_p] * 6 + [_i, ctypes.c_long] + [_p] * 6 + [_i, _i, _f, _f, _p])
library = STEP.library
