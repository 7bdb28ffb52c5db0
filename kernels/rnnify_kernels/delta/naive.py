"""Reference recurrence (the truth): S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t, fp32."""
from __future__ import annotations

import torch

from ..common import check_inputs, expand_kv_heads, run_varlen


def _loop(scale):
    def run(q, k, v, log_decay, beta, initial_state, output_final_state):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        S = torch.zeros(B, H, Dk, Dv) if initial_state is None else initial_state.float().clone()
        S = S.to(q.device)
        eye = torch.eye(Dk, device=q.device)
        outs = []
        for t in range(T):
            a = log_decay[:, t].float().exp()[..., None, None]
            bt = beta[:, t].float()[..., None, None]
            kt, vt = k[:, t].float(), v[:, t].float()
            S = a * (eye - bt * kt[..., :, None] * kt[..., None, :]) @ S + bt * kt[..., :, None] * vt[..., None, :]
            outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
        return torch.stack(outs, 1).to(q.dtype), (S if output_final_state else None)
    return run


def naive(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None):
    """q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], log_decay [B,T,H], beta [B,T,H] -> (o [B,T,H,Dv], S | None)."""
    check_inputs("delta", q, k, v, log_decay, beta, initial_state, cu_seqlens)
    k, v = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return run_varlen(_loop(scale), q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens)
