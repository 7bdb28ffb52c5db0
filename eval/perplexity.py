"""Perplexity over independent windows of token ids (each window scored from an empty context)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], batch_size: int = 4, *, split_across_processes: bool = False) -> float:
    """exp(mean next-token NLL) of ``model`` over ``windows`` (1-D LongTensors of >= 2 tokens each).

    Windows are batched with right padding and an attention mask (recurrent state never sees padding
    before real tokens); no state or context is carried from one window to the next.  Works for any
    causal LM returning ``.logits``.  ``split_across_processes``: under ``torch.distributed``, process r
    scores windows r, r + W, r + 2W, ... and the NLL and token sums are all-reduced, so every process
    gets the same figure in 1/W of the time (every process must call it).
    """
    if not windows or any(w.numel() < 2 for w in windows):
        raise ValueError("perplexity needs windows of at least 2 tokens each")
    distributed = split_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        windows = windows[torch.distributed.get_rank()::torch.distributed.get_world_size()]
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
    if distributed:
        sums = torch.tensor([total_nll, float(total_tokens)], dtype=torch.float64,
                            device=device if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(sums)
        total_nll, total_tokens = sums[0].item(), sums[1].item()
    return math.exp(total_nll / total_tokens)
