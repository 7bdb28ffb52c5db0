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

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention_transfer import mixer_parameters
from .training import TrainOptions, train, window_dropout_schedule


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


LOSS_CHUNK_BYTES = 64 * 2 ** 20   # one chunk's fp32 logits [chunk, vocab]: the loss holds a few such at a time


def loss_chunk(vocab_size: int) -> int:
    """Positions per chunk of the loss: ``LOSS_CHUNK_BYTES`` of fp32 logits (341 for SmolLM2's 49,152 tokens, 130
    for Llama 3's 128,256)."""
    return max(16, LOSS_CHUNK_BYTES // (4 * vocab_size))


class ChunkedDistillation(torch.autograd.Function):
    """The stage loss from final hidden states, the LM head applied ``chunk`` positions at a time:

        loss = kl_weight · T² · mean_n KL(softmax(z_t,n / T) ‖ softmax(z_s,n / T)) + ce_weight · mean_{y_n ≠ -100} CE(z_s,n, y_n)

    with z = h Wᵀ per position n of h [N, D] (student: ``h_s``, ``w_s`` [V, D]; teacher: ``h_t``, ``w_t``), each
    chunk's logits in fp32.  The forward pass also computes the gradients (of ``h_s``, and of ``w_s`` when it
    trains), chunk by chunk, so no [N, V] tensor of either model is ever held; backward only scales them.  Returns
    (loss, KL term before its weight, CE before its weight), the last two for the log.

    liger-kernel's chunked distillation loss (``LigerFusedLinearJSDLoss``, beta 0 = this KL) does the same where
    its semantics fit, but not here: it normalises KL and CE by one shared target mask (this loss counts KL at every
    position, CE at the shifted ones, as the stage always has), computes chunk logits in the input dtype (bf16
    under mixed precision, where this loss has always used fp32), and off CUDA runs uncompiled only.  Matching the
    stage's loss with it would take two passes over the LM head; this form takes one (tests: equal values and
    gradients to the full-logits form, vocabulary 128,256).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature: float, kl_weight: float, ce_weight: float,
                chunk: int):
        N, T = h_s.shape[0], temperature
        counted = (labels != -100).sum()
        grad_h = torch.zeros_like(h_s, dtype=torch.float32)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        kl_sum = h_s.new_zeros((), dtype=torch.float32)
        ce_sum = h_s.new_zeros((), dtype=torch.float32)
        for start in range(0, N, chunk):
            part = slice(start, min(start + chunk, N))
            h = h_s[part].detach().requires_grad_()
            w = w_s.detach().requires_grad_(grad_w is not None)
            with torch.no_grad():
                log_q = F.log_softmax((h_t[part] @ w_t.T).float() / T, -1)   # the teacher's chunk, then freed
            with torch.enable_grad():
                z = (h @ w.T).float()
                kl = F.kl_div(F.log_softmax(z / T, -1), log_q, log_target=True, reduction="sum")
                ce = F.cross_entropy(z, labels[part], ignore_index=-100, reduction="sum")
                weighted = kl * (kl_weight * T * T / N) + (ce * (ce_weight / counted) if ce_weight else 0)
                wanted = [h] + ([w] if grad_w is not None else [])
                grads = torch.autograd.grad(weighted, wanted) if weighted.requires_grad else [None] * len(wanted)
            if grads[0] is not None:
                grad_h[part] = grads[0]
                if grad_w is not None:
                    grad_w += grads[1]
            kl_sum += kl.detach()
            ce_sum += ce.detach()
        ctx.save_for_backward(grad_h.to(h_s.dtype), None if grad_w is None else grad_w.to(w_s.dtype))
        kl_mean, ce_mean = kl_sum * T * T / N, ce_sum / counted
        return kl_weight * kl_mean + (ce_weight * ce_mean if ce_weight else 0), kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss) + (None,) * 7


@contextmanager
def activation_checkpointing(student):
    """Within: each decoder layer (its mixer or attention and its MLP) keeps only its input for the backward pass
    and runs again there (non-reentrant ``torch.utils.checkpoint``), so a training step holds one layer's
    activations instead of every layer's; transformers' own switch (``activation_checkpointing_enable``, before
    5.25 ``gradient_checkpointing_enable``), turned off again on the way out."""
    enable = getattr(student, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield student
    finally:
        (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()


def next_token_targets(labels):
    """[B, T] labels -> [B·T] targets: position t predicts token t+1 of its row; a row's last position has none
    (-100)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100).flatten()


class DistillLoss(nn.Module):
    """One module computing the stage loss (DDP wraps and syncs it)."""

    def __init__(self, model, student, temperature: float, kl_weight: float, ce_weight: float, frozen_copy=None):
        super().__init__()
        self.model = model            # the student, or its peft wrapper (adapters live in the student's modules)
        self.student = student        # the RnnifyForCausalLM inside (teacher_attention lives there)
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight
        if student.lm_head.bias is not None:
            raise ValueError("the distillation loss applies the LM head itself and takes none with a bias")
        # a plain attribute, not a submodule: DDP/FSDP must neither wrap nor sync the frozen teacher
        self.__dict__["frozen_copy"] = frozen_copy

    def forward(self, input_ids, position_ids, labels):
        """[B, T] packed rows -> (loss, {"kl": ..., "ce": ...}); hidden states in, the LM heads applied per chunk."""
        teacher_model = self.frozen_copy if self.frozen_copy is not None else self.model
        teacher_student = self.frozen_copy if self.frozen_copy is not None else self.student
        adapters_off = teacher_model.disable_adapter() if hasattr(teacher_model, "disable_adapter") else nullcontext()
        with torch.inference_mode(), adapters_off, teacher_student.teacher_attention():
            h_t, _ = teacher_student.final_hidden_states(input_ids=input_ids, position_ids=position_ids,
                                                         use_cache=False)
        h_s, _ = self.student.final_hidden_states(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        loss, kl, ce = ChunkedDistillation.apply(
            h_s.flatten(0, 1), self.student.lm_head.weight, h_t.flatten(0, 1), teacher_student.lm_head.weight,
            next_token_targets(labels), self.temperature, self.kl_weight, self.ce_weight,
            loss_chunk(self.student.lm_head.weight.shape[0]))
        return loss, {"kl": kl.detach(), "ce": ce.detach()}


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
    with activation_checkpointing(student) if gradient_checkpointing else nullcontext():
        summary = train(DistillLoss(model, student, temperature, kl_weight, ce_weight, frozen_copy), params, rows,
                        opts, out_dir, "distill", progress=window_dropout_schedule(student, opts.window_dropout))
    del frozen_copy
    if trainable == "lora":
        student = model.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    summary.update(trainable=trainable, trainable_parameters=sum(p.numel() for p in params), lora_parameters=n_lora)
    return student, summary
