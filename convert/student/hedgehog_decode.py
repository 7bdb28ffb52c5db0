"""Decoding a windowed Hedgehog layer one token at a time, over a ring of window slots in transformers' cache.

While decoding, a windowed layer's cache holds its window as a ring instead of an ordered list: keys
[B, Hkv, W+1, D] and values with their normaliser [B, Hkv, W+1, Dv+1], position p in slot p mod W, the sink in
slot W.  A slot's score bias is log(normaliser): 0 for a real key, -inf for padding, an empty slot, or the sink
before a key has left the window (its row is zero until then).  A softmax over the window does not depend on the
order of its keys, so a step writes one slot in place (no copy of the window, no sink concatenated, no mask built)
and the shapes stay the same at every step.  Transformers' cache operations on the batch dimension (beam
reordering, batch selection) apply to the ring unchanged; a multi-token call turns it back into the ordered window
first (``_ring_to_ordered``).  ``RingDecoding`` is mixed into ``Hedgehog`` (mixer_hedgehog.py), whose parameters
(feature maps, window factor, sink) and window sums it reads.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from .attention_windowed import ring_to_window, window_to_ring

try:  # rnnify's kernels: the decode step fused into one C call on CPU (without rnnify: the PyTorch step below)
    from rnnify_kernels import hedgehog_window
except ImportError:
    hedgehog_window = None


_STAMPS = itertools.count()   # tells apart the successive decode constants of a mixer


class RingDecoding:
    """The one-token decode step of a windowed Hedgehog layer over its ring of window slots (module docstring)."""

    def _decode_constants(self, cache) -> dict:
        """Parameter-derived tensors of the decode step, built once per cache (one generation) and again if a
        parameter changes in place meanwhile: ±W of the query feature map [H, D, 2F] and of the key feature map
        grouped by KV head [Hkv, D, G·2F], the window share [H, 1, 1] (and [H]), the sink's key [Hkv, D] and value with
        its normaliser [Hkv, Dv+1] (with a sink)."""
        params = self.__dict__.get("_decode_params")
        if params is None:
            params = [p for name, p in self.named_parameters(recurse=False)]   # this mixer's own: φ, share, sink
            self.__dict__["_decode_params"] = params
        versions = [(p.data_ptr(), p._version) for p in params]
        cached = self.__dict__.get("_decode_cache")
        if cached is not None and cached[0]() is cache and cached[1] == versions:
            return cached[2]
        fq, fk = self.feature_q.float(), self.feature_k.float()
        H, D, F = fk.shape
        Hkv = self.num_kv_heads
        fk = torch.cat([fk, -fk], dim=-1).view(Hkv, H // Hkv, D, 2 * F).transpose(1, 2).reshape(Hkv, D, -1)
        share = torch.sigmoid(self.window_factor.float())
        consts = {"stamp": next(_STAMPS), "feature_q": torch.cat([fq, -fq], dim=-1), "feature_k": fk,
                  "share": share[:, None, None], "share_heads": share}
        if hasattr(self, "rnnify_sink_key"):
            value = self.rnnify_sink_value.float()
            consts["sink_key"] = self.rnnify_sink_key.float()
            consts["sink_value"] = torch.cat([value, torch.ones_like(value[:, :1])], dim=-1)
        self.__dict__["_decode_cache"] = (weakref.ref(cache), versions, consts)
        return consts

    @staticmethod
    def _per_row(consts: dict, name: str, B: int) -> torch.Tensor:
        """``consts[name]`` [N, ...] repeated for a batch of B: [B·N, ...] (a view for B = 1), kept per B."""
        key = (name, B)
        if key not in consts:
            x = consts[name]
            consts[key] = x.expand(B, *x.shape).reshape(B * x.shape[0], *x.shape[1:])
        return consts[key]

    def _is_ring(self, layer) -> bool:
        # an ordered window holds at most W-1 keys (unless the cache records the past: then it never rings)
        return layer.is_initialized and not layer.record_past and layer.keys.shape[2] == self.window + 1

    @staticmethod
    def _push_slot(layer, state, slot: int, feature_k) -> None:
        """The key in ``slot`` leaves the window: φ(k) v enters the recurrent state [B, H, 2F, Dv+1] in place,
        heads grouped by KV head (``feature_k`` [B·Hkv, D, G·2F]: the G query heads' maps side by side)."""
        B, Hkv, _, D = layer.keys.shape
        k_old = layer.keys[:, :, slot].float().view(B * Hkv, 1, D)
        phi_k = torch.bmm(k_old, feature_k).view(B * Hkv, -1, 2, state.shape[-2] // 2).softmax(-1)
        v_old = layer.values[:, :, slot].float().view(B * Hkv, 1, -1)
        state.view(B * Hkv, -1, state.shape[-1]).baddbmm_(phi_k.view(B * Hkv, -1, 1), v_old)

    def _write_sink(self, layer, state, consts) -> None:
        """Slot W: the sink's key, and its value for the rows some key has left the window of (zero before)."""
        layer.rnnify_ring_stamp = consts["stamp"]   # an int, not the tensors: they are not part of the cache
        if "sink_key" not in consts:
            layer.rnnify_sink_all_seen = True   # no sink: slot W stays empty
            return
        W = self.window
        seen = state[:, 0, 0, -1] > 0   # [B]: φ > 0, so any real key in the state makes the normaliser > 0
        layer.keys[:, :, W] = consts["sink_key"]
        layer.values[:, :, W] = consts["sink_value"] * seen[:, None, None]
        layer.rnnify_sink_all_seen = bool(seen.all())

    def _ordered_to_ring(self, layer, state, consts) -> None:
        layer.keys, layer.values = window_to_ring(layer.keys, layer.values, layer.cumulative_length, self.window)
        self._write_sink(layer, state, consts)

    @torch.no_grad()
    def _ring_to_ordered(self, cache, state) -> None:
        """Back to transformers' ordered window (the last W-1 keys; the key before them enters the state)."""
        layer = cache.layers[self.layer_idx]
        W, t = self.window, layer.cumulative_length
        if t >= W:
            self._push_slot(layer, state, t % W, self._per_row(self._decode_constants(cache), "feature_k",
                                                                layer.keys.shape[0]))
        layer.keys, layer.values = ring_to_window(layer.keys, layer.values, t, W)

    def _fused_step(self, layer, state, consts):
        """The ``rnnify_kernels.hedgehog_window.DecodeStep`` bound to this ring and state, or None where it cannot run
        (the PyTorch step runs): decided again when the ring, the state or the parameters' tensors change.  Kept on
        the mixer by weak reference, not in the cache (it holds a C function, which a cache copy could not copy)."""
        args = (layer.keys, layer.values, state, self.feature_q, self.feature_k, consts["share_heads"])
        kept = self.__dict__.get("_fused")
        if kept is not None and all(ref() is x for ref, x in zip(kept[0], args)):
            return kept[1]
        step = None
        if hedgehog_window is not None and hedgehog_window.usable(self.feature_q, *args[:3]):
            step = hedgehog_window.DecodeStep(*args, scaling=self.attn.scaling, eps=self.opts["eps"])
        self.__dict__["_fused"] = ([weakref.ref(x) for x in args], step)
        return step

    def _decode_windowed(self, x, position_embeddings, valid, state, cache):
        """One new token over a cache (T == 1, no gradients): the same sums as ``_mix_windowed`` over the ring
        of window slots (see above).  On CPU in fp32 with rnnify's kernels, one fused C call after the projections
        (``rnnify_kernels.hedgehog_window``, RoPE included); otherwise the PyTorch step, heads grouped ([B·Hkv, G, ·],
        G = H/Hkv) so keys are never copied per head.

        x [B,1,hidden], position_embeddings (cos, sin) [B or 1,1,R], valid [B,1] or None, state [B,H,2F,Dv+1]
        -> [B,1,H,Dv]."""
        B, H, D = x.shape[0], self.num_heads, self.head_dim
        Hkv, W = self.num_kv_heads, self.window
        G, F2 = H // Hkv, state.shape[-2]
        layer = cache.layers[self.layer_idx]
        c = self._decode_constants(cache)
        if not self._is_ring(layer):
            self._ordered_to_ring(layer, state, c)
        elif layer.__dict__.get("rnnify_ring_stamp") != c["stamp"]:   # parameters changed in place: new sink
            self._write_sink(layer, state, c)
        t = layer.cumulative_length
        slot = t % W
        push = t >= W   # slot holds key t - W: it leaves the window now
        if push and not layer.rnnify_sink_all_seen:   # the sink's value row waits for the first key to leave
            self._push_slot(layer, state, slot, self._per_row(c, "feature_k", B))
            self._write_sink(layer, state, c)
            push = False
        fused = (self._fused_step(layer, state, c) if not self.recurrent_off and x.dtype == torch.float32
                 and self.opts["mixing"] == "shared" else None)   # the C step mixes with one normaliser
        if fused is not None:
            rope_in_step = self.opts["rope"] and position_embeddings is not None and self.arch.rope == "rotate_half"
            q, k, v = self.project(x, None if rope_in_step else position_embeddings)
            cos, sin = (e[:, 0].contiguous() for e in position_embeddings) if rope_in_step else (None, None)
            o = fused(q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous(), slot=slot, push=push,
                      valid=None if valid is None else valid[:, 0].float().contiguous(), cos=cos, sin=sin)
            layer.cumulative_length = t + 1
            return o[:, None]
        q, k, v = self.project(x, position_embeddings)
        if push:
            self._push_slot(layer, state, slot, self._per_row(c, "feature_k", B))
        v1 = self.with_normaliser(v, valid)
        layer.keys[:, :, slot], layer.values[:, :, slot] = k[:, 0], v1[:, 0]
        layer.cumulative_length = t + 1
        keys, values = layer.keys.float(), layer.values.float()   # the model's dtype in the cache, fp32 sums
        qf = q.float().view(B * H, 1, D)
        phi_q = torch.bmm(qf, self._per_row(c, "feature_q", B)).view(B * H, 2, -1).softmax(-1)
        lin = torch.bmm(phi_q.view(B * H, 1, F2), state.view(B * H, F2, -1))                # [B·H,1,Dv+1]
        bias = values[..., -1].log().view(B * Hkv, 1, W + 1)   # 0 real, -inf padding/empty/unseen sink
        scores = torch.baddbmm(bias, qf.view(B * Hkv, G, D), keys.view(B * Hkv, W + 1, D).transpose(1, 2),
                               alpha=self.attn.scaling)                                   # [B·Hkv,G,W+1]
        m = scores.amax(-1, keepdim=True).clamp_(min=torch.finfo(scores.dtype).min)    # all-masked rows -> 0
        window = torch.bmm((scores - m).exp_(), values.view(B * Hkv, W + 1, -1)).view(B * H, 1, -1)
        share = self._per_row(c, "share", B)
        if self.opts["mixing"] == "separate":
            f = torch.ones_like(share) if self.recurrent_off else share
            return self.mix_separately(window, lin, f, self.opts["eps"]).view(B, 1, H, -1)
        mixed = window if self.recurrent_off else torch.lerp(lin, window, share)   # ablation: window only
        return (mixed[..., :-1] / (mixed[..., -1:] + self.opts["eps"])).view(B, 1, H, -1)
