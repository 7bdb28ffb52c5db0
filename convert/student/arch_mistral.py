"""Mistral: Llama attention; the teacher's sliding window (if any) stays on the layers it keeps."""
from .arch_registry import Architecture, register_architecture


@register_architecture
class Mistral(Architecture):
    model_type = "mistral"
