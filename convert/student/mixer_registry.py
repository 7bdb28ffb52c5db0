"""Token mixers that replace a teacher's softmax attention, and the registry that names them.

A mixer keeps the teacher's attention module (``self.attn``) and reuses its q/k/v/o projections;
the parameters it adds are initialised so that the layer starts from the attention it replaces.
Each mixer has a parallel form (training, prefill) and a recurrent form (one-token decode) that
compute the same function; both run through the ops of rnnify's ``kernels`` package when it is
importable, else through ``rnnify_ops.py`` shipped beside this file in an exported student.
"""
from __future__ import annotations

import torch
from torch import nn

try:  # rnnify's own kernels (Triton where available); Hugging Face's `kernels` lacks these names
    from kernels import RNNIFY_KERNELS, decay_scalar, decay_vector, delta  # noqa: F401

    _OPS = {"decay_scalar": decay_scalar, "decay_vector": decay_vector, "delta": delta}

    def run_chunk(op, q, k, v, log_decay, beta=None, **kw):
        args = (q, k, v, log_decay) + ((beta,) if op == "delta" else ())
        return _OPS[op].chunk(*args, **kw)

    def run_step(op, q, k, v, log_decay, beta=None, **kw):
        args = (q, k, v, log_decay) + ((beta,) if op == "delta" else ())
        return _OPS[op].recurrent_step(*args, **kw)
except ImportError:  # exported student without rnnify installed
    from .rnnify_ops import chunk as _chunk, recurrent_step as _step

    def run_chunk(op, q, k, v, log_decay, beta=None, **kw):
        return _chunk(op, q, k, v, log_decay, beta, **kw)

    def run_step(op, q, k, v, log_decay, beta=None, **kw):
        return _step(op, q, k, v, log_decay, beta, **kw)


MIXERS: dict[str, "type[Mixer]"] = {}


def register_mixer(cls):
    MIXERS[cls.name] = cls
    return cls


def get_mixer(name: str) -> "type[Mixer]":
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim of [B, T, H, D], one learnable gain per head and channel."""

    def __init__(self, heads: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


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
    Subclasses set ``name``, ``layer_type`` (transformers cache layer type), ``options`` (allowed
    option names with defaults) and implement ``mix``.
    """

    name = ""
    layer_type = "linear_attention"
    options: dict = {"rope": True}

    def __init__(self, attn: nn.Module, arch, config, options: dict, layer_idx: int):
        super().__init__()
        self.attn = attn
        self.arch = arch
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.heads(config)
        self.opts = {**self.options, **{k: v for k, v in options.items() if k != "type"}}
        self.teacher_mode, self.capture = False, None   # set by RnnifyForCausalLM.teacher_attention()

    @classmethod
    def cache_layer_type(cls, options: dict) -> str:
        return cls.layer_type

    # -- pieces for subclasses -----------------------------------------------------------------
    def project(self, x, position_embeddings):
        """x [B,T,hidden] -> q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D] (RoPE applied if enabled)."""
        q, k, v = self.arch.project_qkv(self.attn, x, self.config)
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

    # -- interface -----------------------------------------------------------------------------
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
            out, weights = self.attn(hidden_states, position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, **kwargs)
            if self.capture is not None:
                self.capture[self.layer_idx] = (hidden_states, out)
            return out, weights
        packed = attention_mask if isinstance(attention_mask, PackedSequences) else None
        valid = None if packed is not None else self.valid_mask(attention_mask, hidden_states.shape[1])
        o = self.mix(hidden_states, position_embeddings, valid, cache, packed)
        return self.arch.output(self.attn, o.to(hidden_states.dtype)), None
