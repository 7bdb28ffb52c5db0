"""Stage ``attention_transfer``: each mixer learns its layer's attention output from the frozen teacher (LoLCATs'
attention transfer; with ``block_weight``, MOHAWK's block-output alignment too)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .registry import Stage, TrainingStage, register_stage


class AttentionTransferStage(TrainingStage):
    """Stage 1: train each mixer to reproduce its layer's attention output (and optionally its block's output)."""
    name: Literal["attention_transfer"]
    lr: Annotated[float, Field(gt=0)] = 1e-2
    eval_rows: Annotated[int, Field(ge=0, description="held-out rows for the per-layer errors before/after")] = 8
    trainable: Literal["mixers", "attention"] = Field(
        "mixers", description="mixers: the parameters conversion added (LoLCATs); attention: also the q/k/v/o "
                              "projections each mixer was initialised from (Mamba-in-the-Llama, MOHAWK)")
    projection_lr: Annotated[float, Field(gt=0)] | None = Field(
        None, description="learning rate of the projections with trainable: attention (default: lr)")
    block_weight: Annotated[float, Field(ge=0)] = Field(
        0.0, description="weight of the block-output alignment loss (MOHAWK's hidden-state alignment); 0: off")
    train_window: Annotated[int, Field(gt=0)] | None = Field(
        None, description="windowed mixers train with this shorter softmax window (older keys go to the recurrent "
                          "state), so that the feature maps learn to carry context; null: the mixer's own window")
    attention_weight: Annotated[float, Field(ge=0)] = Field(
        0.0, description="weight of the attention-weight loss: KL from each teacher softmax row to the mixer's "
                         "normalised weights (Hedgehog / LoLCATs; hedgehog without a window, mamba2 with "
                         "feature_map: hedgehog and normalise); 0: off")
    frozen: list[str] = Field(
        [], description="mixer parameters held at their values during this stage, by their name inside a mixer "
                        "(a module's name holds all of its parameters: A_log, dt_proj, conv, gate, D_skip, norm): "
                        "HedgeMamba aligns the linear attention first and releases decay, conv and gates in a later "
                        "stage")
    gradient_checkpointing: bool = Field(
        False, description="each layer's loss runs again in the backward pass, one layer at a time: the stage holds "
                           "one layer's activations instead of every layer's (same gradients, ~1/3 more compute)")

    @model_validator(mode="after")
    def _projection_lr_needs_projections(self):
        if self.projection_lr is not None and self.trainable != "attention":
            raise ValueError("projection_lr needs trainable: attention (only then are the projections trained)")
        return self


def run(student, section: AttentionTransferStage, rows, held, out_dir, opts):
    from distill.attention_transfer import train_attention_transfer
    summary = train_attention_transfer(student, rows, out_dir=out_dir, opts=opts, eval_rows=held,
                                       trainable=section.trainable, projection_lr=section.projection_lr,
                                       block_weight=section.block_weight, train_window=section.train_window,
                                       gradient_checkpointing=section.gradient_checkpointing, frozen=section.frozen,
                                       attention_weight=section.attention_weight)
    return student, summary


def check(student, section: AttentionTransferStage) -> None:
    """A ``frozen`` name that matches no mixer parameter, or an ``attention_weight`` for mixers without normalised
    weights, fails here, before any stage trains."""
    from distill.attention_transfer import check_attention_weights, held_fixed
    try:
        held_fixed(student, section.frozen)
    except ValueError as e:
        raise ValueError(f"frozen: {e}") from None
    if section.attention_weight:
        try:
            check_attention_weights(student)
        except ValueError as e:
            raise ValueError(f"attention_weight: {e}") from None


register_stage(Stage("attention_transfer", AttentionTransferStage, run, check))
