"""The whole recipe.  Its ``convert.mixer`` and ``stages[i]`` sections are typed by the registries (mixers in
``convert.student``, stages in ``rnnify.stages``): ``recipe_model()`` builds the model for what is registered now,
so that a mixer or stage registered later is a recipe section at once."""
from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from .base import Strict, TextSource
from .sections import UNSEEN_AUTO, AutoKeep, BudgetCurve, ConvertSection, EvalSection, TeacherExpectation

DEFAULT_MIXER = "hedgehog"


class Recipe(Strict):
    """Every recipe field; ``recipe_model()`` gives the subclass that validates ``convert.mixer`` and ``stages``."""
    output_dir: str
    teacher: str = Field(description="Hub name, local folder, or builtin:<name> prepared offline")
    expect: TeacherExpectation = Field(default_factory=TeacherExpectation)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto (cuda when available, else cpu) | cpu | cuda[:N] | mps | xpu[:N]")
    seed: int = 0
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="accelerate trackers every stage logs to (files under the stage's folder)")
    convert: ConvertSection = Field(default_factory=ConvertSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    stages: list[Any] = Field(default_factory=list)
    budget_curve: BudgetCurve | None = Field(None, description="quality vs softmax layers kept (null: not measured)")

    @model_validator(mode="after")
    def _budget_curve_starts_from_attention_transfer(self):
        curve = self.budget_curve
        if curve is None:
            return self
        if curve.after_stage >= len(self.stages) or self.stages[curve.after_stage].name != "attention_transfer":
            raise ValueError(f"budget_curve.after_stage: stages[{curve.after_stage}] must be an attention_transfer "
                             "stage (the budgets start from its mixers)")
        if self.stages[curve.after_stage].eval_rows == 0:
            raise ValueError(f"budget_curve: layers are ranked on held-out rows: stages[{curve.after_stage}].eval_rows "
                             "must be at least 1")
        if isinstance(self.convert.keep_attention, AutoKeep):
            raise ValueError("budget_curve: convert.keep_attention {auto: K} already picks one budget; convert the "
                             "layers to compare (e.g. convert.layers: all) and list the budgets in budget_curve.keep")
        return self

    @model_validator(mode="after")
    def _train_window_below_the_mixer_window(self):
        window = getattr(self.convert.mixer, "window", None)
        for i, stage in enumerate(self.stages):
            train_window = getattr(stage, "train_window", None)
            if train_window is not None and not (window and train_window < window):
                raise ValueError(f"stages[{i}].train_window: {train_window} must be shorter than convert.mixer.window "
                                 f"({window or 'none: this mixer has no softmax window'})")
        return self

    @model_validator(mode="after")
    def _window_dropout_needs_a_window(self):
        window = getattr(self.convert.mixer, "window", None)
        for i, stage in enumerate(self.stages):
            if stage.window_dropout and not window:
                raise ValueError(f"stages[{i}].window_dropout: {stage.window_dropout} needs a mixer with a softmax "
                                 "window (convert.mixer.window); set it to 0 or give the mixer a window")
        return self

    @model_validator(mode="after")
    def _auto_keep_after_attention_transfer(self):
        if isinstance(self.convert.keep_attention, AutoKeep):
            first = self.stages[0] if self.stages else None
            if first is None or first.name != "attention_transfer":
                raise ValueError("convert.keep_attention: {auto: K} ranks layers by their attention-transfer error: "
                                 "the first stage must be attention_transfer")
            if first.eval_rows == 0:
                raise ValueError("convert.keep_attention: {auto: K} ranks layers on held-out rows: "
                                 "stages[0].eval_rows must be at least 1")
        return self

    @model_validator(mode="after")
    def _unseen_text_is_unseen(self):
        unseen = self.eval.unseen_text
        if unseen is None or unseen.source == UNSEEN_AUTO:
            return self
        for i, stage in enumerate(self.stages):
            if stage.data.source == unseen.source:
                raise ValueError(f"eval.unseen_text: stages[{i}] trains on {unseen.source}; name a text no stage "
                                 "trains on (or auto, or null for none)")
        if unseen.source == self.eval.text.source:
            raise ValueError(f"eval.unseen_text: {unseen.source} is eval.text already; name a second domain")
        return self

    def unseen_text(self) -> TextSource | None:
        """``eval.unseen_text`` with ``auto`` resolved: builtin:python-docs, or builtin:prose when a stage trains on
        python-docs (or eval.text is it); None when both are seen."""
        unseen = self.eval.unseen_text
        if unseen is None or unseen.source != UNSEEN_AUTO:
            return unseen
        seen = {st.data.source for st in self.stages} | {self.eval.text.source}
        return next((TextSource(source=s) for s in ("builtin:python-docs", "builtin:prose") if s not in seen), None)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device):
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", device):
            raise ValueError("must be auto, cpu, cuda[:N], mps or xpu[:N]")
        return device

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, stages):
        check_stage_names(stages)
        return stages


def _tagged_union(models: list, tag: str):
    """One model, or a union of them told apart by the literal field ``tag``."""
    return models[0] if len(models) == 1 else Annotated[Union[tuple(models)], Field(discriminator=tag)]


@functools.lru_cache(maxsize=None)
def _model_for(mixers: tuple, stages: tuple) -> type[Recipe]:
    """``mixers``: ((type, mixer class), ...); ``stages``: ((name, section model), ...)."""
    from .mixers import options_model

    option_models = {name: options_model(cls) for name, cls in mixers}
    mixer = _tagged_union(list(option_models.values()), "type")
    default_mixer = option_models[DEFAULT_MIXER]
    convert = create_model("ConvertSection", __base__=ConvertSection,
                           mixer=(mixer, Field(default_factory=lambda: default_mixer(type=DEFAULT_MIXER))))
    stage = _tagged_union([section for _, section in stages], "name")
    return create_model("Recipe", __base__=Recipe, convert=(convert, Field(default_factory=convert)),
                        stages=(list[stage], Field(default_factory=list)))


def recipe_model() -> type[Recipe]:
    """The recipe model for the mixers and stages registered now (built once per registry content)."""
    import convert.student  # noqa: F401  (registers the built-in mixers)
    from convert.student.mixer_registry import MIXERS

    from ..stages import STAGES
    return _model_for(tuple(MIXERS.items()), tuple((name, stage.section) for name, stage in STAGES.items()))


def check_stage_names(stages) -> None:
    """A stage name that is not registered: one error naming the index and the stages there are."""
    from ..stages import STAGES
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        name = stage.get("name") if isinstance(stage, dict) else None
        if name not in STAGES:
            raise ValueError(f"stages[{i}]: stage {name!r} does not exist; available: {', '.join(sorted(STAGES))}")
