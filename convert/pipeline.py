"""The pipeline: recipe -> teacher -> student -> evaluation -> report.  The only place that composes packages."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from eval.perplexity import perplexity
from eval.text import corpus_documents, tokenize_documents

from .convert import convert, save_student
from .recipe import Recipe, RecipeError, check_against_teacher, load_recipe, recipe_hash, resolve_path
from .teachers import BUILTIN_TEACHERS, TOKENIZER_CORPUS, build_tiny_teacher, cache_dir, teacher_info

log = logging.getLogger("rnnify")


def resolve_teacher(recipe: Recipe, source: str) -> str:
    """The folder (or Hub name) the teacher loads from; builtin teachers are prepared on first use."""
    ref = recipe.teacher
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        if name not in BUILTIN_TEACHERS:
            raise RecipeError(f"{source}: teacher: unknown builtin teacher {name!r}; "
                              f"available: {', '.join('builtin:' + n for n in BUILTIN_TEACHERS)}")
        folder = cache_dir() / "teachers" / name
        if not teacher_info(folder):
            log.info("preparing builtin teacher %s in %s", name, folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            build_tiny_teacher(name, folder, corpus_documents(TOKENIZER_CORPUS, split="train"))
        return str(folder)
    local = resolve_path(recipe, ref)
    if local is not None:
        if not (local / "config.json").is_file():
            raise RecipeError(f"{source}: teacher: {local} has no config.json")
        return str(local)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise RecipeError(f"{source}: teacher: folder {ref!r} not found (relative paths are looked up beside the "
                          "recipe and at the repo root)")
    return ref   # a Hub name


def load_teacher_config(location: str, source: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{source}: teacher: cannot read the config of {location!r}: "
                          f"{str(e).splitlines()[0]}") from None


def heldout_documents(recipe: Recipe, source: str) -> list[str]:
    """The held-out documents named by ``eval.text`` (a builtin corpus's held-out split, or a file)."""
    spec = recipe.eval.text
    if not spec.startswith("builtin:"):
        path = resolve_path(recipe, spec)
        if path is None:
            raise RecipeError(f"{source}: eval.text: file {spec!r} not found (looked beside the recipe and at the repo root)")
        spec = str(path)
    try:
        return corpus_documents(spec, split="heldout")
    except ValueError as e:
        raise RecipeError(f"{source}: eval.text: {e}") from None


def validate(recipe_path: str, overrides: list[str] = ()):
    """Every check that needs no weights: the recipe itself, then against the teacher's config.json."""
    recipe, resolved = load_recipe(recipe_path, overrides)
    location = resolve_teacher(recipe, recipe_path)
    config = load_teacher_config(location, recipe_path)
    layers = check_against_teacher(recipe, config, recipe_path)
    heldout_documents(recipe, recipe_path)
    return recipe, resolved, location, config, layers


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
    (out / "recipe.resolved.yaml").write_text(f"# recipe hash: {digest}\n" + yaml.safe_dump(resolved, sort_keys=False))
    info = teacher_info(Path(location)) if Path(location).is_dir() else {}
    if info.get("untrained"):
        log.warning("the teacher %s is UNTRAINED (random weights): this run exercises the pipeline; "
                    "its perplexities say nothing about conversion quality", recipe.teacher)
    torch.manual_seed(recipe.seed)
    timings = {}
    t0 = time.perf_counter()
    dtype = getattr(torch, recipe.dtype)
    teacher = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).to(recipe.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    timings["load_teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student = convert(teacher, recipe.convert.mixer.model_dump(), layers)
    save_student(student, out / "student", tokenizer, teacher.generation_config)
    timings["convert_and_save_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = tokenize_documents(tokenizer, heldout_documents(recipe, recipe_path), recipe.eval.max_tokens)
    ppl = {"teacher": perplexity(teacher, ids, recipe.eval.seq_len, recipe.eval.batch_size),
           "student": perplexity(student, ids, recipe.eval.seq_len, recipe.eval.batch_size)}
    timings["eval_s"] = time.perf_counter() - t0

    n = teacher_config.num_hidden_layers
    report = {
        "perplexity": ppl,
        "perplexity_tokens": int(ids.numel()),
        "teacher": recipe.teacher,
        "teacher_path": location,
        "teacher_untrained": bool(info.get("untrained", False)),
        "mixer": recipe.convert.mixer.model_dump(),
        "mixer_layers": layers,
        "attention_layers": [i for i in range(n) if i not in layers],
        "stages": [],
        "recipe_hash": digest,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "student_path": str((out / "student").resolve()),
    }
    _write_json_atomic(out / "report.json", report)
    print_summary(report)
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
    table.add_row("teacher", f"{ppl['teacher']:.3f}", "1.00x")
    table.add_row("student (after init)", f"{ppl['student']:.3f}", f"{ppl['student'] / ppl['teacher']:.2f}x")
    console = Console()
    console.print(table)
    if report["teacher_untrained"]:
        console.print("[bold yellow]note:[/] the teacher is untrained (random weights); these figures only show "
                      "that the pipeline runs.")
    console.print(f"student: {report['student_path']}")
