"""Two processes (accelerate's launcher, DDP over gloo on CPU) train like one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
STAGES = ("stages=[{{name: attention_transfer, data: builtin:python-docs, tokens: 2048, seq_len: 64, "
          "batch_size: {bs}, eval_rows: 0}}, {{name: distill, data: builtin:python-docs, tokens: 1024, seq_len: 64, "
          "batch_size: {bs}, lr: 0.01, lora: {{r: 4, target_modules: [q_proj, v_proj]}}}}]")


def args(out, bs):
    return ["run", "tests/recipes/tiny.yaml", f"output_dir={out}", "device=cpu", STAGES.format(bs=bs)]


def logs(out):
    return {stage: [json.loads(line) for line in (out / "stages" / stage / "log.jsonl").read_text().splitlines()]
            for stage in ("0-attention_transfer", "1-distill")}


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, cli, monkeypatch):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launcher, "-m", "convert", *args(tmp_path / "two", 2)], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    two = logs(tmp_path / "two")                            # 2 processes x 2 rows
    monkeypatch.chdir(REPO)
    code, _, stderr = cli(*args(tmp_path / "one", 4))      # 1 process (this one) x 4 rows
    assert code == 0, stderr[-3000:]
    one = logs(tmp_path / "one")
    planned = [st["planned_steps"] for st in json.loads((tmp_path / "two" / "report.json").read_text())["stages"]]
    for i, stage in enumerate(one):
        assert len(one[stage]) == len(two[stage]) == planned[i] > 0, stage   # steps planned from each shard
        assert two[stage][-1]["lr"] == 0.0, stage                            # the cosine schedule ran to its end
        for a, b in zip(one[stage], two[stage]):
            assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]       # the same global batch and schedule
            # same batches and updates; only the order of fp32 reductions differs
            assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]) + 1e-7, (stage, a["step"], a["loss"], b["loss"])
    assert (tmp_path / "two" / "report.json").is_file() and (tmp_path / "two" / "student" / "config.json").is_file()
