"""Input handling shared by the references, the chunked forms and the fla mapping: shape checks that name the
argument, grouped kv heads, packed sequences.  The code every form is judged by (the recurrences) lives
elsewhere; this is only plumbing, so a reference may use it without importing what it judges.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, beta: Tensor | None,
                 initial_state: Tensor | None, cu_seqlens: Tensor | None) -> None:
    """Raise a ValueError naming the argument when shapes do not follow the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[3] != Dk:
        raise ValueError(f"{op}: k must be [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] matching q {tuple(q.shape)}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2] or H % k.shape[2] != 0:
        raise ValueError(f"{op}: k and v need the same number of heads, dividing q's {H}; got {k.shape[2]}, {v.shape[2]}")
    want = (B, T, H, Dk) if op == "decay_vector" else (B, T, H)
    if tuple(log_decay.shape) != want:
        raise ValueError(f"{op}: log_decay must have shape {want}; got {tuple(log_decay.shape)}")
    if op == "delta" and (beta is None or tuple(beta.shape) != (B, T, H)):
        raise ValueError(f"{op}: beta must have shape {(B, T, H)}; got {None if beta is None else tuple(beta.shape)}")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"{op}: cu_seqlens needs B == 1 (sequences packed along T); got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"{op}: cu_seqlens must be 1-D, start at 0 and end at T={T}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, H, Dk, v.shape[3]):
        raise ValueError(f"{op}: initial_state must be {(n_seq, H, Dk, v.shape[3])}; got {tuple(initial_state.shape)}")


def expand_kv_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, Hkv, D] -> [B, T, H, D]: each kv head serves H/Hkv consecutive query heads (GQA)."""
    if x.shape[2] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def run_varlen(fn, q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens):
    """Run ``fn`` once per packed sequence of ``cu_seqlens`` (or once if None); join outputs and states."""
    if cu_seqlens is None:
        return fn(q, k, v, log_decay, beta, initial_state, output_final_state)
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else initial_state[i:i + 1]
        o, st = fn(q[:, s:e], k[:, s:e], v[:, s:e], log_decay[:, s:e],
                   None if beta is None else beta[:, s:e], init, output_final_state)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, dim=1), (torch.cat(states, dim=0) if output_final_state else None)
