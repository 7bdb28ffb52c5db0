"""Stage 1 (attention transfer) on a tiny model: mixers learn their layer's attention output, nothing else moves."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convert.convert import convert
from distill.attention_transfer import layer_errors, mixer_parameters, train_attention_transfer
from distill.data import pack_documents
from distill.training import NonFiniteError, TrainOptions
from tests.conftest import MIXERS, make_teacher, randomize_mixers

REPO = Path(__file__).resolve().parents[1]


def rows(n_docs=40, seed=0):
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 97, (int(torch.randint(8, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(Dataset.from_dict({"input_ids": docs}), 32, seed=0)


def test_attention_transfer_lowers_every_layer_error_and_trains_only_mixers(tmp_path):
    student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
    frozen = {n: p.clone() for n, p in student.named_parameters()}
    own = {id(p) for _, p in mixer_parameters(student)}
    train, held = rows(), rows(12, seed=1)
    summary = train_attention_transfer(student, train, out_dir=tmp_path, opts=TrainOptions(lr=3e-2, batch_size=4),
                                       eval_rows=held)
    assert summary["steps"] == -(-len(train) // 4) and summary["tokens"] == len(train) * 32
    for layer, err in summary["layer_errors"].items():
        assert err["after"]["mse"] < 0.9 * err["before"]["mse"], (layer, err)
    for name, p in student.named_parameters():
        if id(p) not in own:
            assert torch.equal(p, frozen[name]), f"{name} is the teacher's and must stay frozen"
    assert any(not torch.equal(p, frozen[n]) for n, p in student.named_parameters() if id(p) in own)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps"] and set(json.loads(lines[0])["layers"]) == {"0", "2"}
    assert json.loads((tmp_path / "layer_errors.json").read_text())["2"]["after"]["mse"] > 0


def test_frozen_mixer_parameters_stay_and_the_rest_train_and_unknown_names_are_refused(tmp_path):
    """HedgeMamba's first stage: decay, conv, gate and skip held; the feature maps learn."""
    from distill.attention_transfer import held_fixed
    student = convert(make_teacher("llama"), {"type": "mamba2", "feature_map": "hedgehog", "normalise": True,
                                              "norm": False, "rope": True}, [0, 2])
    before = {n: p.clone() for n, p in mixer_parameters(student)}
    frozen = ["A_log", "dt_proj", "conv", "gate", "D_skip"]
    train_attention_transfer(student, rows(), out_dir=tmp_path, opts=TrainOptions(lr=3e-2, batch_size=4),
                             frozen=frozen)
    for name, p in mixer_parameters(student):
        held = name.split(".", 2)[2].split(".")[0] in frozen
        assert torch.equal(p, before[name]) == held, name
    with pytest.raises(ValueError, match=r"\['decay'\] name no parameter of this student's mixers; they have "
                                         r"\['A_log', 'D_skip', 'conv', 'dt_proj', 'feature_k', 'feature_q', 'gate'\]"):
        held_fixed(student, ["conv", "decay"])


WEIGHTED_MIXERS = [{"type": "hedgehog"},
                   {"type": "mamba2", "feature_map": "hedgehog", "normalise": True, "norm": False, "gate": False,
                    "rope": True}]


