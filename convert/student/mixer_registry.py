"""Token mixers that replace a teacher's softmax attention, and the registry that names them.

A mixer keeps the teacher's attention module (``self.attn``) and reuses its q/k/v/o projections;
the parameters it adds are initialised so that the layer starts from the attention it replaces.
Each mixer has a parallel form (training, prefill) and a recurrent form (one-token decode) that
compute the same function; both run through the ops of rnnify's ``rnnify_kernels`` package when it is
importable; an exported student without rnnify runs flash-linear-attention's kernels on CUDA when fla-core is
installed (``rnnify_fla.py``, the same mapping as ``rnnify_kernels/fla_backend.py``) and otherwise ``rnnify_ops.py``
(the PyTorch forms), both shipped beside this file, and logs which.
"""
from __future__ import annotations

import math

import torch
from torch import nn

try:  # rnnify's own kernels (Triton where available)
    from rnnify_kernels import decay_scalar, decay_vector, delta  # noqa: F401

    _OPS = {"decay_scalar": decay_scalar, "decay_vector": decay_vector, "delta": delta}

    def run_chunk(op, q, k, v, log_decay, beta=None, **kw):
        args = (q, k, v, log_decay) + ((beta,) if op == "delta" else ())
        return _OPS[op].chunk(*args, **kw)

    def run_step(op, q, k, v, log_decay, beta=None, **kw):
        args = (q, k, v, log_decay) + ((beta,) if op == "delta" else ())
        return _OPS[op].recurrent_step(*args, **kw)
except ImportError:  # exported student without rnnify installed: fla's kernels on CUDA if installed, else torch
    import logging

    from .rnnify_fla import available as _fla_available, run as _fla_run
    from .rnnify_ops import chunk as _chunk, recurrent_step as _step

    _announced = set()

    def _use_fla(q) -> bool:
        fla = q.is_cuda and _fla_available()
        if (fla, q.device.type) not in _announced:
            _announced.add((fla, q.device.type))
            logging.getLogger("rnnify.student").info(
                "rnnify's kernels are not importable: on %s this student runs %s", q.device.type,
                "flash-linear-attention's kernels (fla-core)" if fla else
                "the PyTorch ops bundled beside it (rnnify_ops.py); `pip install rnnify` for the Triton kernels")
        return fla

    def run_chunk(op, q, k, v, log_decay, beta=None, **kw):
        if _use_fla(q):
            return _fla_run(op, "chunk", q, k, v, log_decay, beta, **kw)
        return _chunk(op, q, k, v, log_decay, beta, **kw)

    def run_step(op, q, k, v, log_decay, beta=None, **kw):
        if _use_fla(q):
            return _fla_run(op, "step", q, k, v, log_decay, beta, **kw)
        return _step(op, q, k, v, log_decay, beta, **kw)


try:  # rnnify's kernels: a gated recurrent mixer's decode step fused into one C call on CPU (else the torch ops)
    from rnnify_kernels import ssm_step
except ImportError:
    ssm_step = None

MIXERS: dict[str, "type[Mixer]"] = {}


class Option:
    """One option of a mixer, declared once on its class: default, type, bounds and what it does.  The student reads
    the defaults; rnnify's recipe schema derives ``convert.mixer``'s fields from these (``rnnify.recipe.mixers``).
    ``kind``: a type or typing form (``int``, ``tuple[float, float]``); ``optional``: None is allowed too."""

    def __init__(self, default, kind, doc: str = "", *, gt=None, ge=None, le=None, optional: bool = False):
        self.default, self.kind, self.doc, self.optional = default, kind, doc, optional
        self.gt, self.ge, self.le = gt, ge, le

    def __repr__(self):
        return f"Option({self.default!r}, {self.kind!r})"


ROPE = Option(True, bool, "apply the teacher's rotary embedding to q and k")


def check_dt_range(opts: dict) -> dict:
    """Mamba2's step-size range, shared by the mixers with a data-dependent decay: dt_min <= dt_max."""
    if opts["dt_min"] > opts["dt_max"]:
        raise ValueError(f"dt_min ({opts['dt_min']}) must not exceed dt_max ({opts['dt_max']})")
    return opts


def register_mixer(cls):
    MIXERS[cls.name] = cls
    return cls


