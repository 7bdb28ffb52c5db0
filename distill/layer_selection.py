"""Which converted layers should get softmax attention back: rankings for hybrids and the budget curve.

- ``error``: the held-out attention-transfer error of stage 1 (``relative_mse`` or ``mse``), highest first;
- ``kl``: KL-guided selection (as in recent hybrid distillation work): give each converted layer alone its
  teacher attention back and measure how much the student's KL to the teacher drops,

      gain_i = KL(p_teacher ‖ p_student) − KL(p_teacher ‖ p_student with layer i restored)

  averaged over held-out tokens; the largest gains first.  Costs one forward pass per converted layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_by_error(layer_errors: dict, by: str = "relative_mse") -> list[int]:
    """Converted layers, highest held-out stage-1 error ``by`` (after training) first."""
    return [int(layer) for layer in sorted(layer_errors, key=lambda layer: layer_errors[layer]["after"][by],
                                           reverse=True)]


@torch.no_grad()
def kl_gains(student, rows, batch_size: int = 4) -> dict[int, float]:
    """Per converted layer: the drop of the mean per-token KL(teacher ‖ student) over ``rows`` (packed rows)
    when that layer alone runs the teacher's attention (``teacher_attention(layers=[i])``)."""
    from .data import collate_packed

    device = next(student.parameters()).device
    batches = [collate_packed([rows[j] for j in range(lo, min(lo + batch_size, len(rows)))])
               for lo in range(0, len(rows), batch_size)]
    batches = [(b["input_ids"].to(device), b["position_ids"].to(device)) for b in batches]
    with student.teacher_attention():
        teacher = [F.log_softmax(student(input_ids=i, position_ids=p, use_cache=False).logits.float(), -1)
                   for i, p in batches]

    def mean_kl() -> float:
        total, count = 0.0, 0
        for (ids, pos), t in zip(batches, teacher):
            s = F.log_softmax(student(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), -1)
            total += F.kl_div(s, t, log_target=True, reduction="none").sum(-1).sum().item()
            count += ids.numel()
        return total / count

    base = mean_kl()
    gains = {}
    for i in student.config.mixer_layers:
        with student.teacher_attention(layers=[i]):
            gains[i] = base - mean_kl()
    return gains


def rank_by_kl(gains: dict[int, float]) -> list[int]:
    """Converted layers, largest KL drop first."""
    return sorted(gains, key=lambda i: gains[i], reverse=True)