@pytest.mark.parametrize("mixer", WEIGHTED_MIXERS, ids=["hedgehog", "hedgemamba"])
def test_attention_weight_kl_compares_the_teachers_softmax_rows_with_the_weights_the_mixer_really_uses(mixer):
    """weight_factors describe the mixer's own output (Σ_s w_ts v_s); the teacher's rows are its eager attention
    weights; the blockwise KL equals the dense one, within documents of a packed row."""
    from distill.attention_transfer import attention_weight_kl
    from convert.student.mixer_registry import PackedSequences
    student = randomize_mixers(convert(make_teacher("llama"), mixer, [0, 1, 2]), seed=2)
    layer = student.model.layers[1].self_attn
    with torch.no_grad():
        layer.attn.q_proj.weight.mul_(30.0)   # sharper rows than a random tiny teacher's near-uniform ones
        if hasattr(layer, "D_skip"):
            layer.D_skip.zero_()   # the skip adds x_t outside the weights
    T = 14
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(9)) + list(range(5)), list(range(T))])
    seq = torch.tensor([[0] * 9 + [1] * 5, [0] * T])
    packed = PackedSequences(seq)
    pe = student.model.rotary_emb(x, position_ids=positions)
    visible = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None] & (seq[:, :, None] == seq[:, None, :])
    with torch.no_grad():
        c, b, u = layer.weight_factors(x, pe, packed)
        logits = torch.einsum("bthf,bshf->bhts", c, b).log() + (0 if u is None else u.transpose(1, 2)[:, :, None])
        w = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
        _, _, v = layer.project(x, pe, None, packed)
        expected = torch.einsum("bhts,bshd->bthd", w, layer.expand(v).float())
        torch.testing.assert_close(layer.mix(x, pe, None, None, packed).float(), expected, atol=1e-4, rtol=1e-4)

        attn = layer.teacher_attention_module
        attn.config._attn_implementation = "eager"
        mask = torch.zeros(2, 1, T, T).masked_fill(~visible[:, None], float("-inf"))
        _, a = attn(x, position_embeddings=pe, attention_mask=mask)
        dense = (a * (a.clamp_min(1e-30).log() - w.clamp_min(1e-30).log())).sum(-1).mean()
        assert dense > 0.01
        torch.testing.assert_close(attention_weight_kl(layer, x, pe, packed, block=4), dense, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attention_weight_kl(layer, x, pe, packed, block=T), dense, atol=1e-5, rtol=1e-4)
    x.requires_grad_(True)
    attention_weight_kl(layer, x, pe, packed, block=4).backward()
    assert layer.feature_q.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_attention_weight_loss_trains_the_feature_maps_towards_the_teachers_rows(tmp_path):
    from distill.attention_transfer import AttentionTransferLoss, layer_errors
    from distill.data import collate_packed
    student = convert(make_teacher("llama"), {"type": "hedgehog"}, [0, 2])
    batch = collate_packed([rows(12, seed=1)[i] for i in range(4)])

    def weights_kl():
        with torch.no_grad():
            return AttentionTransferLoss(student, attention_weight=1.0).per_layer(
                batch["input_ids"], batch["position_ids"])[4].item()

    before = weights_kl()
    summary = train_attention_transfer(student, rows(), out_dir=tmp_path, opts=TrainOptions(lr=3e-2, batch_size=4),
                                       attention_weight=1.0, gradient_checkpointing=True)
    assert weights_kl() < 0.8 * before
    assert "attention_weight_kl" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    windowed = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
    with pytest.raises(ValueError, match="this student has hedgehog with a window"):
        train_attention_transfer(windowed, rows(), out_dir=tmp_path / "w", opts=TrainOptions(lr=3e-2, batch_size=4),
                                 attention_weight=1.0)


def test_layer_errors_measure_each_converted_layer():
    student = convert(make_teacher("llama"), {"type": "gla"}, [1])
    errors = layer_errors(student, rows(6), batch_size=2)
    assert set(errors) == {1} and errors[1]["mse"] > 0 and math.isfinite(errors[1]["relative_mse"])


def test_distill_with_lora_brings_student_closer_to_teacher_and_merges(tmp_path):
    from distill.distillation import DistillLoss, train_distill
    teacher = make_teacher("llama")
    student = convert(teacher, {"type": "hedgehog", "window": 4}, [0, 2])
    batch = {k: v for k, v in __import__("distill.data", fromlist=["collate_packed"]).collate_packed(
        [rows(12, seed=1)[i] for i in range(4)]).items()}
    loss_fn = DistillLoss(student, student, temperature=1.0, kl_weight=1.0, ce_weight=0.0)
    with torch.no_grad():
        before = loss_fn(**batch)[0].item()
    frozen = {n: p.clone() for n, p in student.named_parameters()}
    student, summary = train_distill(student, rows(80), out_dir=tmp_path, opts=TrainOptions(lr=1e-2, batch_size=4),
                                     trainable="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert summary["lora_parameters"] > 0 and summary["steps"] > 0
    assert type(student).__name__ == "RnnifyForCausalLM" and not any("lora" in n for n, _ in student.named_parameters())
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, frozen[n])}
    assert any(n.endswith("q_proj.weight") for n in changed)          # merged adapters moved q_proj
    assert not any("mlp" in n or "embed" in n for n in changed)       # the rest of the teacher is untouched
    with torch.no_grad():
        after = DistillLoss(student, student, 1.0, 1.0, 0.0)(**batch)[0].item()
    assert after < before
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert {"kl", "ce", "grad_norm"} <= set(json.loads(lines[0]))


