"""Teacher -> student: swap attention layers for mixers (weights from the teacher), save a loadable folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

import kernels.torch_ops
from store import write_folder_atomically

from .student.arch_registry import get_architecture
from .student.configuration_rnnify import WINDOWED_ATTENTION, RnnifyConfig, attention_layer_types
from .student.mixer_registry import Mixer, get_mixer
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
    for i in range(len(layer_types)):
        if i in mixer_layers:
            layer_types[i] = mixer_cls.cache_layer_type(mixer)
        elif attention_window:
            layer_types[i] = WINDOWED_ATTENTION
    return RnnifyConfig.from_teacher(teacher_config, mixer, mixer_layers, layer_types, mixer.get("window"),
                                     attention_window, attention_sink)


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
    them a learned stand-in for the first token once it leaves the window (zeros until ``calibrate_attention_sinks``)."""
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


def _teacher_passes(student: RnnifyForCausalLM, rows, batch_size: int):
    """For each batch of ``rows`` (packed rows): the student run as its teacher (no grad), yielding
    (position_ids [B, T], capture: converted layer -> (attention input, attention output))."""
    from distill.data import collate_packed

    device = next(student.parameters()).device
    for lo in range(0, len(rows), batch_size):
        batch = collate_packed([rows[j] for j in range(lo, min(lo + batch_size, len(rows)))])
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        capture: dict = {}
        with torch.no_grad(), student.teacher_attention(capture):
            student.model(input_ids=ids, position_ids=positions, use_cache=False)
        yield positions, capture


def sink_modules(student: RnnifyForCausalLM) -> dict[int, torch.nn.Module]:
    """Modules that hold an attention sink (``rnnify_sink_key``/``rnnify_sink_value``), by layer index:
    windowed kept attention layers and mixers with a sink."""
    return {i: layer.self_attn for i, layer in enumerate(student.model.layers)
            if hasattr(layer.self_attn, "rnnify_sink_key")}


@torch.no_grad()
def calibrate_attention_sinks(student: RnnifyForCausalLM, rows, batch_size: int = 4) -> int:
    """Set every attention sink to the teacher's mean key/value of the first token of a sequence (position 0),
    over ``rows`` (packed rows: every document start counts), the teacher being the student's own attention.
    Returns how many first tokens were averaged (0: no sink, or no rows)."""
    modules = sink_modules(student)
    if not modules or not len(rows):
        return 0
    found = {i: [] for i in modules}
    kept = {i: m for i, m in modules.items() if not isinstance(m, Mixer)}
    for i, attn in kept.items():
        attn.rnnify_sink_capture = found[i]   # filled by the windowed attention function
    try:
        for positions, capture in _teacher_passes(student, rows, batch_size):
            first = positions == 0
            for i in modules.keys() - kept.keys():   # mixers: their own projections of the attention input
                x = capture[i][0]
                _, k, v = modules[i].project(x, student.model.rotary_emb(x, position_ids=positions))
                found[i].append((k[first], v[first]))
    finally:
        for attn in kept.values():
            del attn.rnnify_sink_capture
    for i, module in modules.items():
        module.rnnify_sink_key.copy_(torch.cat([k for k, _ in found[i]]).float().mean(0))
        module.rnnify_sink_value.copy_(torch.cat([v for _, v in found[i]]).float().mean(0))
    return sum(k.shape[0] for k, _ in found[min(found)])


def _output_norms(student: RnnifyForCausalLM) -> dict[int, Mixer]:
    """Mixers whose output ends in a ``HeadRMSNorm`` (gain and bias to calibrate), by layer index."""
    from .student.mixer_registry import HeadRMSNorm
    return {i: student.model.layers[i].self_attn for i in student.config.mixer_layers
            if isinstance(getattr(student.model.layers[i].self_attn, "norm", None), HeadRMSNorm)}


@torch.no_grad()
def calibrate_output_norms(student: RnnifyForCausalLM, rows, batch_size: int = 4) -> int:
    """Fit each mixer's output-norm gain g and bias b [H, D] by least squares, per head and channel, so that
    g ⊙ n + b (n: the mixer's normalised output) best matches the teacher's attention output before o_proj
    on ``rows`` (packed rows).  A least-squares fit with an intercept is never worse than the best constant,
    so every calibrated mixer starts closer to the attention it replaces than a zero output (on these rows).
    Returns how many tokens were fitted (0: no such mixer, or no rows)."""
    mixers = _output_norms(student)
    if not mixers or not len(rows):
        return 0
    targets: dict[int, torch.Tensor] = {}
    hooks = [m.attn.o_proj.register_forward_pre_hook(
        lambda _module, args, i=i: targets.__setitem__(i, args[0].detach())) for i, m in mixers.items()]
    saved = {i: (m.norm.weight.clone(), m.norm.bias.clone()) for i, m in mixers.items()}
    sums = {i: None for i in mixers}
    try:
        for m in mixers.values():
            m.norm.reset_parameters()   # g = 1, b = 0: the mixer returns the normalised n itself
        for positions, capture in _teacher_passes(student, rows, batch_size):
            position_embeddings = student.model.rotary_emb(capture[min(capture)][0], position_ids=positions)
            packed = student.packed_sequences(positions)
            for i, m in mixers.items():
                n = m.mix(capture[i][0], position_embeddings, None, None, packed).float().flatten(0, 1)   # [N,H,D]
                y = targets[i].float().reshape(n.shape)
                part = torch.stack([n.sum(0), y.sum(0), (n * n).sum(0), (n * y).sum(0)])
                count = torch.tensor(float(n.shape[0]), device=n.device)
                sums[i] = (part, count) if sums[i] is None else (sums[i][0] + part, sums[i][1] + count)
    except BaseException:
        for i, m in mixers.items():
            m.norm.weight.copy_(saved[i][0])
            m.norm.bias.copy_(saved[i][1])
        raise
    finally:
        for h in hooks:
            h.remove()
    for i, m in mixers.items():
        (sn, sy, snn, sny), N = sums[i]
        var = snn - sn * sn / N
        gain = torch.where(var > 1e-12 * N, (sny - sn * sy / N) / var.clamp_min(1e-30), torch.zeros_like(var))
        m.norm.weight.copy_(gain)
        m.norm.bias.copy_((sy - gain * sn) / N)
    return int(next(iter(sums.values()))[1].item())


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
        shutil.copy2(kernels.torch_ops.__file__, tmp / "rnnify_ops.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_folder_atomically(Path(out_dir), write)
