"""Triton kernels for the gated delta rule, forward (chunked, WY form) and backward.

    S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t)

Forward, one program per (sequence, head, block of BV value columns), chunks of BT tokens in order:
value columns of the state never interact (each column of S follows its own delta rule with shared keys),
so the grid grows with Dv and a program holds a [Dk, BV] tile.  With b = cumsum(g) in the
chunk, Γ_t = e^{b_t} and L[t, i] = β_t e^{b_t - b_i} k_t·k_i (i < t), the per-token updates
w_t = β_t (v_t − a_t S_{t-1}ᵀ k_t) solve (I + L) W = diag(β) V − diag(βΓ) K S, so

    W = M (βV) − M (βΓ K) S,   M = (I + L)⁻¹ (forward substitution, BT rows)
    o = scale · [ (q ⊙ Γ) S + (Q Kᵀ ⊙ D) W ],   S_new = e^{b_last} S + (K ⊙ e^{b_last - b})ᵀ W

with D[t, i] = e^{b_t - b_i} (i <= t).  The state at each chunk start is kept (fp32) for backward.

Backward walks the chunks in reverse.  For each chunk it recomputes the states inside the chunk from
the kept chunk-start state (into a per-program scratch), then runs the exact per-token adjoint:
with P = S_{t-1}, w = kᵀP, and dS the gradient of S_t (plus scale · q_t do_tᵀ),

    dq = scale · S_t do,  dv = β dSᵀk,  dβ = (kᵀdS)·(v − a w),  dg = a (⟨dS, P⟩ − β (kᵀdS)·w),
    dk = β dS v − a β (dS w + P dSᵀk),  dS_{t-1} = a (dS − β k (kᵀ dS)).

This is a fused-recurrent backward over chunk checkpoints (memory O(T/BT) states), tiled over value
columns like the forward; dq, dk, dβ and dg sum over columns, so each block writes its share and PyTorch
adds them.  A WY-form chunked backward is the faster path still to write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gated import _block, _load_chunk, _sequence_bounds, value_block


@triton.jit
def _load_row(ptr, row, head, HEADS: tl.constexpr, D: tl.constexpr, cols, col_mask):
    return tl.load(ptr + row * HEADS * D + head * D + cols, mask=col_mask, other=0.0).to(tl.float32)


@triton.jit
def _delta_fwd_kernel(q, k, v, g, beta, o, h0, ht, hc, cu_seqlens, scale, T, NC,
                      H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, STORE_HC: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kv = i_h // (H // HKV)
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + state_off, mask=m_kv, other=0.0)
    for i_c in range(0, tl.cdiv(seq_len, BT)):
        if STORE_HC:   # chunk-start state, for the backward pass
            tl.store(hc + ((i_n * H + i_h).to(tl.int64) * NC + i_c) * K * V + o_k[:, None] * V + o_v[None, :],
                     b_S, mask=m_kv)
        t = i_c * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        b_q = _load_chunk(q, rows, m_t, i_h, H, K, o_k, m_k)
        b_k = _load_chunk(k, rows, m_t, i_kv, HKV, K, o_k, m_k)
        b_v = _load_chunk(v, rows, m_t, i_kv, HKV, V, o_v, m_v)
        b_g = tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_b = tl.cumsum(b_g, axis=0)
        b_last = tl.sum(tl.where(o_t == BT - 1, b_b, 0.0), axis=0)
        diff = b_b[:, None] - b_b[None, :]
        b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
        # M - I by forward substitution on A = -L (strictly lower): row_i += Σ_j A[i, j] row_j
        b_A = -tl.where(strict, b_kk * tl.exp(tl.where(strict, diff, 0.0)), 0.0) * b_beta[:, None]
        for i in range(1, BT):
            row = tl.sum(tl.where((o_t == i)[:, None], b_A, 0.0), axis=0)
            row = row + tl.sum(row[:, None] * b_A, axis=0)
            b_A = tl.where((o_t == i)[:, None], row[None, :], b_A)
        b_M = b_A + tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
        b_u = tl.dot(b_M, b_v * b_beta[:, None], input_precision=PREC)
        b_wk = tl.dot(b_M, b_k * (b_beta * tl.exp(b_b))[:, None], input_precision=PREC)
        b_W = b_u - tl.dot(b_wk, b_S, input_precision=PREC)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * tl.exp(tl.where(causal, diff, float("-inf")))
        b_o = tl.dot(b_q * tl.exp(b_b)[:, None], b_S, input_precision=PREC) + tl.dot(b_qk, b_W, input_precision=PREC)
        tl.store(o + rows[:, None] * H * V + i_h * V + o_v[None, :], b_o * scale, mask=m_t[:, None] & m_v[None, :])
        b_kd = b_k * tl.exp(b_last - b_b)[:, None]
        b_S = b_S * tl.exp(b_last) + tl.dot(tl.trans(b_kd), b_W, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + state_off, b_S, mask=m_kv)


@triton.jit
def _delta_bwd_kernel(q, k, v, g, beta, do, dq, dk, dv, dg, dbeta, hc, scratch, dht, dh0, cu_seqlens, scale, T, NC,
                      NTOK, H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, VARLEN: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kv = i_h // (H // HKV)
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    part = i_v.to(tl.int64) * NTOK                 # block i_v of the [NV, B·T, ...] partial sums
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    prog = (i_n * H + i_h).to(tl.int64)
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + prog * K * V + kv_off, mask=m_kv, other=0.0)
    n_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        start = i_c * BT
        stop = tl.minimum(start + BT, seq_len)
        # states before each step of the chunk, recomputed from the kept chunk-start state
        b_P = tl.load(hc + (prog * NC + i_c) * K * V + kv_off, mask=m_kv, other=0.0)
        for t in range(start, stop):
            row = bos + t
            tl.store(scratch + (prog * BT + (t - start)) * K * V + kv_off, b_P, mask=m_kv)
            b_k = _load_row(k, row, i_kv, HKV, K, o_k, m_k)
            b_v = _load_row(v, row, i_kv, HKV, V, o_v, m_v)
            b_a = tl.exp(tl.load(g + row * H + i_h).to(tl.float32))
            b_beta = tl.load(beta + row * H + i_h).to(tl.float32)
            b_w = tl.sum(b_k[:, None] * b_P, axis=0)
            b_P = b_a * b_P + b_k[:, None] * (b_beta * (b_v - b_a * b_w))[None, :]
        tl.debug_barrier()
        for i_t in range(0, stop - start):
            t = stop - 1 - i_t
            row = bos + t
            b_P = tl.load(scratch + (prog * BT + (t - start)) * K * V + kv_off, mask=m_kv, other=0.0)
            b_q = _load_row(q, row, i_h, H, K, o_k, m_k)
            b_k = _load_row(k, row, i_kv, HKV, K, o_k, m_k)
            b_v = _load_row(v, row, i_kv, HKV, V, o_v, m_v)
            b_do = _load_row(do, row, i_h, H, V, o_v, m_v)
            b_a = tl.exp(tl.load(g + row * H + i_h).to(tl.float32))
            b_beta = tl.load(beta + row * H + i_h).to(tl.float32)
            b_w = tl.sum(b_k[:, None] * b_P, axis=0)                                 # kᵀP        [V]
            b_u = b_v - b_a * b_w
            b_S = b_a * b_P + b_k[:, None] * (b_beta * b_u)[None, :]                # S_t
            b_dS += scale * b_q[:, None] * b_do[None, :]
            b_dq = scale * tl.sum(b_S * b_do[None, :], axis=1)
            b_kdS = tl.sum(b_k[:, None] * b_dS, axis=0)                            # kᵀdS       [V]
            b_dv = b_beta * b_kdS
            b_dbeta = tl.sum(b_kdS * b_u, axis=0)
            b_da = tl.sum(tl.sum(b_dS * b_P, axis=1), axis=0) - b_beta * tl.sum(b_kdS * b_w, axis=0)
            b_dk = b_beta * tl.sum(b_dS * b_v[None, :], axis=1) \
                - b_a * b_beta * (tl.sum(b_dS * b_w[None, :], axis=1) + tl.sum(b_P * b_kdS[None, :], axis=1))
            tl.store(dq + (part + row) * H * K + i_h * K + o_k, b_dq, mask=m_k)
            tl.store(dk + (part + row) * H * K + i_h * K + o_k, b_dk, mask=m_k)
            tl.store(dv + row * H * V + i_h * V + o_v, b_dv, mask=m_v)
            tl.store(dg + (part + row) * H + i_h, b_a * b_da)
            tl.store(dbeta + (part + row) * H + i_h, b_dbeta)
            b_dS = b_a * (b_dS - b_beta * b_k[:, None] * b_kdS[None, :])
        tl.debug_barrier()
    if STORE_DH0:
        tl.store(dh0 + prog * K * V + kv_off, b_dS, mask=m_kv)


class DeltaChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, chunk_size, block_v):
        B, T, H, K = q.shape
        HKV, V = v.shape[2], v.shape[3]
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        longest = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        NC = triton.cdiv(max(longest, 1), chunk_size)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
        ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
        hc = torch.empty(n_seq, H, NC, K, V, dtype=torch.float32, device=q.device)
        BV = block_v or value_block(K, V)
        meta = dict(H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=_block(K), BV=BV, VARLEN=cu_seqlens is not None)
        _delta_fwd_kernel[(n_seq, H, triton.cdiv(V, BV))](q, k, v, g, beta, o, h0, ht, hc, cu_seqlens, scale, T, NC,
                                      USE_H0=h0 is not None, STORE_HT=output_final_state, STORE_HC=True,
                                      PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32", **meta)
        ctx.save_for_backward(q, k, v, g, beta, hc, cu_seqlens)
        ctx.meta, ctx.scale, ctx.n_seq, ctx.NC = meta, scale, n_seq, NC
        ctx.has_h0 = h0 is not None
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype,
                      None if initial_state is None else initial_state.dtype)
        return o.to(q.dtype), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, hc, cu_seqlens = ctx.saved_tensors
        meta = ctx.meta
        B, T, H, K = q.shape
        HKV, V = v.shape[2], v.shape[3]
        f32 = dict(dtype=torch.float32, device=q.device)
        NV = triton.cdiv(V, meta["BV"])
        dq, dk = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
        dv = torch.empty(B, T, H, V, **f32)
        dg, dbeta = torch.empty(NV, B, T, H, **f32), torch.empty(NV, B, T, H, **f32)
        scratch = torch.empty(ctx.n_seq, H, meta["BT"], K, V, **f32)
        dh0 = torch.empty(ctx.n_seq, H, K, V, **f32) if ctx.has_h0 else None
        dht = None if dht is None else dht.float().contiguous()
        _delta_bwd_kernel[(ctx.n_seq, H, NV)](q, k, v, g, beta, do.contiguous(), dq, dk, dv, dg, dbeta, hc, scratch,
                                              dht, dh0, cu_seqlens, ctx.scale, T, ctx.NC, B * T,
                                              USE_DHT=dht is not None, STORE_DH0=ctx.has_h0, **meta)
        dq, dk, dg, dbeta = dq.sum(0), dk.sum(0), dg.sum(0), dbeta.sum(0)   # shares of the column blocks
        if HKV != H:
            dk = dk.view(B, T, HKV, H // HKV, K).sum(3)
            dv = dv.view(B, T, HKV, H // HKV, V).sum(3)
        q_dt, k_dt, v_dt, g_dt, b_dt, s_dt = ctx.dtypes
        return (dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), dg.to(g_dt), dbeta.to(b_dt),
                None if dh0 is None else dh0.to(s_dt), None, None, None, None, None)


def delta_chunk(q, k, v, log_decay, beta, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                scale=None, chunk_size=None, block_v=None):
    """Triton gated delta rule; q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V], log_decay/beta [B,T,H]
    -> (o [B,T,H,V], final state [N,H,K,V] fp32 or None).  ``block_v``: value columns per program
    (default ``value_block(K, V)``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return DeltaChunk.apply(q, k, v, log_decay, beta, initial_state, cu_seqlens, float(scale), output_final_state,
                            chunk_size or 32, block_v)
