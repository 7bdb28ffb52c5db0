"""Perplexity over independent windows of token ids (each window scored from an empty context)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGITS_CHUNK_BYTES = 64 << 20   # fp32 logits held at once when the LM head is applied a chunk of positions at a time
# config fields that post-process logits after the LM head (Gemma 2's soft cap, Cohere's and Granite's scales):
# such models are scored from their full logits, which apply them
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def hidden_states_and_head(model):
    """``model`` -> (f(input_ids, attention_mask) -> [B, T, hidden] states the LM head reads, head weight [V, hidden]),
    or None when its logits are not a bias-free linear map of those states (then they are computed whole).

    An rnnify student gives ``final_hidden_states``; a transformers causal LM its decoder (``get_decoder()``, whose
    ``last_hidden_state`` is already normalised) and its output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if hasattr(model, "final_hidden_states"):
        return (lambda ids, mask: model.final_hidden_states(input_ids=ids, attention_mask=mask, use_cache=False)[0],
                head.weight)
    config = getattr(model, "config", None)
    if not hasattr(model, "get_decoder") or any(getattr(config, name, None) not in (None, 1, 1.0)
                                                  for name in LOGIT_POSTPROCESSING):
        return None
    decoder = model.get_decoder()
    if decoder is model or decoder is None:
        return None
    return (lambda ids, mask: decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state,
            head.weight)


def token_nll(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(h W^T)[target] per position, the fp32 logits made ``LOGITS_CHUNK_BYTES`` at a time.
    hidden [N, hidden], head [V, hidden], targets [N] (−100: not counted, NLL 0) -> [N] float64."""
    step = max(1, LOGITS_CHUNK_BYTES // (4 * head.shape[0]))
    out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], step):
        logits = F.linear(hidden[start:start + step], head).float()
        out[start:start + step] = F.cross_entropy(logits, targets[start:start + step], ignore_index=-100,
                                                  reduction="none").double()
    return out


def window_nll(model, windows: list[torch.Tensor], batch_size: int):
    """Yields, per batch of ``windows``, (NLL [B, T] float64, counted [B, T] bool): position t's NLL of token t + 1
    given tokens 0..t of its window (padding and each window's last position: not counted, NLL 0)."""
    device = next(model.parameters()).device
    chunked = hidden_states_and_head(model)
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
        targets = F.pad(batch[:, 1:].masked_fill(mask[:, 1:] == 0, -100), (0, 1), value=-100)
        if chunked is not None:
            states, head = chunked
            nll = token_nll(states(batch, mask).flatten(0, 1), head, targets.flatten())
        else:
            logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                  reduction="none").double()
            del logits
        yield nll.view_as(targets), targets != -100


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], batch_size: int = 4, *, split_across_processes: bool = False) -> float:
    """exp(mean next-token NLL) of ``model`` over ``windows`` (1-D LongTensors of >= 2 tokens each).

    Windows are batched with right padding and an attention mask (recurrent state never sees padding
    before real tokens); no state or context is carried from one window to the next.  Works for any
    causal LM returning ``.logits``; where the logits are a linear map of hidden states
    (``hidden_states_and_head``) the head is applied a chunk of positions at a time, so a batch never holds its
    whole [B, T, V] logits.  ``split_across_processes``: under ``torch.distributed``, process r
    scores windows r, r + W, r + 2W, ... and the NLL and token sums are all-reduced, so every process
    gets the same figure in 1/W of the time (every process must call it).
    """
    if not windows or any(w.numel() < 2 for w in windows):
        raise ValueError("perplexity needs windows of at least 2 tokens each")
    distributed = split_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        windows = windows[torch.distributed.get_rank()::torch.distributed.get_world_size()]
    total_nll, total_tokens = 0.0, 0
    for nll, counted in window_nll(model, windows, batch_size):
        total_nll += nll.sum().item()
        total_tokens += int(counted.sum())
    if distributed:
        device = next(model.parameters()).device
        sums = torch.tensor([total_nll, float(total_tokens)], dtype=torch.float64,
                            device=device if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(sums)
        total_nll, total_tokens = sums[0].item(), sums[1].item()
    return math.exp(total_nll / total_tokens)


def position_bins(length: int) -> list[tuple[int, int]]:
    """Log-spaced bins of positions [lo, hi) covering 0..length - 1: [0, 1), [1, 2), [2, 4), [4, 8), ..."""
    bins, lo = [(0, 1)], 1
    while lo < length:
        bins.append((lo, min(2 * lo, length)))
        lo *= 2
    return [b for b in bins if b[0] < length]


@torch.no_grad()
def loss_by_position(model, windows: list[torch.Tensor], batch_size: int = 1) -> dict:
    """Mean next-token NLL by position in the window, in log-spaced bins (``position_bins``): whether a model keeps
    using context as it grows.  A position p predicts token p + 1 from p + 1 tokens of context.
    -> {"bins": [[lo, hi], ...], "loss": [mean NLL per bin], "tokens": [count per bin]}."""
    if not windows or any(w.numel() < 2 for w in windows):
        raise ValueError("loss_by_position needs windows of at least 2 tokens each")
    length = max(w.numel() for w in windows) - 1
    sums = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.float64)
    for nll, counted in window_nll(model, windows, batch_size):
        sums[:nll.shape[1] - 1] += nll[:, :-1].sum(0).cpu()
        counts[:nll.shape[1] - 1] += counted[:, :-1].sum(0).double().cpu()
    bins = position_bins(length)
    loss = [(sums[lo:hi].sum() / counts[lo:hi].sum()).item() for lo, hi in bins]
    return {"bins": [list(b) for b in bins], "loss": loss, "tokens": [int(counts[lo:hi].sum()) for lo, hi in bins]}
