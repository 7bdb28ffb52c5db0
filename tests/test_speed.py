"""Speed/memory against context: cache bytes grow with context for attention, stay flat for a recurrent student."""
import pytest
import torch

from convert.convert import convert
from eval.speed import cache_bytes, compare, crossovers, decode_ratio, markdown, measure, plot
from tests.conftest import make_teacher


def test_cache_memory_is_flat_for_the_student_and_linear_for_the_teacher(tmp_path):
    teacher = make_teacher("llama")
    student = convert(teacher, {"type": "gla"}, [0, 1, 2])
    result = compare({"teacher": teacher, "student": student}, [32, 64, 128], new_tokens=4, warmup=8)
    rows = {(r["model"], r["context"]): r for r in result["rows"]}
    t = [rows[("teacher", L)]["cache_mb"] for L in (32, 64, 128)]
    s = [rows[("student", L)]["cache_mb"] for L in (32, 64, 128)]
    assert s[0] == s[1] == s[2] > 0                                     # one state per layer, whatever the length
    assert t[1] > 1.5 * t[0] and t[2] > 1.5 * t[1]                       # K and V grow with every token
    cfg = teacher.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert abs(rows[("teacher", 128)]["cache_mb"] * 2 ** 20 - kv_per_token * (128 + 4)) <= kv_per_token * 2
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in result["rows"])
    assert result["crossover"]["student"]["cache_mb"] is not None
    table = markdown(result)
    assert "| 128 |" in table and "student decode speedup" in table
    assert f"cache memory from {result['crossover']['student']['cache_mb']:,} tokens on" in table
    plot(result, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_hybrid_student_cache_grows_only_with_its_kept_attention_layers():
    teacher = make_teacher("llama")
    hybrid = convert(teacher, {"type": "hedgehog", "window": 8}, [1, 2])
    a, b = (measure(hybrid, L, new_tokens=2)["cache_mb"] for L in (32, 96))
    full_a, full_b = (measure(teacher, L, new_tokens=2)["cache_mb"] for L in (32, 96))
    assert (b - a) == pytest.approx((full_b - full_a) / 3, rel=0.05)    # 1 of 3 layers keeps a KV cache


def test_crossover_is_where_the_student_wins_from_then_on():
    rows = [{"model": "teacher", "context": L, "decode_tokens_per_s": 10.0, "prefill_s": 1.0, "cache_mb": float(L)}
            for L in (1, 2, 4, 8)]
    speeds = {1: 12.0, 2: 8.0, 4: 11.0, 8: 20.0}
    rows += [{"model": "student", "context": L, "decode_tokens_per_s": speeds[L], "prefill_s": 2.0, "cache_mb": 3.0}
             for L in (1, 2, 4, 8)]
    assert crossovers(rows, "teacher") == {"student": {"decode_tokens_per_s": 4, "prefill_s": None, "cache_mb": 4}}


def test_table_says_where_the_student_is_slower_and_where_it_wins():
    rows = [{"model": "teacher", "context": L, "decode_tokens_per_s": 10.0, "prefill_s": 1.0, "cache_mb": float(L)}
            for L in (512, 1024)]
    rows += [{"model": "student", "context": L, "decode_tokens_per_s": 5.0, "prefill_s": 2.0, "cache_mb": 700.0}
             for L in (512, 1024)]
    table = markdown({"rows": rows, "crossover": crossovers(rows, "teacher")})
    assert "| 512 | 1.00 | 10.0 | 512.0 | 2.00 | 5.0 | 700.0 | 2.00× | 0.50× (0.50–0.50) | 1.37× |" in table
    assert ("student beats teacher on decode speed at none of the measured lengths; prefill time at none of the "
            "measured lengths; cache memory from 1,024 tokens on") in table


def test_a_decode_speedup_counts_only_when_it_holds_over_the_whole_range_of_repeats():
    def row(model, L, median, lo, hi):
        return {"model": model, "context": L, "decode_tokens_per_s": median, "decode_range": [lo, hi], "repeats": 5,
                "prefill_s": 1.0, "cache_mb": 1.0}
    rows = [row("teacher", 512, 10.0, 9.0, 11.0), row("teacher", 1024, 10.0, 9.5, 10.5),
            row("student", 512, 11.0, 8.0, 12.0),     # median faster, but its range overlaps the teacher's
            row("student", 1024, 12.0, 11.0, 13.0)]   # faster on every repeat
    cross = crossovers(rows, "teacher")
    assert cross["student"]["decode_tokens_per_s"] == 1024
    table = markdown({"rows": rows, "crossover": cross})
    assert "| 1.10× (0.73–1.33) |" in table and "**1.20× (1.05–1.37)**" in table   # bold only the one that holds
    assert "| 11.0 (8.0–12.0) |" in table


def test_prefill_is_timed_in_alternating_rounds_and_wins_only_over_its_whole_range():
    teacher = make_teacher("llama")
    student = convert(teacher, {"type": "gla"}, [0, 1, 2])
    result = compare({"teacher": teacher, "student": student}, [32, 64], new_tokens=2, warmup=8, prefill_repeats=3,
                     repeats=2)
    assert result["prefill_repeats"] == 3
    for r in result["rows"]:
        lo, hi = r["prefill_range"]
        assert r["prefill_repeats"] == 3 and 0 < lo <= r["prefill_s"] <= hi and r["repeats"] == 2
    student_rows = [r for r in result["rows"] if r["model"] == "student"]
    assert all(r["prefill_ratio"][1] <= r["prefill_ratio"][0] <= r["prefill_ratio"][2] for r in student_rows)

    def row(model, L, prefill, ratio=None):
        return {"model": model, "context": L, "decode_tokens_per_s": 10.0, "prefill_s": prefill, "cache_mb": 1.0,
                "prefill_range": [prefill * 0.9, prefill * 1.1], "prefill_repeats": 3,
                **({"prefill_ratio": ratio} if ratio else {})}
    rows = [row("teacher", 512, 1.0), row("teacher", 1024, 2.0),
            row("student", 512, 0.9, [0.9, 0.8, 1.05]),    # faster at the median, not in every round
            row("student", 1024, 1.8, [0.9, 0.85, 0.95])]  # faster in every round
    cross = crossovers(rows, "teacher")
    assert cross["student"]["prefill_s"] == 1024
    table = markdown({"rows": rows, "crossover": cross})
    assert "| 0.90× (0.80–1.05) |" in table and "| **0.90× (0.85–0.95)** |" in table
    assert "| 512 | 1.00 (0.90–1.10) |" in table


def test_measure_times_every_repeat_and_keeps_the_first_repeats_cache():
    teacher = make_teacher("llama")
    one, three = (measure(teacher, 32, new_tokens=2, repeats=r) for r in (1, 3))
    assert three["repeats"] == 3 and three["decode_range"][0] <= three["decode_tokens_per_s"] <= three["decode_range"][1]
    assert one["cache_mb"] == three["cache_mb"]


def test_cache_bytes_counts_shared_storage_once():
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache()
    k, v = torch.zeros(1, 2, 5, 4), torch.ones(1, 2, 5, 4)
    cache.update(k, v, 0)
    assert cache_bytes(cache) == 2 * k.numel() * 4
    cache.layers[0].values = cache.layers[0].keys    # one storage referenced twice
    assert cache_bytes(cache) == k.numel() * 4


def test_gpu_check_runs_its_steps_and_prints_one_summary(tmp_path, capsys):
    """The GPU script's own plumbing, rehearsed on CPU with its cheapest step (the two-stage bf16 run)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "eval" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--skip", "kernels", "bench"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| two-stage run, bf16 | ok |" in out and "perplexity teacher" in out
    assert (tmp_path / "summary.md").read_text() in out


def test_decode_profile_splits_a_token_into_module_kinds_for_teacher_and_student():
    """eval/decode_profile.py: every module kind timed once (a mixer's own attention module is not counted again),
    the parts of a token add up to its total, one markdown row per model with the ratio of totals."""
    from convert.convert import convert
    from eval.decode_profile import markdown, profile_decode
    from tests.conftest import make_teacher

    teacher = make_teacher("llama")
    student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
    rows = {name: profile_decode(model, 12, 6, repeats=2) for name, model in (("teacher", teacher),
                                                                               ("student", student))}
    for r in rows.values():
        assert r["total"] > 0 and r["token mixer"] > 0 and r["MLP"] > 0 and r["norms"] > 0 and r["LM head"] > 0
        # 3 layers: 3 token mixers (2 recurrent + 1 kept attention; a mixer's own attention is not counted again)
        assert r["modules_timed"] == {"token mixer": 3, "MLP": 3, "norms": 7, "LM head": 1}
    table = markdown(rows, 12, 6)
    assert "| model | total | token mixer | MLP | norms | LM head | rest | tokens/s | × teacher |" in table
    assert table.count("\n| teacher |") == 1 and table.count("\n| student |") == 1
    assert table.splitlines()[-2].endswith("| 1.00× |")
    prefill = {name: profile_decode(model, 12, 6, repeats=2, prefill=True)
               for name, model in (("teacher", teacher), ("student", student))}
    for r in prefill.values():   # the prefill's parts (times only: their sizes are the benchmark's to read)
        assert r["total"] > 0 and r["token mixer"] > 0 and r["MLP"] > 0
        assert r["modules_timed"] == {"token mixer": 3, "MLP": 3, "norms": 7, "LM head": 1}
    table = markdown(prefill, 12, 6, prefill=True)
    assert table.startswith("prefill of 12 tokens, ms") and "| prompt tokens/s |" in table


def test_decode_profile_pytorch_step_copy_decodes_without_the_fused_step(monkeypatch):
    """``--pytorch-step``'s student copy binds its rings to the PyTorch step (an unwrapped copy to the fused one),
    and the environment is left as it was."""
    import os

    from eval.decode_profile import with_pytorch_step
    from rnnify_kernels import hedgehog_window

    monkeypatch.delenv("RNNIFY_KERNELS_BACKEND", raising=False)
    fused_calls, fused_step = [], hedgehog_window.DecodeStep.__call__
    monkeypatch.setattr(hedgehog_window.DecodeStep, "__call__",
                        lambda *a, **kw: fused_calls.append(1) or fused_step(*a, **kw))
    for pytorch_step in (False, True):
        student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
        if pytorch_step:
            student.forward = with_pytorch_step(student.forward)
        fused_calls.clear()
        assert measure(student, 9, new_tokens=6)["decode_tokens_per_s"] > 0
        assert bool(fused_calls) != pytorch_step
    assert "RNNIFY_KERNELS_BACKEND" not in os.environ


def test_compare_times_the_models_in_alternating_rounds_and_reports_the_speedup_of_each_round():
    """Each model prefills in turn (prefill rounds alternating, reversed every other one), then decodes a first round
    in turn, then the rounds alternate (in reverse order every other round); the student's row carries its rate over
    the teacher's per round: [median, min, max]."""
    models = {"teacher": make_teacher("llama"),
              "student": convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])}
    calls = []
    for name, model in models.items():
        model.register_forward_pre_hook(lambda m, args, kwargs, name=name: calls.append((name, kwargs["input_ids"].shape[1])),
                                        with_kwargs=True)
    result = compare(models, [10], new_tokens=3, warmup=10, repeats=4)
    t, s = ("teacher", 1), ("student", 1)
    warmup = [("teacher", 10), t, t, ("student", 10), s, s]
    rounds = [("teacher", 10), ("student", 10), t, t, t, s, s, s] + [s] * 3 + [t] * 3 + [t] * 3 + [s] * 3 + [s] * 3 + [t] * 3
    assert calls == warmup + rounds
    calls.clear()
    compare(models, [10], new_tokens=1, warmup=10, repeats=1, prefill_repeats=3)   # prefill rounds alternate too
    assert calls[6:] == [("teacher", 10), ("student", 10), ("student", 10), ("teacher", 10), ("teacher", 10),
                         ("student", 10), t, s]
    rows = {r["model"]: r for r in result["rows"]}
    median, low, high = rows["student"]["decode_speedup"]
    assert result["paired"] and rows["student"]["repeats"] == rows["teacher"]["repeats"] == 4
    assert 0 < low <= median <= high and "decode_speedup" not in rows["teacher"]
    assert decode_ratio(rows["student"], rows["teacher"]) == (median, low, high)


def test_a_paired_speedup_counts_only_when_the_student_is_faster_in_every_round():
    def row(model, L, speedup=None):
        r = {"model": model, "context": L, "decode_tokens_per_s": 10.0, "decode_range": [8.0, 12.0], "repeats": 5,
             "prefill_s": 1.0, "cache_mb": 1.0}
        return {**r, "decode_speedup": speedup} if speedup else r
    rows = [row("teacher", 512), row("teacher", 1024),
            row("student", 512, [1.04, 0.97, 1.10]),    # faster in most rounds, not in all
            row("student", 1024, [1.20, 1.05, 1.30])]   # faster in every round
    cross = crossovers(rows, "teacher")
    assert cross["student"]["decode_tokens_per_s"] == 1024
    table = markdown({"rows": rows, "crossover": cross})
    assert "| 1.04× (0.97–1.10) |" in table and "**1.20× (1.05–1.30)**" in table
