"""The converted student: equivalence of its parallel and recurrent forms, teacher reproduction, padding,
constant decode memory, and save/load into a process that has only torch + transformers."""
import json
import subprocess
import sys

import pytest
import torch

from convert.convert import convert, save_student
from tests.conftest import ARCH_CONFIGS, MIXERS, make_teacher, randomize_mixers


def prefill_then_decode_logits(model, ids, split):
    out = model(ids[:, :split], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(split, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", ARCH_CONFIGS)
@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_parallel_equals_prefill_plus_decode(arch, mixer):
    student = randomize_mixers(convert(make_teacher(arch), mixer, [0, 2]))   # layer 1 keeps attention (hybrid)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        stepped = prefill_then_decode_logits(student, ids, split=7)
    assert (full - stepped).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCH_CONFIGS)
def test_zero_converted_layers_reproduce_teacher_exactly(arch):
    teacher = make_teacher(arch)
    student = convert(teacher, {"type": "gla"}, [])
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_all_layers_converted_generate_with_linear_cache_only():
    from transformers.cache_utils import LinearAttentionLayer
    student = convert(make_teacher("llama"), {"type": "gated_deltanet"}, [0, 1, 2])
    ids = torch.randint(0, 97, (1, 6))
    out = student.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                           pad_token_id=0)
    assert out.sequences.shape == (1, 14)
    assert all(isinstance(layer, LinearAttentionLayer) for layer in out.past_key_values.layers)


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_left_padded_batch_generates_the_same_tokens(mixer):
    student = randomize_mixers(convert(make_teacher("llama"), mixer, [0, 2]))
    prompts = [torch.randint(2, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4)]
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    batched = student.generate(ids, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = student.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long), **kw)
        assert torch.equal(batched[i], alone[0, p.numel():])


@pytest.mark.parametrize("mixer", [{"type": "hedgehog", "window": 8}, {"type": "gla"}], ids=["window", "gla"])
def test_decode_memory_does_not_grow_with_generated_length(mixer):
    student = convert(make_teacher("llama"), mixer, [0, 1, 2])
    ids = torch.randint(0, 97, (1, 4))

    def cache_bytes(n_new):
        out = student.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               return_dict_in_generate=True, pad_token_id=0)
        total = 0
        for layer in out.past_key_values.layers:
            total += sum(s.numel() * s.element_size() for s in layer.recurrent_states.values() if s is not None)
            for kv in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                total += kv.numel() * kv.element_size() if isinstance(kv, torch.Tensor) else 0
        return total

    assert cache_bytes(16) == cache_bytes(64) > 0


