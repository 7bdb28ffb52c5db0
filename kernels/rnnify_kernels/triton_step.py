"""Triton decode step for the three recurrences: one token, the fp32 state updated in place.

    decay_scalar / decay_vector:  S ← diag(a) S + k vᵀ
    delta:                        S ← a S + k (β (v − a Sᵀk))ᵀ      (= a (I − β k kᵀ) S + β k vᵀ)
    o = scale · Sᵀ q

One program per (batch, head, block of Dv columns): every column block of S is independent, so the
state is read and written exactly once, spread over B·H·Dv/BV programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KIND = {"decay_scalar": 0, "decay_vector": 1, "delta": 2}


@triton.jit
def _step_kernel(q, k, v, g, beta, o, state, scale,
                 H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, KIND: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_kv = i_h // (H // HKV)
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    s_ptr = state + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_S = tl.load(s_ptr, mask=m_kv, other=0.0)
    b_q = tl.load(q + (i_b * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + (i_b * HKV + i_kv) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + (i_b * HKV + i_kv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if KIND == 1:
        b_a = tl.exp(tl.load(g + (i_b * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32))
        b_S = b_S * b_a[:, None]
    else:
        b_a = tl.exp(tl.load(g + i_b * H + i_h).to(tl.float32))
        b_S = b_S * b_a
    if KIND == 2:
        b_beta = tl.load(beta + i_b * H + i_h).to(tl.float32)
        b_v = b_beta * (b_v - tl.sum(b_k[:, None] * b_S, axis=0))
    b_S = b_S + b_k[:, None] * b_v[None, :]
    tl.store(s_ptr, b_S, mask=m_kv)
    tl.store(o + (i_b * H + i_h) * V + o_v, tl.sum(b_S * b_q[:, None], axis=0) * scale, mask=m_v)


def recurrent_step(op, q, k, v, log_decay, beta, state, scale):
    """q [B,1,H,K], k/v [B,1,Hkv,*], state [B,H,K,V] fp32 contiguous (updated in place) -> o [B,1,H,V]."""
    B, _, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    o = torch.empty(B, 1, H, V, dtype=torch.float32, device=q.device)
    BV = min(64, max(16, triton.next_power_of_2(V)))
    grid = (triton.cdiv(V, BV), B * H)
    _step_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), log_decay.contiguous(),
                       None if beta is None else beta.contiguous(), o, state, float(scale),
                       H=H, HKV=HKV, K=K, V=V, BK=max(16, triton.next_power_of_2(K)), BV=BV, KIND=KIND[op])
    return o.to(q.dtype)