def get_mixer(name: str) -> "type[Mixer]":
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def decay_init(heads: int, dt_min: float, dt_max: float, a_range: tuple[float, float] = (1.0, 16.0)):
    """Mamba2's decay initialisation, shared by the mixers with a data-dependent decay a_t = exp(−exp(A_log)·dt_t):
    (softplus⁻¹ of step sizes dt spread log-uniformly over [dt_min, dt_max] across heads, A_log = log of
    ``a_range`` spread linearly), both [heads]."""
    dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), heads))
    return dt + torch.log(-torch.expm1(-dt)), torch.log(torch.linspace(*a_range, heads))


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim of [B, T, H, D] with a gain and a bias per head and channel:
    y = g ⊙ x / rms(x) + b.  The bias starts at 0; ``calibrate_output_norms`` fits g and b by least squares
    to the attention output the mixer replaces (its mean is mostly the teacher's attention sink's value)."""

    def __init__(self, heads: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))
        self.bias = nn.Parameter(torch.zeros(heads, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float() + self.bias.float()).to(x.dtype)

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()


class OutputGate(nn.Module):
    """Mamba2's gate before the output norm: y ⊙ silu(W_z x + b_z), [B,T,H,D] -> [B,T,H,D].

    W_z starts at 0 and b_z at silu⁻¹(1) ≈ 1.28, so the gate is 1 everywhere and the layer starts as it
    would without one; the norm that follows would cancel any other constant anyway.
    """

    SILU_INV_1 = 1.2784645   # silu(b) = 1

    def __init__(self, hidden: int, heads: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden, heads * dim, bias=True)
        self.heads, self.dim = heads, dim

    def reset_parameters(self):
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(self.SILU_INV_1)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x).float().view(*x.shape[:2], self.heads, self.dim)
        return y.float() * nn.functional.silu(z)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, [B, T, C] -> [B, T, C]: out_t = Σ_{i<K} w_i ⊙ x_{t−i}.

    Initialised to pass the current token through (w_0 = 1, others 0), so a converted layer starts with
    the teacher's own projections.  No activation follows: SiLU would move the layer away from the attention
    it was initialised from.  Taps never reach into another document (packed rows) or padding (zeroed by the
    caller); under a cache the last K−1 inputs live in transformers' ``conv_states`` of the layer.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))   # [:, i] multiplies x_{t-i}

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0] = 1.0

    def forward(self, x: torch.Tensor, cache=None, layer_idx: int = 0, packed: "PackedSequences | None" = None):
        B, T, C = x.shape
        K = self.kernel_size
        if cache is not None:   # full = the K cached inputs (zeros at the start) + the T new ones
            full = cache.update_conv_state(x.transpose(1, 2), layer_idx, conv_kernel_size=K).transpose(1, 2)
        else:
            full = x
        P = full.shape[1] - T
        full = nn.functional.pad(full, (0, 0, K - 1, 0))
        w = self.weight.to(x.dtype)
        out = x * w[:, 0]
        for i in range(1, K):
            tap = full[:, K - 1 + P - i:K - 1 + P - i + T]
            if packed is not None:   # x_{t-i} only from t's own document
                same = torch.zeros_like(packed.seq_idx, dtype=torch.bool)
                same[:, i:] = packed.seq_idx[:, i:] == packed.seq_idx[:, :-i]
                tap = tap * same[..., None].to(tap.dtype)
            out = out + tap * w[:, i]
        return out


class PackedSequences:
    """Documents packed along T: ``seq_idx`` [B, T] numbers the document of each token (per row).

    Built from ``position_ids`` that restart at 0 (transformers' packed-sequence convention) when no
    attention mask and no cache are given.  Mixers flatten [B, T] to one sequence of B·T tokens and
    restart their state at every document start (``cu_seqlens`` [n_docs + 1] over B·T; rows are
    boundaries too), so no token sees another document's state.
    """

    def __init__(self, seq_idx: torch.Tensor):
        B, T = seq_idx.shape
        self.seq_idx = seq_idx
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        bounds = torch.nonzero(starts.reshape(-1)).flatten()
        self.cu_seqlens = torch.cat([bounds, bounds.new_tensor([B * T])])


class Mixer(nn.Module):
    """Base class: projections, RoPE, padding and cache plumbing shared by every mixer.

    Options common to all mixers: ``rope`` (apply the teacher's rotary embedding to q and k).
    Subclasses set ``name``, ``family`` (the model card's tag), ``layer_type`` (transformers cache layer type),
    ``options`` ({name: ``Option``}: every option a recipe may set), optionally ``check_options``, and implement
    ``mix``.
    """

    name = ""
    family = "linear-attention"   # or "state-space-model"
    layer_type = "linear_attention"
    options: dict = {"rope": ROPE}
    has_window = False      # a mixer with its own softmax window keeps it when its recurrent part is off
    recurrent_off = False   # set by RnnifyForCausalLM.recurrent_part_off() (the component ablation)

    def __init__(self, attn: nn.Module, arch, config, options: dict, layer_idx: int):
        super().__init__()
        self.attn = attn
        self.arch = arch
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.heads(config)
        self.opts = {**self.defaults(), **{k: v for k, v in options.items() if k != "type"}}
        self.teacher_mode, self.capture = False, None   # set by RnnifyForCausalLM.teacher_attention()

    @classmethod
    def defaults(cls) -> dict:
        return {name: opt.default for name, opt in cls.options.items()}

    @classmethod
    def check_options(cls, opts: dict) -> dict:
        """Checks across options (one at a time: their ``Option`` bounds); returns them, resolved.  ValueError
        with a message for the user on a bad combination."""
        return opts

    @classmethod
    def cache_layer_type(cls, options: dict) -> str:
        return cls.layer_type

    # -- pieces for subclasses -----------------------------------------------------------------
    def add_short_conv(self, kernel_size: int | None) -> None:
        """Give the mixer a ``ShortConv`` over its q, k and v channels (none for a kernel size of 0/None)."""
        self.conv = None
        if kernel_size:
            H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            self.conv = ShortConv((H + 2 * Hkv) * D, kernel_size)

    def project(self, x, position_embeddings, cache=None, packed=None, valid=None):
        """x [B,T,hidden] -> q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D]: the teacher's projections, then the
        mixer's short convolution if it has one (padding zeroed first), then RoPE if enabled."""
        q, k, v = self.arch.project_qkv(self.attn, x, self.config)
        if getattr(self, "conv", None) is not None:
            B, T = x.shape[:2]
            qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
            if valid is not None:
                qkv = qkv * valid[..., None].to(qkv.dtype)
            qkv = self.conv(qkv, cache, self.layer_idx, packed)
            q, k, v = torch.split(qkv, [q[0, 0].numel(), k[0, 0].numel(), v[0, 0].numel()], dim=-1)
            q, k, v = q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim), v.view(B, T, -1, self.head_dim)
        if self.opts["rope"] and position_embeddings is not None:
            q, k = self.arch.apply_rope(self.attn, q, k, *position_embeddings)
        return q, k, v

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,Hkv,D] -> [B,T,H,D] (GQA groups)."""
        return x.repeat_interleave(self.num_heads // x.shape[2], dim=2) if x.shape[2] != self.num_heads else x

    def read_state(self, cache):
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None

    def write_state(self, cache, state):
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx)

    @staticmethod
    def valid_mask(attention_mask, T):
        """[B, T] float mask of real tokens for the current positions, or None when nothing is padded."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        return attention_mask[:, -T:].float()

    def recurrence(self, op, q, k, v, log_decay, beta, cache, scale, packed: PackedSequences | None = None):
        """Run ``op`` over the new tokens from the cached state; write the new state back.

        With ``packed`` (no cache), the state restarts at every document start instead.
        """
        if packed is not None:
            B, T = q.shape[:2]
            flat = [None if x is None else x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, log_decay, beta)]
            o, _ = run_chunk(op, *flat, cu_seqlens=packed.cu_seqlens, scale=scale)
            return o.reshape(B, T, *o.shape[2:])
        state = self.read_state(cache)
        if cache is not None and state is not None and q.shape[1] == 1:
            o, new_state = run_step(op, q, k, v, log_decay, beta, initial_state=state, scale=scale)
        else:
            o, new_state = run_chunk(op, q, k, v, log_decay, beta, initial_state=state,
                                     output_final_state=cache is not None, scale=scale)
        self.write_state(cache, new_state)
        return o

    def fused_decode(self, x, position_embeddings, valid, cache, *, mode: str, logit_linears: list, a_log,
                     d_skip=None):
        """One decode step after the projections: conv, RoPE, recurrence, gate and norm in one C call
        (``rnnify_kernels.ssm_step``, ``mode`` "delta" or "decay"), the cache's conv and recurrent states updated in
        place -> [B, 1, H, D].  ``logit_linears``: β's and the decay's (delta) or dt's (decay) projections.  None
        where it cannot run (the caller runs its PyTorch step, which computes the same): not one token over a cached
        state, gradients wanted, not fp32 on CPU, a cache recording its past, a RoPE other than rotate-half, or no
        built C step."""
        if ssm_step is None or cache is None or x.shape[1] != 1 or x.device.type != "cpu" or (
                x.dtype != torch.float32) or torch.is_grad_enabled():
            return None
        layer = cache.layers[self.layer_idx]
        state = self.read_state(cache)
        conv_state = None
        if self.conv is not None:
            if not (layer.is_conv_states_initialized[0] and layer.has_previous_state[0]) or layer.record_past:
                return None
            conv_state = layer.conv_states[0]
            if conv_state.shape[-1] != self.conv.kernel_size:
                return None
        rope = self.opts["rope"] and position_embeddings is not None
        if state is None or (rope and self.arch.rope != "rotate_half"):
            return None
        B = x.shape[0]
        q, k, v = self.arch.project_qkv(self.attn, x, self.config)
        qkv = torch.cat([q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1)], dim=-1).float()
        if not ssm_step.usable(qkv, state, conv_state, self.num_kv_heads):
            return None
        logits = [linear(x).reshape(B, -1).float().contiguous() for linear in logit_linears]
        z = None if self.gate is None else self.gate.proj(x).reshape(B, -1).float().contiguous()
        cos, sin = (e[:, 0].float().contiguous() for e in position_embeddings) if rope else (None, None)

        def param(t):
            return None if t is None else t.detach().float().contiguous()

        o = ssm_step.decode_step(
            qkv, state, logits[0], param(a_log), param(self.norm.weight), param(self.norm.bias),
            mode=mode, heads=self.num_heads, kv_heads=self.num_kv_heads, scale=self.head_dim ** -0.5,
            eps=self.norm.eps, conv_state=conv_state, conv_weight=None if conv_state is None else param(self.conv.weight),
            decay_logit=logits[1] if len(logits) > 1 else None, d_skip=param(d_skip), z=z,
            valid=None if valid is None else valid[:, -1].float().contiguous(), cos=cos, sin=sin)
        if conv_state is not None:   # the token update_conv_state would have counted (transformers' helper for it)
            layer.increase_count(0)
        return o[:, None]

    def keep_teacher_attention(self) -> None:
        """Keep a frozen copy of the teacher's attention as it is now, for ``teacher_mode`` (and for giving the
        layer its attention back), before training changes the projections ``self.attn`` shares with the mixer.
        A plain attribute, not a submodule: not saved, not trained, not wrapped by DDP/FSDP."""
        if "teacher_attn" not in self.__dict__:
            import copy
            self.__dict__["teacher_attn"] = copy.deepcopy(self.attn).requires_grad_(False)

    @property
    def teacher_attention_module(self) -> nn.Module:
        """The attention this mixer replaced: the frozen copy if one was kept, else ``self.attn``."""
        return self.__dict__.get("teacher_attn", self.attn)

    def teacher_query_key(self, x, position_embeddings):
        """x [B,T,hidden] -> (q [B,T,H,D], k [B,T,H,D], scale): the replaced attention's queries and keys after its
        RoPE, GQA groups expanded, and its score scale; its weights are softmax_s(scale · q_t·k_s) over s ≤ t."""
        attn = self.teacher_attention_module
        q, k, _ = self.arch.project_qkv(attn, x, self.config)
        if position_embeddings is not None:
            q, k = self.arch.apply_rope(attn, q, k, *position_embeddings)
        return q, self.expand(k), getattr(attn, "scaling", self.head_dim ** -0.5)

    # -- interface -----------------------------------------------------------------------------
    @property
    def normalised_weights(self) -> bool:
        """Whether this mixer's output is a normalised average of its values, Σ_s w_ts v_s with w_ts ≥ 0 and
        Σ_s w_ts = 1 (what attention-weight distillation compares with the teacher's softmax rows)."""
        return False

    def weight_factors(self, x, position_embeddings, packed=None):
        """With ``normalised_weights``: x [B,T,hidden] -> (c [B,T,H,F], b [B,T,H,F], u [B,T,H] or None) with
        w_ts ∝ (c_t·b_s) exp(u_s) over s ≤ t in t's document."""
        raise NotImplementedError(f"{self.name}: its output is not a normalised average of its values")

    def reset_rnnify_parameters(self):
        """(Re)initialise the parameters this mixer adds to the teacher's attention."""
        raise NotImplementedError

    def mix(self, x, position_embeddings, valid, cache, packed=None) -> torch.Tensor:
        """x [B,T,hidden] -> mixed values [B,T,H,Dv] before the output projection.

        ``valid`` [B,T] marks real tokens (padding), ``packed`` the document boundaries of packed rows.
        """
        raise NotImplementedError

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.teacher_mode:   # the replaced attention itself (distillation targets, teacher logits)
            out, weights = self.teacher_attention_module(hidden_states, position_embeddings=position_embeddings,
                                                         attention_mask=attention_mask, **kwargs)
            if self.capture is not None:
                self.capture[self.layer_idx] = (hidden_states, out)
            return out, weights
        packed = attention_mask if isinstance(attention_mask, PackedSequences) else None
        valid = None if packed is not None else self.valid_mask(attention_mask, hidden_states.shape[1])
        if self.recurrent_off and not self.has_window:   # the ablation: nothing of this layer's recurrence
            B, T = hidden_states.shape[:2]
            o = hidden_states.new_zeros(B, T, self.num_heads, self.head_dim)
            return self.arch.output(self.attn, o), None
        o = self.mix(hidden_states, position_embeddings, valid, cache, packed)
        return self.arch.output(self.attn, o.to(hidden_states.dtype)), None