def test_save_load_round_trip_in_fresh_process_without_rnnify(tmp_path, tokenizer):
    """A windowed Hedgehog student and a gated DeltaNet one (short conv, output gate), saved and loaded in one
    fresh interpreter that has neither rnnify's kernels nor its converter: same logits, same greedy tokens, and
    each says once which ops it runs."""
    from transformers import LlamaConfig, LlamaForCausalLM
    mixers = {"hedgehog-window": {"type": "hedgehog", "window": 24},   # > the 17-token prompt: its prefill runs an op
              "gated_deltanet-conv-gate": {"type": "gated_deltanet"}}
    ids = torch.tensor([tokenizer("The if statement is used for")["input_ids"]])
    folders, refs = {}, {}
    for name, mixer in mixers.items():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        student = randomize_mixers(convert(LlamaForCausalLM(cfg).eval(), mixer, [1, 2]))
        folders[name] = str(save_student(student, tmp_path / name, tokenizer))
        with torch.no_grad():
            ref = student(ids).logits
        refs[name] = {"ref": ref, "expected": student.generate(ids, max_new_tokens=32, min_new_tokens=32,
                                                               do_sample=False)}
    torch.save({"ids": ids, "refs": refs}, tmp_path / "ref.pt")
    code = f"""
import logging, sys
sys.modules["rnnify_kernels"] = None; sys.modules["rnnify"] = None; sys.modules["convert"] = None   # rnnify is not installed here
logging.basicConfig(level=logging.INFO)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = torch.load({str(tmp_path / 'ref.pt')!r})
for name, folder in {folders!r}.items():
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    diff = (m(d["ids"]).logits - d["refs"][name]["ref"]).abs().max().item()
    out = m.generate(d["ids"], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    same = torch.equal(out, d["refs"][name]["expected"])
    print(name, diff, out.shape[1] - d["ids"].shape[1], type(m).__name__, same)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()[-2:]
    for name, line in zip(mixers, lines):
        got, diff, new_tokens, cls, same_tokens = line.split()
        assert got == name and float(diff) == 0.0 and int(new_tokens) == 32 and cls == "RnnifyForCausalLM"
        assert same_tokens == "True", name
    # each student's runtime says once which ops it runs
    assert res.stderr.count("on cpu this student runs the PyTorch ops bundled beside it (rnnify_ops.py)") == 2
    assert res.stderr.count("rnnify's kernels are not importable") == 2
    for name, mixer in mixers.items():
        folder = tmp_path / name
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rnnify.RnnifyForCausalLM"
        kind = "hybrid_sliding" if mixer.get("window") else "linear_attention"
        assert config["layer_types"] == ["full_attention", kind, kind]
        for file in ("model.safetensors", "rnnify_ops.py", "rnnify_common.py", "rnnify_fla.py", "modeling_rnnify.py",
                     "generation_config.json", "tokenizer.json"):
            assert (folder / file).is_file(), (name, file)


def test_converted_layers_reuse_teacher_projections():
    teacher = make_teacher("qwen3")
    student = convert(teacher, {"type": "mamba2"}, [1])
    mixer = student.model.layers[1].self_attn
    assert torch.equal(mixer.attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(mixer.attn.k_norm.weight, teacher.model.layers[1].self_attn.k_norm.weight)
    assert type(student.model.layers[0].self_attn).__name__ == "Qwen3Attention"


def test_unsupported_teacher_lists_supported_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"supported: llama, mistral, phi3, qwen2, qwen3.*arch_llama.py"):
        convert(teacher, {"type": "gla"}, [0])


@pytest.mark.parametrize("mixer", [{"type": "gla"}, {"type": "hedgehog", "window": 6}], ids=["gla", "window=teacher's"])
def test_mistral_sliding_window_teacher_keeps_its_window_on_kept_layers(mixer):
    teacher = make_teacher("mistral", sliding_window=6)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(convert(teacher, mixer, []).forward(ids).logits, teacher(ids).logits)
        student = randomize_mixers(convert(teacher, mixer, [1]))
        assert student.config.layer_types[0] == "sliding_attention"
        full = student(ids, use_cache=False).logits
        assert (full - prefill_then_decode_logits(student, ids, split=9)).abs().max().item() <= 1e-4


def test_a_sliding_window_teacher_converts_to_a_hybrid_with_another_mixer_window():
    """Mistral-style teacher (window 6) + Hedgehog with a 4-token window: the kept layers keep the teacher's window
    through the student's windowed attention, exactly the teacher's sliding window; the mixers get their own."""
    teacher = make_teacher("mistral", sliding_window=6)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    mixer = {"type": "hedgehog", "window": 4, "sink": False}
    with torch.no_grad():
        none_converted = convert(teacher, mixer, [])
        torch.testing.assert_close(none_converted(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
        student = randomize_mixers(convert(teacher, mixer, [1]))
        assert student.config.layer_types == ["chunked_attention", "hybrid_sliding", "chunked_attention"]
        assert student.config.attention_chunk_size == 6 and student.config.sliding_window == 4
        full = student(ids, use_cache=False).logits
        assert (full - prefill_then_decode_logits(student, ids, split=9)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_multi_token_continuation_of_a_cache(mixer):
    """Chunked prefill: a second multi-token forward continues the cached state exactly."""
    student = randomize_mixers(convert(make_teacher("llama"), mixer, [0, 2]))
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :7], use_cache=True)
        parts = [out.logits]
        out = student(ids[:, 7:18], cache=out.cache, use_cache=True)
        parts.append(out.logits)
        for t in range(18, 23):
            out = student(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            parts.append(out.logits)
    assert (full - torch.cat(parts, 1)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(str(v) for v in m.values()))
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_rows_equal_separate_documents(arch, mixer):
    """Packed rows (position_ids restarting at 0) give each document the logits it gets alone: no state,
    window or attention crosses a document boundary, in mixer layers and in the kept attention layer."""
    student = randomize_mixers(convert(make_teacher(arch), mixer, [0, 2]))
    g = torch.Generator().manual_seed(0)
    rows = [[7, 3, 9], [11, 2, 6]]    # document lengths per row (the middle one longer than the window)
    docs = [[torch.randint(0, 97, (n,), generator=g) for n in row] for row in rows]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    with torch.no_grad():
        packed = student(ids, position_ids=pos, use_cache=False).logits
        alone = torch.stack([torch.cat([student(d[None], use_cache=False).logits[0] for d in row]) for row in docs])
        unpacked = student(ids, use_cache=False).logits
    assert (packed - alone).abs().max().item() <= 1e-4
    assert (unpacked - alone).abs().max().item() > 1e-3    # without the boundaries, documents do leak


# Mamba2 with Hedgehog features runs the same op at the same shapes as windowless Hedgehog (2F keys, D + 1 values)
@pytest.mark.parametrize("mixer", [m for m in MIXERS if m.get("feature_map") != "hedgehog"],
                         ids=lambda m: "-".join(str(v) for v in m.values()))
def test_student_on_triton_kernels_matches_torch_kernels(mixer, monkeypatch):
    """The mixers run on the Triton kernels (interpreted on CPU here): same logits, training gradients and decode."""
    student = randomize_mixers(convert(make_teacher("llama"), mixer, [0, 2]))
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", backend)
        student.zero_grad()
        logits = student(ids, use_cache=False).logits
        logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        with torch.no_grad():
            stepped = prefill_then_decode_logits(student, ids, split=7)
        results[backend] = (logits.detach(), grads, stepped)
    (l_t, g_t, s_t), (l_x, g_x, s_x) = results["torch"], results["triton"]
    assert (l_t - l_x).abs().max().item() <= 1e-4 and (s_t - s_x).abs().max().item() <= 1e-4
    for name, g in g_t.items():
        err = (g_x[name] - g).abs().max().item()
        assert err <= 1e-4 * max(1.0, g.abs().max().item()), (name, err, g.abs().max().item())


@pytest.mark.parametrize("arch", ARCH_CONFIGS)
def test_teacher_attention_mode_is_the_teacher(arch):
    """Inside `teacher_attention()` every converted layer runs its original attention: the teacher's logits,
    also for packed rows; `capture` holds each converted layer's attention input and output."""
    teacher = make_teacher(arch, **({"sliding_window": 6} if arch == "mistral" else {}))
    mixer = {"type": "hedgehog", "window": 6} if arch == "mistral" else {"type": "gla"}
    student = randomize_mixers(convert(teacher, mixer, [0, 1, 2]))
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None].expand(2, -1)
    capture = {}
    with torch.no_grad():
        with student.teacher_attention(capture):
            mine = student(ids, use_cache=False).logits
            mine_packed = student(ids, position_ids=pos, use_cache=False).logits
        theirs = teacher(ids, use_cache=False).logits
        theirs_packed = teacher(ids, position_ids=pos, use_cache=False).logits
        converted = student(ids, use_cache=False).logits      # back to the mixers after the context
    assert (mine - theirs).abs().max().item() <= 1e-5
    assert (mine_packed - theirs_packed).abs().max().item() <= 1e-5
    assert (converted - theirs).abs().max().item() > 1e-3
    assert sorted(capture) == [0, 1, 2] and capture[1][0].shape == capture[1][1].shape == (2, 15, 64)


