"""Stage 1, attention transfer (LoLCATs' attention transfer, MOHAWK's hidden-state alignment).

The teacher is the student itself run with its original attention (``teacher_attention()``): one
no-grad forward gives, for every converted layer i, the attention input x_i and output y_i.  Each
mixer is then trained to reproduce its layer's output from the same input,

    loss = mean_i  mean((mixer_i(x_i) − y_i)²)

all layers at once from teacher activations (no error compounds through student layers).  Only the
parameters a mixer adds are trained; the teacher's projections, MLPs and embeddings stay frozen.
Runs on ``accelerate`` (one process, or ``accelerate launch`` for several).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .training import TrainOptions, train


def mixer_modules(student) -> dict[int, nn.Module]:
    """Converted layers' mixers by layer index."""
    return {i: student.model.layers[i].self_attn for i in student.config.mixer_layers}


def mixer_parameters(student) -> list[tuple[str, nn.Parameter]]:
    """The parameters the mixers add (feature maps, gates, norms), not the teacher's attention inside them."""
    return [(f"layers.{i}.{n}", p) for i, m in mixer_modules(student).items()
            for n, p in m.named_parameters() if not n.startswith("attn.")]


class AttentionTransferLoss(nn.Module):
    """Wraps the student so that one module's forward computes the loss (what DDP needs to sync gradients)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, position_ids, labels=None):
        """input_ids, position_ids [B, T] (packed rows) -> (mean loss, {"layers": {layer: MSE}})."""
        loss, per_layer, _ = self.per_layer(input_ids, position_ids)
        return loss, {"layers": {str(i): v for i, v in zip(self.student.config.mixer_layers, per_layer.tolist())}}

    def per_layer(self, input_ids, position_ids):
        """-> (mean loss, per-layer MSE [L], per-layer relative MSE [L] = MSE / mean(y²))."""
        student = self.student
        capture: dict = {}
        with torch.no_grad(), student.teacher_attention(capture):
            student.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = capture[min(capture)][0]
        position_embeddings = student.model.rotary_emb(hidden, position_ids=position_ids)
        packed = student.packed_sequences(position_ids)
        losses, relative = [], []
        for i, mixer in mixer_modules(student).items():
            x, y = capture[i]
            y_hat = mixer(x, position_embeddings=position_embeddings, attention_mask=packed)[0]
            mse = (y_hat.float() - y.float()).pow(2).mean()
            losses.append(mse)
            relative.append(mse.detach() / y.float().pow(2).mean().clamp_min(1e-12))
        losses = torch.stack(losses)
        return losses.mean(), losses.detach(), torch.stack(relative)


@torch.no_grad()
def layer_errors(student, rows, batch_size: int) -> dict[int, dict[str, float]]:
    """Per converted layer: MSE and relative MSE (MSE / mean y²) of the mixer vs the attention, averaged over rows."""
    from .data import collate_packed

    device = next(student.parameters()).device
    loss_fn = AttentionTransferLoss(student)
    total, total_rel, n = None, None, 0
    for lo in range(0, len(rows), batch_size):
        batch = collate_packed([rows[j] for j in range(lo, min(lo + batch_size, len(rows)))])
        _, mse, rel = loss_fn.per_layer(batch["input_ids"].to(device), batch["position_ids"].to(device))
        total = mse if total is None else total + mse
        total_rel = rel if total_rel is None else total_rel + rel
        n += 1
    layers = list(mixer_modules(student))
    return {layer: {"mse": (total[j] / n).item(), "relative_mse": (total_rel[j] / n).item()}
            for j, layer in enumerate(layers)}


def train_attention_transfer(student, rows, *, out_dir: Path, opts: TrainOptions, eval_rows=None) -> dict:
    """Train every mixer on its layer's attention output over ``rows`` (packed rows, one pass).

    Writes ``log.jsonl``, ``loss.png`` and ``layer_errors.json`` (per layer: MSE and relative MSE on
    ``eval_rows`` before and after) into ``out_dir``; returns the stage summary.
    """
    trainable = [p for _, p in mixer_parameters(student)]
    keep = {id(p) for p in trainable}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    errors_before = layer_errors(student, eval_rows, opts.batch_size) if eval_rows is not None else None
    module = AttentionTransferLoss(student)
    summary = train(module, trainable, rows, opts, out_dir, "attention_transfer")
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    errors_after = layer_errors(student, eval_rows, opts.batch_size) if eval_rows is not None else None
    per_layer = {str(i): {"before": errors_before[i] if errors_before else None,
                          "after": errors_after[i] if errors_after else None} for i in student.config.mixer_layers}
    from accelerate import PartialState
    if PartialState().is_main_process and eval_rows is not None:
        (out_dir / "layer_errors.json").write_text(json.dumps(per_layer, indent=2))
    return {**summary, "layer_errors": per_layer}
