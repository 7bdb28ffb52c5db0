"""Mamba2 / SSD mixer initialised from attention (Mamba-in-the-Llama): C←q, B←k, x←v, out←o.

    C, B, x = conv(q, k, v)                                              (short causal conv, K taps)
    dt_t = softplus(w_dt·h_t + b_dt),  a_t = exp(-exp(A_log) dt_t)         (one scalar per head)
    S_t = a_t S_{t-1} + B_t (dt_t x_t)ᵀ,   y_t = S_tᵀ C_t / √D + D_skip ⊙ x_t
    out = W_o (g ⊙ RMSNorm(y_t ⊙ silu(W_z h_t + b_z)) + b)
New parameters: the short convolution (``conv`` taps, starting as a pass-through), dt projection (zero weight;
bias so dt spans [dt_min, dt_max] log-uniformly across heads, Mamba2's init), A_log (log of 1..16), D_skip
(ones), the output gate (``gate``; starts at 1) and the per-head output norm's gain g and bias b (fitted to the
teacher's attention output by ``calibrate_output_norms``).
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from .mixer_registry import HeadRMSNorm, Mixer, Option, OutputGate, check_dt_range, decay_init, register_mixer


@register_mixer
class Mamba2(Mixer):
    name = "mamba2"
    family = "state-space-model"
    options = {"rope": Option(False, bool, "apply the teacher's rotary embedding to C and B (q and k)"),
               "dt_min": Option(0.001, float, "smallest initial step size (heads spread log-uniformly)", gt=0),
               "dt_max": Option(0.1, float, "largest initial step size", gt=0),
               "a_init_range": Option((1.0, 16.0), tuple[float, float], "range of exp(A_log) across heads"),
               "conv": Option(4, int, "short causal conv taps on x/B/C (0: none)", ge=0, le=16),
               "gate": Option(True, bool, "output gate silu(W_z h) before the output norm")}

    @classmethod
    def check_options(cls, opts):
        if min(opts["a_init_range"]) <= 0:
            raise ValueError(f"a_init_range: both ends must be above 0 (got {list(opts['a_init_range'])})")
        return check_dt_range(opts)

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        self.add_short_conv(self.opts["conv"])
        self.dt_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.A_log = nn.Parameter(torch.empty(H))
        self.D_skip = nn.Parameter(torch.ones(H))
        self.gate = OutputGate(config.hidden_size, H, D) if self.opts["gate"] else None
        self.norm = HeadRMSNorm(H, D, eps=getattr(config, "rms_norm_eps", 1e-6))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        H = self.num_heads
        lo, hi = self.opts["a_init_range"]
        with torch.no_grad():
            self.dt_proj.weight.zero_()
            bias, a_log = decay_init(H, self.opts["dt_min"], self.opts["dt_max"], (lo, hi))
            self.dt_proj.bias.copy_(bias)
            self.A_log.copy_(a_log)
            self.D_skip.fill_(1.0)
        for part in (self.conv, self.gate, self.norm):
            if part is not None:
                part.reset_parameters()

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        fused = self.fused_decode(x, position_embeddings, valid, cache, mode="decay", logit_linears=[self.dt_proj],
                                  a_log=self.A_log, d_skip=self.D_skip)
        if fused is not None:
            return fused
        q, k, v = self.project(x, position_embeddings, cache, packed, valid)
        dt = F.softplus(self.dt_proj(x).float())                           # [B,T,H]
        if valid is not None:
            dt = dt * valid[..., None]                                       # padded steps: no decay, no input
        log_decay = -torch.exp(self.A_log.float()) * dt
        xv = self.expand(v).float()
        y = self.recurrence("decay_scalar", q, self.expand(k), xv * dt[..., None], log_decay, None, cache,
                            scale=self.head_dim ** -0.5, packed=packed)
        y = y.float() + self.D_skip.float()[:, None] * xv
        if self.gate is not None:
            y = self.gate(y, x)
        return self.norm(y)
