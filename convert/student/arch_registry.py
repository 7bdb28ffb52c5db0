"""Source architectures: how to read q, k, v from a teacher's attention module and write the output back.

One small file per architecture (``arch_<name>.py``) registers an ``Architecture`` under the
teacher's ``model_type``.  To add one: copy ``arch_llama.py``, override what differs (fused or
normed projections, biases), register it, and import it in ``modeling_rnnify.py``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

ARCHITECTURES: dict[str, "type[Architecture]"] = {}


def register_architecture(cls):
    ARCHITECTURES[cls.model_type] = cls
    return cls


def get_architecture(model_type: str) -> "type[Architecture]":
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported teacher model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "To add one, write convert/student/arch_<name>.py (see arch_llama.py) and import it in modeling_rnnify.py.")
    return ARCHITECTURES[model_type]


class Architecture:
    """Llama-style attention: separate q_proj/k_proj/v_proj/o_proj (biases, if any, live in the Linear)."""

    model_type = ""
    projection_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    # what apply_rope does: "rotate_half" = x cos + rotate_half(x) sin over the first cos.shape[-1] dims, the rest
    # unchanged (transformers' Llama-family and Phi-3 functions), so a fused decode step may apply it itself; an
    # architecture whose RoPE differs overrides apply_rope and sets None
    rope = "rotate_half"

    @staticmethod
    def heads(config) -> tuple[int, int, int]:
        """(query heads, kv heads, head_dim) of the teacher config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return config.num_attention_heads, kv, head_dim

    @classmethod
    def project_qkv(cls, attn: nn.Module, x: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, D] (before RoPE)."""
        B, T, _ = x.shape
        return (attn.q_proj(x).view(B, T, -1, attn.head_dim), attn.k_proj(x).view(B, T, -1, attn.head_dim),
                attn.v_proj(x).view(B, T, -1, attn.head_dim))

    @staticmethod
    def apply_rope(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotate q [B, T, H, D] and k [B, T, Hkv, D] with the teacher's own RoPE function."""
        apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return apply(q, k, cos, sin, unsqueeze_dim=2)

    @staticmethod
    def output(attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, Dv] -> [B, T, hidden] through the teacher's output projection."""
        return attn.o_proj(o.reshape(*o.shape[:2], -1))
