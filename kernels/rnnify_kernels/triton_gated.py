"""Triton chunked scans for the gated (decay) recurrences, forward and backward.

    S_t = diag(a_t) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t)

with g_t a scalar per head (``decay_scalar``) or a vector over Dk (``decay_vector``).  One program
per (sequence, head, block of BV value columns) walks the chunks in order with its [Dk, BV] tile of the
state in fp32 registers: value columns never interact, so the grid grows with Dv and a program's state
stays bounded (Dk = 256, Hedgehog's doubled feature width, holds a [256, 32] tile).  Inside a chunk of
BT tokens, with b = cumsum(g) over the chunk (so b_t - b_j <= 0 for j <= t):

    o_t   = scale · [ (q_t ⊙ e^{b_t})ᵀ S + Σ_{j<=t} (Σ_c q_tc k_jc e^{b_tc - b_jc}) v_j ]
    S_new = diag(e^{b_last}) S + Σ_j (k_j ⊙ e^{b_last - b_j}) v_jᵀ

Every exponent is a difference of cumulative log decays, never positive, so strong decay cannot
overflow.  The backward pass recomputes states (dq: forward sweep) and walks the chunks in reverse
with dS (dk, dv, d initial state); dq and dk sum over value columns, so each column block writes its
partial sum and PyTorch adds them.  The decay gradient follows in PyTorch from the identity
dg_s = Σ_{t>=s} (q_t ⊙ dq_t − k_t ⊙ dk_t) + rowsum(S_T ⊙ dS_T) (per sequence).  Per-channel scores
inside a chunk are accumulated over key blocks of at most 64 channels, so the [BT, BT, ·] temporary is
bounded too.
Grouped heads (k/v with fewer heads) are read in place; their gradients are summed per group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sequence_bounds(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``i_n``: from ``cu_seqlens`` when packed, else row ``i_n · T``, length T."""
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        return bos, tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    return i_n.to(tl.int64) * T, T


