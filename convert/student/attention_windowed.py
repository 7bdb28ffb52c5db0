"""Kept softmax layers over their last W tokens (``config.attention_window``), computed in blocks at prefill.

A dense sliding mask makes a T-token prefill cost O(T²) however small W is.  Cut the queries into blocks
of W: block b's queries can only see keys of blocks b-1 and b, so each block attends to 2W keys under
one fixed [W, 2W] mask, and the whole prefill costs O(T·W).  The kept attention modules dispatch through
``WINDOWED_IMPLEMENTATION`` (registered with transformers' ``AttentionInterface``): it takes the blocked
path when the student hands it a ``BlockedWindow`` instead of a mask, and otherwise calls the model's own
implementation (sdpa, eager, flash) with ``sliding_window`` set, which flash kernels need.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

WINDOWED_IMPLEMENTATION = "rnnify_windowed"


class BlockedWindow:
    """Stands in for the dense sliding-window mask: the prompt starts at position 0, has no padding and no
    document boundaries, so the window is the only restriction."""

    def __init__(self, window: int):
        self.window = window


def blocked_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                             scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] -> o [B, T, H, Dv];
    o_i = softmax_{i-W < j <= i}(scaling · q_i·k_j) v_j (Hkv divides H: grouped-query heads)."""
    B, H, T, _ = query.shape
    W = window
    blocks = -(-T // W)
    pad = blocks * W - T

    def key_blocks(x):   # [B, Hkv, T, D] -> [B·blocks, Hkv, 2W, D]: block b-1 then block b (zeros before b = 0)
        x = F.pad(x, (0, 0, W, pad)).unflatten(2, (blocks + 1, W))
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3).transpose(1, 2).flatten(0, 1)

    q = F.pad(query, (0, 0, 0, pad)).unflatten(2, (blocks, W)).transpose(1, 2).flatten(0, 1)   # [B·blocks, H, W, D]
    a = torch.arange(W, device=query.device)[:, None]   # query offset in its block
    c = torch.arange(2 * W, device=query.device)[None]  # key offset in the 2W keys (W = this block's first)
    allowed = ((c > a) & (c <= a + W)).expand(blocks, W, 2 * W).clone()
    allowed[0, :, :W] = False   # block 0 has no previous block
    mask = allowed[None, :, None].expand(B, -1, -1, -1, -1).flatten(0, 1)   # [B·blocks, 1, W, 2W]
    out = F.scaled_dot_product_attention(q, key_blocks(key), key_blocks(value), attn_mask=mask, scale=scaling,
                                         dropout_p=dropout, enable_gqa=H != key.shape[1])
    return out.unflatten(0, (B, blocks)).transpose(2, 3).flatten(1, 2)[:, :T]   # [B, T, H, Dv]


def windowed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """transformers' attention-interface signature; ``module.config`` carries the window and the base kind."""
    config = module.config
    if isinstance(attention_mask, BlockedWindow):
        if key.shape[-2] != query.shape[-2]:
            raise RuntimeError(f"blocked window attention needs as many keys as queries (got {key.shape[-2]} keys "
                               f"for {query.shape[-2]} queries): it applies only to a prefill from an empty cache")
        return blocked_window_attention(query, key, value, attention_mask.window, scaling, dropout), None
    eager = sys.modules[type(module).__module__].eager_attention_forward
    base = ALL_ATTENTION_FUNCTIONS.get_interface(config.rnnify_base_attention, eager)
    if config.rnnify_attention_window:   # None while the model plays the teacher (full attention)
        kwargs["sliding_window"] = config.rnnify_attention_window
    return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(WINDOWED_IMPLEMENTATION, windowed_attention_forward)
