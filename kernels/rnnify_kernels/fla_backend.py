"""The ``fla`` backend: the three ops on flash-linear-attention's kernels (``fla-core``, ``pip install rnnify[fla]``).

Our ops and fla's share the layout ([B, T, H, D], states [N, H, Dk, Dv], ``cu_seqlens`` over B == 1) and the
gate convention (log decay, a_t = exp(g_t)); what the mapping does:

    decay_scalar -> simple_gla (``g`` [B, T, H]),  decay_vector -> gla (``g``/``gk`` [B, T, H, Dk]),
    delta        -> gated_delta_rule (``g`` [B, T, H], ``beta`` [B, T, H], no in-kernel l2-norm or sigmoid),

grouped kv heads are expanded to the query heads (fla's GLA ops take equal head counts), the initial state
goes in as fp32, and ``scale`` defaults to Dk^-½ as ours does.  Each op has three fla forms: ``chunk``
(training, prefill), ``step`` (fused recurrent, decode) and ``naive`` (fla's reference recurrence, which runs
on CPU and is how the mapping is tested without a GPU).  A form whose function takes no ``scale`` gets q
pre-scaled (scale / its default Dk^-½); one that takes no ``cu_seqlens`` runs once per packed sequence.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect

from .common import check_inputs, expand_kv_heads, run_varlen

FORMS = {
    "decay_scalar": {"chunk": "fla.ops.simple_gla:chunk_simple_gla",
                     "step": "fla.ops.simple_gla:fused_recurrent_simple_gla",
                     "naive": "fla.ops.simple_gla.naive:naive_recurrent_simple_gla"},
    "decay_vector": {"chunk": "fla.ops.gla:chunk_gla",
                     "step": "fla.ops.gla:fused_recurrent_gla",
                     "naive": "fla.ops.gla.naive:naive_recurrent_gla"},
    "delta": {"chunk": "fla.ops.gated_delta_rule:chunk_gated_delta_rule",
              "step": "fla.ops.gated_delta_rule:fused_recurrent_gated_delta_rule",
              "naive": "fla.ops.gated_delta_rule.naive:naive_recurrent_gated_delta_rule"},
}
# the keyword each fla function takes the log decay under, when it is not ``g``
GATE_KEYWORD = {"fused_recurrent_gla": "gk", "naive_recurrent_gla": "gk"}


def available() -> bool:
    return importlib.util.find_spec("fla") is not None


def function(op: str, form: str):
    """fla's function for ``op`` in ``form`` (chunk | step | naive)."""
    module, name = FORMS[op][form].split(":")
    return getattr(importlib.import_module(module), name)


def arguments(op, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=False, cu_seqlens=None,
              scale=None) -> dict:
    """Our op's arguments as fla's keywords: kv heads expanded, state fp32, scale explicit, gate named ``g``."""
    check_inputs(op, q, k, v, log_decay, beta, initial_state, cu_seqlens)
    H = q.shape[2]
    kw = {"q": q, "k": expand_kv_heads(k, H), "v": expand_kv_heads(v, H), "g": log_decay,
          "scale": q.shape[-1] ** -0.5 if scale is None else float(scale),
          "initial_state": None if initial_state is None else initial_state.float(),
          "output_final_state": output_final_state}
    if op == "delta":
        kw["beta"] = beta
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens.long()
    return kw


def keywords(fn, kw: dict) -> dict:
    """``arguments``' keywords adapted to what fla's ``fn`` takes: its name for the gate, the scale folded into q
    where it takes none (fla's default is Dk^-½)."""
    kw = dict(kw)
    gate = GATE_KEYWORD.get(fn.__name__)
    if gate:
        kw[gate] = kw.pop("g")
    if "scale" not in inspect.signature(fn).parameters:
        q = kw["q"]
        kw["q"] = q * (kw.pop("scale") / q.shape[-1] ** -0.5)
    return kw


def call(fn, kw: dict):
    """Call fla's ``fn`` with ``arguments``' keywords (``keywords``); -> (o, state)."""
    kw = keywords(fn, kw)
    o, state = fn(**kw)
    return o, (state if kw["output_final_state"] else None)


def run(op: str, form: str, q, k, v, log_decay, beta=None, *, initial_state=None, output_final_state=False,
        cu_seqlens=None, scale=None):
    """``op`` on fla's ``form``, in our calling convention: (o [B,T,H,Dv] in q's dtype, final state fp32 | None).
    A form that takes no ``cu_seqlens`` runs once per packed sequence."""
    fn = function(op, form)

    def one(q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens=None):
        return call(fn, arguments(op, q, k, v, log_decay, beta, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, scale=scale))

    if cu_seqlens is not None and "cu_seqlens" not in inspect.signature(fn).parameters:
        o, state = run_varlen(one, q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens)
    else:
        o, state = one(q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), (None if state is None else state.float())