def test_restore_attention_equals_converting_with_those_layers_kept():
    from convert.convert import restore_attention
    teacher = make_teacher("mistral")
    mixer = {"type": "hedgehog", "window": 4}
    direct = convert(teacher, mixer, [1])
    restored = restore_attention(convert(teacher, mixer, [0, 1, 2]), [2, 0])
    assert restored.config.mixer_layers == [1] and restored.config.layer_types == direct.config.layer_types
    a, b = direct.state_dict(), restored.state_dict()
    assert a.keys() == b.keys()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, direct(ids).logits)
    with pytest.raises(ValueError, match=r"layers \[0\] are not converted"):
        restore_attention(restored, [0])


@pytest.mark.parametrize("mixer", [{"type": "hedgehog", "window": 5}, {"type": "gla"}], ids=["hedgehog-5", "gla"])
def test_attention_window_bounds_kept_layers_and_matches_its_own_cache(mixer):
    teacher = make_teacher("llama")
    student = randomize_mixers(convert(teacher, mixer, [0, 2], attention_window=6))
    assert student.config.layer_types[1] == "chunked_attention" and student.config.attention_chunk_size == 6
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        stepped = prefill_then_decode_logits(student, ids, split=7)
        assert (full - stepped).abs().max().item() <= 1e-4
        kept_only = convert(teacher, mixer, [], attention_window=6)   # every layer keeps windowed attention
        short, long = ids[:, :6], ids
        torch.testing.assert_close(kept_only(short).logits, teacher(short).logits)      # within the window: teacher
        assert (kept_only(long).logits[:, 6:] - teacher(long).logits[:, 6:]).abs().max() > 1e-3   # beyond: windowed
    out = student.generate(ids[:1, :10], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           return_dict_in_generate=True, pad_token_id=0)
    assert out.past_key_values.layers[1].keys.shape[-2] <= 6 + 1   # at most its window (+ the sink's slot)


@pytest.mark.parametrize("T, W, H, Hkv, query_block", [(19, 6, 4, 2, 64), (24, 6, 2, 2, 64), (7, 6, 3, 1, 64),
                                                       (19, 6, 4, 2, 4), (23, 8, 2, 1, 3), (6, 6, 2, 2, 4)])
@pytest.mark.parametrize("sink", [False, True])
def test_blocked_window_attention_equals_the_dense_sliding_mask(T, W, H, Hkv, query_block, sink, monkeypatch):
    """Blocks of Q queries (Q below, at and above the window; T within the window: plain causal), with and
    without the sink, against the dense mask (``sink_attention``, which the student takes when blocks do not
    apply), values and gradients."""
    import torch.nn.functional as F

    import convert.student.attention_windowed as windowed
    monkeypatch.setattr(windowed, "QUERY_BLOCK", query_block)
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, h, T, d, generator=g, requires_grad=True) for h, d in ((H, 8), (Hkv, 8), (Hkv, 5)))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = ((j <= i) & (j > i - W))[None, None]
    if sink:
        module = torch.nn.Module()
        module.rnnify_sink_key, module.rnnify_sink_value = torch.randn(Hkv, 8, generator=g), torch.randn(Hkv, 5, generator=g)
        dense = windowed.sink_attention(module, q, k, v, mask, None, W, 0.3, 0.0)
        blocked = windowed.blocked_window_attention(q, k, v, W, 0.3, sink=(module.rnnify_sink_key,
                                                                           module.rnnify_sink_value))
    else:
        dense = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                               attn_mask=mask, scale=0.3).transpose(1, 2)
        blocked = windowed.blocked_window_attention(q, k, v, W, 0.3)
    torch.testing.assert_close(blocked, dense, atol=1e-6, rtol=1e-5)
    grad = torch.randn(dense.shape, generator=g)
    for a, b in zip(torch.autograd.grad((blocked * grad).sum(), (q, k, v)),
                    torch.autograd.grad((dense * grad).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_windowed_prefill_runs_in_blocks_and_equals_the_dense_mask(monkeypatch):
    import convert.student.attention_windowed as windowed
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 5}, [0, 2],
                                       attention_window=6))
    calls = []
    blocked = windowed.blocked_window_attention
    monkeypatch.setattr(windowed, "blocked_window_attention", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = student(ids, attention_mask=torch.ones_like(ids)).logits
        assert len(calls) == 1   # the kept layer (1 of 3), once
        monkeypatch.setattr(type(student), "_blocked_window_applies", lambda *a: False)
        dense = student(ids).logits
    assert len(calls) == 1
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-4)


