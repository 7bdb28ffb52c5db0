"""``run``: recipe -> teacher -> student -> stages -> evaluation -> report, and ``evaluate_saved`` (``convert
eval``): the evaluation again on a finished run's saved student."""
from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from convert.convert import save_student
from convert.teachers import teacher_info
from distill.training import process_peak_memory_gb

from ..recipe import RecipeError, load_recipe, located, recipe_hash
from ..store import write_json_atomically
from .budget_curve import run_budget_curve
from .evaluation import Evaluation
from .inputs import all_stage_rows, check_tasks, heldout_windows, is_hub_dataset, load_teacher, position_windows, \
    process_state, resolve_device, unseen_windows, validate, windows_digest
from .training import build_student, conversion_fingerprint, run_stages

log = logging.getLogger("rnnify.pipeline")


def teacher_card(ref: str, location: str, info: dict) -> dict:
    """The teacher's licence and Hub id (for the student's model card): builtin metadata (with its description and
    source, e.g. the package and quantization it came from), else its model card."""
    if info.get("license") or info.get("base_model"):   # a builtin teacher: what it really is, from its marker
        return {"license": info.get("license"), "base_model": info.get("base_model"),
                "description": info.get("description"), "source": info.get("source")}
    try:
        from huggingface_hub import ModelCard
        card = ModelCard.load(str(Path(location) / "README.md") if Path(location).is_dir() else location)
        return {"license": card.data.license, "base_model": None if Path(location).is_dir() else ref}
    except (OSError, ValueError):   # no card, or offline (hub errors are OSError/ValueError): licence "other"
        return {"license": None, "base_model": None if Path(location).is_dir() else ref}


def publish(report: dict, out: Path) -> None:
    """report.json, REPORT.md, and the report's markdown on the console."""
    from eval.report import render, write as write_report
    write_json_atomically(out / "report.json", report)
    write_report(report, out)
    print(render(report))
    print(f"student: {report['student_path']}   report: {Path(report['student_path']).parent / 'REPORT.md'}")


def run(recipe_path: str, overrides: list[str] = ()) -> dict:
    with located(recipe_path):
        return _run(recipe_path, overrides)


