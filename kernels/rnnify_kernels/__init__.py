"""rnnify's sequence-mixing ops: linear recurrences with a [Dk, Dv] state per head.

``from rnnify_kernels import decay_scalar, decay_vector, delta`` (the stable interface); each exposes ``naive`` (the reference
recurrence), ``chunk`` (parallel form) and ``recurrent_step`` (one decoding step).  Shapes:
q [B, T, H, Dk]; k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] with Hkv dividing H (grouped heads:
kv head j serves query heads j·H/Hkv ... (j+1)·H/Hkv - 1); log_decay [B, T, H] or [B, T, H, Dk];
beta [B, T, H].  Decay is exp(log_decay) (log_decay <= 0) and o_t = scale · S_tᵀ q_t.

``rnnify_kernels.hedgehog_window`` is one windowed Hedgehog decode step (RoPE, state update and read, softmax window
with sink, mix) fused into one C call for CPU, beside its PyTorch reference; ``rnnify_kernels.ssm_step`` the same for
a Gated DeltaNet or Mamba2 layer (short conv, RoPE, delta rule or decayed update, gate, norm).  Both are built by
``cpu_build``.

This package imports nothing of rnnify's.  Its folder is ``kernels/rnnify_kernels/``: the import name ``kernels``
belongs to Hugging Face's kernel hub (which transformers imports), so nothing of ours is importable under it.
"""
from . import decay_scalar, decay_vector, delta

__all__ = ["decay_scalar", "decay_vector", "delta"]