def test_full_distillation_trains_every_weight_against_the_original_teacher(tmp_path):
    from distill.data import collate_packed
    from distill.distillation import DistillLoss, train_distill
    student = convert(make_teacher("llama"), {"type": "gla"}, [1, 2])
    original = convert(make_teacher("llama"), {"type": "gla"}, [1, 2])   # same seeded weights: the reference
    batch = collate_packed([rows(12, seed=1)[i] for i in range(4)])

    def kl_to_original(model):   # teacher logits from an untouched copy, whatever happened to `model`
        return DistillLoss(model, model, 1.0, 1.0, 0.0, frozen_copy=original)(**batch)[0].item()

    with torch.no_grad():
        before = kl_to_original(student)
    student, summary = train_distill(student, rows(80), out_dir=tmp_path, opts=TrainOptions(lr=3e-3, batch_size=4),
                                     trainable="full")
    assert summary["trainable_parameters"] == sum(p.numel() for p in student.parameters())
    changed = {n for n, p in student.named_parameters()
               if not torch.equal(p, dict(original.named_parameters())[n])}
    assert any("mlp" in n for n in changed) and any("embed" in n for n in changed)
    assert not any(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        after = kl_to_original(student)
    assert after < 0.8 * before, (before, after)


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    from distill.distillation import train_distill
    student = convert(make_teacher("llama"), {"type": "mamba2"}, [1])
    with pytest.raises(NonFiniteError, match=r"distill: the (loss|gradient norm) is (nan|inf).* at step \d+; stopped "
                                             r"before the optimizer step.*learning rate too high \(lr=1e\+30\)") as e:
        train_distill(student, rows(40), out_dir=tmp_path, trainable="mixers",
                      opts=TrainOptions(lr=1e30, batch_size=4, max_grad_norm=1e30, checkpoint_every=1))
    for name, p in student.named_parameters():
        assert torch.isfinite(p).all(), name
    failed = int(str(e.value).split(" at step ")[1].split(";")[0])
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [f"step-{s:06d}" for s in range(max(1, failed - 2), failed)]   # none for the failed step
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / saved[-1]}" in str(e.value)
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == failed - 1


def test_gradient_checkpointing_gives_the_same_loss(tmp_path):
    from distill.distillation import train_distill
    losses = []
    for checkpointing in (False, True):
        student = convert(make_teacher("llama"), {"type": "gated_deltanet"}, [0, 2])
        _, summary = train_distill(student, rows(24), out_dir=tmp_path / str(checkpointing),
                                   opts=TrainOptions(lr=1e-2, batch_size=4), trainable="mixers",
                                   gradient_checkpointing=checkpointing)
        log = (tmp_path / str(checkpointing) / "log.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in log])
        assert summary["peak_memory_gb"] > 0
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-8)


