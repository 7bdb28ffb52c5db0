"""Qwen2 / Qwen2.5: Llama attention with biases on q/k/v (carried by the teacher's Linear layers)."""
from .arch_registry import Architecture, register_architecture


@register_architecture
class Qwen2(Architecture):
    model_type = "qwen2"
