"""`hedgehog_window` op: one decode step of Hedgehog linear attention beside a softmax window kept as a ring of
slots (the layer's whole per-token work after its projections), fused into one C call on CPU.

``naive`` is the reference (the math is in its module); ``DecodeStep`` (bound to one ring and state) and
``decode_step`` (one call) run the fused C step (``step.c``, built once per machine by ``cpu.py``), updating the
ring and the state in place.  ``usable`` says whether it can run on the given tensors; where it cannot (CUDA,
another dtype, no C compiler, ``$RNNIFY_KERNELS_BACKEND=torch``), callers run their PyTorch step, which computes
the same.  On CPU a PyTorch step is ~20 small ops (RoPE's ~6 more) and eager PyTorch pays microseconds per op
whatever its size; one call does the same work without that cost.
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor

from . import cpu
from ..dispatch import ENV_VAR
from .naive import naive

OP = "hedgehog_window"
# step.c keeps one KV head's work on the stack (feature maps, the window's scores, a group's queries and sums):
# shapes that need more than this are refused (``stack_bytes``), and decoding runs the PyTorch step instead
STACK_BYTES_MAX = 256 * 1024


def stack_bytes(H: int, Hkv: int, D: int, F: int, Dv: int, slots: int) -> int:
    """Bytes of stack one call of the C step uses for these shapes (its arrays; see ``step.c``)."""
    G = H // Hkv
    floats = 2 * (2 * F) + G * (Dv + 1) + 2 * (Dv + 1) + slots + G * D + D
    return 4 * floats + 8 * G   # and G pointers


def _ring_sizes(keys: Tensor, values: Tensor, state: Tensor) -> tuple[int, ...]:
    """(H, Hkv, D, F, Dv, slots) of a ring and state."""
    B, Hkv, S, D = keys.shape
    return state.shape[1], Hkv, D, state.shape[2] // 2, values.shape[-1] - 1, S


def usable(q: Tensor, keys: Tensor, values: Tensor, state: Tensor) -> bool:
    """Whether the fused step can run on these tensors here: CPU, fp32, contiguous ring and state, shapes within
    ``STACK_BYTES_MAX``, a built library, and the backend not forced to ``torch`` (``$RNNIFY_KERNELS_BACKEND``)."""
    fp32 = torch.float32
    return (q.device.type == "cpu" and q.dtype == fp32 and keys.dtype == fp32 and values.dtype == fp32
            and state.dtype == fp32 and keys.is_contiguous() and values.is_contiguous() and state.is_contiguous()
            and stack_bytes(*_ring_sizes(keys, values, state)) <= STACK_BYTES_MAX
            and os.environ.get(ENV_VAR) != "torch" and cpu.library() is not None)


class DecodeStep:
    """The fused step bound to one ring and state: shapes, dtypes and the library are checked once here, so a
    call per token costs one C call and the checks of its new token.  Holds its tensors by weak reference (the
    cache owns them) and nothing of ctypes, so a model holding it can still be deep-copied.

    keys [B, Hkv, S, D], values [B, Hkv, S, Dv+1], state [B, H, 2F, Dv+1], feature maps [H, D, F], share [H]:
    contiguous fp32 CPU tensors (feature maps and share are read at every call, so in-place changes count)."""

    def __init__(self, keys: Tensor, values: Tensor, state: Tensor, feature_q: Tensor, feature_k: Tensor,
                 share: Tensor, *, scaling: float, eps: float):
        B, Hkv, S, D = keys.shape
        H, F, Dv = state.shape[1], feature_q.shape[-1], values.shape[-1] - 1
        if not (values.shape == (B, Hkv, S, Dv + 1) and state.shape == (B, H, 2 * F, Dv + 1)
                and feature_k.shape == feature_q.shape == (H, D, F) and share.shape == (H,) and H % Hkv == 0):
            raise ValueError(f"{OP}: shapes do not match (keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                             f"state {tuple(state.shape)}, feature maps {tuple(feature_q.shape)}/"
                             f"{tuple(feature_k.shape)}, share {tuple(share.shape)})")
        for x in (keys, values, state, feature_q, feature_k, share):
            _check(x)
        needed = stack_bytes(H, Hkv, D, F, Dv, S)
        if needed > STACK_BYTES_MAX:
            raise ValueError(f"{OP}: {S} window slots with H={H}, Hkv={Hkv}, D={D}, F={F}, Dv={Dv} need {needed:,} "
                             f"bytes of stack in the C step, over its bound of {STACK_BYTES_MAX:,}: decode with the "
                             f"PyTorch step ({ENV_VAR}=torch), which has no such bound")
        if cpu.library() is None:
            raise RuntimeError(f"{OP}: the C step could not be built (see the rnnify.kernels log); check usable() first")
        self._tensors = [weakref.ref(x) for x in (keys, values, state, feature_q, feature_k, share)]
        self._sizes = (B, H, Hkv, D, F, Dv, S)
        self._token_shapes = ((B, H, D), (B, Hkv, D), (B, Hkv, Dv))
        self.scaling, self.eps = scaling, eps

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, slot: int, push: bool, valid: Tensor | None = None,
                 cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        """q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv], valid [B] or None (1: a real token, 0: padding), cos/sin
        [B or 1, R] (R even, <= D) to apply RoPE to q and k in the step, or None -> o [B, H, Dv]; slot ``slot`` of
        the ring takes the new token, the state takes the key leaving it if ``push``."""
        tensors = [ref() for ref in self._tensors]
        if any(x is None for x in tensors):
            raise RuntimeError(f"{OP}: the ring or state this step was bound to is gone; bind a new DecodeStep")
        B, H, Hkv, D, F, Dv, S = self._sizes
        tokens = [q, k, v] + [x for x in (valid, cos, sin) if x is not None]
        R = 0 if cos is None else cos.shape[-1]
        if (q.shape, k.shape, v.shape) != self._token_shapes or not 0 <= slot < S or (
                valid is not None and valid.shape != (B,)) or (cos is None) != (sin is None) or (
                cos is not None and (cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] not in (1, B)
                                     or R % 2 or R > D)):
            def shape(x):
                return None if x is None else tuple(x.shape)
            raise ValueError(f"{OP}: the new token does not fit the ring (q {shape(q)}, k {shape(k)}, v {shape(v)}, "
                             f"valid {shape(valid)}, cos/sin {shape(cos)}/{shape(sin)}, slot {slot}; expected "
                             f"{self._token_shapes}, valid ({B},), cos/sin ({B} or 1, even R <= {D}), slot < {S})")
        for x in tokens:
            _check(x)
        keys, values, state, feature_q, feature_k, share = tensors
        out = q.new_empty(B, H, Dv)
        cpu.library().rnnify_hedgehog_window_step(
            B, H, Hkv, D, F, Dv, S, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            None if valid is None else valid.data_ptr(), None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(), R, R if R and cos.shape[0] == B and B > 1 else 0,
            keys.data_ptr(), values.data_ptr(), state.data_ptr(),
            feature_q.data_ptr(), feature_k.data_ptr(), share.data_ptr(), slot, int(push), self.scaling, self.eps,
            out.data_ptr())
        return out


def _check(x: Tensor) -> None:
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"{OP} takes contiguous fp32 CPU tensors; got {x.dtype} on {x.device}"
                         f"{'' if x.is_contiguous() else ', not contiguous'} (shape {tuple(x.shape)})")


def decode_step(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, state: Tensor, feature_q: Tensor,
                feature_k: Tensor, share: Tensor, *, slot: int, push: bool, scaling: float, eps: float,
                valid: Tensor | None = None, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """``naive``'s step, in place, in one call: ``DecodeStep(keys, values, state, ...)(q, k, v, ...)`` (a decoder
    keeps the ``DecodeStep`` instead, for its per-token calls)."""
    return DecodeStep(keys, values, state, feature_q, feature_k, share, scaling=scaling, eps=eps)(
        q, k, v, slot=slot, push=push, valid=valid, cos=cos, sin=sin)


__all__ = ["naive", "DecodeStep", "decode_step", "usable"]
