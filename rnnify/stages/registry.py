"""``Stage`` (a recipe section and its runner), the registry ``STAGES``, and what every training stage shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..recipe.base import Strict, TextSource


@dataclass(frozen=True)
class Stage:
    """A training stage.  ``section``: its recipe model (``name: Literal["<name>"]`` and its options);
    ``run(student, section, rows, held, out_dir, opts) -> (student, summary)`` trains it (``held``: held-out rows,
    None when the stage is restored from its final checkpoint; ``summary``: what ``distill.training.train`` returns,
    or any figures of the stage's own: the report shows what is there); ``check(student, section)``, when given, runs on the
    converted student before any stage trains and raises ``ValueError("<field>: <why>")`` on what would fail."""
    name: str
    section: type[BaseModel]
    run: Callable
    check: Callable | None = None


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    tag = stage.section.model_fields.get("name")
    if tag is None or getattr(tag.annotation, "__args__", ()) != (stage.name,):
        raise ValueError(f"stage {stage.name!r}: its section needs the field name: Literal[{stage.name!r}]")
    STAGES[stage.name] = stage
    return stage


class TrainingStage(Strict):
    """What every training stage has: its data, token budget, optimizer and precision."""
    data: TextSource = Field(TextSource(source="builtin:prose"), description="training text (default split: train)")
    tokens: Annotated[int, Field(gt=0, description="token budget: ceil(tokens / seq_len) packed rows")] = 65536
    seq_len: Annotated[int, Field(ge=16)] = 512
    batch_size: Annotated[int, Field(gt=0, description="rows per step and process")] = 4
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0)] = 1e-3
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: Annotated[int, Field(gt=0)] = 10
    checkpoint_every: Annotated[int, Field(ge=0, description="optimizer steps between checkpoints; 0: none")] = 25
    keep_checkpoints: Annotated[int, Field(gt=0)] = 2
    window_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="windowed mixers: probability that a (row, head) trains without its softmax window (linear "
                         "attention over every key), annealed linearly to 0 over the stage; 0: off")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value   # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _budget_fills_a_step(self):
        rows = -(-self.tokens // self.seq_len)
        if rows < self.batch_size * self.gradient_accumulation_steps:
            raise ValueError(f"tokens ({self.tokens}) give {rows} rows of {self.seq_len}, fewer than one optimizer "
                             f"step (batch_size {self.batch_size} x gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps})")
        return self


def train_options(section: TrainingStage, seed: int, trackers: tuple[str, ...], device: str, fingerprint: str):
    """The trainer's options for one stage (``distill.training.TrainOptions``)."""
    from distill.training import TrainOptions
    return TrainOptions(lr=section.lr, batch_size=section.batch_size, seed=seed,
                        checkpoint_every=section.checkpoint_every, keep_checkpoints=section.keep_checkpoints,
                        fingerprint=fingerprint, gradient_accumulation_steps=section.gradient_accumulation_steps,
                        lr_schedule=section.lr_schedule, warmup_steps=section.warmup_steps,
                        weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm,
                        mixed_precision=section.mixed_precision, cpu=device == "cpu", log_every=section.log_every,
                        window_dropout=section.window_dropout,
                        trackers=tuple(trackers))


def stage_dir(out: Path, i: int, section) -> Path:
    """``<out>/stages/<i>-<name>``: where stage ``i`` keeps its log, checkpoints and done.json."""
    return out / "stages" / f"{i}-{section.name}"
