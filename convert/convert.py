"""Teacher -> student: swap attention layers for mixers (weights from the teacher), save a loadable folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

import rnnify_kernels.common
import rnnify_kernels.fla_backend
import rnnify_kernels.torch_ops
from rnnify.store import write_folder_atomically

from .student.arch_registry import get_architecture
from .student.configuration_rnnify import WINDOWED_ATTENTION, RnnifyConfig, attention_layer_types
from .student.mixer_registry import get_mixer
from .student.modeling_rnnify import RnnifyForCausalLM

STUDENT_RUNTIME = Path(__file__).parent / "student"
AUTO_MAP = {"AutoConfig": "configuration_rnnify.RnnifyConfig",
            "AutoModelForCausalLM": "modeling_rnnify.RnnifyForCausalLM"}


def student_config(teacher_config, mixer: dict, mixer_layers: list[int],
                   attention_window: int | None = None, attention_sink: bool = False) -> RnnifyConfig:
    """The student's config: teacher fields, mixer choice, per-layer cache types for transformers
    (kept layers: the teacher's, or windowed ``chunked_attention`` with ``attention_window``)."""
    get_architecture(teacher_config.model_type)            # fail early on an unsupported teacher
    mixer_cls = get_mixer(mixer["type"])
    layer_types = attention_layer_types(teacher_config)
    attention_window = attention_window or kept_layers_window(teacher_config, mixer, mixer_layers)
    for i in range(len(layer_types)):
        if i in mixer_layers:
            layer_types[i] = mixer_cls.cache_layer_type(mixer)
        elif attention_window:
            layer_types[i] = WINDOWED_ATTENTION
    return RnnifyConfig.from_teacher(teacher_config, mixer, mixer_layers, layer_types, mixer.get("window"),
                                     attention_window, attention_sink)


def kept_layers_window(teacher_config, mixer: dict, mixer_layers: list[int]) -> int | None:
    """The window kept layers need when a sliding-window teacher (Mistral) meets a mixer with another window.

    transformers sizes every ``sliding_attention`` cache layer by the one ``config.sliding_window``, which the
    windowed mixers then need for their own window; so the kept layers take the student's windowed-attention path
    (``attention_window``, cache type ``chunked_attention``) with the teacher's window, which computes exactly the
    teacher's sliding-window attention (tested).  None when nothing needs it; kept layers of mixed types (some
    full, some sliding) cannot be expressed this way (``check_against_teacher`` says what to set)."""
    teacher_window = getattr(teacher_config, "sliding_window", None)
    window = mixer.get("window")
    kept = [t for i, t in enumerate(attention_layer_types(teacher_config)) if i not in set(mixer_layers)]
    if teacher_window and window and window != teacher_window and kept and set(kept) == {"sliding_attention"}:
        return teacher_window
    return None


def _student_param_name(name: str, mixer_layers) -> str:
    """model.layers.{i}.self_attn.X -> model.layers.{i}.self_attn.attn.X for converted layers (the mixer
    holds the teacher's attention module as ``attn``)."""
    parts = name.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and int(parts[2]) in mixer_layers:
        return ".".join(parts[:4] + ["attn"] + parts[4:])
    return name


def convert(teacher: torch.nn.Module, mixer: dict, mixer_layers: list[int],
            attention_window: int | None = None, attention_sink: bool = False) -> RnnifyForCausalLM:
    """Build the student of ``teacher`` (a transformers causal LM): every weight the teacher has is copied,
    attention projections included (each mixer reuses its layer's q/k/v/o); only new mixer parameters
    keep their initialisation.  The student has the teacher's dtype and device.  With ``attention_window``
    the layers that keep softmax attention see (and cache) only their last N tokens; ``attention_sink`` gives
    them a learned stand-in for the first token once it leaves the window (zeros until calibrated:
    ``distill.calibration``)."""
    config = student_config(teacher.config, mixer, mixer_layers, attention_window, attention_sink)
    config._attn_implementation = teacher.config._attn_implementation
    param = next(teacher.parameters())
    student = RnnifyForCausalLM(config).to(dtype=param.dtype, device=param.device)
    state = {_student_param_name(name, mixer_layers): t for name, t in teacher.state_dict().items()}
    result = student.load_state_dict(state, strict=False)
    # only the mixers' own new parameters may be absent from the teacher (and a tied lm_head)
    unmapped = [k for k in result.missing_keys if k != "lm_head.weight" and (".attn." in k or ".self_attn." not in k)]
    if result.unexpected_keys or unmapped:
        raise RuntimeError(f"teacher weights did not map onto the student: unexpected {result.unexpected_keys[:5]}, "
                           f"missing {unmapped[:5]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student.eval()


def restore_attention(student: RnnifyForCausalLM, layers: list[int]) -> RnnifyForCausalLM:
    """Give converted ``layers`` back the teacher's softmax attention (each mixer holds it as ``attn``, or as a
    frozen copy once stage 1 trained the projections), in place.

    The result equals converting with those layers kept: same modules, weights, ``mixer_layers`` and
    ``layer_types``; the mixers' trained parameters of the other layers are untouched.
    """
    missing = [i for i in layers if i not in student.config.mixer_layers]
    if missing:
        raise ValueError(f"layers {missing} are not converted (converted: {student.config.mixer_layers})")
    teacher_types = student._teacher_layer_types
    for i in layers:
        block = student.model.layers[i]
        block.self_attn = block.self_attn.teacher_attention_module
        window = student.config.attention_window
        student.config.layer_types[i] = WINDOWED_ATTENTION if window else teacher_types[i]
    student.config.mixer_layers = [i for i in student.config.mixer_layers if i not in set(layers)]
    student.route_windowed_attention()
    return student


def save_student(student: RnnifyForCausalLM, out_dir: str | Path, tokenizer=None, generation_config=None) -> Path:
    """Write a self-contained folder: safetensors, config.json with auto_map, the runtime modeling files
    (which need only torch + transformers), tokenizer and generation config."""
    student.config.auto_map = dict(AUTO_MAP)
    student.config.architectures = ["RnnifyForCausalLM"]
    if generation_config is not None:
        student.generation_config = generation_config

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        for src in STUDENT_RUNTIME.glob("*.py"):
            if src.name != "__init__.py":
                shutil.copy2(src, tmp / src.name)
        # the kernels' portable files, their imports of each other renamed to the copies' names
        for module, name in ((rnnify_kernels.common, "rnnify_common"), (rnnify_kernels.torch_ops, "rnnify_ops"),
                             (rnnify_kernels.fla_backend, "rnnify_fla")):
            text = Path(module.__file__).read_text().replace("from .common import", "from .rnnify_common import")
            (tmp / f"{name}.py").write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_folder_atomically(Path(out_dir), write)
