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
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("rnnify")


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

    def forward(self, input_ids, position_ids):
        """input_ids, position_ids [B, T] (packed rows) -> (mean loss, per-layer MSE [L], per-layer relative MSE [L])."""
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
        _, mse, rel = loss_fn(batch["input_ids"].to(device), batch["position_ids"].to(device))
        total = mse if total is None else total + mse
        total_rel = rel if total_rel is None else total_rel + rel
        n += 1
    layers = list(mixer_modules(student))
    return {layer: {"mse": (total[j] / n).item(), "relative_mse": (total_rel[j] / n).item()}
            for j, layer in enumerate(layers)}


def train_attention_transfer(student, rows, *, out_dir: Path, lr: float, batch_size: int, seed: int,
                             gradient_accumulation_steps: int = 1, lr_schedule: str = "cosine",
                             warmup_steps: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                             mixed_precision: str = "no", cpu: bool = True, eval_rows=None,
                             log_every: int = 10) -> dict:
    """Train every mixer on its layer's attention output over ``rows`` (packed rows, one pass).

    Writes ``log.jsonl`` (one line per optimizer step), ``layer_errors.json`` and ``loss.png`` into
    ``out_dir``; returns a summary (steps, tokens, wall time, final loss, per-layer errors before/after).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import collate_packed

    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              gradient_accumulation_steps=gradient_accumulation_steps)
    trainable = mixer_parameters(student)
    keep = {id(p) for _, p in trainable}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    errors_before = layer_errors(student, eval_rows, batch_size) if eval_rows is not None else None

    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_packed)
    steps = math.ceil(len(loader) / gradient_accumulation_steps)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=weight_decay)
    scheduler = get_scheduler(lr_schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    module = AttentionTransferLoss(student)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    module.train()

    seq_len = len(rows[0]["input_ids"])
    history, step, tokens, started = [], 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc="attention_transfer", unit="step", disable=not accelerator.is_local_main_process)
    with open(out_dir / "log.jsonl", "w") as log_file:
        for batch in loader:
            with accelerator.accumulate(module):
                loss, per_layer, _ = module(batch["input_ids"], batch["position_ids"])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"attention_transfer: non-finite loss at step {step}; lower lr ({lr})")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for _, p in trainable], max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += batch["input_ids"].numel() * accelerator.num_processes
            if accelerator.sync_gradients:
                step += 1
                loss_value = accelerator.gather(loss.detach()[None]).mean().item()
                record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                          "elapsed_s": round(time.perf_counter() - started, 3),
                          "layers": {str(i): v for i, v in zip(student.config.mixer_layers, per_layer.tolist())}}
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if step % log_every == 0:
                    log.info("attention_transfer step %d/%d loss %.4g", step, steps, loss_value)
    bar.close()
    wall = time.perf_counter() - started
    student = accelerator.unwrap_model(module).student
    for p in student.parameters():
        p.requires_grad_(False)
    errors_after = layer_errors(student, eval_rows, batch_size) if eval_rows is not None else None
    per_layer = {str(i): {"before": errors_before[i] if errors_before else None,
                          "after": errors_after[i] if errors_after else None} for i in student.config.mixer_layers}
    (out_dir / "layer_errors.json").write_text(json.dumps(per_layer, indent=2))
    _plot_loss(history, out_dir / "loss.png", "attention transfer: mean per-layer MSE")
    return {"name": "attention_transfer", "steps": step, "tokens": tokens, "seq_len": seq_len,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "final_loss": history[-1]["loss"] if history else None, "layer_errors": per_layer}


def _plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["tokens"] for r in history], [r["loss"] for r in history])
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
