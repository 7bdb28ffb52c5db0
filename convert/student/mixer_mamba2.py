"""Mamba2 / SSD mixer initialised from attention (Mamba-in-the-Llama): C←q, B←k, x←v, out←o.

    C, B, x = conv(q, k, v)                                              (short causal conv, K taps)
    dt_t = softplus(w_dt·h_t + b_dt),  a_t = exp(-exp(A_log) dt_t)         (one scalar per head)
    S_t = a_t S_{t-1} + B_t (dt_t x_t)ᵀ,   y_t = S_tᵀ C_t / √D + D_skip ⊙ x_t
    out = W_o (g ⊙ RMSNorm(y_t ⊙ silu(W_z h_t + b_z)) + b)
New parameters: the short convolution (``conv`` taps, starting as a pass-through), dt projection (zero weight;
bias so dt spans [dt_min, dt_max] log-uniformly across heads, Mamba2's init), A_log (log of 1..16), D_skip
(ones), the output gate (``gate``; starts at 1) and the per-head output norm's gain g and bias b (fitted to the
teacher's attention output by ``calibrate_output_norms``).

``feature_map: hedgehog`` (HedgeMamba, "Attention to Mamba", arXiv 2604.14191): C = φ_q(q), B = φ_k(k) with
Hedgehog's feature maps φ(x) = [softmax(xW), softmax(−xW)] (W [D, F] per head, identity at first), a state of
2F × D per head and no 1/√D.  ``normalise``: y_t is divided by the same recurrence run over ones,
y_t = Σ_s w_ts x_s / Σ_s w_ts with w_ts = C_t·B_s dt_s Π a, the skip starting closed (D_skip = 0).  With both, a
decay near 1 (``a_init_range`` near 0) and ``norm: false``, the layer starts as windowless Hedgehog linear
attention, exactly while dt is constant per head: the aligned linear attention a pure Mamba2 student is initialised
from, whose decay, conv and gate training then releases (``attention_transfer``'s ``frozen``).
"""
from __future__ import annotations


