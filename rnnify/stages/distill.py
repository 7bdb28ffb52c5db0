"""Stage ``distill``: end-to-end KL (+ optional CE) against the frozen teacher, with LoRA, the mixers only, or
every weight."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..recipe.base import Strict
from .registry import Stage, TrainingStage, register_stage


class LoraOptions(Strict):
    r: Annotated[int, Field(gt=0)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class DistillStage(TrainingStage):
    """Stage 2: end-to-end KL (+ optional CE) against the frozen teacher; LoRA + mixers, mixers only, or full."""
    name: Literal["distill"]
    temperature: Annotated[float, Field(gt=0)] = 1.0
    kl_weight: Annotated[float, Field(ge=0)] = 1.0
    ce_weight: Annotated[float, Field(ge=0)] = 0.0
    trainable: Literal["lora", "mixers", "full"] = Field(
        "lora", description="lora: adapters + mixers (merged at the end); mixers: mixers only; full: every weight "
                            "(keeps a frozen copy of the teacher in memory)")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _some_loss(self):
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight are both 0: nothing to train on")
        return self


def run(student, section: DistillStage, rows, held, out_dir, opts):
    from distill.distillation import train_distill
    return train_distill(student, rows, out_dir=out_dir, opts=opts, temperature=section.temperature,
                         kl_weight=section.kl_weight, ce_weight=section.ce_weight, trainable=section.trainable,
                         lora=section.lora.model_dump(), gradient_checkpointing=section.gradient_checkpointing)


def check(student, section: DistillStage) -> None:
    """LoRA targets that match no Linear layer of the student fail here, before any stage trains."""
    if section.trainable == "lora":
        from distill.distillation import check_lora_targets
        try:
            check_lora_targets(student, section.lora.target_modules)
        except ValueError as e:
            raise ValueError(f"lora.target_modules: {e}") from None


register_stage(Stage("distill", DistillStage, run, check))
