"""`delta` op (gated delta rule): `naive` (reference), `chunk` (parallel form), `recurrent_step` (decode)."""
from __future__ import annotations

from .. import torch_ops
from ..dispatch import select_backend
from .naive import naive

OP = "delta"


def chunk(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None,
          backend=None):
    """Chunked form; same contract as `naive`: returns (o [B,T,H,Dv], final state [B,H,Dk,Dv] or None)."""
    select_backend(OP, q, backend)
    return torch_ops.chunk(OP, q, k, v, log_decay, beta, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale)


def recurrent_step(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=True, scale=None,
                   backend=None):
    """One token (T == 1) from `initial_state` [B,H,Dk,Dv]; returns (o [B,1,H,Dv], new state or None)."""
    select_backend(OP, q, backend)
    return torch_ops.recurrent_step(OP, q, k, v, log_decay, beta, initial_state=initial_state,
                                    output_final_state=output_final_state, scale=scale)


__all__ = ["naive", "chunk", "recurrent_step"]