def test_windowed_layers_give_the_window_to_the_attention_kernel_except_as_the_teacher():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    student = convert(make_teacher("llama"), {"type": "gla"}, [0, 2], attention_window=4)
    seen, sdpa = [], ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("rnnify_test_spy", lambda *a, **k: seen.append(k.get("sliding_window")) or sdpa(*a, **k))
    student.model.layers[1].self_attn.config.rnnify_base_attention = "rnnify_test_spy"   # flash kernels need it
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        student(ids)
        with student.teacher_attention():
            student(ids)
        student(ids)
    assert seen == [4, None, 4]


def test_windowed_student_loads_and_generates_in_a_fresh_process(tmp_path, tokenizer):
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "gla"}, [0, 2], attention_window=4,
                                       attention_sink=True))
    save_student(student, tmp_path / "s", tokenizer)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    here = student.generate(torch.tensor([[1, 2, 3, 4, 5, 6]]), **kw)[0].tolist()
    code = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 's')!r}, trust_remote_code=True)
out = m.generate(torch.tensor([[1, 2, 3, 4, 5, 6]]), return_dict_in_generate=True, **{kw!r})
layer = out.past_key_values.layers[1]
print(m.config.layer_types[1], type(layer).__name__, layer.keys.shape[-2], m.config.attention_sink)
print(out.sequences[0].tolist())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    kinds, tokens = res.stdout.strip().splitlines()[-2:]
    assert kinds.split() == ["chunked_attention", "WindowRing", "5", "True"]   # decoded over 4 slots + the sink's
    assert tokens == str(here)   # the sink's weights came back with the model


def test_an_exported_student_loaded_beside_rnnifys_own_leaves_both_working(tmp_path, tokenizer):
    """Loading a saved student (its own copy of the windowed attention, registered with transformers by name) in a
    process that also runs rnnify's student: each keeps dispatching to its own copy (blocked prefill, ring decode)."""
    from transformers import AutoModelForCausalLM
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 3}, [0, 2],
                                       attention_window=4, attention_sink=True))
    save_student(student, tmp_path / "s", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=True).eval()
    assert type(loaded).__module__ != type(student).__module__   # the exported copy of the code
    ids = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(0))   # > 2 windows: blocked prefill
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)
        assert loaded.generate(ids, **kw).tolist() == student.generate(ids, **kw).tolist()


def sink_student(mixer_layers=(0, 2), window=6):
    return randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 5}, list(mixer_layers),
                                    attention_window=window, attention_sink=True))   # sinks randomized too


