"""Stage 2, end-to-end distillation: the student's next-token distribution against the frozen teacher's.

    loss = kl_weight · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + ce_weight · CE(z_student, next token)

averaged over positions.  The teacher is not a second model: its logits come from the same modules run
with the original attention (``teacher_attention()``) and, with LoRA, with the adapters disabled, so the
only extra memory is one set of activations.  Trainable: LoRA adapters (``peft``) on the recipe's target
modules plus the parameters conversion added, i.e. the mixers' own and the windowed kept layers' attention
sinks (``trainable: lora``); those added parameters only (``trainable: mixers``); or every weight
(``trainable: full``).  Adapters are merged into the weights at the end of the stage.  Full training
changes the weights the teacher is made of, so it alone keeps a frozen copy of the model as the teacher
(one more set of weights in memory, besides AdamW's two).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention_transfer import mixer_parameters
from .training import TrainOptions, train


def added_parameters(student) -> list[nn.Parameter]:
    """What conversion added to the teacher: the mixers' parameters and the windowed layers' attention sinks."""
    own = [p for _, p in mixer_parameters(student)]
    seen = {id(p) for p in own}   # a mixer's own sink is among its parameters already
    return own + [p for n, p in student.named_parameters()
                  if n.rsplit(".", 1)[-1].startswith("rnnify_sink_") and id(p) not in seen]


def check_lora_targets(student, targets: list[str]) -> None:
    """Every LoRA target names Linear layers of the student; otherwise a ValueError naming the missing targets
    and the Linear layer names the model has (e.g. Phi-3 fuses q/k/v into ``qkv_proj``)."""
    names = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no Linear layer of this model; its Linear layers are "
                         f"named {sorted(names)}")


class DistillLoss(nn.Module):
    """One module computing the stage loss (DDP wraps and syncs it)."""

    def __init__(self, model, student, temperature: float, kl_weight: float, ce_weight: float, frozen_copy=None):
        super().__init__()
        self.model = model            # the student, or its peft wrapper
        self.student = student        # the RnnifyForCausalLM inside (teacher_attention lives there)
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight
        # a plain attribute, not a submodule: DDP/FSDP must neither wrap nor sync the frozen teacher
        self.__dict__["frozen_copy"] = frozen_copy

    def forward(self, input_ids, position_ids, labels):
        """[B, T] packed rows -> (loss, {"kl": ..., "ce": ...})."""
        teacher_model = self.frozen_copy if self.frozen_copy is not None else self.model
        teacher_student = self.frozen_copy if self.frozen_copy is not None else self.student
        adapters_off = teacher_model.disable_adapter() if hasattr(teacher_model, "disable_adapter") else nullcontext()
        with torch.no_grad(), adapters_off, teacher_student.teacher_attention():
            teacher = teacher_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
        student = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="none").sum(-1).mean() * t * t
        ce = F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return self.kl_weight * kl + self.ce_weight * ce, {"kl": kl.detach(), "ce": ce.detach()}


def train_distill(student, rows, *, out_dir: Path, opts: TrainOptions, temperature: float = 1.0,
                  kl_weight: float = 1.0, ce_weight: float = 0.0, trainable: str = "lora", lora: dict | None = None,
                  gradient_checkpointing: bool = False):
    """Distil ``student`` end to end over ``rows``; returns (the student, adapters merged; the stage summary)."""
    for p in student.parameters():
        p.requires_grad_(False)
    model = student
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model
        lora = lora or {}
        check_lora_targets(student, list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])))
        config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
                            target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                            bias="none")
        model = get_peft_model(student, config)
    frozen_copy = None
    if trainable == "full":
        import copy
        frozen_copy = copy.deepcopy(student).eval()   # before any update: the teacher, with its attention
        own = list(student.parameters())
    else:
        own = added_parameters(student)
    for p in own:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    if gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = train(DistillLoss(model, student, temperature, kl_weight, ce_weight, frozen_copy), params, rows, opts,
                    out_dir, "distill")
    del frozen_copy
    if gradient_checkpointing:
        student.gradient_checkpointing_disable()
    if trainable == "lora":
        student = model.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    summary.update(trainable=trainable, trainable_parameters=sum(p.numel() for p in params), lora_parameters=n_lora)
    return student, summary
