"""The pipeline: recipe -> teacher -> student -> evaluation -> report.  The only place that composes packages."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from distill.attention_transfer import train_attention_transfer
from distill.distillation import train_distill
from distill.training import NonFiniteError, ResumeError, TrainOptions
from distill.data import DataError, document_windows, load_documents, pack_documents, take_tokens, tokenize_documents
from eval.perplexity import perplexity

from .convert import convert, save_student
from .recipe import Recipe, RecipeError, TextSource, check_against_teacher, load_recipe, recipe_hash, resolve_path
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


def load_text(recipe: Recipe, text: TextSource, field: str, source: str, builtin_split: str, hub_split: str):
    """The documents of ``text`` (a ``datasets.Dataset`` with column ``text``); errors name ``field``.

    Without ``text.split``: ``builtin_split`` for bundled corpora, ``hub_split`` for Hub datasets.
    """
    name = text.source
    if not name.startswith("builtin:"):
        local = resolve_path(recipe, name)   # relative paths: beside the recipe, then the repo root
        name = str(local) if local is not None else name
    split = text.split or (builtin_split if name.startswith("builtin:") else hub_split)
    try:
        return load_documents(name, split=split, text_column=text.text_column, subset=text.subset)
    except DataError as e:
        raise RecipeError(f"{source}: {field}: {e}") from None


def heldout_documents(recipe: Recipe, source: str):
    return load_text(recipe, recipe.eval.text, "eval.text", source, builtin_split="heldout", hub_split="test")


def validate(recipe_path: str, overrides: list[str] = ()):
    """Every check that needs no weights: the recipe itself, then against the teacher's config.json."""
    recipe, resolved = load_recipe(recipe_path, overrides)
    location = resolve_teacher(recipe, recipe_path)
    config = load_teacher_config(location, recipe_path)
    layers = check_against_teacher(recipe, config, recipe_path)
    heldout_documents(recipe, recipe_path)
    if recipe.stages:   # every stage's data and token budget, before any weights load
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(location)
        for i in range(len(recipe.stages)):
            stage_rows(recipe, i, tokenizer, recipe_path)
    return recipe, resolved, location, config, layers


def stage_rows(recipe: Recipe, i: int, tokenizer, source: str):
    """Training rows of stage ``i`` (its data, packed at its seq_len, cut to its token budget) and held-out rows."""
    stage = recipe.stages[i]
    docs = load_text(recipe, stage.data, f"stages[{i}].data", source, builtin_split="train", hub_split="train")
    try:
        rows = take_tokens(pack_documents(tokenize_documents(docs, tokenizer), stage.seq_len, seed=recipe.seed),
                           stage.tokens, source=stage.data.source)
        held = None
        if getattr(stage, "eval_rows", 0):
            held = take_tokens(pack_documents(tokenize_documents(heldout_documents(recipe, source), tokenizer),
                                              stage.seq_len, seed=recipe.seed),
                               stage.eval_rows * stage.seq_len, source=recipe.eval.text.source)
    except DataError as e:
        raise RecipeError(f"{source}: stages[{i}].tokens: {e}") from None
    return rows, held


def stage_fingerprint(recipe: Recipe, i: int) -> str:
    """What stage i's result depends on: teacher, conversion, precision, seed, and stages 0..i."""
    import hashlib
    part = recipe.model_dump(mode="json", include={"teacher", "convert", "dtype", "seed"})
    part["stages"] = [s.model_dump(mode="json") for s in recipe.stages[:i + 1]]
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def train_options(stage, recipe: Recipe, device: str) -> TrainOptions:
    i = next(j for j, s in enumerate(recipe.stages) if s is stage)
    return TrainOptions(lr=stage.lr, batch_size=stage.batch_size, seed=recipe.seed,
                        checkpoint_every=stage.checkpoint_every, keep_checkpoints=stage.keep_checkpoints,
                        fingerprint=stage_fingerprint(recipe, i),
                        gradient_accumulation_steps=stage.gradient_accumulation_steps, lr_schedule=stage.lr_schedule,
                        warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
                        max_grad_norm=stage.max_grad_norm, mixed_precision=stage.mixed_precision,
                        cpu=device == "cpu", log_every=stage.log_every)


def run_attention_transfer(student, stage, rows, held, out_dir: Path, recipe: Recipe, device: str):
    summary = train_attention_transfer(student, rows, out_dir=out_dir, opts=train_options(stage, recipe, device),
                                       eval_rows=held)
    return student, summary


def run_distill(student, stage, rows, held, out_dir: Path, recipe: Recipe, device: str):
    return train_distill(student, rows, out_dir=out_dir, opts=train_options(stage, recipe, device),
                         temperature=stage.temperature, kl_weight=stage.kl_weight, ce_weight=stage.ce_weight,
                         trainable=stage.trainable, lora=stage.lora.model_dump(),
                         gradient_checkpointing=stage.gradient_checkpointing)