@pytest.mark.parametrize("T", [6, 11, 23])
@pytest.mark.parametrize("sink", [False, True])
def test_hedgehog_prefill_in_blocks_equals_the_scan_and_keeps_the_state_of_the_keys_left_behind(T, sink):
    """A prompt from an empty state runs window and linear parts in one pass of W-query blocks (prefix sums for
    the state); the same sums through the shifted scan (the packed path, one document per row), left padding
    included: outputs and gradients, and the state handed to the cache is Σ φ(k_j)ᵀ[v_j, 1] over j ≤ T − W."""
    from transformers.cache_utils import DynamicCache

    from convert.student.mixer_registry import PackedSequences
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 5, "sink": sink},
                                       [0, 2], attention_window=6))
    mixer = student.model.layers[0].self_attn
    g = torch.Generator().manual_seed(T)
    B, H, Hkv, D = 2, mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    valid = torch.ones(B, T)
    valid[1, :3] = 0   # left padding

    def run(packed=None, cache=None):
        v1 = mixer.with_normaliser(v, valid)
        return mixer._mix_windowed(q, k, v1, mixer.feature_map(q, mixer.feature_q), cache, packed)

    blocks = run()
    scan = run(packed=PackedSequences(torch.zeros(B, T, dtype=torch.long)))
    torch.testing.assert_close(blocks, scan, atol=1e-5, rtol=1e-4)
    grad = torch.randn(blocks.shape, generator=g)
    params = [q, k, v, mixer.feature_q, mixer.feature_k, mixer.window_factor]
    params += [mixer.rnnify_sink_key, mixer.rnnify_sink_value] if sink else []
    for a, b in zip(torch.autograd.grad((blocks * grad).sum(), params),
                    torch.autograd.grad((scan * grad).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        run(cache=cache)
        left = max(T - mixer.window + 1, 0)   # keys that have left the window
        phi_k = mixer.feature_map(mixer.expand(k), mixer.feature_k)[:, :left]
        v1 = mixer.expand(mixer.with_normaliser(v, valid))[:, :left]
        expected = torch.einsum("bthf,bthv->bhfv", phi_k, v1)
    torch.testing.assert_close(mixer.read_state(cache), expected, atol=1e-5, rtol=1e-4)


def test_attention_sink_is_seen_past_the_window_only_and_matches_its_own_cache():
    student = sink_student()
    plain = convert(make_teacher("llama"), {"type": "hedgehog", "window": 5}, [0, 2], attention_window=6)
    plain.load_state_dict(student.state_dict(), strict=False)   # the same weights, without the sink
    attn = student.model.layers[1].self_attn
    assert attn.rnnify_sink_key.shape == (2, 16) and attn.rnnify_sink_value.shape == (2, 16)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        torch.testing.assert_close(full[:, :6], plain(ids).logits[:, :6])       # first token still in the window
        assert (full[:, 6:] - plain(ids).logits[:, 6:]).abs().max() > 1e-3     # past it: the sink
        stepped = prefill_then_decode_logits(student, ids, split=7)
        assert (full - stepped).abs().max().item() <= 1e-4
        long = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))
        blocked = student(long, attention_mask=torch.ones_like(long)).logits   # > 2W from an empty cache: blocks
        dense = student(long, attention_mask=torch.ones_like(long), use_cache=False).logits
        with student.teacher_attention(), plain.teacher_attention():   # the teacher has no window, no sink
            torch.testing.assert_close(student(ids).logits, plain(ids).logits)
    torch.testing.assert_close(blocked, dense, atol=1e-5, rtol=1e-4)
    prompts = [torch.randint(2, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 4)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for i, p in enumerate(prompts):   # left padding: the sink follows each row's own positions
        ids[i, 13 - p.numel():], mask[i, 13 - p.numel():] = p, 1
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    batched = student.generate(ids, attention_mask=mask, **kw)[:, 13:]
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i], student.generate(p[None], **kw)[0, p.numel():])


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_windowed_decode_step_equals_the_general_form_and_follows_parameter_changes(monkeypatch, backend):
    """The one-token decode of a windowed Hedgehog (grouped heads, constants kept per cache, state updated in
    place) computes what the general windowed form computes, also after parameters change between steps: the
    fused C step (``rnnify_kernels.hedgehog_window``, the default on CPU) and the PyTorch step alike."""
    from convert.student.mixer_hedgehog import Hedgehog
    from rnnify_kernels import hedgehog_window

    if backend == "torch":
        monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "torch")
    used, fused_step = [], hedgehog_window.DecodeStep.__call__
    monkeypatch.setattr(hedgehog_window.DecodeStep, "__call__", lambda *a, **kw: used.append(1) or fused_step(*a, **kw))

    def decode(student):
        ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cache = student(ids[:, :7], use_cache=True).cache
            logits = []
            for t in range(7, 19):
                if t == 12:   # in place, as an optimizer step would: the kept constants must not go stale
                    for layer in (0, 2):
                        mixer = student.model.layers[layer].self_attn
                        mixer.feature_q.mul_(1.5)
                        mixer.window_factor.add_(1.0)
                        mixer.rnnify_sink_value.add_(0.5)
                logits.append(student(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        return torch.cat(logits, 1)

    def student():
        return randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 5, "sink": True},
                                        [0, 2], attention_window=6, attention_sink=True))

    fast = decode(student())
    assert bool(used) == (backend == "fused")
    def general_form(self, x, position_embeddings, valid, state, cache):
        q, k, v = self.project(x, position_embeddings)
        return self._mix_windowed(q, k, self.with_normaliser(v, valid), self.feature_map(q, self.feature_q), cache)

    monkeypatch.setattr(Hedgehog, "_decode_windowed", general_form)
    general = decode(student())
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=1e-4)


def test_a_student_that_decoded_with_the_fused_step_deep_copies_and_the_copy_decodes_alike():
    """The fused step's binding lives on the mixer (by weak reference, nothing of ctypes): a decoded model can
    be deep-copied (as layer selection does), and the copy binds its own rings."""
    import copy

    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 4, "sink": True},
                                       [0, 2], attention_window=6, attention_sink=True))
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(2))
    first = prefill_then_decode_logits(student, ids, split=5)
    twin = copy.deepcopy(student)
    torch.testing.assert_close(prefill_then_decode_logits(twin, ids, split=5), first, rtol=0, atol=0)


