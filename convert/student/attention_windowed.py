"""Kept softmax layers over their last W tokens (``config.attention_window``), computed in blocks at prefill.

A dense sliding mask makes a T-token prefill cost O(T²) however small W is.  Cut the queries into blocks
of Q: block b's queries can only see the W + Q keys before its end, under one fixed mask, and the whole
prefill costs O(T·(W + Q)); a prompt no longer than the window is plain causal attention.  The kept attention modules dispatch through
``WINDOWED_IMPLEMENTATION`` (registered with transformers' ``AttentionInterface``): it takes the blocked
path when the student hands it a ``BlockedWindow`` instead of a mask, and otherwise calls the model's own
implementation (sdpa, eager, flash) with ``sliding_window`` set, which flash kernels need.

Attention sink (``config.attention_sink``).  Pretrained LMs park most of their attention mass on the first
token of a sequence (StreamingLLM's "attention sink"); a plain window drops that token once a query is W
tokens past it and the softmax degrades (README.md, "Attention sinks", has the measured cost).  Instead of
caching the real first token, each windowed layer holds one constant key/value per KV head
(``rnnify_sink_key``/``rnnify_sink_value``, calibrated to the teacher's mean first-token key/value and
trainable) that every query at position >= W sees in place of position 0: no cache entry, no dependence on
padding.

Decoding (``WindowRing``).  One token at a time, a kept windowed layer's cache is a ring of W slots plus one for
the sink instead of an ordered list: position p sits in slot p mod W and the new token overwrites the oldest, in
place.  Softmax attention does not depend on the order of its keys, so attention over the ring is attention over
the window; the sink needs no concatenation and the window is never copied.  Which slots are seen (filled, not
padding; the sink once a query is W tokens in) is the same for every kept layer, so the model builds that bias
once per step (``ring_bias``) and hands it to every layer as its mask (``RingMask``).
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

# one name per copy of this module (rnnify's own, and the one each exported student carries): a model dispatches
# to the copy whose mask and cache classes it builds, also when several copies are loaded in one process
WINDOWED_IMPLEMENTATION = "rnnify_windowed_" + __name__.replace(".", "_")


class BlockedWindow:
    """Stands in for the dense sliding-window mask: the prompt starts at position 0, has no padding and no
    document boundaries, so the window is the only restriction."""

    def __init__(self, window: int):
        self.window = window


# the model's own attention implementations that blocks replace (others, flash kernels, take the window natively)
BLOCKED_BASES = ("sdpa", "eager")
QUERY_BLOCK = 64   # queries per block: each block reads W + QUERY_BLOCK keys, so smaller blocks waste fewer


def blocked_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                             scaling: float | None = None, dropout: float = 0.0,
                             sink: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] -> o [B, T, H, Dv];
    o_i = softmax_{i-W < j <= i}(scaling · q_i·k_j) v_j (Hkv divides H: grouped-query heads).
    With ``sink`` = (k_s [Hkv, D], v_s [Hkv, Dv]), queries i >= W also attend to k_s/v_s (see module doc).
    T <= W is plain causal attention (the teacher's own kernel, no mask); longer prompts go in blocks of
    ``QUERY_BLOCK`` queries, block b over keys bQ - W .. bQ + Q - 1 under one mask: O(T·(W + Q))."""
    B, H, T, _ = query.shape
    W = window
    gqa = H != key.shape[1]
    if T <= W:   # no key has left the window, no query sees the sink
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)
    Q = min(W, QUERY_BLOCK)
    blocks = -(-T // Q)
    pad = blocks * Q - T

    def key_blocks(x):   # [B, Hkv, T, D] -> [B·blocks, Hkv, W + Q, D]: positions bQ - W .. bQ + Q - 1
        return F.pad(x, (0, 0, W, pad)).unfold(2, W + Q, Q).permute(0, 2, 1, 4, 3).flatten(0, 1)

    q = F.pad(query, (0, 0, 0, pad)).unflatten(2, (blocks, Q)).transpose(1, 2).flatten(0, 1)   # [B·blocks, H, Q, D]
    a = torch.arange(Q, device=query.device)[:, None]        # query offset in its block
    c = torch.arange(W + Q, device=query.device)[None]       # key offset: position bQ - W + c
    start = torch.arange(blocks, device=query.device)[:, None, None] * Q
    allowed = (c > a) & (c <= a + W) & (start - W + c >= 0)  # t − W < key ≤ t, and no key before the prompt
    keys, values = key_blocks(key), key_blocks(value)
    if sink is not None:   # one more key per block, seen by queries at position >= W
        keys, values = with_sink(keys, values, sink)
        allowed = torch.cat([(start + a >= W).expand(blocks, Q, 1), allowed], dim=-1)
    mask = allowed[None, :, None].expand(B, -1, -1, -1, -1).flatten(0, 1)   # [B·blocks, 1, Q, W + Q (+1)]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, dropout_p=dropout,
                                         enable_gqa=gqa)
    return out.unflatten(0, (B, blocks)).transpose(2, 3).flatten(1, 2)[:, :T]   # [B, T, H, Dv]