@triton.jit
def _load_chunk(ptr, rows, row_mask, head, HEADS: tl.constexpr, D: tl.constexpr, cols, col_mask):
    """[BT, BD] block of a [rows, HEADS, D] tensor, as fp32, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * HEADS * D + head * D + cols[None, :],
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decays(g, rows, row_mask, i_h, H: tl.constexpr, K: tl.constexpr, o_k, m_k, o_t,
            BT: tl.constexpr, BK: tl.constexpr, SCALAR: tl.constexpr):
    """Cumulative log decay over the chunk: b [BT, BK] (scalar decays broadcast), its last row [BK],
    and for scalar decays the cumulative scalar [BT] (zeros otherwise)."""
    if SCALAR:
        b_g = tl.load(g + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32)
        b_s = tl.cumsum(b_g, axis=0)
        b_b = b_s[:, None] + tl.zeros([BT, BK], dtype=tl.float32)
    else:
        b_s = tl.zeros([BT], dtype=tl.float32)
        b_b = tl.cumsum(_load_chunk(g, rows, row_mask, i_h, H, K, o_k, m_k), axis=0)
    b_last = tl.sum(tl.where((o_t == BT - 1)[:, None], b_b, 0.0), axis=0)
    return b_b, b_last, b_s


@triton.jit
def _pair_decay(b_s, causal):
    """e^{b_t - b_j} for j <= t, else 0: [BT, BT] (scalar decays)."""
    return tl.exp(tl.where(causal, b_s[:, None] - b_s[None, :], float("-inf")))


@triton.jit
def _pair_decay3(b_b, causal):
    """e^{b_tc - b_jc} for j <= t, else 0: [BT, BT, BK] (per-channel decays)."""
    return tl.exp(tl.where(causal[:, :, None], b_b[:, None, :] - b_b[None, :, :], float("-inf")))


@triton.jit
def _next_state(b_S, b_k, b_v, b_b, b_last, PREC: tl.constexpr):
    """State after the chunk: diag(e^{b_last}) S + Σ_j (k_j ⊙ e^{b_last - b_j}) v_jᵀ."""
    return b_S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(b_k * tl.exp(b_last[None, :] - b_b)), b_v,
                                                  input_precision=PREC)


@triton.jit
def _intra_scores_scalar(b_q, b_k, b_s, causal, PREC: tl.constexpr):
    """A[t, j] = q_t·k_j e^{b_t - b_j} for j <= t, else 0 (scalar decays: one matmul)."""
    return tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * _pair_decay(b_s, causal)


@triton.jit
def _intra_scores_vector(q, k, g, rows, row_mask, i_h, i_kv, H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr,
                         o_t, causal, BT: tl.constexpr, BKS: tl.constexpr):
    """A[t, j] = Σ_c q_tc k_jc e^{b_tc - b_jc} for j <= t, else 0 (per-channel decays), accumulated over key
    blocks of BKS channels: [BT, BT]."""
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKS)):
        o_ks = i_k * BKS + tl.arange(0, BKS)
        m_ks = o_ks < K
        b_q = _load_chunk(q, rows, row_mask, i_h, H, K, o_ks, m_ks)
        b_k = _load_chunk(k, rows, row_mask, i_kv, HKV, K, o_ks, m_ks)
        b_b = tl.cumsum(_load_chunk(g, rows, row_mask, i_h, H, K, o_ks, m_ks), axis=0)
        b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _pair_decay3(b_b, causal), axis=2)
    return b_A


@triton.jit
def _intra_grad_vector(b_dA, x, g, rows, row_mask, head, HEADS: tl.constexpr, H: tl.constexpr, i_h,
                       K: tl.constexpr, causal, out, out_row_stride, TRANSPOSED: tl.constexpr,
                       BT: tl.constexpr, BKS: tl.constexpr):
    """Per-channel intra-chunk gradient, computed and stored in key blocks of BKS channels into ``out``:
    TRANSPOSED=False gives dq_t = Σ_{j<=t} dA[t, j] e^{b_t - b_j} ⊙ x_j (x = k), True gives
    dk_j = Σ_{t>=j} dA[t, j] e^{b_t - b_j} ⊙ x_t (x = q)."""
    for i_k in range(0, tl.cdiv(K, BKS)):
        o_ks = i_k * BKS + tl.arange(0, BKS)
        m_ks = o_ks < K
        b_x = _load_chunk(x, rows, row_mask, head, HEADS, K, o_ks, m_ks)
        b_b = tl.cumsum(_load_chunk(g, rows, row_mask, i_h, H, K, o_ks, m_ks), axis=0)
        if TRANSPOSED:
            part = tl.sum(b_dA[:, :, None] * b_x[:, None, :] * _pair_decay3(b_b, causal), axis=0)
        else:
            part = tl.sum(b_dA[:, :, None] * b_x[None, :, :] * _pair_decay3(b_b, causal), axis=1)
        tl.store(out + rows[:, None] * out_row_stride + o_ks[None, :], part, mask=row_mask[:, None] & m_ks[None, :])


@triton.jit
def _fwd_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale, T,
                H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr, SCALAR: tl.constexpr,
                USE_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kv = i_h // (H // HKV)
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + state_off, mask=m_k[:, None] & m_v[None, :], other=0.0)
    for i_c in range(0, tl.cdiv(seq_len, BT)):
        t = i_c * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        b_q = _load_chunk(q, rows, m_t, i_h, H, K, o_k, m_k)
        b_k = _load_chunk(k, rows, m_t, i_kv, HKV, K, o_k, m_k)
        b_v = _load_chunk(v, rows, m_t, i_kv, HKV, V, o_v, m_v)
        b_b, b_last, b_s = _decays(g, rows, m_t, i_h, H, K, o_k, m_k, o_t, BT, BK, SCALAR)
        if SCALAR:
            b_A = _intra_scores_scalar(b_q, b_k, b_s, causal, PREC)
        else:
            b_A = _intra_scores_vector(q, k, g, rows, m_t, i_h, i_kv, H, HKV, K, o_t, causal, BT, BKS)
        b_o = tl.dot(b_q * tl.exp(b_b), b_S, input_precision=PREC) + tl.dot(b_A, b_v, input_precision=PREC)
        tl.store(o + rows[:, None] * H * V + i_h * V + o_v[None, :], b_o * scale, mask=m_t[:, None] & m_v[None, :])
        b_S = _next_state(b_S, b_k, b_v, b_b, b_last, PREC)
    if STORE_HT:
        tl.store(ht + state_off, b_S, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _bwd_dq_kernel(q, k, v, g, do, dq, dq_intra, h0, cu_seqlens, scale, T, NTOK,
                   H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr, SCALAR: tl.constexpr,
                   USE_H0: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Forward sweep: dq_t = scale · [e^{b_t} ⊙ (S do_t) + Σ_{j<=t} (do_t·v_j) e^{b_t - b_j} ⊙ k_j], this program's
    value columns' share (into block ``i_v`` of dq; per-channel decays put the second term in dq_intra)."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kv = i_h // (H // HKV)
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    part = i_v.to(tl.int64) * NTOK * H * K + i_h * K                      # block i_v of [NV, B·T, H, K]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_S += tl.load(h0 + state_off, mask=m_k[:, None] & m_v[None, :], other=0.0)
    for i_c in range(0, tl.cdiv(seq_len, BT)):
        t = i_c * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        b_k = _load_chunk(k, rows, m_t, i_kv, HKV, K, o_k, m_k)
        b_v = _load_chunk(v, rows, m_t, i_kv, HKV, V, o_v, m_v)
        b_do = _load_chunk(do, rows, m_t, i_h, H, V, o_v, m_v) * scale
        b_b, b_last, b_s = _decays(g, rows, m_t, i_h, H, K, o_k, m_k, o_t, BT, BK, SCALAR)
        b_dA = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)                      # [t, j] = do_t · v_j
        b_dq = tl.dot(b_do, tl.trans(b_S), input_precision=PREC) * tl.exp(b_b)
        if SCALAR:
            b_dq += tl.dot(b_dA * _pair_decay(b_s, causal), b_k, input_precision=PREC)
        else:
            _intra_grad_vector(b_dA, k, g, rows, m_t, i_kv, HKV, H, i_h, K, causal, dq_intra + part, H * K, False,
                               BT, BKS)
        tl.store(dq + part + rows[:, None] * H * K + o_k[None, :], b_dq, mask=m_t[:, None] & m_k[None, :])
        b_S = _next_state(b_S, b_k, b_v, b_b, b_last, PREC)


@triton.jit
def _bwd_dkv_kernel(q, k, v, g, do, dk, dk_intra, dv, dht, dh0, cu_seqlens, scale, T, NTOK,
                    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr, SCALAR: tl.constexpr,
                    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Reverse sweep with dS = ∂L/∂S at the end of the current chunk (this program's value columns); dk, dv per
    query head (dk: this block's share, into block ``i_v``; per-channel decays put its intra term in dk_intra)."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kv = i_h // (H // HKV)
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    part = i_v.to(tl.int64) * NTOK * H * K + i_h * K
    state_off = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + state_off, mask=m_k[:, None] & m_v[None, :], other=0.0)
    n_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        t = i_c * BT + o_t
        m_t = t < seq_len
        rows = bos + t
        b_q = _load_chunk(q, rows, m_t, i_h, H, K, o_k, m_k)
        b_k = _load_chunk(k, rows, m_t, i_kv, HKV, K, o_k, m_k)
        b_v = _load_chunk(v, rows, m_t, i_kv, HKV, V, o_v, m_v)
        b_do = _load_chunk(do, rows, m_t, i_h, H, V, o_v, m_v) * scale
        b_b, b_last, b_s = _decays(g, rows, m_t, i_h, H, K, o_k, m_k, o_t, BT, BK, SCALAR)
        if SCALAR:
            b_A = _intra_scores_scalar(b_q, b_k, b_s, causal, PREC)                            # [t, j]
        else:
            b_A = _intra_scores_vector(q, k, g, rows, m_t, i_h, i_kv, H, HKV, K, o_t, causal, BT, BKS)
        b_kd = b_k * tl.exp(b_last[None, :] - b_b)                                         # k_j e^{b_last - b_j}
        b_dv = tl.dot(tl.trans(b_A), b_do, input_precision=PREC) + tl.dot(b_kd, b_dS, input_precision=PREC)
        b_dA = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)                          # [t, j] = do_t · v_j
        b_dk = tl.dot(b_v, tl.trans(b_dS), input_precision=PREC) * tl.exp(b_last[None, :] - b_b)
        if SCALAR:
            b_dk += tl.dot(tl.trans(b_dA * _pair_decay(b_s, causal)), b_q, input_precision=PREC)
        else:
            _intra_grad_vector(b_dA, q, g, rows, m_t, i_h, H, H, i_h, K, causal, dk_intra + part, H * K, True,
                               BT, BKS)
        tl.store(dk + part + rows[:, None] * H * K + o_k[None, :], b_dk, mask=m_t[:, None] & m_k[None, :])
        tl.store(dv + rows[:, None] * H * V + i_h * V + o_v[None, :], b_dv, mask=m_t[:, None] & m_v[None, :])
        b_dS = b_dS * tl.exp(b_last)[:, None] + tl.dot(tl.trans(b_q * tl.exp(b_b)), b_do, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + state_off, b_dS, mask=m_k[:, None] & m_v[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def value_block(K: int, V: int) -> int:
    """Value columns per program: at most 64, and at most 8K fp32 state entries per program."""
    return max(16, min(_block(V), 64, 8192 // _block(K)))


def _reverse_cumsum(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Σ_{s >= t} x_s along dim 1 ([B, T, ...]), restarting at every sequence end of ``cu_seqlens``."""
    total = x.flip(1).cumsum(1).flip(1)
    if cu_seqlens is None:
        return total
    ends = cu_seqlens[1:].long()
    seq_of_t = torch.searchsorted(ends, torch.arange(x.shape[1], device=x.device), right=True)
    after = torch.cat([total, torch.zeros_like(total[:, :1])], dim=1)    # value just past each sequence
    return total - after[:, ends[seq_of_t]]


class GatedChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, scalar, output_final_state, chunk_size,
                block_v):
        B, T, H, K = q.shape
        HKV, V = v.shape[2], v.shape[3]
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
        ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
        prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
        BV = block_v or value_block(K, V)
        meta = dict(H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=_block(K), BV=BV, BKS=min(_block(K), 64),
                    SCALAR=scalar, VARLEN=cu_seqlens is not None, PREC=prec)
        _fwd_kernel[(n_seq, H, triton.cdiv(V, BV))](q, k, v, g, o, h0, ht, cu_seqlens, scale, T,
                                                    USE_H0=h0 is not None, STORE_HT=output_final_state, **meta)
        ctx.save_for_backward(q, k, v, g, h0, ht, cu_seqlens)
        ctx.meta, ctx.scale, ctx.n_seq, ctx.in_dtypes = meta, scale, n_seq, (q.dtype, k.dtype, v.dtype, g.dtype)
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o.to(q.dtype), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht, cu_seqlens = ctx.saved_tensors
        meta, scale = ctx.meta, ctx.scale
        B, T, H, K = q.shape
        HKV, V = v.shape[2], v.shape[3]
        do = do.contiguous()
        NV = triton.cdiv(V, meta["BV"])
        f32 = dict(dtype=torch.float32, device=q.device)
        # dq and dk sum over value columns: each column block writes its share, added here
        dq, dk = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
        dq_intra = dk_intra = None
        if not meta["SCALAR"]:
            dq_intra, dk_intra = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
        dv = torch.empty(B, T, H, V, **f32)
        dh0 = torch.empty_like(h0) if h0 is not None else None
        grid = (ctx.n_seq, H, NV)
        _bwd_dq_kernel[grid](q, k, v, g, do, dq, dq_intra, h0, cu_seqlens, scale, T, B * T, USE_H0=h0 is not None,
                             **meta)
        dht = None if dht is None else dht.float().contiguous()
        _bwd_dkv_kernel[grid](q, k, v, g, do, dk, dk_intra, dv, dht, dh0, cu_seqlens, scale, T, B * T,
                              USE_DHT=dht is not None, STORE_DH0=dh0 is not None, **meta)
        dq, dk = dq.sum(0), dk.sum(0)
        if not meta["SCALAR"]:
            dq, dk = dq + dq_intra.sum(0), dk + dk_intra.sum(0)
        # decay gradient: dg_s = Σ_{t>=s} (q_t ⊙ dq_t − k_t ⊙ dk_t) + rowsum(S_T ⊙ dS_T), per sequence
        k_heads = k.float().repeat_interleave(H // HKV, dim=2)
        db = q.float() * dq - k_heads * dk
        if meta["SCALAR"]:
            db = db.sum(-1)
        dg = _reverse_cumsum(db, cu_seqlens)
        if dht is not None:
            final = (ht * dht).sum(-1)                                   # [n_seq, H, K]
            final = final.sum(-1) if meta["SCALAR"] else final
            if cu_seqlens is None:
                dg = dg + final[:, None]
            else:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                dg = dg + final.repeat_interleave(lengths, dim=0)[None]
        if HKV != H:   # grouped heads: a kv head's gradient sums over the query heads it serves
            dk = dk.view(B, T, HKV, H // HKV, K).sum(3)
            dv = dv.view(B, T, HKV, H // HKV, V).sum(3)
        q_dt, k_dt, v_dt, g_dt = ctx.in_dtypes
        dh0 = None if dh0 is None else dh0.to(ctx.state_dtype)
        return dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), dg.to(g_dt), dh0, None, None, None, None, None, None


def gated_chunk(q, k, v, log_decay, *, scalar: bool, initial_state=None, output_final_state=False,
                cu_seqlens=None, scale=None, chunk_size=None, block_v=None):
    """Triton chunked scan; q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V], log_decay [B,T,H] (scalar) or
    [B,T,H,K] -> (o [B,T,H,V], final state [N,H,K,V] fp32 or None).  ``block_v``: value columns per program
    (default ``value_block(K, V)``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk_size = chunk_size or (64 if scalar else 16)
    return GatedChunk.apply(q, k, v, log_decay, initial_state, cu_seqlens, float(scale), scalar,
                            output_final_state, chunk_size, block_v)
