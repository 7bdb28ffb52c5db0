"""Llama (1/2/3.x): GQA, custom head_dim, RoPE scaling and tied embeddings come from the teacher config."""
from .arch_registry import Architecture, register_architecture


@register_architecture
class Llama(Architecture):
    model_type = "llama"