# stage name -> how the pipeline runs it: (student, stage, rows, held-out rows, out dir, recipe, device) -> (student, summary)
STAGE_RUNNERS = {"attention_transfer": run_attention_transfer, "distill": run_distill}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def run(recipe_path: str, overrides: list[str] = ()) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, resolved, location, teacher_config, layers = validate(recipe_path, overrides)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = recipe_hash(resolved)
    from accelerate import PartialState
    device = resolve_device(recipe.device)
    # under `accelerate launch`/torchrun every process runs this (CPU: gloo); one of them writes the outputs
    main = PartialState(cpu=device == "cpu").is_main_process
    if main:
        (out / "recipe.resolved.yaml").write_text(f"# recipe hash: {digest}\n" + yaml.safe_dump(resolved, sort_keys=False))
    info = teacher_info(Path(location)) if Path(location).is_dir() else {}
    if info.get("untrained"):
        log.warning("the teacher %s is UNTRAINED (random weights): this run exercises the pipeline; "
                    "its perplexities say nothing about conversion quality", recipe.teacher)
    torch.manual_seed(recipe.seed)
    timings = {}
    t0 = time.perf_counter()
    dtype = getattr(torch, recipe.dtype)
    teacher = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    timings["load_teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student = convert(teacher, recipe.convert.mixer.model_dump(), layers)
    timings["convert_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    windows = document_windows(tokenize_documents(heldout_documents(recipe, recipe_path), tokenizer),
                               recipe.eval.seq_len, recipe.eval.max_tokens)
    ppl = {"teacher": perplexity(teacher, windows, recipe.eval.batch_size),
           "student_after_init": perplexity(student, windows, recipe.eval.batch_size)}
    timings["eval_s"] = time.perf_counter() - t0
    generation_config = teacher.generation_config
    del teacher   # from here on the teacher is the student's own attention (teacher_attention())

    stages = []
    for i, stage in enumerate(recipe.stages):
        rows, held = stage_rows(recipe, i, tokenizer, recipe_path)
        log.info("stage %d (%s): %d rows of %d tokens", i, stage.name, len(rows), stage.seq_len)
        try:
            student, summary = STAGE_RUNNERS[stage.name](student, stage, rows, held,
                                                         out / "stages" / f"{i}-{stage.name}", recipe, device)
        except (NonFiniteError, ResumeError) as e:
            raise RecipeError(f"{recipe_path}: stages[{i}]: {e}") from None
        student.eval()
        t0 = time.perf_counter()
        summary["perplexity"] = perplexity(student, windows, recipe.eval.batch_size)
        timings[f"eval_after_stage_{i}_s"] = time.perf_counter() - t0
        stages.append(summary)
    ppl["student"] = stages[-1]["perplexity"] if stages else ppl["student_after_init"]

    t0 = time.perf_counter()
    if main:
        save_student(student, out / "student", tokenizer, generation_config)
    timings["save_s"] = time.perf_counter() - t0

    n = teacher_config.num_hidden_layers
    report = {
        "perplexity": ppl,
        "perplexity_tokens": sum(len(w) for w in windows),
        "teacher": recipe.teacher,
        "teacher_path": location,
        "teacher_untrained": bool(info.get("untrained", False)),
        "mixer": recipe.convert.mixer.model_dump(),
        "mixer_layers": layers,
        "attention_layers": [i for i in range(n) if i not in layers],
        "stages": stages,
        "recipe_hash": digest,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "student_path": str((out / "student").resolve()),
    }
    if main:
        _write_json_atomic(out / "report.json", report)
        print_summary(report)
    PartialState().wait_for_everyone()
    return report


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ppl = report["perplexity"]
    table = Table(title=f"teacher vs student ({len(report['mixer_layers'])} of "
                        f"{len(report['mixer_layers']) + len(report['attention_layers'])} layers -> "
                        f"{report['mixer']['type']})")
    table.add_column("model")
    table.add_column("held-out perplexity", justify="right")
    table.add_column("ratio to teacher", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("wall", justify="right")
    table.add_row("teacher", f"{ppl['teacher']:.3f}", "1.00x", "", "")
    table.add_row("student after init", f"{ppl['student_after_init']:.3f}",
                  f"{ppl['student_after_init'] / ppl['teacher']:.2f}x", "", "")
    for i, stage in enumerate(report["stages"]):
        table.add_row(f"after stage {i} ({stage['name']})", f"{stage['perplexity']:.3f}",
                      f"{stage['perplexity'] / ppl['teacher']:.2f}x", f"{stage['tokens']:,}", f"{stage['wall_s']:.0f} s")
    console = Console()
    console.print(table)
    if report["teacher_untrained"]:
        console.print("[bold yellow]note:[/] the teacher is untrained (random weights); these figures only show "
                      "that the pipeline runs.")
    console.print(f"student: {report['student_path']}")
