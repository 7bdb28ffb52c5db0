"""Stage 1, attention transfer (LoLCATs' attention transfer, MOHAWK's hidden-state alignment).

The teacher is the student itself run with its original attention (``teacher_attention()``): one
no-grad forward gives, for every converted layer i, the attention input x_i and output y_i.  Each
mixer is then trained to reproduce its layer's output from the same input,

    loss = mean_i  mean((mixer_i(x_i) − y_i)²)

all layers at once from teacher activations (no error compounds through student layers).

``trainable``: ``mixers`` trains only the parameters a mixer adds (LoLCATs); ``attention`` also trains the
q/k/v/o projections each mixer was initialised from (Mamba-in-the-Llama, MOHAWK), at ``projection_lr``; the
teacher's own attention is then kept as a frozen copy in each mixer (``Mixer.keep_teacher_attention``), so
targets, later stages' teacher and restored layers stay the teacher's.  ``block_weight`` > 0 adds MOHAWK's
hidden-state alignment: the whole decoder block with the mixer, from the teacher's block input, against the
teacher's block output,

    loss_block_i = mean((block_i(h_i) − z_i)²) / mean((z_i − h_i)²)     (relative to the block's own update)

``attention_weight`` > 0 adds Hedgehog's / LoLCATs' attention-weight distillation for mixers whose output is a
normalised average of their values: w × the KL from each teacher softmax row to the mixer's normalised weights
(``attention_weight_kl``).  ``train_window`` trains windowed mixers with a window shorter than the one they run
with (keys in between enter the recurrent state), so that the recurrence learns to carry context rather than lean
on the window.  ``frozen`` holds named mixer parameters for the stage.  MLPs, norms and embeddings stay frozen.
Runs on ``accelerate`` (one process, or ``accelerate launch``).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .training import TrainOptions, train, window_dropout_schedule


def mixer_modules(student) -> dict[int, nn.Module]:
    """Converted layers' mixers by layer index."""
    return {i: student.model.layers[i].self_attn for i in student.config.mixer_layers}


def mixer_parameters(student) -> list[tuple[str, nn.Parameter]]:
    """The parameters the mixers add (feature maps, gates, norms), not the teacher's attention inside them."""
    return [(f"layers.{i}.{n}", p) for i, m in mixer_modules(student).items()
            for n, p in m.named_parameters() if not n.startswith("attn.")]


def projection_parameters(student) -> list[tuple[str, nn.Parameter]]:
    """The teacher's attention projections inside the mixers (what ``trainable: attention`` adds)."""
    return [(f"layers.{i}.{n}", p) for i, m in mixer_modules(student).items()
            for n, p in m.named_parameters() if n.startswith("attn.")]


def held_fixed(student, frozen: list[str]) -> set[int]:
    """ids of the mixer parameters ``frozen`` names (a parameter's name inside its mixer, or a module's name for all
    of its parameters: ``conv`` holds ``conv.weight``); ValueError naming the names that match nothing."""
    if not frozen:
        return set()
    named = [(n.split(".", 2)[2], p) for n, p in mixer_parameters(student)]   # "layers.3.conv.weight" -> "conv.weight"

    def matches(name, pattern):
        return name == pattern or name.startswith(pattern + ".")

    unknown = [f for f in frozen if not any(matches(n, f) for n, _ in named)]
    if unknown:
        roots = sorted({n.split(".")[0] for n, _ in named})
        raise ValueError(f"{unknown} name no parameter of this student's mixers; they have {roots}")
    return {id(p) for n, p in named if any(matches(n, f) for f in frozen)}


ATTENTION_WEIGHT_BLOCK = 256   # query rows per block of the attention-weight loss: [B, H, 256, T] at a time


def _weights_block_kl(q, k, c, b, u, same_doc, t0, scale):
    """Σ over the rows t0.. of KL(teacher's softmax row ‖ the mixer's normalised row): q, c [B,n,H,·] the block's
    rows, k, b [B,S,H,·] and u [B,S,H] (or None) the keys up to its last row, same_doc [B or 1,n,S] -> scalar."""
    n, S = q.shape[1], k.shape[1]
    rows = torch.arange(t0, t0 + n, device=q.device)[:, None]
    visible = (torch.arange(S, device=q.device)[None, :] <= rows)[None] & same_doc           # [B,n,S]
    visible = visible[:, None]                                                                # [B,1,n,S]
    hidden = -1e30   # a finite "-inf": a hidden key gets weight 0 on both sides and a finite log, so no 0 · nan
    teacher = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale
    log_a = teacher.masked_fill(~visible, hidden).log_softmax(-1)
    student = torch.einsum("bthf,bshf->bhts", c, b).clamp_min(1e-30).log()
    if u is not None:
        student = student + u.transpose(1, 2)[:, :, None, :]
    log_w = student.masked_fill(~visible, hidden).log_softmax(-1)
    return (log_a.exp() * (log_a - log_w)).masked_fill(~visible, 0.0).sum()


