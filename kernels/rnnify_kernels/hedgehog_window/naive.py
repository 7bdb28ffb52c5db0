"""The reference of one Hedgehog decode step over a ring of window slots (plain PyTorch; defines the truth).

Per query head h (KV head j = h // G, G = H / Hkv), φ_h(x) = [softmax(x W_h), softmax(−x W_h)]; with
``cos``/``sin``, q and k are first rotated (RoPE, rotate-half over their first R dims: x cos + [−x₂, x₁] sin,
x = [x₁, x₂, rest]):
    push:    S_h ← S_h + φ^k_h(k_s) [v_s, n_s]ᵀ            (the key leaving the window, in ``slot``, when ``push``)
    write:   slot ← (k, [v·n, n])                          (n = ``valid``: 1 for a real token, 0 for padding)
    linear:  l_h = φ^q_h(q_h)ᵀ S_h
    window:  w_h = Σ_j exp(s_j − max_j s_j) [v_j, n_j],   s_j = scaling · q_h·k_j + log n_j   (slots with n_j > 0)
    output:  m_h = l_h + f_h (w_h − l_h),  o_h = m_h[:Dv] / (m_h[Dv] + eps)
"""
from __future__ import annotations

import torch
from torch import Tensor


def _feature_map(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., H, D], weight [H, D, F] -> [..., H, 2F]."""
    z = torch.einsum("...hd,hdf->...hf", x, weight)
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, N, D] rotated over its first R dims by cos/sin [B or 1, R] (rotate-half pairs d, d + R/2)."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    half = torch.cat([-x_rot[..., R // 2:], x_rot[..., :R // 2]], dim=-1)
    return torch.cat([x_rot * cos[:, None] + half * sin[:, None], x_pass], dim=-1)


def naive(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, state: Tensor, feature_q: Tensor,
          feature_k: Tensor, share: Tensor, *, slot: int, push: bool, scaling: float, eps: float,
          valid: Tensor | None = None, cos: Tensor | None = None,
          sin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q [B, H, D], k [B, Hkv, D], v [B, Hkv, Dv], ring keys [B, Hkv, S, D] and values [B, Hkv, S, Dv+1], state
    [B, H, 2F, Dv+1], feature maps [H, D, F], share f [H], valid [B] (None: all 1), cos/sin [B or 1, R] (None: q
    and k already rotated) -> (o [B, H, Dv], keys, values, state): new tensors, the inputs untouched.  In fp32."""
    B, H, D = q.shape
    G = H // k.shape[1]
    q, k, v = q.float(), k.float(), v.float()
    if cos is not None:
        q, k = rope(q, cos.float(), sin.float()), rope(k, cos.float(), sin.float())
    keys, values, state = keys.float().clone(), values.float().clone(), state.float().clone()
    if push:
        phi_k = _feature_map(keys[:, :, slot].repeat_interleave(G, dim=1), feature_k.float())     # [B, H, 2F]
        state += phi_k[..., :, None] * values[:, :, slot].repeat_interleave(G, dim=1)[..., None, :]
    n = torch.ones(B, device=q.device) if valid is None else valid.float()
    keys[:, :, slot] = k
    values[:, :, slot] = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) * n[:, None, None]
    lin = torch.einsum("bhf,bhfv->bhv", _feature_map(q, feature_q.float()), state)
    ring_k, ring_v = keys.repeat_interleave(G, dim=1), values.repeat_interleave(G, dim=1)   # [B, H, S, ·]
    scores = torch.einsum("bhd,bhsd->bhs", q, ring_k) * scaling + ring_v[..., -1].log()
    m = scores.amax(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)   # no slot seen: weights 0
    window = torch.einsum("bhs,bhsv->bhv", (scores - m).exp(), ring_v)
    mixed = lin + share.float()[:, None] * (window - lin)
    return mixed[..., :-1] / (mixed[..., -1:] + eps), keys, values, state
