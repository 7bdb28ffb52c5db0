"""Gated DeltaNet: the gated delta rule on L2-normalised q and k from the teacher.

    β_t = σ(w_β·x_t + b_β),  log a_t = -exp(A_log) softplus(w_a·x_t + b_a)      (per head)
    S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,  o_t = RMSNorm(S_tᵀ q_t / √D),  out = W_o o
with k_t, q_t unit vectors (the update is then a contraction).  New parameters: the β and decay
projections (zero weights; β starts at σ(0) = ½, decay like Mamba2's dt/A init), and the norm gain.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .mixer_registry import HeadRMSNorm, Mixer, register_mixer


@register_mixer
class GatedDeltaNet(Mixer):
    name = "gated_deltanet"
    options = {"rope": True, "dt_min": 0.001, "dt_max": 0.1}

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        self.beta_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.decay_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.norm = HeadRMSNorm(H, D, eps=getattr(config, "rms_norm_eps", 1e-6))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        H = self.num_heads
        with torch.no_grad():
            self.beta_proj.weight.zero_()
            self.beta_proj.bias.zero_()
            self.decay_proj.weight.zero_()
            dt = torch.exp(torch.linspace(math.log(self.opts["dt_min"]), math.log(self.opts["dt_max"]), H))
            self.decay_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.linspace(1.0, 16.0, H)))
            self.norm.weight.fill_(1.0)

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        q, k, v = self.project(x, position_embeddings)
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(self.expand(k).float(), dim=-1)
        beta = torch.sigmoid(self.beta_proj(x).float())
        log_decay = -torch.exp(self.A_log.float()) * F.softplus(self.decay_proj(x).float())
        if valid is not None:                                              # padded steps leave S unchanged
            beta, log_decay = beta * valid[..., None], log_decay * valid[..., None]
        o = self.recurrence("delta", q, k, self.expand(v), log_decay, beta, cache,
                            scale=self.head_dim ** -0.5, packed=packed)
        return self.norm(o)