def attention_weight_kl(mixer, x, position_embeddings, packed=None, block: int = ATTENTION_WEIGHT_BLOCK):
    """Mean over (row, head, query) of KL(softmax row of the teacher's attention ‖ the mixer's normalised weights)
    (Hedgehog's / LoLCATs' attention-weight distillation), x [B,T,hidden] -> scalar.  Computed ``block`` query rows
    at a time against the keys they see, each block recomputed in the backward pass, so a 2,048-token row holds
    [B, H, block, T] scores, not [B, H, T, T]."""
    c, b, u = mixer.weight_factors(x, position_embeddings, packed)
    q, k, scale = mixer.teacher_query_key(x, position_embeddings)
    B, T = x.shape[:2]
    seq = packed.seq_idx if packed is not None else torch.zeros(1, T, dtype=torch.long, device=x.device)
    total = x.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        same_doc = seq[:, t0:t1, None] == seq[:, None, :t1]
        args = (q[:, t0:t1], k[:, :t1], c[:, t0:t1], b[:, :t1], None if u is None else u[:, :t1], same_doc, t0, scale)
        if torch.is_grad_enabled():
            total = total + checkpoint(_weights_block_kl, *args, use_reentrant=False)
        else:
            total = total + _weights_block_kl(*args)
    return total / (B * T * c.shape[2])


def check_attention_weights(student) -> None:
    """ValueError naming the mixers that have no normalised attention weights (``attention_weight`` needs them)."""
    lacking = sorted({type(m).name + (" with a window" if getattr(m, "window", None) else "")
                      for m in mixer_modules(student).values() if not m.normalised_weights})
    if lacking:
        raise ValueError(f"the attention-weight loss needs mixers whose output is a normalised average of their "
                         f"values (hedgehog without a window; mamba2 with feature_map: hedgehog and normalise: true); "
                         f"this student has {', '.join(lacking)}")


