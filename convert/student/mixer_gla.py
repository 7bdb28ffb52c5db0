"""Gated linear attention (GLA) with per-key-channel decay gates.

    log a_t = logsigmoid(W_2 W_1 x_t + b) / τ   ([H, Dk] per token; low-rank gate, τ = 16)
    S_t = diag(a_t) S_{t-1} + k_t v_tᵀ,   o_t = RMSNorm(S_tᵀ q_t / √D),   out = W_o o
q, k, v come from the teacher's projections (with RoPE by default). The gate starts with W_2 = 0 and
b chosen so that every channel keeps a_t ≈ exp(-1/initial_memory): a long memory at initialisation.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .mixer_registry import ROPE, HeadRMSNorm, Mixer, Option, register_mixer


@register_mixer
class GLA(Mixer):
    name = "gla"
    options = {"rope": ROPE,
               "gate_rank": Option(16, int, "rank of the low-rank decay gate", gt=0),
               "gate_normalizer": Option(16.0, float, "divides the gate's log-sigmoid (slower decay when larger)",
                                         gt=0),
               "initial_memory": Option(256.0, float, "tokens the state starts to remember (sets the gate bias)",
                                        gt=1)}

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        self.gate_down = nn.Linear(config.hidden_size, self.opts["gate_rank"], bias=False)
        self.gate_up = nn.Linear(self.opts["gate_rank"], H * D, bias=True)
        self.norm = HeadRMSNorm(H, D, eps=getattr(config, "rms_norm_eps", 1e-6))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        tau = self.opts["gate_normalizer"]
        target = -tau / self.opts["initial_memory"]                        # logsigmoid(b) = τ log a
        with torch.no_grad():
            nn.init.normal_(self.gate_down.weight, std=self.config.hidden_size ** -0.5)
            self.gate_up.weight.zero_()
            self.gate_up.bias.fill_(-math.log(math.expm1(-target)))          # logsigmoid⁻¹(target)
        self.norm.reset_parameters()

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        q, k, v = self.project(x, position_embeddings)
        B, T, H, D = q.shape
        log_decay = F.logsigmoid(self.gate_up(self.gate_down(x)).float()).view(B, T, H, D) / self.opts["gate_normalizer"]
        k, v = self.expand(k), self.expand(v)
        if valid is not None:
            log_decay = log_decay * valid[..., None, None]
            k = k * valid[..., None, None].to(k.dtype)
        o = self.recurrence("decay_vector", q, k, v, log_decay, None, cache,
                            scale=self.head_dim ** -0.5, packed=packed)
        return self.norm(o)