def test_windowed_decode_ring_survives_continuation_and_batch_reordering():
    """Decoding keeps a windowed layer's window as a ring of slots; a multi-token call after decoding (the ring
    back in order) and a beam-style reordering of the batch (applied to the ring as is) continue it exactly.
    The prompt is shorter than the window: no key has left it yet when decoding starts."""
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 4, "sink": True},
                                       [0, 2], attention_window=6, attention_sink=True))
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    swapped = torch.tensor([1, 0])
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :3], use_cache=True)
        parts = [out.logits]
        for t in range(3, 12):   # fills the ring and wraps it
            out = student(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            parts.append(out.logits)
        layer = out.cache.layers[0]
        assert layer.keys.shape[2] == layer.values.shape[2] == 4 + 1   # W slots + the sink's
        out = student(ids[:, 12:17], cache=out.cache, use_cache=True)   # the ring back in order
        parts.append(out.logits)
        assert layer.keys.shape[2] == 4 - 1
        for t in range(17, 23):
            out = student(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            parts.append(out.logits)
        kept = out.cache.layers[1]   # a new ring after the continuation: its last slot holds the sink again
        sink_key = student.model.layers[1].self_attn.rnnify_sink_key
        assert kept.keys.shape[2] == 6 + 1 and torch.equal(kept.keys[:, :, -1], sink_key.expand(2, -1, -1))
        out.cache.reorder_cache(swapped)
        for t in range(23, 30):
            out = student(ids[swapped, t:t + 1], cache=out.cache, use_cache=True)
            parts.append(out.logits[swapped])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_ring_bias_marks_the_slots_a_decoded_token_sees():
    from convert.student.attention_windowed import ring_bias
    inf = float("-inf")
    positions = torch.tensor([[7], [5]])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0                       # row 1: two left pads (cache positions 0, 1)
    mask[0, 5] = 0                        # row 0: position 5 masked
    bias = ring_bias(7, 4, mask, positions, sink=True, dtype=torch.float32)[:, 0, 0]
    # slots 0..3 hold cache positions 4, 5, 6, 7; slot 4 the sink (row 1 is at position 5 >= 4: seen too)
    assert bias.tolist() == [[0, inf, 0, 0, 0], [0, 0, 0, 0, 0]]
    early = ring_bias(2, 4, None, torch.tensor([[2]]), sink=True, dtype=torch.float32)[:, 0, 0]
    assert early.tolist() == [[0, 0, 0, inf, inf]]   # slot 3 never written yet; the sink not reached
    assert ring_bias(9, 4, None, torch.tensor([[9]]), sink=True, dtype=torch.float32) is None   # all seen: no mask
    assert ring_bias(7, 4, torch.ones(1, 8), torch.tensor([[7]]), sink=False, dtype=torch.float32) is None


def test_calibrated_sink_stands_in_exactly_for_the_first_token():
    """Calibrated on rows that all start like the input, the sink is that input's first-token key/value at every
    layer (position 0 sees only itself), so the student is the teacher attending to window + first token."""
    import torch.nn.functional as F
    from transformers.modeling_utils import AttentionInterface

    from distill.calibration import calibrate_attention_sinks
    from distill.distillation import added_parameters
    W, T = 5, 17

    def window_and_first_token(module, q, k, v, mask, dropout=0.0, scaling=None, **kwargs):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        allowed = (j <= i) & ((i - j < W) | (j == 0))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None

    AttentionInterface.register("rnnify_test_window_first", window_and_first_token)
    teacher = make_teacher("llama")
    student = convert(teacher, {"type": "gla"}, [], attention_window=W, attention_sink=True)   # all layers kept
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[0, :8].tolist(), "position_ids": list(range(8))} for _ in range(3)]
    assert calibrate_attention_sinks(student, rows, batch_size=2) == 3
    sinks = [p for n, p in student.named_parameters() if "rnnify_sink_" in n]
    assert len(sinks) == 6 and all(any(s is p for p in added_parameters(student)) for s in sinks)
    teacher.config._attn_implementation = "rnnify_test_window_first"
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-4)


def test_sink_calibration_takes_the_teachers_first_token_key_and_value():
    from distill.calibration import calibrate_attention_sinks
    teacher = make_teacher("llama")
    student = convert(teacher, {"type": "hedgehog", "window": 3, "sink": True}, [0, 2], attention_window=4,
                      attention_sink=True)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (8,), generator=g).tolist(), "position_ids": [0, 1, 2, 3, 0, 1, 2, 3]}
            for _ in range(3)]
    assert calibrate_attention_sinks(student, rows, batch_size=2) == 6   # two documents per row
    from distill.distillation import added_parameters
    added = added_parameters(student)
    assert len({id(p) for p in added}) == len(added)   # each once
    assert all(any(p is a for a in added) for n, p in student.named_parameters() if "rnnify_sink_" in n)
    firsts = torch.tensor([[r["input_ids"][0], r["input_ids"][4]] for r in rows]).flatten()
    with torch.no_grad():
        for i in (0, 1):   # a Hedgehog mixer, a kept windowed layer
            # position 0 sees only itself, so its input is the teacher's layer-i input on that token alone
            h = teacher.model.embed_tokens(firsts)[:, None]
            for layer in teacher.model.layers[:i]:
                h = layer(h, position_embeddings=teacher.model.rotary_emb(h, torch.zeros(1, 1, dtype=torch.long)))
            attn = teacher.model.layers[i].self_attn
            x = teacher.model.layers[i].input_layernorm(h)[:, 0]
            module = student.model.layers[i].self_attn
            torch.testing.assert_close(module.rnnify_sink_key, attn.k_proj(x).view(6, 2, 16).mean(0))
            torch.testing.assert_close(module.rnnify_sink_value, attn.v_proj(x).view(6, 2, 16).mean(0))


