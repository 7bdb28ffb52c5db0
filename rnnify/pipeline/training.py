"""The student from conversion to the last stage: conversion with its calibrations, each stage by its registered
runner, and the fingerprints that let a rerun reuse a finished conversion, stage or evaluation."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

from convert.convert import convert, restore_attention
from distill.calibration import calibrate_attention_sinks, calibrate_output_norms
from distill.layer_selection import rank_by_error
from distill.training import NonFiniteError, ResumeError

from ..recipe import AutoKeep, ConvertSection, Recipe, RecipeError
from ..stages import STAGES, train_options
from ..stages.registry import stage_dir
from ..store import write_json_atomically
from .provenance import changes, code_version

log = logging.getLogger("rnnify.pipeline")
SINK_CALIBRATION_ROWS = 16   # stage 0's first rows, whose document starts give the sinks' mean key/value
OUTPUT_NORM_CALIBRATION_ROWS = 8   # stage 0's first rows, on which mixers' output norms are fitted to the attention
DONE_FILE = "done.json"


def fingerprint(part: dict) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(section, previous: str, rows) -> str:
    """What a stage's result depends on: the stages before it (``previous``: their fingerprint, or the
    conversion's for stage 0, which holds the code version), its own recipe section and its rows' content
    (``datasets`` fingerprint)."""
    return fingerprint({"previous": previous, "stage": section.model_dump(mode="json"),
                        "rows": getattr(rows, "_fingerprint", None) or str(len(rows))})


def conversion_fingerprint(recipe: Recipe, location: str, mixer_layers: list[int],
                           calibrated: dict[str, int] | None = None) -> str:
    """What the student after conversion depends on: teacher, mixer, converted layers, precision, seed
    (``{auto: K}`` converts all layers: its K only matters after stage 1), and what was calibrated on how
    many of stage 0's rows (``calibrated``: name -> rows)."""
    part = recipe.model_dump(mode="json", include={"teacher", "dtype", "seed"})
    part["mixer"], part["mixer_layers"] = recipe.convert.mixer.model_dump(mode="json"), list(mixer_layers)
    part["attention_window"] = recipe.convert.attention_window
    first_rows = recipe.stages[0].model_dump(mode="json", include={"data", "seq_len", "tokens"}) \
        if recipe.stages else None
    if recipe.convert.calibrates_sinks:   # calibrated on stage 0's rows (their content: stage 0's fingerprint)
        part["attention_sink"] = {"rows": SINK_CALIBRATION_ROWS, "data": first_rows}
    if calibrated:
        part["calibrated"] = {"rows": calibrated, "data": first_rows}
    marker = Path(location, "RNNIFY_TEACHER.json")
    part["teacher_version"] = marker.read_text() if marker.is_file() else location
    part["code"] = code_version()   # what the stages and evaluations chained to this one were made by, too
    return fingerprint(part)


def build_student(section: ConvertSection, stages: list, teacher, layers: list[int], first_rows):
    """The converted student, each stage's ``check`` run on it before any training, its attention sinks and output
    norms calibrated on the first stage's rows (``first_rows``, None without stages) -> (student, what was
    calibrated: part of the conversion's fingerprint)."""
    student = convert(teacher, section.mixer.model_dump(), layers, section.attention_window,
                      section.uses_attention_sink)
    for i, stage in enumerate(stages):   # before any training: e.g. LoRA targets that match nothing
        check = STAGES[stage.name].check
        try:
            if check is not None:
                check(student, stage)
        except ValueError as e:
            raise RecipeError(f"stages[{i}].{e}") from None
    batch_size = stages[0].batch_size if stages else None
    if section.calibrates_sinks and first_rows is not None:
        rows = first_rows.select(range(min(SINK_CALIBRATION_ROWS, len(first_rows))))
        n = calibrate_attention_sinks(student, rows, batch_size)
        log.info("attention sinks: the teacher's mean first-token key/value over %d sequence starts", n)
    elif section.calibrates_sinks:
        log.warning("attention sinks start from zeros: no stage data to calibrate them on")
    calibrated = {}
    if first_rows is not None:
        rows = first_rows.select(range(min(OUTPUT_NORM_CALIBRATION_ROWS, len(first_rows))))
        n = calibrate_output_norms(student, rows, batch_size)
        if n:
            calibrated["output_norms"] = OUTPUT_NORM_CALIBRATION_ROWS
            log.info("mixer output norms: gain and bias fitted to the teacher's attention output over %d tokens", n)
    return student, calibrated


