"""Calibration at conversion, where data meets the converted student: the teacher (the student's own attention)
run over a few packed rows sets what conversion cannot know from weights alone —

- attention sinks: each sink key/value = the teacher's mean key/value of the first token of a sequence;
- mixers' output norms: gain and bias fitted by least squares to the teacher's attention output before o_proj.

The pipeline calls both on stage 0's first rows, before any training.
"""
from __future__ import annotations

import torch

from convert.student.mixer_registry import HeadRMSNorm, Mixer

from .data import collate_packed


def _teacher_passes(student, rows, batch_size: int):
    """For each batch of ``rows`` (packed rows): the student run as its teacher (no grad), yielding
    (position_ids [B, T], capture: converted layer -> (attention input, attention output))."""
    device = next(student.parameters()).device
    for lo in range(0, len(rows), batch_size):
        batch = collate_packed([rows[j] for j in range(lo, min(lo + batch_size, len(rows)))])
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        capture: dict = {}
        with torch.no_grad(), student.teacher_attention(capture):
            student.model(input_ids=ids, position_ids=positions, use_cache=False)
        yield positions, capture


def sink_modules(student) -> dict[int, torch.nn.Module]:
    """Modules that hold an attention sink (``rnnify_sink_key``/``rnnify_sink_value``), by layer index:
    windowed kept attention layers and mixers with a sink."""
    return {i: layer.self_attn for i, layer in enumerate(student.model.layers)
            if hasattr(layer.self_attn, "rnnify_sink_key")}


@torch.no_grad()
def calibrate_attention_sinks(student, rows, batch_size: int = 4) -> int:
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


def _output_norms(student) -> dict[int, Mixer]:
    """Mixers whose output ends in a ``HeadRMSNorm`` (gain and bias to calibrate), by layer index."""
    return {i: student.model.layers[i].self_attn for i in student.config.mixer_layers
            if isinstance(getattr(student.model.layers[i].self_attn, "norm", None), HeadRMSNorm)}


@torch.no_grad()
def calibrate_output_norms(student, rows, batch_size: int = 4) -> int:
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
