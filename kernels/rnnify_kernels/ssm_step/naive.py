"""The reference of one decode step of a gated recurrent mixer after its projections (plain PyTorch; defines the
truth): Gated DeltaNet (``mode="delta"``) or Mamba2 (``mode="decay"``), short convolution to output norm.

Per row b, with C = (H + 2·Hkv)·D channels x = [q | k | v] (the projections before the convolution) and n = ``valid``
(1: a real token, 0: padding):
    conv:   s ← [s[:, 1:], n·x] (the last K inputs, oldest first),  c = Σ_{i<K} w[:, i] ⊙ s[:, K−1−i]  (K = 0: c = n·x)
    RoPE:   q_h, k_j of c rotated over their first R dims (rotate-half) with ``cos``/``sin`` row b (if given)
    delta:  q̂, k̂ = q/‖q‖, k/‖k‖;  β = n·σ(g_h),  a = exp(−n·e^{A_h}·softplus(d_h))
            S_h ← a S_h;  S_h ← S_h + β k̂ (v − S_hᵀ k̂)ᵀ;  o_h = scale · S_hᵀ q̂
    decay:  dt = n·softplus(g_h),  a = exp(−e^{A_h}·dt)
            S_h ← a S_h + k (dt v)ᵀ;  o_h = scale · S_hᵀ q + D_h v
    gate:   o_h ← o_h ⊙ silu(z_h)                                                         (if ``z`` is given)
    norm:   o_h ← w_h ⊙ o_h / sqrt(mean(o_h²) + eps) + b_h
query head h reads KV head j = h // (H / Hkv); state S [B, H, D, D] (key dim × value dim).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..hedgehog_window.naive import rope   # the same rotate-half RoPE as the Hedgehog step's reference


def naive(qkv: Tensor, state: Tensor, gate_logit: Tensor, a_log: Tensor, norm_weight: Tensor, norm_bias: Tensor,
          *, mode: str, heads: int, kv_heads: int, scale: float, eps: float, conv_state: Tensor | None = None,
          conv_weight: Tensor | None = None, decay_logit: Tensor | None = None, d_skip: Tensor | None = None,
          z: Tensor | None = None, valid: Tensor | None = None, cos: Tensor | None = None,
          sin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """qkv [B, (H+2Hkv)·D], state [B, H, D, D], gate_logit [B, H] (β's logit for delta, dt's for decay), a_log [H],
    norm_weight/norm_bias [H, D]; conv_state [B, C, K] with conv_weight [C, K] (w[:, i] multiplies x_{t−i}) or
    neither; decay_logit [B, H] (delta); d_skip [H] (decay); z [B, H·D]; valid [B]; cos/sin [B or 1, R]
    -> (o [B, H, D], new state, new conv state or None)."""
    if mode not in ("delta", "decay"):
        raise ValueError(f"mode must be 'delta' or 'decay'; got {mode!r}")
    B, H, Hkv = qkv.shape[0], heads, kv_heads
    D = state.shape[-1]
    n = torch.ones(B) if valid is None else valid.float()
    x = qkv.float() * n[:, None]
    if conv_state is not None:
        K = conv_state.shape[-1]
        conv_state = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)
        x = sum(conv_weight[:, i] * conv_state[..., K - 1 - i] for i in range(K))
    q, k, v = x[:, :H * D].view(B, H, D), x[:, H * D:(H + Hkv) * D].view(B, Hkv, D), x[:, (H + Hkv) * D:].view(B, Hkv, D)
    if cos is not None:
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    S = state.float()
    if mode == "delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = n[:, None] * torch.sigmoid(gate_logit.float())
        a = torch.exp(-n[:, None] * torch.exp(a_log.float()) * F.softplus(decay_logit.float()))
        S = S * a[..., None, None]
        u = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))
        S = S + k[..., :, None] * u[..., None, :]
        o = scale * torch.einsum("bhk,bhkv->bhv", q, S)
    else:
        dt = n[:, None] * F.softplus(gate_logit.float())
        a = torch.exp(-torch.exp(a_log.float()) * dt)
        S = S * a[..., None, None] + k[..., :, None] * (dt[..., None] * v)[..., None, :]
        o = scale * torch.einsum("bhk,bhkv->bhv", q, S) + d_skip.float()[:, None] * v
    if z is not None:
        o = o * F.silu(z.float().view(B, H, D))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return o * norm_weight.float() + norm_bias.float(), S, conv_state
