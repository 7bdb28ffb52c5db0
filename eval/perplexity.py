"""Perplexity over a token stream in non-overlapping windows."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of ``model`` over ``ids`` [N] cut into windows of ``seq_len`` tokens.

    Each window is scored independently (no state carried across windows); the tail shorter than
    two tokens is dropped.  Works for any causal LM returning ``.logits``.
    """
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    windows = [ids[i:i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        width = max(w.numel() for w in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, w in enumerate(group):          # right padding: recurrent state never sees it before real tokens
            batch[j, :w.numel()] = w
            mask[j, :w.numel()] = 1
        batch, mask = batch.to(device), mask.to(device)
        logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="none")
        keep = mask[:, 1:].reshape(-1).bool()
        total_nll += nll[keep].sum().item()
        total_tokens += int(keep.sum())
    return math.exp(total_nll / total_tokens)