def test_mamba2_with_hedgehog_features_starts_as_the_windowless_hedgehog_it_is_given():
    """HedgeMamba's initialisation: C, B = φ(q), φ(k), normalised, decay ~1, no norm -> the aligned Hedgehog layer."""
    teacher = make_teacher("llama")
    hedgehog = randomize_mixers(convert(teacher, {"type": "hedgehog"}, [0, 1, 2]), seed=3)
    mamba = convert(teacher, {"type": "mamba2", "feature_map": "hedgehog", "normalise": True, "norm": False,
                              "rope": True, "a_init_range": (1e-7, 1e-7)}, [0, 1, 2])
    with torch.no_grad():
        for layer_h, layer_m in zip(hedgehog.model.layers, mamba.model.layers):
            layer_m.self_attn.feature_q.copy_(layer_h.self_attn.feature_q)
            layer_m.self_attn.feature_k.copy_(layer_h.self_attn.feature_k)
    assert mamba.model.layers[0].self_attn.D_skip.abs().max() == 0        # the skip starts closed
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hedgehog(ids).logits, mamba(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    with torch.no_grad():   # a decay that is not ~1 moves it away: the comparison can fail
        for layer in mamba.model.layers:
            layer.self_attn.A_log.fill_(2.0)
        assert (mamba(ids).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("mixer", ["mamba2", "gated_deltanet"])
def test_short_conv_and_gate_start_as_the_mixer_without_them(mixer):
    teacher = make_teacher("llama")
    plain = convert(teacher, {"type": mixer, "conv": 0, "gate": False}, [0, 1, 2])
    full = convert(teacher, {"type": mixer}, [0, 1, 2])
    assert full.model.layers[0].self_attn.conv.weight.shape == (4 * 16 + 2 * 2 * 16, 4)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_short_conv_taps_reach_back_within_a_document_only():
    from convert.student.mixer_registry import PackedSequences, ShortConv
    conv = ShortConv(2, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 10.0, 100.0], [0.0, 1.0, 0.0]]))
    x = torch.arange(1.0, 7.0)[None, :, None].expand(1, 6, 2)
    seq = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = conv(x, packed=PackedSequences(seq))
    assert out[0, :, 0].tolist() == [1.0, 12.0, 123.0, 4.0, 45.0, 456.0]   # x_t + 10 x_{t-1} + 100 x_{t-2}
    assert out[0, :, 1].tolist() == [0.0, 1.0, 2.0, 0.0, 4.0, 5.0]


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_every_mixer_starts_closer_to_the_attention_than_a_zero_output(mixer):
    """Relative error MSE / mean(y²) < 1 on held-out rows of the teacher's own activations, after calibration."""
    from distill.calibration import calibrate_output_norms
    from distill.attention_transfer import layer_errors
    from tests.test_distill import rows
    student = convert(make_teacher("llama"), mixer, [0, 1, 2])
    fitted = calibrate_output_norms(student, rows(24), batch_size=4)
    assert fitted == (0 if mixer["type"] == "hedgehog" or mixer.get("norm") is False else len(rows(24)) * 32)
    errors = layer_errors(student, rows(12, seed=1), batch_size=4)
    assert all(e["relative_mse"] < 1.0 for e in errors.values()), errors


def test_window_dropout_trains_dropped_heads_as_linear_attention_over_every_key_and_only_while_training():
    """A dropped (row, head) is the windowless Hedgehog with the same weights; nothing changes outside training
    (eval mode, or no gradients) or at probability 0; a probability in between drops some pairs, not all."""
    teacher = make_teacher("llama")
    windowed = randomize_mixers(convert(teacher, {"type": "hedgehog", "window": 4, "sink": True}, [0, 2]))
    plain = convert(teacher, {"type": "hedgehog"}, [0, 2])
    plain.load_state_dict(windowed.state_dict(), strict=False)   # the same feature maps, no window
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normal, linear = windowed(ids).logits, plain(ids).logits
    assert not torch.allclose(normal, linear, atol=1e-3)
    windowed.set_window_dropout(1 - 1e-9)   # every pair, almost surely
    with torch.no_grad():
        torch.testing.assert_close(windowed(ids).logits, normal)   # eval mode: no dropout
    windowed.train()
    torch.testing.assert_close(windowed(ids).logits, linear, atol=1e-5, rtol=1e-4)
    with torch.no_grad():   # no gradients: not training a step
        torch.testing.assert_close(windowed(ids).logits, normal)
    windowed.set_window_dropout(0.5)
    torch.manual_seed(0)
    half = windowed(ids).logits
    assert not torch.allclose(half, normal, atol=1e-4) and not torch.allclose(half, linear, atol=1e-4)
    windowed.set_window_dropout(0.0)
    torch.testing.assert_close(windowed(ids).logits, normal)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        windowed.set_window_dropout(1.0)
    with pytest.raises(ValueError, match="softmax window"):
        convert(teacher, {"type": "gla"}, [1]).set_window_dropout(0.5)


