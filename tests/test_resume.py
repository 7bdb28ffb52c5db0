"""Kill a run with SIGKILL during stage 2, run the same command again: it resumes from the last checkpoint and
ends with the same losses and weights as an uninterrupted run (CPU, deterministic)."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).parent.parent
STAGES = ("stages=[{name: attention_transfer, data: builtin:python-docs, tokens: 2048, seq_len: 64, batch_size: 4, "
          "eval_rows: 0, checkpoint_every: 2}, {name: distill, data: builtin:python-docs, tokens: 8192, seq_len: 64, "
          "batch_size: 4, lr: 0.01, checkpoint_every: 4, keep_checkpoints: 2, lora: {r: 4, target_modules: [q_proj]}}]")


def command(out):
    return [sys.executable, "-m", "convert", "run", "tests/recipes/tiny.yaml", f"output_dir={out}", "device=cpu",
            STAGES]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_sigkill_during_distill_then_rerun_matches_an_uninterrupted_run(tmp_path, cli, caplog, monkeypatch):
    straight = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True, cwd=REPO, env=ENV)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    checkpoints = out / "stages" / "1-distill" / "checkpoints"
    proc = subprocess.Popen(command(out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    def complete():   # a checkpoint is complete once its folder lost the .tmp suffix
        return [p for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp")]
    while not complete() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads((out / "stages" / "1-distill" / "log.jsonl").read_text().splitlines()[-1])["step"]

    again = subprocess.run(command(out), capture_output=True, text=True, cwd=REPO, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distill: resuming from" in again.stderr

    logs = [[json.loads(x) for x in (d / "stages" / "1-distill" / "log.jsonl").read_text().splitlines()]
            for d in (tmp_path / "a", out)]
    assert [r["step"] for r in logs[1]] == list(range(1, len(logs[0]) + 1)) and len(logs[0]) == 32 > killed_at
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]          # same batches, same updates
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["step-000028", "step-000032"]                                # pruned to the last two
    a, b = (load_file(d / "student" / "model.safetensors") for d in (tmp_path / "a", out))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)       # bit-identical weights


    # the same command once more: both stages are done, nothing is trained or evaluated again
    report = json.loads((out / "report.json").read_text())
    log_before = (out / "stages" / "1-distill" / "log.jsonl").read_text()
    # (this process runs the CLI from here on: no training is interrupted, and a new interpreter costs seconds)
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(REPO)
    code, _, stderr = cli(*command(out)[3:])
    assert code == 0, stderr[-3000:]
    assert caplog.text.count("done before: weights restored from its last checkpoint") == 2, caplog.text[-3000:]
    assert "evaluation of teacher: reused" in caplog.text
    again_report = json.loads((out / "report.json").read_text())
    assert again_report["perplexity"] == report["perplexity"] and again_report["stages"] == report["stages"]
    assert (out / "stages" / "1-distill" / "log.jsonl").read_text() == log_before
    c = load_file(out / "student" / "model.safetensors")
    assert all((a[k] == c[k]).all() for k in a)

    # a changed stage 2 is redone; stage 1, unchanged, is not
    caplog.clear()
    code, _, stderr = cli(*command(out)[3:-1], STAGES.replace("lr: 0.01", "lr: 0.02"))
    assert code == 0, stderr[-3000:]
    assert caplog.text.count("done before") == 1 and "distill: resuming from" not in caplog.text
    assert json.loads((out / "report.json").read_text())["stages"][1]["final_loss"] != report["stages"][1]["final_loss"]


def test_checkpoints_hold_the_trained_tensors_and_refuse_another_number_of_processes(tmp_path):
    import torch
    from accelerate import Accelerator

    from distill.training import ResumeError, fresh_accelerator_state, load_checkpoint, save_checkpoint, \
        save_only_trainable
    fresh_accelerator_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)                       # frozen, like the teacher's weights
    opt = torch.optim.AdamW(model[1].parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    accelerator.register_for_checkpointing(sched)
    accelerator.register_save_state_pre_hook(save_only_trainable(list(model[1].parameters())))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(accelerator, tmp_path, 4, 100, "fp", keep=2)
    path = tmp_path / "step-000004"
    assert set(load_file(path / "model.safetensors")) == {"1.weight", "1.bias"}   # not the frozen layer
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert load_checkpoint(accelerator, path) == (4, 100)
    assert torch.equal(model[1].weight, saved["1.weight"]) and not torch.equal(model[0].weight, saved["0.weight"])
    assert opt.state_dict()["state"], "the optimizer state came back"
    trainable = list(model[1].parameters())
    assert load_checkpoint(accelerator, path, trainable) == (4, 100)   # every trainable tensor is there
    from safetensors.torch import save_file
    held = load_file(path / "model.safetensors")
    save_file({"1.renamed_weight" if k == "1.weight" else k: v for k, v in held.items()}, path / "model.safetensors")
    with pytest.raises(ResumeError, match=r"step-000004: the checkpoint holds no 1\.weight: the trainable "
                                          r"parameters changed since it was written"):
        load_checkpoint(accelerator, path, trainable)
    save_file(held, path / "model.safetensors")
    state = json.loads((path / "rnnify_state.json").read_text())
    (path / "rnnify_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    try:
        load_checkpoint(accelerator, path)
    except ResumeError as e:
        assert "written by 2 process(es), resumed with 1" in str(e)
    else:
        raise AssertionError("expected a ResumeError")


def test_a_result_made_by_other_code_is_made_again_and_the_log_says_why(tmp_path, cli, caplog, monkeypatch):
    from rnnify.pipeline import provenance
    args = ["run", REPO / "tests/recipes/tiny.yaml", f"output_dir={tmp_path}", "device=cpu", "eval.max_tokens=512",
            "stages=[{name: attention_transfer, data: builtin:python-docs, tokens: 1024, seq_len: 64, batch_size: 4, "
            "eval_rows: 0, checkpoint_every: 2}]"]

    def run() -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="rnnify"):
            code, _, stderr = cli(*args)
        assert code == 0, stderr[-2000:]
        return caplog.text

    run()
    assert "done before: weights restored" in run()   # the same code: the stage and evaluations are reused
    real = provenance.installed_version
    monkeypatch.setattr(provenance, "installed_version", lambda name: "99.0" if name == "transformers" else real(name))
    text = run()
    change = f"transformers {real('transformers')} -> 99.0"
    assert f"stage 0 (attention_transfer): trained again: its result was made by other code ({change})" in text
    assert f"evaluation of teacher: measured again: the earlier one was made by other code ({change})" in text
    assert "done before" not in text
    done = json.loads((tmp_path / "stages" / "0-attention_transfer" / "done.json").read_text())
    assert done["code"]["transformers"] == "99.0" and done["code"]["rnnify_source"] == provenance.source_digest()