def saved_for_backward(student, ids):
    """(bytes of the distinct tensors autograd keeps for the backward pass of a forward, the gradients)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, _ = student.final_hidden_states(input_ids=ids, use_cache=False)
    hidden.square().mean().backward()
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    return sum(kept.values()), grads


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(map(str, m.values())))
def test_activation_checkpointing_keeps_only_layer_inputs_for_every_mixer(mixer):
    """With checkpointing on, a training forward keeps a small fraction of what it keeps without (each layer, mixer
    included, runs again in the backward pass) and the gradients are the same: no mixer sidesteps it."""
    from distill.distillation import activation_checkpointing
    student = randomize_mixers(convert(make_teacher("llama", num_hidden_layers=4), mixer, [0, 1, 2])).train()
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    without, grads = saved_for_backward(student, ids)
    with activation_checkpointing(student):
        with_it, grads_with = saved_for_backward(student, ids)
    assert with_it < 0.1 * without, (with_it, without)
    assert len(grads) == len(grads_with) > 0
    for a, b in zip(grads, grads_with):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert saved_for_backward(student, ids)[0] > 0.9 * without   # turned off again on the way out


@pytest.mark.parametrize("mixer", [{"type": "gated_deltanet"}, {"type": "hedgehog", "window": 8, "sink": True}],
                         ids=["gated_deltanet", "hedgehog-window"])
def test_attention_transfer_checkpointing_keeps_no_layer_graph_and_gives_the_same_gradients(mixer):
    """Stage 1 with ``gradient_checkpointing``: each layer's loss (mixer and block alignment) runs again in the
    backward pass, so a step keeps a small fraction of the tensors it keeps without, with the same loss and
    gradients (window dropout's random masks drawn alike in the recomputation)."""
    from distill.attention_transfer import AttentionTransferLoss
    student = randomize_mixers(convert(make_teacher("llama", num_hidden_layers=4), mixer, [0, 1, 2, 3])).train()
    for p in student.parameters():
        p.requires_grad_(True)
    if "window" in mixer:
        student.set_window_dropout(0.5)
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64)[None].expand(2, -1)
    results = []
    for checkpointing in (False, True):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        torch.manual_seed(1)
        module = AttentionTransferLoss(student, block_weight=0.5, gradient_checkpointing=checkpointing)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = module(ids, positions)
        loss.backward()
        results.append((loss.item(), sum(kept.values()),
                        [p.grad.clone() for p in student.parameters() if p.grad is not None]))
        student.zero_grad(set_to_none=True)
    (loss_without, kept_without, grads), (loss_with, kept_with, grads_with) = results
    assert loss_with == pytest.approx(loss_without, rel=1e-6)
    assert kept_with < 0.1 * kept_without, (kept_with, kept_without)
    assert len(grads) == len(grads_with) > 0
    for a, b in zip(grads, grads_with):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tensorboard_tracker_gets_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    student = convert(make_teacher("llama"), {"type": "gla"}, [1])
    summary = train_attention_transfer(student, rows(24), out_dir=tmp_path,
                                       opts=TrainOptions(lr=1e-2, batch_size=4, trackers=("tensorboard",)))
    events = EventAccumulator(str(next(tmp_path.glob("attention_transfer*")))).Reload()
    losses = events.Scalars("loss")
    logged = [json.loads(x)["loss"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e.step for e in losses] == list(range(1, summary["steps"] + 1))
    assert [e.value for e in losses] == pytest.approx(logged, rel=1e-6)


def test_attention_transfer_can_train_the_projections_and_align_block_outputs(tmp_path):
    from convert.convert import restore_attention
    student = convert(make_teacher("llama"), {"type": "gated_deltanet"}, [0, 2])
    original = {n: p.clone() for n, p in student.named_parameters() if ".attn." in n}
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), student.teacher_attention():
        teacher_logits = student(ids).logits
    summary = train_attention_transfer(student, rows(), out_dir=tmp_path, eval_rows=rows(12, seed=1),
                                       opts=TrainOptions(lr=3e-2, batch_size=4), trainable="attention",
                                       projection_lr=1e-2, block_weight=0.5)
    for layer, err in summary["layer_errors"].items():
        assert err["after"]["mse"] < 0.9 * err["before"]["mse"], (layer, err)
    moved = [n for n, p in student.named_parameters() if n in original and not torch.equal(p, original[n])]
    assert {n.split(".self_attn.attn.")[1] for n in moved} >= {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                  "o_proj.weight"}
    with torch.no_grad(), student.teacher_attention():   # the teacher is still the teacher
        torch.testing.assert_close(student(ids).logits, teacher_logits)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["block"]) for r in log) and log[-1]["block"] < log[0]["block"]
    restore_attention(student, [0, 2])   # restored layers get the teacher's attention, not the trained projections
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher_logits)