def test_recurrent_part_off_keeps_only_the_window_or_zeroes_the_mixer():
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    windowed = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 4, "sink": True}, [0, 2]))
    with torch.no_grad():
        trained = windowed(ids).logits
        with windowed.recurrent_part_off():
            off = windowed(ids).logits
            for m in (windowed.model.layers[0].self_attn, windowed.model.layers[2].self_attn):
                m.window_factor.fill_(30.0)   # window share 1 by the weights themselves
        torch.testing.assert_close(off, windowed(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(off, trained) and not windowed.model.layers[0].self_attn.recurrent_off
    assert set(windowed.window_shares()) == {0, 2}
    plain = convert(make_teacher("llama"), {"type": "gla"}, [1])
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad(), plain.recurrent_part_off():
        out, _ = plain.model.layers[1].self_attn(hidden)
    assert torch.equal(out, torch.zeros_like(out)) and plain.window_shares() == {}


@pytest.mark.parametrize("mixer", [{"type": "gated_deltanet"}, {"type": "gated_deltanet", "conv": 0, "gate": False},
                                   {"type": "mamba2"}, {"type": "mamba2", "rope": True, "conv": 2}],
                         ids=["gdn", "gdn-no-conv-no-gate", "mamba2", "mamba2-rope-conv2"])
def test_recurrent_decode_step_fused_equals_the_pytorch_step(monkeypatch, mixer):
    """Gated DeltaNet and Mamba2 decode one token per C call on CPU (``rnnify_kernels.ssm_step``: conv state and
    recurrent state in place); over a left-padded batch, its logits and its caches equal the PyTorch step's, and
    the cache's length counts every token."""
    from rnnify_kernels import ssm_step

    used, fused_step = [], ssm_step.decode_step
    monkeypatch.setattr(ssm_step, "decode_step", lambda *a, **kw: used.append(1) or fused_step(*a, **kw))
    ids = torch.randint(2, 97, (2, 15), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def decode(backend):
        if backend == "torch":
            monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "torch")
        student = randomize_mixers(convert(make_teacher("llama"), mixer, [0, 2]))
        used.clear()
        with torch.no_grad():
            out = student(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            cache, logits = out.cache, [out.logits[:, -1:]]
            for t in range(6, 15):
                if t == 10:   # in place, as an optimizer step would: nothing derived from them may go stale
                    for layer in (0, 2):
                        converted = student.model.layers[layer].self_attn
                        converted.attn.v_proj.weight.mul_(1.5)
                        (converted.beta_proj if hasattr(converted, "beta_proj") else converted.dt_proj).bias.add_(0.5)
                logits.append(student(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                                      use_cache=True).logits)
        monkeypatch.delenv("RNNIFY_KERNELS_BACKEND", raising=False)
        return torch.cat(logits, 1), cache, len(used)

    fused, fused_cache, calls = decode("fused")
    assert calls == 2 * 9   # two converted layers, nine decoded tokens
    reference, reference_cache, calls = decode("torch")
    assert calls == 0
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)
    for layer in (0, 2):
        mine, theirs = fused_cache.layers[layer], reference_cache.layers[layer]
        torch.testing.assert_close(mine.recurrent_states[0], theirs.recurrent_states[0], atol=1e-5, rtol=1e-4)
        if mixer.get("conv", 4):   # the conv state, and the token count transformers keeps beside it
            torch.testing.assert_close(mine.conv_states[0], theirs.conv_states[0], atol=1e-6, rtol=1e-5)
            assert int(mine.cumulative_length_linear) == int(theirs.cumulative_length_linear) == 15


def test_separate_mixing_normalises_window_and_linear_parts_on_their_own():
    """``mixing: separate`` (Liger-style): o_t = f·softmax-window average + (1−f)·φ-weighted average of the keys
    that left the window, each with its own normaliser (the window alone before any key has left it), computed
    directly from q, k, v and the feature maps for every position, against the layer's prefill."""
    W = 4
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": W, "sink": False,
                                                               "mixing": "separate"}, [0, 1, 2]))
    mixer = student.model.layers[1].self_attn
    T = 11
    x = torch.randn(2, T, student.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pe = student.model.rotary_emb(x, position_ids=torch.arange(T)[None])
        o = mixer.mix(x, pe, None, None)                                       # [B,T,H,D]
        q, k, v = mixer.project(x, pe)
        k, v = mixer.expand(k), mixer.expand(v)
        phi_q, phi_k = mixer.feature_map(q, mixer.feature_q), mixer.feature_map(k, mixer.feature_k)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * mixer.attn.scaling
        linear = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)
        f = torch.sigmoid(mixer.window_factor)[None, :, None]
        expected = torch.empty_like(o)
        for t in range(T):
            window = scores[:, :, t, max(0, t - W + 1):t + 1].softmax(-1)
            part = torch.einsum("bhs,bshd->bhd", window, v[:, max(0, t - W + 1):t + 1])
            if t >= W:
                weights = linear[:, :, t, :t - W + 1]
                old = torch.einsum("bhs,bshd->bhd", weights / weights.sum(-1, keepdim=True), v[:, :t - W + 1])
                part = f * part + (1 - f) * old
            expected[:, t] = part
    torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [3, 9], ids=["decode-from-inside-the-window", "decode-after-blocked-prefill"])
def test_separate_mixing_decodes_and_packs_as_its_parallel_form(split):
    """With a sink, separate mixing gives the same logits through prefill + decode (the PyTorch step: the fused C
    step mixes with one normaliser and is not used) and for packed documents as alone."""
    from rnnify_kernels import hedgehog_window
    student = randomize_mixers(convert(make_teacher("llama"), {"type": "hedgehog", "window": 4, "sink": True,
                                                               "mixing": "separate"}, [0, 2],
                                       attention_window=6, attention_sink=True))
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    calls = []
    fused = hedgehog_window.DecodeStep.__call__
    hedgehog_window.DecodeStep.__call__ = lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    try:
        with torch.no_grad():
            full = student(ids, use_cache=False).logits
            stepped = prefill_then_decode_logits(student, ids, split=split)
    finally:
        hedgehog_window.DecodeStep.__call__ = fused
    assert not calls
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
    pos = torch.cat([torch.arange(7), torch.arange(10)])[None].expand(2, -1)
    with torch.no_grad():
        packed = student(ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([student(ids[:, :7], use_cache=False).logits, student(ids[:, 7:], use_cache=False).logits], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
