"""The runtime of converted models. Every file here is copied flat into each exported student and
needs only torch + transformers (plus rnnify's kernels when importable).  Importing the package
registers all architectures and mixers."""
from .modeling_rnnify import RnnifyForCausalLM  # noqa: F401
