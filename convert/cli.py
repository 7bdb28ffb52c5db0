"""``python -m convert {run,validate} RECIPE [dotted.key=value ...]``"""
from __future__ import annotations

import argparse
import logging
import sys

from .recipe import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="Convert a Transformer LM into a recurrent student.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "convert, evaluate and write <output_dir>/report.json"),
                            ("validate", "check the recipe and the teacher's config.json; load no weights")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from . import pipeline
    try:
        if args.command == "validate":
            recipe, _, location, config, layers = pipeline.validate(args.recipe, args.overrides)
            print(f"{args.recipe}: ok — teacher {location} ({config.model_type}, {config.num_hidden_layers} layers); "
                  f"{len(layers)} layers -> {recipe.convert.mixer.type}: {layers}")
        else:
            pipeline.run(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
