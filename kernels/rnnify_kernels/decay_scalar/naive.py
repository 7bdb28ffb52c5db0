"""Reference recurrence (the truth): S_t = a_t S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t, step by step in fp32.

A scalar decay per head is the per-channel recurrence of ``decay_vector`` with a_t repeated over Dk.
"""
from __future__ import annotations

from ..decay_vector.naive import naive as _vector_naive
from ..common import check_inputs


def naive(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None):
    """q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], log_decay [B,T,H] -> (o [B,T,H,Dv], S [B,H,Dk,Dv] | None)."""
    check_inputs("decay_scalar", q, k, v, log_decay, None, initial_state, cu_seqlens)
    per_channel = log_decay[..., None].expand(*log_decay.shape, q.shape[-1])
    return _vector_naive(q, k, v, per_channel, initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, scale=scale)
