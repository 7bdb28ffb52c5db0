"""Hedgehog linear attention (LoLCATs), optionally mixed with sliding-window softmax attention.

    φ(x) = [softmax(x W), softmax(-x W)]  (per head, W [D, F] learnable, initialised to I)
    linear:  o_t = Σ_{j≤t} φ(q_t)·φ(k_j) v_j / Σ_{j≤t} φ(q_t)·φ(k_j)
    window N: softmax weights e_tj = exp(q_t·k_j/√D - m_t) on the last N keys (t-N < j ≤ t) and
              φ weights on the older ones (j ≤ t-N), mixed by a learnable per-head factor f = σ(w):
    o_t = (f Σ_win e_tj v_j + (1-f) Σ_old φ(q_t)·φ(k_j) v_j) / (f Σ_win e_tj + (1-f) Σ_old φ(q_t)·φ(k_j))
(``mixing: shared``, LoLCATs: one normaliser, so the linear part's share of a row depends on how much weight it
holds), or (``mixing: separate``, Liger-style) each part normalised on its own and then mixed,
    o_t = f Σ_win e_tj v_j / Σ_win e_tj + (1-f) Σ_old φ(q_t)·φ(k_j) v_j / Σ_old φ(q_t)·φ(k_j)
(f = 1 while no key has left the window), so the linear part always contributes its share (1-f) of the output.
The linear sums are a decay_scalar recurrence with zero log decay over values [v, 1] (numerator
and denominator in one state); with a window, keys enter that state only once they leave the window.
sink (with a window): once keys have left the window, the softmax part also scores one learned key k_s
with value v_s per KV head (calibrated to the teacher's first-token key/value), so the attention sink the
teacher keeps on the first token stays exact instead of being left to the feature maps.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .hedgehog_decode import RingDecoding
from .mixer_registry import ROPE, Mixer, Option, register_mixer, run_chunk


@register_mixer
class Hedgehog(RingDecoding, Mixer):
    name = "hedgehog"
    options = {"rope": ROPE,
               "feature_dim": Option(None, int, "feature map width F (default head_dim)", gt=0, optional=True),
               "window": Option(None, int, "sliding-window softmax size (LoLCATs hybrid)", gt=0, optional=True),
               # None: a recipe default that depends on window (check_options); the student reads None as off
               "sink": Option(None, bool, "with window: the softmax part also scores a learned stand-in for the "
                                          "first token (the teacher's attention sink) once keys have left the "
                                          "window; default: on with a window", optional=True),
               "eps": Option(1e-6, float, "normaliser floor of the linear part", gt=0),
               "mixing": Option("shared", Literal["shared", "separate"],
                                "with window: shared = one normaliser over window and linear weights (LoLCATs); "
                                "separate = each part normalised, then mixed by the learned share (Liger-style)")}

    @classmethod
    def check_options(cls, opts):
        if opts["sink"] and not opts["window"]:
            raise ValueError("sink needs window (the sink is scored in the sliding-window softmax part)")
        if opts["mixing"] != "shared" and not opts["window"]:
            raise ValueError("mixing: separate needs window (it mixes the window and linear parts)")
        return {**opts, "sink": bool(opts["window"]) if opts["sink"] is None else opts["sink"]}

    @classmethod
    def cache_layer_type(cls, options):
        return "hybrid_sliding" if options.get("window") else "linear_attention"

    def __init__(self, attn, arch, config, options, layer_idx):
        super().__init__(attn, arch, config, options, layer_idx)
        H, D = self.num_heads, self.head_dim
        F = self.opts["feature_dim"] or D
        self.feature_q = nn.Parameter(torch.empty(H, D, F))
        self.feature_k = nn.Parameter(torch.empty(H, D, F))
        self.window = self.opts["window"]
        self.has_window = bool(self.window)
        self.window_dropout = 0.0   # set by RnnifyForCausalLM.set_window_dropout while a stage trains
        if self.window:
            self.window_factor = nn.Parameter(torch.empty(H))
        if self.window and self.opts["sink"]:
            self.rnnify_sink_key = nn.Parameter(torch.empty(self.num_kv_heads, D))
            self.rnnify_sink_value = nn.Parameter(torch.empty(self.num_kv_heads, D))
        self.reset_rnnify_parameters()

    def reset_rnnify_parameters(self):
        """Feature maps start as the identity (φ = softmax(±x)); window and linear parts mix ½ : ½."""
        H, D, F = self.feature_q.shape
        with torch.no_grad():
            self.feature_q.copy_(torch.eye(D, F).repeat(H, 1, 1))
            self.feature_k.copy_(torch.eye(D, F).repeat(H, 1, 1))
            if self.window:
                self.window_factor.zero_()
            if hasattr(self, "rnnify_sink_key"):   # zeros until calibrated on the teacher's first tokens
                self.rnnify_sink_key.zero_()
                self.rnnify_sink_value.zero_()

    @staticmethod
    def feature_map(x, weight):
        """x [B,T,H,D], weight [H,D,F] -> [B,T,H,2F]: softmax over features of ±xW, computed in fp32."""
        w = weight.float()
        xw = torch.einsum("bthd,hdf->bthf", x.float(), torch.cat([w, -w], dim=-1))
        return xw.unflatten(-1, (2, -1)).softmax(-1).flatten(-2)

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        if self.window and x.shape[1] == 1 and packed is None and not torch.is_grad_enabled():
            state = self.read_state(cache)
            if state is not None and not cache.layers[self.layer_idx].record_past:
                return self._decode_windowed(x, position_embeddings, valid, state, cache)
        q, k, v = self.project(x, position_embeddings)
        v1 = self.with_normaliser(v, valid)
        phi_q = self.feature_map(q, self.feature_q)
        if not self.window:
            return self._linear(phi_q, k, v1, cache, packed)
        out = self._mix_windowed(q, k, v1, phi_q, cache, packed)
        if self.window_dropout and self.training and torch.is_grad_enabled():
            B, T, H = phi_q.shape[:3]
            dropped = torch.rand(B, 1, H, 1, device=q.device) < self.window_dropout
            if dropped.any():   # these (row, head) pairs: linear attention over every key, no window
                out = torch.where(dropped, self._linear(phi_q, k, v1, None, packed).to(out.dtype), out)
        return out

    @property
    def normalised_weights(self) -> bool:
        return not self.window   # with a window, softmax and φ weights share one normaliser (not built here)

    def weight_factors(self, x, position_embeddings, packed=None):
        """Windowless: c, b = φ(q), φ(k) [B,T,H,2F] and no u (w_ts ∝ φ(q_t)·φ(k_s))."""
        if not self.normalised_weights:
            return super().weight_factors(x, position_embeddings, packed)
        q, k, _ = self.project(x, position_embeddings)
        return self.feature_map(q, self.feature_q), self.feature_map(self.expand(k), self.feature_k), None

    def _linear(self, phi_q, k, v1, cache, packed):
        """Linear attention over every key: φ(q) [B,T,H,2F], k [B,T,Hkv,D], v1 [B,T,Hkv,Dv+1] -> [B,T,H,Dv]."""
        phi_k = self.feature_map(self.expand(k), self.feature_k)
        o = self.recurrence("decay_scalar", phi_q, phi_k, self.expand(v1).float(),
                            torch.zeros(phi_q.shape[:3], device=phi_q.device), None, cache, scale=1.0, packed=packed)
        return o[..., :-1] / (o[..., -1:] + self.opts["eps"])

    @staticmethod
    def with_normaliser(v, valid):
        """v [B,T,Hkv,Dv] -> [B,T,Hkv,Dv+1]: the values, then 1 (their normaliser); zero for padding (``valid``
        [B,T] 0)."""
        v1 = torch.nn.functional.pad(v, (0, 1), value=1.0)
        return v1 if valid is None else v1 * valid[:, :, None, None].to(v1.dtype)

    @staticmethod
    def _softmax_sums(scores, allowed, values, equation, sink=None):
        """Σ_j exp(s_tj − m_t) v_j over allowed keys (numerator | denominator columns of ``values``);
        ``sink`` = (scores, allowed, values, the key dim of values) of one more key, concatenated last."""
        if sink is not None:
            sink_scores, sink_allowed, sink_values, key_dim = sink
            scores, allowed = torch.cat([scores, sink_scores], dim=-1), torch.cat([allowed, sink_allowed], dim=-1)
            values = torch.cat([values, sink_values], dim=key_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        return torch.einsum(equation, (scores - m).exp(), values)

    def window_share(self) -> float | None:
        """The mean over heads of the learned window share f = σ(w) (None without a window)."""
        return torch.sigmoid(self.window_factor.float()).mean().item() if self.window else None

    def _sink(self):
        """The sink's key [H, D] and value [H, Dv+1] per query head (``expand``ed from the KV heads)."""
        key = self.expand(self.rnnify_sink_key.float()[None, None])[0, 0]
        value = self.expand(self.rnnify_sink_value.float()[None, None])[0, 0]
        return key, torch.cat([value, torch.ones_like(value[:, :1])], dim=-1)

    def _window_dense(self, q, k_ext, v_ext, P, packed, past_window=None):
        """Window sums for T queries at extended positions P..N-1 over all N keys: [B,T,H,Dv+1]
        (``past_window`` [B,T,H]: queries that also see the sink)."""
        N, W = k_ext.shape[1], self.window
        scores = torch.einsum("bthd,bnhd->bhtn", q.float(), k_ext.float()) * self.attn.scaling
        t_pos = torch.arange(P, N, device=q.device)[:, None]
        j_pos = torch.arange(N, device=q.device)[None, :]
        allowed = (j_pos <= t_pos) & (j_pos > t_pos - W)
        allowed = allowed & (v_ext[..., -1].transpose(1, 2)[:, :, None, :] > 0)   # real keys only [B,H,1,N]
        if packed is not None:                                              # no cache: P = 0, N = T
            allowed = allowed & (packed.seq_idx[:, None, :, None] == packed.seq_idx[:, None, None, :])
        sink = None
        if past_window is not None:
            key, value = self._sink()
            sink = (torch.einsum("bthd,hd->bht", q.float(), key)[..., None] * self.attn.scaling,
                    past_window.transpose(1, 2)[..., None], value[None, None].expand(k_ext.shape[0], 1, -1, -1), 1)
            allowed = allowed.expand(*sink[1].shape[:3], -1)
        return self._softmax_sums(scores, allowed, v_ext, "bhtn,bnhv->bthv", sink)

    def _window_blocked(self, q, k, v, packed, past_window=None):
        """The same sums for packed documents (no cache) in blocks of W queries, each over its 2W nearest keys of
        its own document: [B,T,H,Dv+1].  (An unpacked prompt takes ``_prefill_blocks``.)"""
        import torch.nn.functional as F
        B, T, H, D = q.shape
        W = self.window
        nb = -(-T // W)
        pad = nb * W - T
        qb = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, D)
        # keys of block b: positions bW − W .. bW + W − 1 (W zeros in front stand for "before the sequence")
        kw = F.pad(k.float(), (0, 0, 0, 0, W, pad)).unfold(1, 2 * W, W)              # [B,nb,H,D,2W]
        vw = F.pad(v, (0, 0, 0, 0, W, pad)).unfold(1, 2 * W, W)                       # [B,nb,H,Dv+1,2W]
        scores = torch.einsum("bnwhd,bnhdk->bnhwk", qb, kw) * self.attn.scaling     # [B,nb,H,W,2W]
        i = torch.arange(W, device=q.device)[:, None]
        j = torch.arange(2 * W, device=q.device)[None, :]
        allowed = (j > i) & (j <= i + W)                                             # t − W < key ≤ t
        allowed = allowed & (vw[:, :, :, -1, None, :] > 0)                           # real keys [B,nb,H,1,2W]
        seq_k = F.pad(packed.seq_idx, (W, pad), value=-1).unfold(1, 2 * W, W)       # [B,nb,2W]
        seq_q = F.pad(packed.seq_idx, (0, pad), value=-2).view(B, nb, W)
        allowed = allowed & (seq_q[:, :, None, :, None] == seq_k[:, :, None, None, :])
        sink = None
        if past_window is not None:
            key, value = self._sink()
            seen = F.pad(past_window.float(), (0, 0, 0, pad)).view(B, nb, W, H).transpose(2, 3) > 0   # [B,nb,H,W]
            sink = (torch.einsum("bnwhd,hd->bnhw", qb, key)[..., None] * self.attn.scaling, seen[..., None],
                    value[None, None, :, :, None].expand(B, nb, -1, -1, 1), -1)
            allowed = allowed.expand(*seen.shape, -1)
        out = self._softmax_sums(scores, allowed, vw, "bnhwk,bnhvk->bnwhv", sink)    # [B,nb,W,H,Dv+1]
        return out.reshape(B, nb * W, H, -1)[:, :T]

    def _mix_windowed(self, q, k, v1, phi_q, cache, packed=None):
        B, T, H, D = q.shape
        W = self.window
        if cache is not None and self._is_ring(cache.layers[self.layer_idx]):   # decoded before: reorder
            self._ring_to_ordered(cache, self.read_state(cache))
        if cache is not None:   # sliding cache keeps the last W-1 keys; returns them + the new ones
            k_ext, v_ext = cache.update(k.transpose(1, 2), v1.transpose(1, 2), self.layer_idx)
            k_ext, v_ext = k_ext.transpose(1, 2), v_ext.transpose(1, 2)
        else:
            k_ext, v_ext = k, v1
        N = k_ext.shape[1]
        P = N - T                                                          # cached keys before the new ones
        k_ext, v_ext = self.expand(k_ext), self.expand(v_ext).float()
        # linear part: keys enter the state once they leave the window (extended position <= t - W)
        state = self.read_state(cache)
        phi_k = self.feature_map(k_ext, self.feature_k)
        if P == 0 and packed is None and T > W:   # a prompt from an empty state: both parts in one pass of blocks
            sw, lin, new_state = self._prefill_blocks(q, k_ext, v_ext, phi_q, phi_k, cache is not None)
            self.write_state(cache, new_state)
            return self._mixed(sw, lin)
        if packed is not None:
            # shifted sequences as below, restarted at each document; a key enters only its own document's state
            k_sh = torch.nn.functional.pad(phi_k, (0, 0, 0, 0, W, 0))[:, :T]
            v_sh = torch.nn.functional.pad(v_ext, (0, 0, 0, 0, W, 0))[:, :T]
            seq = packed.seq_idx
            same = torch.zeros_like(seq, dtype=torch.bool)
            if W < T:
                same[:, W:] = seq[:, W:] == seq[:, :-W]
            v_sh = v_sh * same[:, :, None, None].to(v_sh.dtype)
            lin = self.recurrence("decay_scalar", phi_q, k_sh, v_sh, torch.zeros(B, T, H, device=q.device), None,
                                  None, scale=1.0, packed=packed)
            new_state = None
        else:
            # position s of the shifted sequences holds query s and key s - W (W zeros in front, also when N < W);
            # one extra step at the end pushes key N - W into the state, which then covers exactly the keys no
            # longer cached.
            q_sh = torch.cat([torch.zeros_like(phi_k[:, :P]), phi_q, torch.zeros_like(phi_q[:, :1])], dim=1)
            k_sh = torch.nn.functional.pad(phi_k, (0, 0, 0, 0, W, 0))[:, :N + 1]
            v_sh = torch.nn.functional.pad(v_ext, (0, 0, 0, 0, W, 0))[:, :N + 1]
            lin, new_state = run_chunk("decay_scalar", q_sh, k_sh, v_sh, torch.zeros(B, N + 1, H, device=q.device),
                                       initial_state=state, output_final_state=cache is not None, scale=1.0)
            lin = lin[:, P:N]
        self.write_state(cache, new_state)
        # the sink is seen by queries some key has left the window of: exactly those with a linear normaliser > 0
        past_window = lin[..., -1] > 0 if hasattr(self, "rnnify_sink_key") else None
        if packed is not None and T > 2 * W:   # long packed rows: O(T·W) blocks instead of a T x T score matrix
            sw = self._window_blocked(q, k_ext, v_ext, packed, past_window)
        else:
            sw = self._window_dense(q, k_ext, v_ext, P, packed, past_window)
        return self._mixed(sw, lin)

    def _mixed(self, sw, lin):
        """Window sums sw and linear sums lin [B,T,H,Dv+1] (numerator | denominator) -> o [B,T,H,Dv]."""
        f = torch.sigmoid(self.window_factor.float())[:, None]             # [H,1]
        if self.recurrent_off:   # the ablation: window (and sink) only
            f = torch.ones_like(f)
        if self.opts["mixing"] == "separate":
            return self.mix_separately(sw, lin, f, self.opts["eps"])
        mixed = f * sw + (1 - f) * lin
        return mixed[..., :-1] / (mixed[..., -1:] + self.opts["eps"])

    @staticmethod
    def mix_separately(sw, lin, f, eps: float):
        """``mixing: separate``: window sums sw and linear sums lin [..., Dv+1] (numerator | denominator), each
        normalised, then mixed by the share f (broadcasting to [..., 1]) -> [..., Dv]; the window alone where no key
        has left it (the linear denominator is 0 there: φ > 0 for every real key)."""
        window = sw[..., :-1] / sw[..., -1:].clamp_min(torch.finfo(sw.dtype).tiny)
        linear = lin[..., :-1] / (lin[..., -1:] + eps)
        f = torch.where(lin[..., -1:] > 0, f, torch.ones_like(f))
        return f * window + (1 - f) * linear

    def _prefill_blocks(self, q, k, v1, phi_q, phi_k, final_state: bool):
        """Window and linear sums of a prompt from an empty state, in blocks of W queries (T > W): block n's
        queries see blocks n-1 and n through the window (t − W < j ≤ t), block n-1's older keys (j ≤ t − W)
        and every key of blocks ≤ n-2 through the feature maps; with zero decay the state entering block n is
        a plain prefix sum of per-block φ(k)ᵀ[v, 1] (no scan).  q [B,T,H,D], k [B,T,H,D], v1 [B,T,H,Dv+1]
        (fp32), φ(q), φ(k) [B,T,H,2F] -> window sums, linear sums [B,T,H,Dv+1], state [B,H,2F,Dv+1] over the
        keys j ≤ T − W (those no longer in the window) or None."""
        import torch.nn.functional as F
        B, T, H, _ = q.shape
        W = self.window
        nb = -(-T // W)
        pad = nb * W - T

        def blocks(x):   # [B,T,H,d] -> [B,H,nb,W,d] fp32 (padded keys have zero values: no weight anywhere)
            return F.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, -1).permute(0, 3, 1, 2, 4)

        def previous(x):   # block n -> block n-1 (zeros before the first)
            return F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]

        qb, kb, vb, pqb, pkb = (blocks(x) for x in (q, k, v1, phi_q, phi_k))
        k_prev, v_prev, pk_prev = previous(kb), previous(vb), previous(pkb)
        a = torch.arange(W, device=q.device)[:, None]   # query offset in its block
        c = torch.arange(W, device=q.device)[None]      # key offset in its block
        # linear: block n-1's keys older than the window (c <= a), then the blocks before it through the state
        kv = pkb.transpose(-1, -2) @ vb                                          # [B,H,nb,2F,Dv+1]
        before = F.pad(kv.cumsum(2), (0, 0, 0, 0, 2, 0))[:, :, :nb]              # Σ over blocks ≤ n-2
        lin = ((pqb @ pk_prev.transpose(-1, -2)) * (c <= a)) @ v_prev + pqb @ before
        # window: block n-1's keys still in it (c > a), block n's up to the query (c <= a)
        keys, values = torch.cat([k_prev, kb], dim=3), torch.cat([v_prev, vb], dim=3)   # [B,H,nb,2W,·]
        scores = (qb @ keys.transpose(-1, -2)) * self.attn.scaling                       # [B,H,nb,W,2W]
        allowed = torch.cat([c > a, c <= a], dim=-1) & (values[..., -1] > 0)[..., None, :]   # real keys only
        sink = None
        if hasattr(self, "rnnify_sink_key"):   # seen once some key has left the window: lin's normaliser > 0
            key, value = self._sink()
            sink = ((qb @ key[None, :, None, :, None]) * self.attn.scaling, lin[..., -1:] > 0,
                    value[None, :, None, None].expand(B, -1, nb, -1, -1), -2)
            allowed = allowed.expand(*sink[1].shape[:-1], -1)
        sw = self._softmax_sums(scores, allowed, values, "bhnwk,bhnkv->bhnwv", sink)
        state = None
        if final_state:   # the keys j ≤ T − W: whole blocks from the prefix sums, then the rest of one block
            held = T - W + 1
            whole, rest = divmod(held, W)
            state = kv[:, :, :whole].sum(2)
            if rest:
                state = state + pkb[:, :, whole, :rest].transpose(-1, -2) @ vb[:, :, whole, :rest]

        def tokens(x):   # [B,H,nb,W,d] -> [B,T,H,d]
            return x.permute(0, 2, 3, 1, 4).reshape(B, nb * W, H, -1)[:, :T]
        return tokens(sw), tokens(lin), state
