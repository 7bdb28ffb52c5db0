"""One dispatcher for the three ops: rnnify's Triton kernels, flash-linear-attention's (``fla``), or the chunked
PyTorch form.

The choice is, in order: the ``backend=`` argument, ``$RNNIFY_KERNELS_BACKEND``, then the default: on CUDA the
backend ``eval/bench_kernels.py --record`` measured fastest for the op on this GPU model (the file
``fastest_file()``), else ``triton`` when triton imports; ``torch`` elsewhere.  Each (op, backend, device) choice
is logged once, with where it came from.  ``triton`` on CPU tensors runs Triton's interpreter and needs
``TRITON_INTERPRET=1`` in the environment before the first kernel is compiled (that is how CI tests the
kernels); ``fla`` needs CUDA tensors (its naive references, which run on CPU, test the mapping).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from . import fla_backend, torch_ops
from .common import check_inputs

logger = logging.getLogger("rnnify.kernels")
ENV_VAR = "RNNIFY_KERNELS_BACKEND"
BACKENDS = ("torch", "triton", "fla")
_announced: set[tuple[str, str, str]] = set()
_defaults: dict[tuple[str, str], tuple[str, str]] = {}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on ``device`` here (installed, and CUDA where it needs it)."""
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    return backend == "fla" and fla_backend.available() and device.type == "cuda"


def cache_dir() -> Path:
    """``<rnnify cache>/kernels``, the cache being ``$RNNIFY_CACHE`` or ``~/.cache/rnnify`` (spelled out here
    because this package imports nothing of rnnify's): measurements and built kernels."""
    return Path(os.environ.get("RNNIFY_CACHE", Path.home() / ".cache" / "rnnify")) / "kernels"


def fastest_file() -> Path:
    """Where ``eval/bench_kernels.py --record`` keeps the fastest backend per GPU model and op (JSON:
    {device name: {op: backend}}): ``cache_dir() / "fastest.json"``."""
    return cache_dir() / "fastest.json"


@functools.lru_cache(maxsize=None)
def measured_fastest(device_name: str, path: str) -> dict[str, str]:
    """{op: backend} measured for ``device_name`` in the file at ``path`` ({} when there is none, or when it is not
    a measurement file: then the defaults apply and the log says so, once)."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        logger.warning("%s is not a readable measurement file (%s): default backends; rerun "
                       "python eval/bench_kernels.py --record to replace it", path, e)
        return {}
    entry = table.get(device_name, {}) if isinstance(table, dict) else None
    if not isinstance(entry, dict):
        logger.warning("%s: no {op: backend} table for %s: default backends", path, device_name)
        return {}
    return dict(entry)


def default_backend(op: str, x: torch.Tensor) -> tuple[str, str]:
    """(backend, why) when neither the argument nor the environment names one."""
    if not x.is_cuda:
        return "torch", "default off CUDA"
    name = torch.cuda.get_device_name(x.device)
    measured = measured_fastest(name, str(fastest_file())).get(op)
    if measured in BACKENDS and usable(measured, x.device):
        return measured, f"fastest measured on {name} ({fastest_file()})"
    if triton_available():
        return "triton", "default on CUDA (no measurement for this GPU: python eval/bench_kernels.py --record)"
    return "torch", "default on CUDA without triton"


def select_backend(op: str, x: torch.Tensor, backend: str | None) -> str:
    """Return the backend that will run ``op`` on ``x``; log each (op, backend, device) choice once, with why."""
    choice = backend or os.environ.get(ENV_VAR)
    source = "backend=" if backend else f"${ENV_VAR}="
    why = source.rstrip("=")
    if choice is None:   # decided once per (op, device): every decode step of every layer asks
        key = (op, str(x.device))
        if key not in _defaults:
            _defaults[key] = default_backend(op, x)
        choice, why = _defaults[key]
    if choice not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {source}{choice!r}; available: {', '.join(BACKENDS)}")
    if choice == "triton":
        if not triton_available():
            raise ValueError(f"{op}: {source}'triton' but triton is not installed (pip install triton)")
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{op}: {source}'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                             "(set before the first kernel compiles), or backend='torch'")
    if choice == "fla":
        if not fla_backend.available():
            raise ValueError(f"{op}: {source}'fla' but flash-linear-attention is not installed "
                             "(pip install 'rnnify[fla]', which installs fla-core)")
        if not x.is_cuda:
            raise ValueError(f"{op}: {source}'fla' needs CUDA tensors (fla's ops are Triton kernels); got "
                             f"{x.device.type} tensors; use backend='torch' there")
    if (op, choice, x.device.type) not in _announced:
        _announced.add((op, choice, x.device.type))
        logger.info("rnnify_kernels.%s: backend %s on %s (%s)", op, choice, x.device.type, why)
    return choice


def chunk(op, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=False, cu_seqlens=None,
          scale=None, backend=None):
    """The op's chunked form on the chosen backend: (o [B,T,H,Dv], final state [N,H,Dk,Dv] fp32 or None)."""
    check_inputs(op, q, k, v, log_decay, beta, initial_state, cu_seqlens)
    kw = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale)
    chosen = select_backend(op, q, backend)
    if chosen == "torch":
        return torch_ops.chunk(op, q, k, v, log_decay, beta, **kw)
    if chosen == "fla":
        return fla_backend.run(op, "chunk", q, k, v, log_decay, beta, **kw)
    if op == "delta":
        from .triton_delta import delta_chunk
        return delta_chunk(q, k, v, log_decay, beta, **kw)
    from .triton_gated import gated_chunk
    return gated_chunk(q, k, v, log_decay, scalar=op == "decay_scalar", **kw)


def recurrent_step(op, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=True, scale=None,
                   backend=None):
    """One decoding step.  On ``triton`` a given fp32 contiguous state is updated in place (and returned)."""
    chosen = select_backend(op, q, backend)
    if chosen == "torch":
        return torch_ops.recurrent_step(op, q, k, v, log_decay, beta, initial_state=initial_state,
                                        output_final_state=output_final_state, scale=scale)
    check_inputs(op, q, k, v, log_decay, beta, initial_state, None)
    B, T, H, Dk = q.shape
    if T != 1:
        raise ValueError(f"{op}.recurrent_step takes one token (T == 1); got T={T}")
    if chosen == "fla":
        return fla_backend.run(op, "step", q, k, v, log_decay, beta, initial_state=initial_state,
                               output_final_state=output_final_state, scale=scale)
    state = initial_state
    if state is None:
        state = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float32, device=q.device)
    elif state.dtype != torch.float32 or not state.is_contiguous():
        state = state.float().contiguous()
    from .triton_step import recurrent_step as triton_step
    o = triton_step(op, q, k, v, log_decay, beta, state, Dk ** -0.5 if scale is None else scale)
    return o, (state if output_final_state else None)