class AttentionTransferLoss(nn.Module):
    """Wraps the student so that one module's forward computes the loss (what DDP needs to sync gradients)."""

    def __init__(self, student, block_weight: float = 0.0, gradient_checkpointing: bool = False,
                 attention_weight: float = 0.0):
        super().__init__()
        self.student = student
        self.block_weight = block_weight
        self.attention_weight = attention_weight
        self.gradient_checkpointing = gradient_checkpointing

    def _run(self, loss_of, *inputs):
        """``loss_of(*inputs)``, its graph kept (default) or recomputed in the backward pass (checkpointing; the
        random state is restored there, so window dropout draws the same masks)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(loss_of, *inputs, use_reentrant=False)
        return loss_of(*inputs)

    def forward(self, input_ids, position_ids, labels=None):
        """input_ids, position_ids [B, T] (packed rows) -> (mean loss, {"layers": {layer: MSE}})."""
        loss, per_layer, _, block, weights_kl = self.per_layer(input_ids, position_ids)
        extras = {"layers": {str(i): v for i, v in zip(self.student.config.mixer_layers, per_layer.tolist())}}
        if block is not None:
            extras["block"] = block.detach()
        if weights_kl is not None:
            extras["attention_weight_kl"] = weights_kl.detach()
        return loss, extras

    def per_layer(self, input_ids, position_ids):
        """-> (loss, per-layer MSE [L], per-layer relative MSE [L] = MSE / mean(y²), mean block loss or None, mean
        attention-weight KL or None)."""
        student = self.student
        mixers = mixer_modules(student)
        capture: dict = {}
        blocks: dict = {}
        hooks = []
        if self.block_weight:   # the teacher's block input h_i and output z_i of every converted layer
            for i in mixers:
                hooks.append(student.model.layers[i].register_forward_hook(
                    lambda _m, args, kwargs, out, i=i: blocks.__setitem__(
                        i, (args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)),
                    with_kwargs=True))
        try:
            with torch.no_grad(), student.teacher_attention(capture):
                student.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        hidden = capture[min(capture)][0]
        position_embeddings = student.model.rotary_emb(hidden, position_ids=position_ids)
        packed = student.packed_sequences(position_ids)
        losses, relative, block_losses = [], [], []

        def mixer_mse(x, y, mixer):
            y_hat = mixer(x, position_embeddings=position_embeddings, attention_mask=packed)[0]
            return (y_hat.float() - y.float()).pow(2).mean()

        def block_loss(h, z, block):
            z_hat = block(h, attention_mask=packed, position_ids=position_ids, position_embeddings=position_embeddings,
                          use_cache=False)
            z_hat = z_hat[0] if isinstance(z_hat, tuple) else z_hat
            update = (z.float() - h.float()).pow(2).mean().clamp_min(1e-12)
            return (z_hat.float() - z.float()).pow(2).mean() / update

        def weights_kl_of(x, mixer):
            return attention_weight_kl(mixer, x, position_embeddings, packed)

        weight_kls = []
        for i, mixer in mixers.items():
            x, y = capture[i]
            mse = self._run(mixer_mse, x, y, mixer)
            losses.append(mse)
            if self.attention_weight:
                weight_kls.append(self._run(weights_kl_of, x, mixer))
            relative.append(mse.detach() / y.float().pow(2).mean().clamp_min(1e-12))
            if self.block_weight:
                block_losses.append(self._run(block_loss, *blocks[i], student.model.layers[i]))
        losses = torch.stack(losses)
        loss = losses.mean()
        block = weights_kl = None
        if block_losses:
            block = torch.stack(block_losses).mean()
            loss = loss + self.block_weight * block
        if weight_kls:
            weights_kl = torch.stack(weight_kls).mean()
            loss = loss + self.attention_weight * weights_kl
        return loss, losses.detach(), torch.stack(relative), block, weights_kl


@torch.no_grad()
def layer_errors(student, rows, batch_size: int) -> dict[int, dict[str, float]]:
    """Per converted layer: MSE and relative MSE (MSE / mean y²) of the mixer vs the attention, averaged over rows."""
    from .data import collate_packed

    device = next(student.parameters()).device
    loss_fn = AttentionTransferLoss(student)
    total, total_rel, n = None, None, 0
    for lo in range(0, len(rows), batch_size):
        batch = collate_packed([rows[j] for j in range(lo, min(lo + batch_size, len(rows)))])
        _, mse, rel, _, _ = loss_fn.per_layer(batch["input_ids"].to(device), batch["position_ids"].to(device))
        total = mse if total is None else total + mse
        total_rel = rel if total_rel is None else total_rel + rel
        n += 1
    layers = list(mixer_modules(student))
    return {layer: {"mse": (total[j] / n).item(), "relative_mse": (total_rel[j] / n).item()}
            for j, layer in enumerate(layers)}


def train_attention_transfer(student, rows, *, out_dir: Path, opts: TrainOptions, eval_rows=None,
                             trainable: str = "mixers", projection_lr: float | None = None,
                             block_weight: float = 0.0, train_window: int | None = None,
                             gradient_checkpointing: bool = False, frozen: list[str] = (),
                             attention_weight: float = 0.0) -> dict:
    """Train every mixer on its layer's attention output over ``rows`` (packed rows, one pass).

    ``trainable``: ``mixers`` (their added parameters) or ``attention`` (also the projections inside them, at
    ``projection_lr``, default ``opts.lr``); ``block_weight``: weight of the block-output alignment loss;
    ``train_window``: windowed mixers train with this shorter softmax window (``student.mixer_window``), so that
    keys beyond it reach the output only through the feature maps and the recurrent state;
    ``gradient_checkpointing``: each layer's loss is recomputed in the backward pass instead of kept (module docstring);
    ``frozen``: mixer parameters held fixed in this stage (``held_fixed``); ``attention_weight``: weight of the
    attention-weight KL (``attention_weight_kl``) added to each layer's output MSE.
    Writes ``log.jsonl``, ``loss.png`` and ``layer_errors.json`` (per layer: MSE and relative MSE on
    ``eval_rows`` before and after) into ``out_dir``; returns the stage summary.
    """
    fixed = held_fixed(student, list(frozen))
    groups = [{"params": [p for _, p in mixer_parameters(student) if id(p) not in fixed]}]
    if trainable == "attention":
        for mixer in mixer_modules(student).values():
            mixer.keep_teacher_attention()   # before any update (and before a checkpoint is restored)
        groups.append({"params": [p for _, p in projection_parameters(student)], "lr": projection_lr or opts.lr})
    keep = {id(p) for group in groups for p in group["params"]}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    errors_before = layer_errors(student, eval_rows, opts.batch_size) if eval_rows is not None else None
    if attention_weight:
        check_attention_weights(student)
    module = AttentionTransferLoss(student, block_weight, gradient_checkpointing, attention_weight)
    with student.mixer_window(train_window) if train_window else nullcontext():
        summary = train(module, groups, rows, opts, out_dir, "attention_transfer",
                        progress=window_dropout_schedule(student, opts.window_dropout))
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
