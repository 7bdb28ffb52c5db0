"""Gated DeltaNet: the gated delta rule on L2-normalised q and k from the teacher.

    q, k, v = conv(q, k, v)                                               (short causal conv, K taps)
    β_t = σ(w_β·h_t + b_β),  log a_t = -exp(A_log) softplus(w_a·h_t + b_a)      (per head)
    S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,  o_t = S_tᵀ q_t / √D
    out = W_o (g ⊙ RMSNorm(o_t ⊙ silu(W_z h_t + b_z)) + b)
with k_t, q_t unit vectors (the update is then a contraction).  New parameters: the short convolution
(``conv`` taps, a pass-through at first), the β and decay projections (zero weights; β starts at σ(0) = ½,
decay like Mamba2's dt/A init), the output gate (``gate``; 1 at first) and the norm's gain and bias (fitted
to the teacher's attention output by ``calibrate_output_norms``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .mixer_registry import ROPE, HeadRMSNorm, Mixer, Option, OutputGate, check_dt_range, decay_init, register_mixer


@register_mixer
class GatedDeltaNet(Mixer):
    name = "gated_deltanet"
    options = {"rope": ROPE,
               "dt_min": Option(0.001, float, "smallest initial decay step size (heads spread log-uniformly)", gt=0),
               "dt_max": Option(0.1, float, "largest initial decay step size", gt=0),
               "conv": Option(4, int, "short causal conv taps on q/k/v (0: none)", ge=0, le=16),
               "gate": Option(True, bool, "output gate silu(W_z h) before the output norm")}

    @classmethod
    def check_options(cls, opts):
        return check_dt_range(opts)

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        self.add_short_conv(self.opts["conv"])
        self.beta_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.decay_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.gate = OutputGate(config.hidden_size, H, D) if self.opts["gate"] else None
        self.norm = HeadRMSNorm(H, D, eps=getattr(config, "rms_norm_eps", 1e-6))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        H = self.num_heads
        with torch.no_grad():
            self.beta_proj.weight.zero_()
            self.beta_proj.bias.zero_()
            self.decay_proj.weight.zero_()
            bias, a_log = decay_init(H, self.opts["dt_min"], self.opts["dt_max"])
            self.decay_proj.bias.copy_(bias)
            self.A_log.copy_(a_log)
        for part in (self.conv, self.gate, self.norm):
            if part is not None:
                part.reset_parameters()

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        fused = self.fused_decode(x, position_embeddings, valid, cache, mode="delta",
                                  logit_linears=[self.beta_proj, self.decay_proj], a_log=self.A_log)
        if fused is not None:
            return fused
        q, k, v = self.project(x, position_embeddings, cache, packed, valid)
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(self.expand(k).float(), dim=-1)
        beta = torch.sigmoid(self.beta_proj(x).float())
        log_decay = -torch.exp(self.A_log.float()) * F.softplus(self.decay_proj(x).float())
        if valid is not None:                                              # padded steps leave S unchanged
            beta, log_decay = beta * valid[..., None], log_decay * valid[..., None]
        o = self.recurrence("delta", q, k, self.expand(v), log_decay, beta, cache,
                            scale=self.head_dim ** -0.5, packed=packed)
        if self.gate is not None:
            o = self.gate(o, x)
        return self.norm(o)
