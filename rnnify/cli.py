"""``python -m convert {run,validate,eval} RECIPE [dotted.key=value ...]``, ``prepare NAME ...``, ``export
OUTPUT_DIR [--push-to-hub ORG/NAME]`` and ``compare A B``.  A recipe error exits with status 2 and one line."""
from __future__ import annotations

import argparse
import logging
import sys

from convert.export import ExportError, export

from .recipe import RecipeError


def prepare(names: list[str]) -> None:
    """Prepare builtin teachers and corpora (``builtin:<name>``) or everything a recipe names, offline after."""
    from distill.corpora import BUILTIN_CORPORA, CorpusError, prepare_corpus

    from .recipe import load_recipe
    from convert.teachers import BUILTIN_TEACHERS, TeacherError, prepare_teacher

    from eval.harness import offline_tasks

    wanted = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            recipe, _ = load_recipe(name)
            wanted += [ref for ref in (recipe.teacher, recipe.eval.text.source) if ref.startswith("builtin:")]
            wanted += ["eval-tasks"] if set(t.name for t in recipe.eval.tasks) & offline_tasks() else []
        else:
            wanted.append(name)
    for ref in wanted:
        name = ref.removeprefix("builtin:")
        try:
            if name == "eval-tasks":
                from eval.tasks.utils import prepare as prepare_task_data
                print(f"eval-tasks (offline lm-eval data): {prepare_task_data()}")
            elif name in BUILTIN_TEACHERS:
                print(f"builtin:{name} (teacher): {prepare_teacher(name)}")
            elif name in BUILTIN_CORPORA:
                print(f"builtin:{name} (corpus): {prepare_corpus(name)}")
            else:
                raise RecipeError(f"{ref}: not a builtin teacher ({', '.join(BUILTIN_TEACHERS)}) nor corpus "
                                  f"({', '.join(BUILTIN_CORPORA)}), nor eval-tasks, nor a recipe (.yaml)")
        except (TeacherError, CorpusError, OSError) as e:
            raise RecipeError(f"{ref}: {e}") from None


def compare(a: str, b: str) -> str:
    """Markdown table of two runs' reports (output folders or report.json files)."""
    import json
    from pathlib import Path

    from eval.report import compare as compare_reports

    reports = []
    for ref in (a, b):
        path = Path(ref) / "report.json" if Path(ref).is_dir() else Path(ref)
        if not path.is_file():
            raise RecipeError(f"{ref}: no report.json there (give an output_dir or a report.json)")
        try:
            reports.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: not valid JSON ({e})") from None
    return compare_reports(reports[0], reports[1], names=(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="Convert a Transformer LM into a recurrent student.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "convert, evaluate and write <output_dir>/report.json"),
                            ("validate", "check the recipe, the teacher's config.json and each text source's first record; "
                                         "load no weights"),
                            ("eval", "evaluate the teacher and the saved student of a finished run again (eval: "
                                     "section as it is now); rewrite report.json and REPORT.md")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    p = sub.add_parser("prepare", help="download and cache builtin teachers/corpora and the offline lm-eval data "
                                       "(then everything runs offline)")
    p.add_argument("names", nargs="+", metavar="builtin:NAME|eval-tasks|RECIPE.yaml")
    p = sub.add_parser("export", help="write the model card into <output_dir>/student and optionally push it")
    p.add_argument("output_dir")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None)
    p.add_argument("--private", action="store_true")
    p = sub.add_parser("compare", help="two runs' reports side by side (markdown)")
    p.add_argument("reports", nargs=2, metavar="OUTPUT_DIR_OR_REPORT_JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from . import pipeline
    try:
        if args.command == "validate":
            recipe, _, location, config, layers = pipeline.validate(args.recipe, args.overrides)
            print(f"{args.recipe}: ok — teacher {location} ({config.model_type}, {config.num_hidden_layers} layers); "
                  f"{len(layers)} layers -> {recipe.convert.mixer.type}: {layers}")
        elif args.command == "prepare":
            prepare(args.names)
        elif args.command == "eval":
            pipeline.evaluate_saved(args.recipe, args.overrides)
        elif args.command == "export":
            from eval.report import card_sections
            folder = export(args.output_dir, card_sections, args.push_to_hub, args.private)
            print(f"exported: {folder}" + (f" -> pushed to {args.push_to_hub}" if args.push_to_hub else ""))
        elif args.command == "compare":
            print(compare(*args.reports))
        else:
            pipeline.run(args.recipe, args.overrides)
    except (RecipeError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
