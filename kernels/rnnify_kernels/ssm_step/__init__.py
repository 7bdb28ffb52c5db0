"""`ssm_step` op: one decode step of Gated DeltaNet or Mamba2 after the layer's projections (short convolution,
RoPE, the delta rule or the decayed update, output gate, per-head RMSNorm), fused into one C call on CPU.

``naive`` is the reference (the math is in its module); ``decode_step`` runs the fused C step (``step.c``, built
once per machine by ``rnnify_kernels.cpu_build``), updating the conv state and the recurrent state in place.
``usable`` says whether it can run on the given tensors; where it cannot (CUDA, another dtype, no C compiler,
``$RNNIFY_KERNELS_BACKEND=torch``), callers run their PyTorch step, which computes the same.  On CPU that step is
~40 small ops per layer and eager PyTorch pays microseconds per op whatever its size; one call does the same work
without that cost.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from ..cpu_build import CLibrary
from ..dispatch import ENV_VAR
from .naive import naive

OP = "ssm_step"
MODES = {"delta": 0, "decay": 1}
# step.c keeps a row's channels and two head vectors on the stack: shapes that need more are refused
STACK_BYTES_MAX = 256 * 1024

_i, _p, _f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
STEP = CLibrary(OP, Path(__file__).with_name("step.c"), "rnnify_ssm_step",
                [_i] * 6 + [_p] * 4 + [_i, ctypes.c_long] + [_p] * 9 + [_f, _f, _p, _p])
library = STEP.library


def stack_bytes(H: int, Hkv: int, D: int) -> int:
    """Bytes of stack one call of the C step uses for these shapes (its arrays; see ``step.c``)."""
    return 4 * ((H + 2 * Hkv) * D + 2 * D)


def usable(qkv: Tensor, state: Tensor, conv_state: Tensor | None, kv_heads: int) -> bool:
    """Whether the fused step can run on these tensors here: CPU, fp32, contiguous state (and conv state), shapes
    within ``STACK_BYTES_MAX``, a built library, and the backend not forced to ``torch`` (``$RNNIFY_KERNELS_BACKEND``)."""
    tensors = [qkv, state] + ([] if conv_state is None else [conv_state])
    return (all(x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() for x in tensors)
            and stack_bytes(state.shape[1], kv_heads, state.shape[-1]) <= STACK_BYTES_MAX
            and os.environ.get(ENV_VAR) != "torch" and library() is not None)


def _check(name: str, x: Tensor | None, shape: tuple) -> None:
    if x is None:
        return
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"{OP}: {name} must be a contiguous fp32 CPU tensor; got {x.dtype} on {x.device}"
                         f"{'' if x.is_contiguous() else ', not contiguous'} (shape {tuple(x.shape)})")
    if tuple(x.shape) != shape:
        raise ValueError(f"{OP}: {name} has shape {tuple(x.shape)}; expected {shape}")


def decode_step(qkv: Tensor, state: Tensor, gate_logit: Tensor, a_log: Tensor, norm_weight: Tensor,
                norm_bias: Tensor, *, mode: str, heads: int, kv_heads: int, scale: float, eps: float,
                conv_state: Tensor | None = None, conv_weight: Tensor | None = None,
                decay_logit: Tensor | None = None, d_skip: Tensor | None = None, z: Tensor | None = None,
                valid: Tensor | None = None, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """``naive``'s step in one C call, ``state`` and ``conv_state`` updated in place; the same arguments (all
    contiguous fp32 CPU tensors) -> o [B, H, D]."""
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {sorted(MODES)}; got {mode!r}")
    B, H, Hkv = qkv.shape[0], heads, kv_heads
    D = state.shape[-1]
    C = (H + 2 * Hkv) * D
    if H % Hkv:
        raise ValueError(f"{OP}: {Hkv} KV heads do not divide {H} heads")
    if (conv_state is None) != (conv_weight is None):
        raise ValueError(f"{OP}: conv_state and conv_weight go together (got only one)")
    needed = {"delta": ("decay_logit",), "decay": ("d_skip",)}[mode]
    given = {"decay_logit": decay_logit, "d_skip": d_skip}
    if any(given[name] is None for name in needed):
        raise ValueError(f"{OP}: mode {mode!r} needs {', '.join(needed)}")
    K = 0 if conv_state is None else conv_state.shape[-1]
    R = 0 if cos is None else cos.shape[-1]
    if (cos is None) != (sin is None) or (cos is not None and (cos.dim() != 2 or cos.shape[0] not in (1, B)
                                                                or R % 2 or R > D)):
        raise ValueError(f"{OP}: cos/sin must be given together, [{B} or 1, R] with R even and <= {D} "
                         f"(got {None if cos is None else tuple(cos.shape)}/{None if sin is None else tuple(sin.shape)})")
    for name, x, shape in (("qkv", qkv, (B, C)), ("state", state, (B, H, D, D)), ("gate_logit", gate_logit, (B, H)),
                           ("a_log", a_log, (H,)), ("norm_weight", norm_weight, (H, D)), ("norm_bias", norm_bias, (H, D)),
                           ("conv_state", conv_state, (B, C, K)), ("conv_weight", conv_weight, (C, K)),
                           ("decay_logit", decay_logit, (B, H)), ("d_skip", d_skip, (H,)), ("z", z, (B, H * D)),
                           ("valid", valid, (B,)), ("cos", cos, (cos.shape[0] if cos is not None else 0, R)),
                           ("sin", sin, (cos.shape[0] if cos is not None else 0, R))):
        _check(name, x, shape)
    if stack_bytes(H, Hkv, D) > STACK_BYTES_MAX:
        raise ValueError(f"{OP}: H={H}, Hkv={Hkv}, D={D} need {stack_bytes(H, Hkv, D):,} bytes of stack in the C "
                         f"step, over its bound of {STACK_BYTES_MAX:,}: decode with the PyTorch step "
                         f"({ENV_VAR}=torch)")
    lib = library()
    if lib is None:
        raise RuntimeError(f"{OP}: the C step could not be built (see the rnnify.kernels log); check usable() first")

    def ptr(x):
        return None if x is None else x.data_ptr()

    out = qkv.new_empty(B, H, D)
    lib.rnnify_ssm_step(B, H, Hkv, D, K, MODES[mode], ptr(qkv), ptr(valid), ptr(cos), ptr(sin), R,
                        R if R and cos.shape[0] == B and B > 1 else 0, ptr(conv_state), ptr(conv_weight),
                        ptr(gate_logit), ptr(decay_logit), ptr(a_log), ptr(d_skip), ptr(z), ptr(norm_weight),
                        ptr(norm_bias), scale, eps, ptr(state), ptr(out))
    return out


__all__ = ["naive", "decode_step", "usable"]
