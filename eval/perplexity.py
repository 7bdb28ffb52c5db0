"""Perplexity over independent windows of token ids (each window scored from an empty context)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of ``model`` over ``windows`` (1-D LongTensors of >= 2 tokens each).

    Windows are batched with right padding and an attention mask (recurrent state never sees padding
    before real tokens); no state or context is carried from one window to the next.  Works for any
    causal LM returning ``.logits``.
    """
    if not windows or any(w.numel() < 2 for w in windows):
        raise ValueError("perplexity needs windows of at least 2 tokens each")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        width = max(w.numel() for w in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, w in enumerate(group):
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
