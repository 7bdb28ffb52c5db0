"""Phi-3: one fused qkv_proj ([H·D | Hkv·D | Hkv·D] rows) and partial rotary handled by its RoPE function."""
from .arch_registry import Architecture, register_architecture


@register_architecture
class Phi3(Architecture):
    model_type = "phi3"
    projection_modules = ("qkv_proj", "o_proj")

    @classmethod
    def project_qkv(cls, attn, x, config):
        B, T, _ = x.shape
        H, Hkv, D = cls.heads(config)
        q, k, v = attn.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