def with_sink(keys: torch.Tensor, values: torch.Tensor, sink) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the sink: k [N, Hkv, S, D], v [N, Hkv, S, Dv] -> [N, Hkv, 1 + S, ·] (sink first)."""
    k_s, v_s = sink
    n = keys.shape[0]
    return (torch.cat([k_s.to(keys.dtype)[None, :, None].expand(n, -1, -1, -1), keys], dim=2),
            torch.cat([v_s.to(values.dtype)[None, :, None].expand(n, -1, -1, -1), values], dim=2))


def add_attention_sink(attn: torch.nn.Module) -> None:
    """Give a kept attention module its sink parameters (zeros: a key scoring 0 with a zero value, until
    rnnify's ``calibrate_attention_sinks`` sets the teacher's first-token statistics)."""
    if hasattr(attn, "rnnify_sink_key"):
        return
    weight = attn.k_proj.weight if hasattr(attn, "k_proj") else next(attn.parameters())
    kv_heads = attn.config.num_key_value_heads
    attn.rnnify_sink_key = torch.nn.Parameter(weight.new_zeros(kv_heads, attn.head_dim))
    attn.rnnify_sink_value = torch.nn.Parameter(weight.new_zeros(kv_heads, attn.head_dim))


def sink_attention(module, query, key, value, attention_mask, position_ids, window: int, scaling, dropout):
    """Windowed attention plus the sink for queries at position >= ``window``: q [B, H, T, D],
    k/v [B, Hkv, N, D] (cache + new), ``attention_mask`` sdpa-style (bool [B, 1, T, N] or None) -> [B, T, H, D]."""
    B, H, T, _ = query.shape
    N = key.shape[-2]
    if attention_mask is None:   # transformers drops the mask when plain causal attention is exact
        attention_mask = torch.ones(T, N, dtype=torch.bool, device=query.device).tril(N - T)[None, None]
    if position_ids is None:
        position_ids = torch.arange(N - T, N, device=query.device)[None]
    sees_sink = (position_ids >= window)[:, None, :, None].expand(B, 1, T, 1)
    mask = torch.cat([sees_sink, attention_mask.expand(B, 1, T, N)], dim=-1)
    keys, values = with_sink(key, value, (module.rnnify_sink_key, module.rnnify_sink_value))
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, dropout_p=dropout,
                                         enable_gqa=H != key.shape[1])
    return out.transpose(1, 2)


def window_to_ring(keys: torch.Tensor, values: torch.Tensor, seen: int, window: int):
    """An ordered window, k/v [B, Hkv, n, ·] holding positions seen-n .. seen-1 (n < W), -> a ring [B, Hkv, W+1, ·]:
    position p in slot p mod W; the other slots, and slot W (the sink's), zero."""
    B, Hkv, n = keys.shape[:3]
    slots = torch.arange(seen - n, seen, device=keys.device) % window
    ring_k = keys.new_zeros(B, Hkv, window + 1, keys.shape[-1])
    ring_v = values.new_zeros(B, Hkv, window + 1, values.shape[-1])
    ring_k[:, :, slots], ring_v[:, :, slots] = keys, values
    return ring_k, ring_v


def ring_to_window(keys: torch.Tensor, values: torch.Tensor, seen: int, window: int):
    """The inverse as transformers' sliding layer keeps it: the last min(seen, W-1) positions, in order."""
    n = min(seen, window - 1)
    slots = torch.arange(seen - n, seen, device=keys.device) % window
    return keys[:, :, slots], values[:, :, slots]


class WindowRing(DynamicSlidingWindowLayer):
    """A kept windowed layer's cache while decoding: keys/values [B, Hkv, W+1, D], position p in slot p mod W,
    slot W the sink (see module doc).  Built from transformers' ordered sliding layer by ``from_ordered`` and turned
    back by ``to_ordered`` before a multi-token call; batch operations (beam reordering, selection) apply as is."""

    @classmethod
    def from_ordered(cls, layer: DynamicSlidingWindowLayer) -> "WindowRing":
        ring = cls(layer.sliding_window)
        ring.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("keys", "values")})
        ring.keys, ring.values = window_to_ring(layer.keys, layer.values, layer.cumulative_length,
                                                layer.sliding_window)
        return ring

    def to_ordered(self) -> DynamicSlidingWindowLayer:
        """transformers' sliding layer holding the last W-1 tokens in order."""
        layer = DynamicSlidingWindowLayer(self.sliding_window)
        layer.__dict__.update({k: v for k, v in vars(self).items() if k not in ("keys", "values")})
        if self.is_initialized:
            layer.keys, layer.values = ring_to_window(self.keys, self.values, self.cumulative_length,
                                                      self.sliding_window)
        return layer

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the new token (k/v [B, Hkv, 1, D]) over the oldest slot; returns the whole ring [B, Hkv, W+1, D]."""
        if key_states.shape[-2] != 1:
            raise RuntimeError("WindowRing takes one token per step; the student turns it back into an ordered "
                               "window (to_ordered) before a multi-token call")
        slot = self.cumulative_length % self.sliding_window
        self.keys[:, :, slot] = key_states[:, :, 0]
        self.values[:, :, slot] = value_states[:, :, 0]
        self.cumulative_length += 1
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a decoding ring cannot be cropped; turn it back first: "
                           "cache.layers[i] = layer.to_ordered()")


class RingMask:
    """The mask of kept windowed layers while decoding over ``WindowRing`` caches: ``bias`` [B, 1, 1, W+1]
    (0 seen, -inf not), the same for every such layer in a step; None when every slot is seen."""

    def __init__(self, bias: torch.Tensor | None):
        self.bias = bias


def ring_bias(cached: int, window: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
              sink: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Which ring slots the next token (cache index ``cached``) sees once written: slot j holds the latest position
    p <= cached with p = j mod W, seen if p >= 0 and not padding (2D ``attention_mask`` [B, >= cached+1]); the
    sink slot is seen from position W on (``position_ids`` [B, 1]: real tokens only).  -> bias [B, 1, 1, W+1],
    or None when every slot is seen (the sink's only if there is one): attention then needs no mask."""
    if (attention_mask is None or attention_mask.dim() != 2) and cached >= window:
        return None   # unpadded, the ring full, the sink reached (positions count the cache)
    device = position_ids.device
    slot = torch.arange(window, device=device)
    held = cached - (cached - slot) % window                                     # [W]
    seen = (held >= 0)[None]                                                      # [1, W]
    if attention_mask is not None and attention_mask.dim() == 2:
        seen = seen & attention_mask[:, held.clamp(min=0)].bool()                 # [B, W]
    sees_sink = position_ids[:, -1:] >= window
    if not sink:
        sees_sink = torch.zeros_like(sees_sink)
    seen = torch.cat([seen.expand(sees_sink.shape[0], -1), sees_sink], dim=-1)
    if bool(seen[:, :window + sink].all()):   # the window's slots, and the sink's if there is one
        return None
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))[:, None, None]


