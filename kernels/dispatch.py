"""Backend choice for the ops: an explicit argument, else $RNNIFY_KERNELS_BACKEND, else the default."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("kernels")
ENV_VAR = "RNNIFY_KERNELS_BACKEND"
BACKENDS = ("torch",)   # the Triton kernels join this tuple when they land
_announced: set[tuple[str, str]] = set()


def select_backend(op: str, x: torch.Tensor, backend: str | None) -> str:
    """Return the backend that will run ``op`` on ``x``; log each (op, backend) choice once."""
    choice = backend or os.environ.get(ENV_VAR) or "torch"
    if choice not in BACKENDS:
        source = "backend=" if backend else f"${ENV_VAR}="
        raise ValueError(f"{op}: unknown backend {source}{choice!r}; available: {', '.join(BACKENDS)}")
    if (op, choice) not in _announced:
        _announced.add((op, choice))
        logger.info("kernels.%s: backend %s on %s", op, choice, x.device.type)
    return choice