def completed_stage(directory: Path, key: str, label: str) -> dict | None:
    """The summary of a stage that finished with fingerprint ``key`` and whose final checkpoint is still there;
    when one finished with another fingerprint, the log says why it runs again (``label``: which stage)."""
    from distill.training import latest_checkpoint
    path = directory / DONE_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("fingerprint") != key:
        now = code_version()
        why = (f"its result was made by other code ({changes(done.get('code'), now)})" if done.get("code") != now
               else "its recipe section, its data or a stage before it changed")
        log.info("%s: trained again: %s", label, why)
        return None
    last = latest_checkpoint(directory / "checkpoints", key)
    if last is None or last.name != f"step-{done['summary']['steps']:06d}":
        return None
    return done["summary"]


def run_stage(section, student, rows, held, directory: Path, recipe: Recipe, device: str, key: str):
    """One stage by its registered runner -> (student in eval mode, summary)."""
    opts = train_options(section, recipe.seed, tuple(recipe.trackers), device, key)
    directory.mkdir(parents=True, exist_ok=True)   # the pipeline writes done.json there, whatever the runner writes
    student, summary = STAGES[section.name].run(student, section, rows, held, directory, opts)
    return student.eval(), {"name": section.name, **summary}


def auto_keep_layers(layer_errors: dict, spec: AutoKeep) -> list[int]:
    """The ``spec.auto`` layers with the highest held-out stage-1 error ``spec.by`` (after training), sorted."""
    return sorted(rank_by_error(layer_errors, spec.by)[:spec.auto])


def run_stages(recipe: Recipe, student, all_rows: dict, key: str, layers: list[int], evaluation, device: str,
               timings: dict):
    """Every stage of the recipe in order, each run by its registered runner and evaluated after it; a stage that
    finished before with the same fingerprint restores its final weights instead.  -> (student, stage summaries,
    mixer layers (``keep_attention: auto`` may give some back), the budget curve's starting point or None)."""
    out, main = evaluation.out, evaluation.main
    curve_start = None
    stages = []
    for i, section in enumerate(recipe.stages):
        rows, held, tokenized = all_rows[i]
        key = stage_fingerprint(section, key, rows)
        directory = stage_dir(out, i, section)
        done = completed_stage(directory, key, f"stage {i} ({section.name})")
        log.info("stage %d (%s): %d rows of %d tokens%s", i, section.name, len(rows), section.seq_len,
                 " (done before: weights restored from its last checkpoint, nothing retrained)" if done else "")
        try:
            # a finished stage resumes from its final checkpoint: weights restored, no step taken again
            student, summary = run_stage(section, student, rows, None if done else held, directory, recipe, device,
                                         key)
        except (NonFiniteError, ResumeError) as e:
            raise RecipeError(f"stages[{i}]: {e}") from None
        stage_key = key
        if done:
            summary = done
        if recipe.budget_curve and i == recipe.budget_curve.after_stage:
            curve_start = (copy.deepcopy(student), summary, held, key)
        if i == 0 and isinstance(recipe.convert.keep_attention, AutoKeep):
            kept = auto_keep_layers(summary["layer_errors"], recipe.convert.keep_attention)
            student = restore_attention(student, kept)
            layers = list(student.config.mixer_layers)
            summary["keep_attention_auto"] = {"by": recipe.convert.keep_attention.by, "kept": kept}
            key = hashlib.sha256(f"{key}|kept={kept}".encode()).hexdigest()[:16]   # later stages
            log.info("keep_attention auto: layers %s keep softmax attention (highest %s after stage 0)",
                     kept, recipe.convert.keep_attention.by)
        if not done:
            t0 = time.perf_counter()
            last = i == len(recipe.stages) - 1
            summary.update(evaluation.after_stage(student, i, last, str((out / "student").resolve())))
            summary["documents_tokenized"] = tokenized   # 0: its rows came from the rows cache
            timings[f"eval_after_stage_{i}_s"] = time.perf_counter() - t0
            if main:
                write_json_atomically(directory / DONE_FILE, {"fingerprint": stage_key, "summary": summary,
                                                              "code": code_version()})
        stages.append(summary)
    return student, stages, layers, curve_start