from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from .mixer_hedgehog import Hedgehog
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
               "gate": Option(True, bool, "output gate silu(W_z h) before the output norm"),
               "feature_map": Option("identity", Literal["identity", "hedgehog"],
                                     "identity: C = q, B = k; hedgehog: C, B = Hedgehog's learned feature maps of "
                                     "q, k (HedgeMamba)"),
               "feature_dim": Option(None, int, "with feature_map: hedgehog, the feature map width F (default "
                                                "head_dim)", gt=0, optional=True),
               "normalise": Option(False, bool, "divide y by the recurrence's total weight (linear attention's "
                                                "normaliser; needs feature_map: hedgehog); the skip starts at 0"),
               "norm": Option(True, bool, "the per-head output RMSNorm with gain and bias")}

    @classmethod
    def check_options(cls, opts):
        if min(opts["a_init_range"]) <= 0:
            raise ValueError(f"a_init_range: both ends must be above 0 (got {list(opts['a_init_range'])})")
        if opts["normalise"] and opts["feature_map"] != "hedgehog":
            raise ValueError("normalise needs feature_map: hedgehog (the weights C·B must be positive to be "
                             "normalised)")
        if opts["feature_dim"] is not None and opts["feature_map"] != "hedgehog":
            raise ValueError("feature_dim needs feature_map: hedgehog")
        return check_dt_range(opts)

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        self.add_short_conv(self.opts["conv"])
        self.dt_proj = nn.Linear(config.hidden_size, H, bias=True)
        self.A_log = nn.Parameter(torch.empty(H))
        self.D_skip = nn.Parameter(torch.ones(H))
        self.gate = OutputGate(config.hidden_size, H, D) if self.opts["gate"] else None
        self.norm = HeadRMSNorm(H, D, eps=getattr(config, "rms_norm_eps", 1e-6)) if self.opts["norm"] else None
        self.hedgehog = self.opts["feature_map"] == "hedgehog"
        if self.hedgehog:
            F_ = self.opts["feature_dim"] or D
            self.feature_q = nn.Parameter(torch.empty(H, D, F_))
            self.feature_k = nn.Parameter(torch.empty(H, D, F_))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        H = self.num_heads
        lo, hi = self.opts["a_init_range"]
        with torch.no_grad():
            self.dt_proj.weight.zero_()
            bias, a_log = decay_init(H, self.opts["dt_min"], self.opts["dt_max"], (lo, hi))
            self.dt_proj.bias.copy_(bias)
            self.A_log.copy_(a_log)
            self.D_skip.fill_(0.0 if self.opts["normalise"] else 1.0)
            if self.hedgehog:
                D, F_ = self.feature_q.shape[1:]
                self.feature_q.copy_(torch.eye(D, F_).repeat(H, 1, 1))
                self.feature_k.copy_(torch.eye(D, F_).repeat(H, 1, 1))
        for part in (self.conv, self.gate, self.norm):
            if part is not None:
                part.reset_parameters()

    def features(self, q, k):
        """q [B,T,H,D], k [B,T,Hkv,D] -> (C, B, scale): Hedgehog's φ(q), φ(k) [B,T,H,2F] (positive, so C·B is a
        weight) and no 1/√D, or q and k themselves and 1/√D."""
        if self.hedgehog:
            return Hedgehog.feature_map(q, self.feature_q), Hedgehog.feature_map(self.expand(k), self.feature_k), 1.0
        return q, self.expand(k), self.head_dim ** -0.5

    def step_sizes(self, x, valid=None):
        """x [B,T,hidden] -> (dt, log a) [B,T,H]: dt = softplus(w_dt·h + b_dt), log a = −exp(A_log)·dt; padded steps
        (``valid`` 0) get dt = 0: no decay, no input."""
        dt = F.softplus(self.dt_proj(x).float())
        if valid is not None:
            dt = dt * valid[..., None]
        return dt, -torch.exp(self.A_log.float()) * dt

    @property
    def normalised_weights(self) -> bool:
        return self.hedgehog and self.opts["normalise"]

    def weight_factors(self, x, position_embeddings, packed=None):
        """With feature_map: hedgehog and normalise: c, b = C, B [B,T,H,2F] and u_s = log dt_s − Σ_{r≤s} log a_r,
        so that w_ts ∝ (c_t·b_s) dt_s Π_{s<r≤t} a_r (the factor of t cancels in the normalisation)."""
        if not self.normalised_weights:
            return super().weight_factors(x, position_embeddings, packed)
        q, k, _ = self.project(x, position_embeddings, None, packed)
        dt, log_decay = self.step_sizes(x)
        c, b, _ = self.features(q, k)
        return c, b, torch.log(dt.clamp_min(1e-30)) - log_decay.cumsum(1)

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        if not self.hedgehog and self.norm is not None:   # the C step: identity feature map, output norm
            fused = self.fused_decode(x, position_embeddings, valid, cache, mode="decay",
                                      logit_linears=[self.dt_proj], a_log=self.A_log, d_skip=self.D_skip)
            if fused is not None:
                return fused
        q, k, v = self.project(x, position_embeddings, cache, packed, valid)
        dt, log_decay = self.step_sizes(x, valid)
        xv = self.expand(v).float()
        c, b, scale = self.features(q, k)
        inputs = xv * dt[..., None]
        if self.opts["normalise"]:   # one more value channel, dt_s itself: the recurrence's total weight
            inputs = torch.cat([inputs, dt[..., None]], dim=-1)
        y = self.recurrence("decay_scalar", c, b, inputs, log_decay, None, cache, scale=scale, packed=packed).float()
        if self.opts["normalise"]:
            y = y[..., :-1] / y[..., -1:].clamp_min(1e-9)   # total weight ≥ dt·C·B; 0 only before any token
        y = y + self.D_skip.float()[:, None] * xv
        if self.gate is not None:
            y = self.gate(y, x)
        return y if self.norm is None else self.norm(y)