def test_lora_targets_that_match_nothing_are_named_with_the_layers_that_exist():
    from distill.distillation import check_lora_targets
    phi3 = convert(make_teacher("phi3"), {"type": "gla"}, [1])
    check_lora_targets(phi3, ["qkv_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"lora.target_modules \['q_proj', 'k_proj'\] match no Linear layer of this "
                                         r"model; its Linear layers are named \[.*'qkv_proj'"):
        check_lora_targets(phi3, ["q_proj", "k_proj", "o_proj"])


class _Probe(torch.nn.Module):
    """A module with a bf16 weight that records the dtype it trains in: loss = mean((W x)^2) over embedded rows."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(97, 8).to(torch.bfloat16).requires_grad_(False)
        self.proj = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
        with torch.no_grad():   # magnitudes in [1, 2): bf16's spacing there is 2^-7, half of it ~3.9e-3
            w = torch.empty(8, 8).uniform_(1, 2, generator=torch.Generator().manual_seed(0))
            self.proj.weight.copy_(w * torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).sign())
        self.seen = []

    def forward(self, input_ids, position_ids, labels):
        self.seen.append((self.proj.weight.dtype, torch.is_autocast_enabled("cpu")))
        y = self.proj(self.embed(input_ids))
        return (y.float() ** 2).mean(), {}


def test_master_weights_are_fp32_under_mixed_precision_and_stages_may_change_precision(tmp_path):
    from distill.training import train
    probe = _Probe()
    before = probe.proj.weight.detach().clone()
    train(probe, [probe.proj.weight], rows(), TrainOptions(lr=1e-3, batch_size=4, mixed_precision="bf16"),
          tmp_path / "bf16", "bf16 stage")
    assert set(probe.seen) == {(torch.float32, True)}   # fp32 master weight, bf16 compute
    assert probe.proj.weight.dtype == torch.bfloat16 and probe.embed.weight.dtype == torch.bfloat16
    # lr 1e-3 moves a weight by at most ~1e-3 per step, below half of bf16's spacing (~3.9e-3) for every weight here:
    # applied in bf16 each update would be rounded away (none changes: checked by training without master weights);
    # fp32 master weights accumulate them over the 9 steps
    assert (probe.proj.weight != before).float().mean() > 0.9
    probe.seen.clear()
    probe.float()   # a later stage in the same process, without mixed precision (accelerate's state is reset)
    summary = train(probe, [probe.proj.weight], rows(), TrainOptions(lr=1e-3, batch_size=4), tmp_path / "fp32",
                    "fp32 stage")
    assert set(probe.seen) == {(torch.float32, False)} and summary["steps"] == summary["planned_steps"]
    log = [json.loads(x) for x in (tmp_path / "fp32" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)   # the cosine schedule runs to its end


def test_window_dropout_is_annealed_to_zero_over_the_stage_and_left_off(tmp_path):
    """``train`` reports its progress before each batch (0, 1/steps, ...) and 1.0 at the end; the schedule turns
    it into the mixers' dropout probability, from the recipe's value down to 0."""
    from distill.training import train, window_dropout_schedule
    student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
    mixers = [student.model.layers[i].self_attn for i in (0, 2)]
    probe, seen = _Probe(), []
    schedule = window_dropout_schedule(student, 0.6)

    def progress(fraction):
        schedule(fraction)
        seen.append((fraction, mixers[0].window_dropout, mixers[1].window_dropout))
    summary = train(probe, [probe.proj.weight], rows(), TrainOptions(lr=1e-3, batch_size=4), tmp_path, "s", progress)
    steps = summary["steps"]
    assert [f for f, _, _ in seen] == [i / steps for i in range(steps)] + [1.0]
    assert [p for _, p, _ in seen] == pytest.approx([0.6 * (1 - i / steps) for i in range(steps)] + [0.0])
    assert all(a == b for _, a, b in seen) and mixers[0].window_dropout == 0.0
    assert window_dropout_schedule(student, 0.0) is None


def test_a_shorter_training_window_is_the_student_converted_with_that_window_and_is_given_back():
    teacher = make_teacher("llama")
    wide = convert(teacher, {"type": "hedgehog", "window": 6}, [0, 2])
    narrow = convert(teacher, {"type": "hedgehog", "window": 3}, [0, 2])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with wide.mixer_window(3):
            assert torch.allclose(wide(ids).logits, narrow(ids).logits, atol=1e-5)
        assert not torch.allclose(wide(ids).logits, narrow(ids).logits, atol=1e-3)
    assert all(wide.model.layers[i].self_attn.window == 6 for i in (0, 2))


def test_attention_transfer_with_a_training_window_trains_the_mixers_and_keeps_their_window(tmp_path):
    student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 6}, [0, 2])
    summary = train_attention_transfer(student, rows(), out_dir=tmp_path, opts=TrainOptions(lr=3e-2, batch_size=4),
                                       eval_rows=rows(12, seed=1), train_window=2)
    assert all(err["after"]["mse"] < err["before"]["mse"] for err in summary["layer_errors"].values())
    assert all(student.model.layers[i].self_attn.window == 6 for i in (0, 2))


def full_logits_loss(z_s, z_t, labels, T, kl_weight, ce_weight):
    """The stage loss as it was computed before chunking: [B, T, V] logits of both models at once."""
    kl = F.kl_div(F.log_softmax(z_s.float() / T, -1), F.log_softmax(z_t.float() / T, -1), log_target=True,
                  reduction="none").sum(-1).mean() * T * T
    ce = F.cross_entropy(z_s.float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return kl_weight * kl + ce_weight * ce, kl, ce


@pytest.mark.parametrize("trains_head", [False, True], ids=["head-frozen", "head-trained"])
def test_chunked_loss_equals_the_full_logits_loss_with_a_llama3_vocabulary(trains_head):
    """Hidden states in, the LM head applied per chunk: the same loss, KL and CE, and the same gradients of the
    student's hidden states (and head), as the full [B, T, 128,256] logits; chunks that do not divide the rows."""
    from distill.distillation import ChunkedDistillation, next_token_targets
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 24, 16, 128_256
    h_s, h_t = torch.randn(B, T, D, generator=g, requires_grad=True), torch.randn(B, T, D, generator=g)
    w_s = (torch.randn(V, D, generator=g) / 4).requires_grad_(trains_head)
    w_t = torch.randn(V, D, generator=g) / 4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 5] = -100
    for temperature, kl_weight, ce_weight in ((1.0, 1.0, 0.0), (2.0, 0.7, 0.4)):
        ref = full_logits_loss(h_s @ w_s.T, h_t @ w_t.T, labels, temperature, kl_weight, ce_weight)
        ref_grads = torch.autograd.grad(ref[0], [h_s] + ([w_s] if trains_head else []))
        got = ChunkedDistillation.apply(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t, next_token_targets(labels),
                                        temperature, kl_weight, ce_weight, 20)
        grads = torch.autograd.grad(got[0] * 3.0, [h_s] + ([w_s] if trains_head else []))   # backward scales
        for a, b in zip(got, ref):
            assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()), (a, b)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, 3.0 * b, rtol=1e-5, atol=1e-8)


