"""`decay_scalar` op: `naive` (reference), `chunk` (parallel form for training/prefill), `recurrent_step` (decode)."""
from __future__ import annotations

from .. import dispatch
from .naive import naive

OP = "decay_scalar"


def chunk(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None,
          backend=None):
    """Chunked form (Triton on CUDA, PyTorch elsewhere; see `rnnify_kernels.dispatch`); same contract as `naive`:
    returns (o [B,T,H,Dv], final state [B,H,Dk,Dv] fp32 or None)."""
    return dispatch.chunk(OP, q, k, v, log_decay, initial_state=initial_state, output_final_state=output_final_state,
                          cu_seqlens=cu_seqlens, scale=scale, backend=backend)


def recurrent_step(q, k, v, log_decay, *, initial_state=None, output_final_state=True, scale=None, backend=None):
    """One token (T == 1) from `initial_state` [B,H,Dk,Dv]; returns (o [B,1,H,Dv], new state or None).

    The Triton backend updates an fp32 contiguous `initial_state` in place and returns it."""
    return dispatch.recurrent_step(OP, q, k, v, log_decay, initial_state=initial_state,
                                   output_final_state=output_final_state, scale=scale, backend=backend)


__all__ = ["naive", "chunk", "recurrent_step"]