def _run(recipe_path: str, overrides: list[str]) -> dict:
    from transformers import AutoTokenizer

    # under `accelerate launch`/torchrun every process runs this (CPU: gloo); one of them writes the outputs, and
    # the main one prepares what the others then read (builtin teacher, corpora, task data), so that no two
    # processes download and unpack the same thing
    device = resolve_device(load_recipe(recipe_path, overrides)[0].device)
    state = process_state(device)
    with state.main_process_first():
        recipe, resolved, location, teacher_config, layers = validate(recipe_path, overrides)
        check_tasks(recipe.eval, prepare=True)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = recipe_hash(resolved)
    main = state.is_main_process
    if main:
        (out / "recipe.resolved.yaml").write_text(f"# recipe hash: {digest}\n" + yaml.safe_dump(resolved, sort_keys=False))
    info = teacher_info(Path(location)) if Path(location).is_dir() else {}
    if info.get("untrained"):
        log.warning("the teacher %s is UNTRAINED (random weights): this run exercises the pipeline; "
                    "its perplexities say nothing about conversion quality", recipe.teacher)
    torch.manual_seed(recipe.seed)
    timings = {}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(location)
    # every stage's rows before any weights load: a budget the data cannot fill stops the run here
    all_rows = all_stage_rows(recipe, tokenizer)
    windows = heldout_windows(recipe, tokenizer)
    unseen, long_windows = unseen_windows(recipe, tokenizer), position_windows(recipe, tokenizer)
    timings["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = load_teacher(location, recipe.dtype, device)
    timings["load_teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student, calibrated = build_student(recipe.convert, recipe.stages, teacher, layers,
                                        all_rows[0][0] if recipe.stages else None)
    timings["convert_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    key = conversion_fingerprint(recipe, location, layers, calibrated)
    evaluation = Evaluation(recipe.eval, recipe.seed, tokenizer, windows, out, main,
                            partial(load_teacher, location, recipe.dtype, device),
                            key={"conversion": key, "eval": recipe.eval.model_dump(mode="json")}, unseen=unseen,
                            position_windows=long_windows)
    teacher_point = evaluation.teacher(teacher, location)
    ppl = {"teacher": teacher_point["perplexity"],
           "student_after_init": evaluation.perplexity(student, "student_after_init")}
    unseen_ppl = {"teacher": teacher_point["unseen_perplexity"],
                  "student_after_init": evaluation.unseen_perplexity(student, "student_after_init")}
    tasks = {}
    if "after_init" in recipe.eval.tasks_at:
        tasks["student_after_init"] = evaluation.tasks(student, "student_after_init")
    timings["eval_s"] = time.perf_counter() - t0
    generation_config = teacher.generation_config
    del teacher   # from here on the teacher is the student's own attention (teacher_attention())

    student, stages, layers, curve_start = run_stages(recipe, student, all_rows, key, layers, evaluation, device,
                                                      timings)
    ppl["student"] = stages[-1]["perplexity"] if stages else ppl["student_after_init"]
    unseen_ppl["student"] = stages[-1].get("unseen_perplexity") if stages else unseen_ppl["student_after_init"]
    student_tasks = None
    if "student" in recipe.eval.tasks_at and main:
        student_tasks = stages[-1].get("tasks", {}) if stages else evaluation.tasks(student, "student_after_init")
    for i, summary in enumerate(stages):
        if "stages" in recipe.eval.tasks_at and "tasks" in summary:
            tasks[f"after_stage_{i}"] = summary["tasks"]
    recall = None
    budget_curve = None
    if recipe.budget_curve:
        snapshot, summary0, held0, key0 = curve_start
        final = None
        if len(layers) == teacher_config.num_hidden_layers:   # the main run is the K = 0 student
            final = {"perplexity": ppl["student"], "tasks": student_tasks or {}, "recall": evaluation.recall(student)}
            if teacher_point["recall"] is not None:
                recall = {"teacher": teacher_point["recall"], "student": final["recall"]}
        budget_curve = run_budget_curve(recipe, snapshot, summary0, held0, evaluation, device, key0, final, all_rows)
        del snapshot

    t0 = time.perf_counter()
    if main:
        save_student(student, out / "student", tokenizer, generation_config)
    timings["save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final = evaluation.final(student, teacher_point, ppl["student"], student_tasks, recall)
    measured = final.pop("tasks")   # points in the order of the run: teacher, after init, final, after each stage
    tasks = {name: result for name, result in [("teacher", measured.get("teacher")),
                                               ("student_after_init", tasks.pop("student_after_init", None)),
                                               ("student", measured.get("student")), *tasks.items()]
             if result is not None}
    timings["speed_and_recall_s"] = time.perf_counter() - t0

    n = teacher_config.num_hidden_layers
    report = {
        "perplexity": ppl,
        "perplexity_tokens": sum(len(w) for w in windows),
        "perplexity_windows": windows_digest(windows),
        "eval_text": recipe.eval.text.source,
        "unseen": unseen_report(unseen, unseen_ppl),
        "teacher": recipe.teacher,
        "teacher_path": location,
        "teacher_untrained": bool(info.get("untrained", False)),
        "teacher_card": teacher_card(recipe.teacher, location, info),
        "stage_data": [{"name": st.name, "data": st.data.source, "hub_dataset": is_hub_dataset(recipe, st.data)}
                       for st in recipe.stages],
        "mixer": recipe.convert.mixer.model_dump(),
        "mixer_layers": layers,
        "attention_layers": [i for i in range(n) if i not in layers],
        "attention_window": recipe.convert.attention_window,
        "attention_sink": recipe.convert.uses_attention_sink,
        "stages": stages,
        **final,   # component_ablation, speed, recall, eval_peak_memory_gb (a stage's evaluation: in its summary)
        "budget_curve": budget_curve,
        "tasks": tasks,
        "recipe_hash": digest,
        "run_peak_memory_gb": process_peak_memory_gb(device),   # across every phase and what lies between them
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "student_path": str((out / "student").resolve()),
    }
    if main:
        publish(report, out)
    process_state(device).wait_for_everyone()
    return report


def evaluate_saved(recipe_path: str, overrides: list[str] = ()) -> dict:
    """``convert eval``: evaluation only, on the teacher and the saved ``<output_dir>/student`` of a finished run.

    Perplexity, the recipe's lm-eval tasks and speed/memory are measured again (the recipe's ``eval:``
    section as it is now); the training stages of report.json are kept; REPORT.md is rewritten.  The perplexities
    the run measured after init and after each stage stay only where the evaluation scores the same tokens as the
    run's did (text and windows); otherwise they are dropped (null), not shown against a teacher measured on other
    tokens.
    """
    with located(recipe_path):
        return _evaluate_saved(recipe_path, overrides)


def unseen_report(unseen: tuple[str, list] | None, perplexities: dict) -> dict | None:
    """report.json's ``unseen``: the second domain's source, its token count, a digest of its windows and
    ``perplexities`` (None without one)."""
    if unseen is None:
        return None
    source, windows = unseen
    return {"text": source, "tokens": sum(len(w) for w in windows), "windows": windows_digest(windows),
            "perplexity": perplexities}


def _same_windows(measured: dict | None, source: str, windows: list) -> bool:
    """Whether a run's evaluation (``measured``: its text, token count and, since it was recorded, windows digest)
    scored the same tokens as ``windows`` of ``source``."""
    if not measured:
        return False
    digest = measured.get("windows")
    return (measured.get("text") == source and measured.get("tokens") == sum(len(w) for w in windows)
            and (digest is None or digest == windows_digest(windows)))


def _evaluate_saved(recipe_path: str, overrides: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, _, location, _, _ = validate(recipe_path, overrides)
    check_tasks(recipe.eval, prepare=True)
    out = Path(recipe.output_dir)
    if not (out / "report.json").is_file() or not (out / "student" / "config.json").is_file():
        raise RecipeError(f"{out} has no finished run (report.json and student/): "
                          f"run `python -m convert run {recipe_path}` first")
    report = json.loads((out / "report.json").read_text())
    device = resolve_device(recipe.device)
    tokenizer = AutoTokenizer.from_pretrained(location)
    windows = heldout_windows(recipe, tokenizer)
    unseen = unseen_windows(recipe, tokenizer)
    load = partial(load_teacher, location, recipe.dtype, device)
    evaluation = Evaluation(recipe.eval, recipe.seed, tokenizer, windows, out, True, load,   # no key: measured again
                            unseen=unseen, position_windows=position_windows(recipe, tokenizer))
    teacher_point = evaluation.teacher(load(), location)
    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=getattr(torch, recipe.dtype),
                                                   trust_remote_code=True)
    student = student.to(device).eval()
    measured = {"text": report.get("eval_text"), "tokens": report.get("perplexity_tokens"),
                "windows": report.get("perplexity_windows")}
    if not _same_windows(measured, recipe.eval.text.source, windows):   # the run's points scored other tokens
        report["perplexity"]["student_after_init"] = None
        for stage in report.get("stages", []):
            stage["perplexity"] = None
        if report.get("budget_curve"):   # its students are not saved: they cannot be measured again
            report["budget_curve"] = None
        log.info("eval: the held-out tokens differ from the run's: its perplexities after init and after each "
                 "stage are left out of the report (only the teacher and the saved student are measured again)")
    earlier_unseen = report.get("unseen") or {}
    unseen_points = {key: value for key, value in earlier_unseen.get("perplexity", {}).items()
                     if key == "student_after_init"}
    if unseen is not None and not _same_windows(earlier_unseen, *unseen):
        unseen_points = {}
        for stage in report.get("stages", []):
            stage.pop("unseen_perplexity", None)
    report["perplexity"]["teacher"] = teacher_point["perplexity"]
    report["perplexity"]["student"] = evaluation.perplexity(student, "student")
    report["perplexity_tokens"] = sum(len(w) for w in windows)
    report["perplexity_windows"] = windows_digest(windows)
    report["eval_text"] = recipe.eval.text.source
    report["unseen"] = unseen_report(unseen, {**unseen_points, "teacher": teacher_point["unseen_perplexity"],
                                              "student": evaluation.unseen_perplexity(student, "student")})
    student_tasks = None
    if "student" in recipe.eval.tasks_at:
        student_tasks = evaluation.tasks(student, "student", str((out / "student").resolve()))
    report.update(evaluation.final(student, teacher_point, report["perplexity"]["student"], student_tasks))
    publish(report, out)
    return report