def test_distill_loss_on_a_student_equals_the_loss_from_its_logits():
    """The stage's module (hidden states, chunked heads, the teacher under inference mode) against the loss computed
    from both models' logits, on a student with a Llama-3-sized vocabulary: same value, same mixer gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.distillation import DistillLoss
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128_256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    student = randomize_mixers(convert(LlamaForCausalLM(cfg).eval(), {"type": "gated_deltanet"}, [1]))
    params = [p for n, p in student.named_parameters() if ".self_attn." in n and ".attn." not in n]
    ids = torch.randint(0, 128_256, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(2, -1)
    loss, extras = DistillLoss(student, student, 2.0, 1.0, 0.5)(ids, pos, ids)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad(), student.teacher_attention():
        z_t = student(input_ids=ids, position_ids=pos, use_cache=False).logits
    ref, kl, ce = full_logits_loss(student(input_ids=ids, position_ids=pos, use_cache=False).logits, z_t, ids, 2.0,
                                   1.0, 0.5)
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item() and torch.allclose(extras["kl"], kl)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_each_phase_reports_its_own_peak_memory():
    """``reset_peak_memory`` starts a new peak (Linux: the resident high-water mark), so a small phase after a large
    one reports its own peak, not the large one's (stages and evaluation points are measured this way)."""
    from distill.training import peak_memory_gb, process_peak_memory_gb, reset_peak_memory
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    big = torch.ones(100 * 2 ** 20)   # 400 MB, written: resident
    large = peak_memory_gb(cpu)
    del big
    reset_peak_memory(cpu)
    small = torch.ones(2 ** 20)
    assert small.sum() > 0 and peak_memory_gb(cpu) < large - 0.3, (peak_memory_gb(cpu), large)
    assert process_peak_memory_gb(cpu) >= large   # the process's peak survives the resets


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident size from /proc")
def test_memory_freed_between_phases_goes_back_to_the_system(tmp_path):
    """Tensors under glibc's (grown) mmap threshold live in its heap; freed between live ones they stay resident
    until ``release_freed_memory`` trims the heap, so without it the next phase would start from this one's peak.
    In a fresh process, so that the heap's layout is this test's."""
    script = """
import torch
from pathlib import Path
from distill.training import release_freed_memory
def rss():
    return int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith("VmRSS:"))) / 2 ** 20
once = torch.ones(30 * 2 ** 18)
del once   # a freed 30 MB mapping raises glibc's mmap threshold to 30 MB
big, pins = [], []
for _ in range(40):
    big.append(torch.ones(5 * 2 ** 20))   # 20 MB each, in the heap now
    pins.append(torch.ones(2 ** 18))   # a live 1 MB tensor after each, from the heap top: the freed ones are holes
start = rss()
del big
held = rss()
release_freed_memory()
print(start, held, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    start, held, released = map(float, out.stdout.split())
    assert held > start - 0.3, "the heap returned the holes by itself: this test no longer sees the effect"
    assert released < held - 0.6, (start, held, released)
