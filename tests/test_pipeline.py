"""End to end: `python -m convert run` on a builtin tiny teacher, offline, then a fresh process loads the
student with trust_remote_code and generates 32 tokens."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    env = {**os.environ, "RNNIFY_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "convert", "run", str(REPO / "tests/recipes/tiny.yaml"),
                          f"output_dir={tmp / 'out'}", "eval.max_tokens=2048",
                          "eval.tasks=[{name: piqa_offline, limit: 8}, {name: lambada_openai_offline, limit: 8}]",
                          "eval.speed={lengths: [32, 128], new_tokens: 4}"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out", res


def test_run_writes_report_with_teacher_and_student_perplexity(run_dir):
    out, res = run_dir
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    assert math.isfinite(ppl["teacher"]) and math.isfinite(ppl["student"]) and ppl["teacher"] > 1
    assert report["teacher_untrained"] is True and "untrained" in res.stdout
    assert Path(report["teacher_path"], "config.json").is_file()
    assert report["mixer_layers"] == [1, 2, 3] and report["attention_layers"] == [0]
    assert "held-out perplexity" in res.stdout


def test_run_trains_the_recipe_stages_and_reports_each(run_dir):
    out, res = run_dir
    report = json.loads((out / "report.json").read_text())
    stage, distill = report["stages"]
    assert stage["name"] == "attention_transfer" and stage["tokens"] == 4096 and stage["steps"] == 8
    assert distill["name"] == "distill" and distill["steps"] == 4 and distill["lora_parameters"] > 0
    assert math.isfinite(stage["perplexity"]) and report["perplexity"]["student"] == distill["perplexity"]
    assert "student_after_init" in report["perplexity"]
    folder = out / "stages" / "0-attention_transfer"
    assert len((folder / "log.jsonl").read_text().splitlines()) == 8
    errors = json.loads((folder / "layer_errors.json").read_text())
    assert sorted(errors) == ["1", "2", "3"] and errors["1"]["after"]["relative_mse"] >= 0
    assert (folder / "loss.png").stat().st_size > 1000
    assert "after stage 0" in res.stdout and "after stage 1" in res.stdout
    assert (out / "stages" / "1-distill" / "loss.png").is_file()


def test_run_evaluates_tasks_and_speed_and_writes_the_report(run_dir):
    out, res = run_dir
    report = json.loads((out / "report.json").read_text())
    for point in ("teacher", "student"):
        piqa = report["tasks"][point]["piqa_offline"]
        assert 0 <= piqa["metrics"]["acc"] <= 1 and piqa["samples"] == 8
        assert report["tasks"][point]["lambada_openai_offline"]["metrics"]["perplexity"] > 1
    assert report["tasks"]["student"]["piqa_offline"]["command"].startswith(
        f"lm_eval --model hf --model_args pretrained={(out / 'student').resolve()},trust_remote_code=True")
    assert list((out / "lm_eval" / "teacher" / "piqa_offline").rglob("results_*.json"))
    assert list((out / "lm_eval" / "after_stage_1" / "piqa_offline").rglob("samples_piqa_offline_*.jsonl"))
    rows = {(r["model"], r["context"]): r for r in report["speed"]["rows"]}
    assert rows[("teacher", 128)]["cache_mb"] > 2 * rows[("teacher", 32)]["cache_mb"]
    # 3 of 4 layers hold a fixed-size state: the student's cache is the smaller one by 128 tokens
    assert rows[("student", 128)]["cache_mb"] < rows[("teacher", 128)]["cache_mb"]
    smaller_from = 32 if rows[("student", 32)]["cache_mb"] < rows[("teacher", 32)]["cache_mb"] else 128
    assert report["speed"]["crossover"]["student"]["cache_mb"] == smaller_from
    text = (out / "REPORT.md").read_text()
    for heading in ("## Perplexity", "## lm-eval tasks", "## Speed and memory against context", "## Training",
                    "## Reproduce the student's task figures with lm-eval"):
        assert heading in text, heading
    assert "| piqa_offline | acc_norm | 0 | 8 |" in text and "student − teacher" in text
    assert (out / "speed.png").stat().st_size > 1000
    assert "lm-eval" in res.stdout and f"smaller cache from {smaller_from} tokens" in res.stdout


def test_compare_puts_two_reports_side_by_side(run_dir, tmp_path):
    out, _ = run_dir
    other = json.loads((out / "report.json").read_text())
    other["perplexity"]["student"] += 1.0
    (tmp_path / "report.json").write_text(json.dumps(other))
    res = subprocess.run([sys.executable, "-m", "convert", "compare", str(out), str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "| perplexity: student |" in res.stdout and "| +1.00 |" in res.stdout
    assert "piqa_offline acc_norm: student" in res.stdout and "student cache MB at 128" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "convert", "compare", str(out), str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "no report.json there" in bad.stderr


def test_run_saves_resolved_recipe_with_hash(run_dir):
    out, _ = run_dir
    text = (out / "recipe.resolved.yaml").read_text()
    digest = json.loads((out / "report.json").read_text())["recipe_hash"]
    assert text.startswith(f"# recipe hash: {digest}") and "eval:" in text and "max_tokens: 2048" in text


def test_fresh_process_loads_student_and_generates(run_dir):
    out, _ = run_dir
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(out / 'student')!r}
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
ids = tok("The while statement", return_tensors="pt")
gen = model.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
print(gen.shape[1] - ids["input_ids"].shape[1])
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "32"


def test_perplexity_of_uniform_model_is_vocab_size():
    from eval.perplexity import perplexity

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    windows = [torch.arange(n) % 50 for n in (8, 8, 5, 2)]
    assert perplexity(Uniform(), windows, batch_size=3) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(Uniform(), [torch.arange(1)])


def test_auto_keep_attention_keeps_the_layers_with_the_highest_stage1_error(tmp_path):
    env = {**os.environ, "RNNIFY_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "convert", "run", str(REPO / "tests/recipes/tiny.yaml"),
                          f"output_dir={tmp_path / 'out'}", "eval.max_tokens=1024", "convert.keep_attention={auto: 2}",
                          "stages.1.tokens=1024"], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    errors = json.loads((out / "stages" / "0-attention_transfer" / "layer_errors.json").read_text())
    assert sorted(errors) == ["0", "1", "2", "3"]   # stage 1 trains every layer
    worst = sorted(sorted(errors, key=lambda k: errors[k]["after"]["relative_mse"])[-2:], key=int)
    assert report["attention_layers"] == [int(k) for k in worst]
    assert report["stages"][0]["keep_attention_auto"] == {"by": "relative_mse", "kept": [int(k) for k in worst]}
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["mixer_layers"] == report["mixer_layers"] and len(config["mixer_layers"]) == 2
    assert all(config["layer_types"][int(k)] == "full_attention" for k in worst)
