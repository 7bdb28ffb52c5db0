"""Chunked PyTorch forms and single-token steps of the three recurrences: the ``torch`` backend (the default on
CPU; chosen by name elsewhere, see ``dispatch``).

This file imports nothing but torch and ``common.py`` (input checks shared with the references): both are
copied into every exported student (as ``rnnify_ops.py`` and ``rnnify_common.py``) so that a converted model
runs where rnnify is not installed.

The three recurrences, with state S_t of shape [Dk, Dv] per (batch, head) and a_t = exp(log_decay_t):
    decay_scalar:  S_t = a_t S_{t-1} + k_t v_tᵀ                       (a_t a scalar per head)
    decay_vector:  S_t = diag(a_t) S_{t-1} + k_t v_tᵀ                 (a_t a vector over Dk)
    delta:         S_t = a_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
and the output o_t = scale · S_tᵀ q_t.

Chunked algorithm: inside a chunk of C tokens the output is a masked, decay-weighted quadratic
attention computed with matmuls; across chunks one [Dk, Dv] state is carried.  Decays are handled
as differences of cumulative log decays (never as ratios of products), so strong decay cannot
overflow; all accumulation is in fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch

from .common import check_inputs, expand_kv_heads, run_varlen

Tensor = torch.Tensor

DEFAULT_CHUNK = {"decay_scalar": 64, "decay_vector": 64, "delta": 32}


# ----------------------------------------------------------------------------------------------
# chunk scans on [B, H, N, C, D] fp32 tensors; S0 [B, H, Dk, Dv]
# ----------------------------------------------------------------------------------------------
def _masked_decay(b: Tensor, strict: bool) -> Tensor:
    """exp(b_i - b_j) for j <= i (j < i if strict), 0 elsewhere; b [..., C] cumulative log decay."""
    C = b.shape[-1]
    keep = torch.ones(C, C, dtype=torch.bool, device=b.device).tril(-1 if strict else 0)
    # mask before exp: exp(b_i - b_j) for j > i can overflow, and inf · 0 in the backward would be NaN
    return (b[..., :, None] - b[..., None, :]).masked_fill(~keep, float("-inf")).exp()


STATE_BLOCK = 16        # chunks whose entering states are computed at once (one [n, n] matmul per block)
SAFE_LOG_RANGE = 60.0   # a chunk whose cumulative log decay spans less than this uses the factored form


def _chunk_states(b_last: Tensor, U: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """States entering each chunk of the recurrence S_n = diag(e^{b_last[n]}) S_{n-1} + U_n.

    b_last [B,H,N] (scalar decay) or [B,H,N,Dk]; U [B,H,N,Dk,Dv]; S [B,H,Dk,Dv] entering chunk 0.
    Within blocks of STATE_BLOCK chunks, S_in[n] = e^{c_n} S + Σ_{m<n} e^{c_n - c_m - b_last[m] ...} is one
    matmul: with c = cumsum(b_last) (inclusive) and c' = c - b_last (exclusive),
    S_in[n] = e^{c'_n} S + Σ_{m<n} e^{c'_n - c_m} U_m, every exponent <= 0.  Returns (S_in [B,H,N,Dk,Dv], S_out).
    """
    vector = b_last.dim() == 4
    N = U.shape[2]
    out = []
    for lo in range(0, N, STATE_BLOCK):
        bl, u = b_last[:, :, lo:lo + STATE_BLOCK], U[:, :, lo:lo + STATE_BLOCK]
        n = u.shape[2]
        c = bl.cumsum(2)
        c_excl = c - bl
        strict = torch.ones(n, n, dtype=torch.bool, device=U.device).tril(-1)
        if vector:                                                    # [B,H,n,m,Dk]
            diff = c_excl[:, :, :, None, :] - c[:, :, None, :, :]
            W = torch.where(strict[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
            s_in = (W.permute(0, 1, 4, 2, 3) @ u.transpose(2, 3)).transpose(2, 3)   # [B,H,n,Dk,Dv]
            s_in = s_in + c_excl.exp()[..., None] * S[:, :, None]
            S = s_in[:, :, -1] * bl[:, :, -1].exp()[..., None] + u[:, :, -1]
        else:                                                         # [B,H,n,m]
            diff = c_excl[..., :, None] - c[..., None, :]
            W = torch.where(strict, diff, torch.full_like(diff, float("-inf"))).exp()
            s_in = (W @ u.flatten(-2)).view_as(u) + c_excl.exp()[..., None, None] * S[:, :, None]
            S = s_in[:, :, -1] * bl[:, :, -1].exp()[..., None, None] + u[:, :, -1]
        out.append(s_in)
    return torch.cat(out, dim=2), S


def _scan_scalar(q, k, v, g, beta, S):
    b = g.cumsum(-1)                                              # [B,H,N,C]
    o_intra = ((q @ k.transpose(-1, -2)) * _masked_decay(b, strict=False)) @ v
    b_last = b[..., -1]                                           # [B,H,N]
    chunk_kv = (k * (b_last[..., None] - b).exp()[..., None]).transpose(-1, -2) @ v   # [B,H,N,Dk,Dv]
    S_in, S = _chunk_states(b_last, chunk_kv, S)
    return o_intra + (q * b.exp()[..., None]) @ S_in, S


def _intra_vector(q, k, b):
    """A[t, j] = Σ_c q_tc k_jc e^{b_tc - b_jc} (j <= t) for [B,H,N,C,Dk] inputs.

    Where a chunk's cumulative log decay spans < SAFE_LOG_RANGE the factors e^{b_t} (<= 1) and
    e^{-b_j} (<= e^{range}) stay finite and A is one matmul; other chunks use the exact
    [C, C, Dk] form (strong decay), so no input can overflow.
    """
    C = b.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    span = -b[..., -1, :].amin(-1)                                # [B,H,N]: b is non-increasing, b_0 <= 0
    safe = span < SAFE_LOG_RANGE
    A = ((q * b.exp()) @ (k * torch.where(safe[..., None, None], -b, torch.zeros_like(b)).exp()).transpose(-1, -2))
    A = A.masked_fill(~causal, 0.0)
    if not bool(safe.all()):
        idx = (~safe).nonzero(as_tuple=True)
        qb, kb, bb = q[idx], k[idx], b[idx]                       # [M,C,Dk]
        diff = bb[:, :, None, :] - bb[:, None, :, :]
        decay = torch.where(causal[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
        A[idx] = (decay * qb[:, :, None, :] * kb[:, None, :, :]).sum(-1)
    return A


def _scan_vector(q, k, v, g, beta, S):
    b = g.cumsum(-2)                                              # [B,H,N,C,Dk]
    o_intra = _intra_vector(q, k, b) @ v
    b_last = b[..., -1, :]                                        # [B,H,N,Dk]
    chunk_kv = (k * (b_last[..., None, :] - b).exp()).transpose(-1, -2) @ v
    S_in, S = _chunk_states(b_last, chunk_kv, S)
    return o_intra + (q * b.exp()) @ S_in, S


def _scan_delta(q, k, v, g, beta, S):
    # WY form: inside a chunk the per-token updates w_t = β_t (v_t - a_t S_{t-1}ᵀ k_t) solve
    # (I + L) W = diag(β) V - diag(β Γ) K S0 with L[t, i] = β_t (Γ_t/Γ_i) k_t·k_i (i < t).
    b = g.cumsum(-1)
    C = b.shape[-1]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    L = (k @ k.transpose(-1, -2)) * _masked_decay(b, strict=True) * beta[..., :, None]
    T_inv = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    U = T_inv @ (beta[..., None] * v)
    Wk = T_inv @ ((beta * b.exp())[..., None] * k)
    A_qk = (q @ k.transpose(-1, -2)) * _masked_decay(b, strict=False)
    b_last = b[..., -1]
    k_dec = (k * (b_last[..., None] - b).exp()[..., None]).transpose(-1, -2)   # [B,H,N,Dk,C]
    # only the state recurrence is sequential; outputs are one batched matmul over all chunks after it
    W_all, S_in = [], []
    for n in range(q.shape[2]):
        S_in.append(S)
        W = U[:, :, n] - Wk[:, :, n] @ S
        W_all.append(W)
        S = S * b_last[:, :, n, None, None].exp() + k_dec[:, :, n] @ W
    S_in, W_all = torch.stack(S_in, dim=2), torch.stack(W_all, dim=2)
    return (q * b.exp()[..., None]) @ S_in + A_qk @ W_all, S


_SCANS = {"decay_scalar": _scan_scalar, "decay_vector": _scan_vector, "delta": _scan_delta}


def _chunk_one(op: str, chunk_size: int, scale: float):
    scan = _SCANS[op]

    def run(q, k, v, log_decay, beta, initial_state, output_final_state):
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        C = chunk_size
        pad = (-T) % C
        N = (T + pad) // C

        def to_chunks(x: Tensor) -> Tensor:
            # [B,T,H,*] -> [B,H,N,C,*] in fp32; padded steps have zero k/v/β and zero log decay,
            # which makes them exact no-ops of the recurrence.
            x = x.float()
            if pad:
                x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
            x = x.movedim(1, 2)
            return x.reshape(B, H, N, C, *x.shape[3:])

        qc, kc, vc = to_chunks(q * scale), to_chunks(k), to_chunks(v)
        gc = to_chunks(log_decay)
        bc = None if beta is None else to_chunks(beta)
        S0 = (torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=q.device) if initial_state is None
              else initial_state.float())
        o, S = scan(qc, kc, vc, gc, bc, S0)
        o = o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2).to(q.dtype)
        return o, (S if output_final_state else None)

    return run


def chunk(op: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, beta: Tensor | None = None, *,
          initial_state: Tensor | None = None, output_final_state: bool = False,
          cu_seqlens: Tensor | None = None, scale: float | None = None,
          chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked parallel form of ``op``; q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv] -> o [B,T,H,Dv], S [B,H,Dk,Dv]."""
    check_inputs(op, q, k, v, log_decay, beta, initial_state, cu_seqlens)
    H = q.shape[2]
    k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = _chunk_one(op, chunk_size or DEFAULT_CHUNK[op], scale)
    return run_varlen(fn, q, k, v, log_decay, beta, initial_state, output_final_state, cu_seqlens)


def recurrent_step(op: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, beta: Tensor | None = None, *,
                   initial_state: Tensor | None = None, output_final_state: bool = True,
                   scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """One decoding step (T == 1): S_1 from S_0 = initial_state, o = scale · S_1ᵀ q; state kept in fp32."""
    check_inputs(op, q, k, v, log_decay, beta, initial_state, None)
    B, T, H, Dk = q.shape
    if T != 1:
        raise ValueError(f"{op}.recurrent_step takes one token (T == 1); got T={T}")
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    kt = expand_kv_heads(k, H)[:, 0].float()                     # [B,H,Dk]
    vt = expand_kv_heads(v, H)[:, 0].float()                     # [B,H,Dv]
    S = (torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=q.device) if initial_state is None
         else initial_state.float())
    a = log_decay[:, 0].float().exp()
    S = S * (a[..., :, None] if op == "decay_vector" else a[..., None, None])
    if op == "delta":
        bt = beta[:, 0].float()[..., None]
        vt = bt * (vt - (kt[..., None] * S).sum(-2))
    S = S + kt[..., :, None] * vt[..., None, :]
    o = (q[:, 0].float()[..., :, None] * S).sum(-2) * scale
    return o[:, None].to(q.dtype), (S if output_final_state else None)
