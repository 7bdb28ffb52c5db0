"""One dispatcher for the three ops: Triton on CUDA, the chunked PyTorch form elsewhere.

The choice is, in order: the ``backend=`` argument, ``$RNNIFY_KERNELS_BACKEND``, then the default
(``triton`` for CUDA tensors when triton imports, else ``torch``).  Each (op, backend, device) choice
is logged once.  ``triton`` on CPU tensors runs Triton's interpreter and needs ``TRITON_INTERPRET=1``
in the environment before the first kernel is compiled (that is how CI tests the kernels).
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from . import torch_ops

logger = logging.getLogger("kernels")
ENV_VAR = "RNNIFY_KERNELS_BACKEND"
BACKENDS = ("torch", "triton")
_announced: set[tuple[str, str, str]] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(op: str, x: torch.Tensor, backend: str | None) -> str:
    """Return the backend that will run ``op`` on ``x``; log each (op, backend, device) choice once."""
    default = "triton" if x.is_cuda and triton_available() else "torch"
    choice = backend or os.environ.get(ENV_VAR) or default
    source = "backend=" if backend else f"${ENV_VAR}="
    if choice not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {source}{choice!r}; available: {', '.join(BACKENDS)}")
    if choice == "triton":
        if not triton_available():
            raise ValueError(f"{op}: {source}'triton' but triton is not installed (pip install triton)")
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{op}: {source}'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                             "(set before the first kernel compiles), or backend='torch'")
    if (op, choice, x.device.type) not in _announced:
        _announced.add((op, choice, x.device.type))
        logger.info("kernels.%s: backend %s on %s", op, choice, x.device.type)
    return choice


def chunk(op, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=False, cu_seqlens=None,
          scale=None, backend=None):
    """The op's chunked form on the chosen backend: (o [B,T,H,Dv], final state [N,H,Dk,Dv] fp32 or None)."""
    torch_ops.check_inputs(op, q, k, v, log_decay, beta, initial_state, cu_seqlens)
    kw = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale)
    if select_backend(op, q, backend) == "torch":
        return torch_ops.chunk(op, q, k, v, log_decay, beta, **kw)
    if op == "delta":
        from .triton_delta import delta_chunk
        return delta_chunk(q, k, v, log_decay, beta, **kw)
    from .triton_gated import gated_chunk
    return gated_chunk(q, k, v, log_decay, scalar=op == "decay_scalar", **kw)


def recurrent_step(op, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=True, scale=None,
                   backend=None):
    """One decoding step.  On ``triton`` a given fp32 contiguous state is updated in place (and returned)."""
    if select_backend(op, q, backend) == "torch":
        return torch_ops.recurrent_step(op, q, k, v, log_decay, beta, initial_state=initial_state,
                                        output_final_state=output_final_state, scale=scale)
    torch_ops.check_inputs(op, q, k, v, log_decay, beta, initial_state, None)
    B, T, H, Dk = q.shape
    if T != 1:
        raise ValueError(f"{op}.recurrent_step takes one token (T == 1); got T={T}")
    state = initial_state
    if state is None:
        state = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float32, device=q.device)
    elif state.dtype != torch.float32 or not state.is_contiguous():
        state = state.float().contiguous()
    from .triton_step import recurrent_step as triton_step
    o = triton_step(op, q, k, v, log_decay, beta, state, Dk ** -0.5 if scale is None else scale)
    return o, (state if output_final_state else None)
