"""Qwen3: q and k pass through a per-head RMSNorm (q_norm, k_norm) before RoPE."""
from .arch_registry import Architecture, register_architecture


@register_architecture
class Qwen3(Architecture):
    model_type = "qwen3"
    projection_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")

    @classmethod
    def project_qkv(cls, attn, x, config):
        q, k, v = super().project_qkv(attn, x, config)
        return attn.q_norm(q), attn.k_norm(k), v