def ring_attention(module, query, key, value, mask: RingMask, scaling, sink) -> torch.Tensor:
    """One query per row over a ``WindowRing``: q [B, H, 1, D], k/v [B, Hkv, W+1, D] -> [B, 1, H, D].  The sink's
    key/value go into slot W when the ring is new to this module or the sink parameters changed."""
    if sink is not None:
        W = key.shape[2] - 1
        # the ring tensor itself, by weak reference (a new ring may reuse a freed one's memory address)
        ring, versions = module.__dict__.get("_rnnify_ring_stamp", (None, None))
        now = (sink[0].data_ptr(), sink[0]._version, sink[1].data_ptr(), sink[1]._version)
        if ring is None or ring() is not key or versions != now:
            key[:, :, W], value[:, :, W] = sink[0].detach(), sink[1].detach()
            module.__dict__["_rnnify_ring_stamp"] = (weakref.ref(key), now)
    if mask.bias is None and sink is None:   # every window slot seen; slot W (no sink) left out
        key, value = key[:, :, :-1], value[:, :, :-1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.bias, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def windowed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """transformers' attention-interface signature; ``module.config`` carries the window and the base kind."""
    config = module.config
    window = config.rnnify_attention_window   # None while the model plays the teacher (full attention)
    capture = getattr(module, "rnnify_sink_capture", None)
    if capture is not None:   # sink calibration: keys/values of the tokens at position 0
        first = kwargs["position_ids"].expand(key.shape[0], -1) == 0                    # [B, T]
        capture.append((key.transpose(1, 2)[first].detach(), value.transpose(1, 2)[first].detach()))
    sink = (module.rnnify_sink_key, module.rnnify_sink_value) if window and hasattr(module, "rnnify_sink_key") \
        else None
    if isinstance(attention_mask, RingMask):
        return ring_attention(module, query, key, value, attention_mask, scaling, sink), None
    eager = sys.modules[type(module).__module__].eager_attention_forward
    base = ALL_ATTENTION_FUNCTIONS.get_interface(config.rnnify_base_attention, eager)
    if window:
        kwargs["sliding_window"] = window
    if isinstance(attention_mask, BlockedWindow) and sink is None and config.rnnify_base_attention not in BLOCKED_BASES:
        # flash kernels take the window themselves (causal, from an empty cache: no mask needed)
        return base(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(attention_mask, BlockedWindow):
        if key.shape[-2] != query.shape[-2]:
            raise RuntimeError(f"blocked window attention needs as many keys as queries (got {key.shape[-2]} keys "
                               f"for {query.shape[-2]} queries): it applies only to a prefill from an empty cache")
        return blocked_window_attention(query, key, value, attention_mask.window, scaling, dropout, sink), None
    if sink is not None:
        return sink_attention(module, query, key, value, attention_mask, kwargs.get("position_ids"), window,
                              scaling, dropout), None
    return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(WINDOWED_IMPLEMENTATION, windowed_attention_forward)
