"""Recipes: YAML validated by pydantic before any model is loaded, then checked against the teacher's config.json.

Every error is one line naming the file and the dotted field (``RecipeError``); the CLI prints it and exits with
status 2.  ``dotted.key=value`` overrides are applied to the YAML before validation.  Where each part lives:
``base`` (shared types), ``sections`` (convert, eval, budget curve), ``mixers`` (``convert.mixer``, derived from
the mixer classes), ``rnnify.stages`` (each stage's section beside its runner), ``schema`` (the whole recipe),
``loading`` (YAML, overrides, errors), ``teacher_check`` (against config.json).
"""
from .base import REPO_ROOT, RecipeError, Strict, TextSource, located
from .loading import load_recipe, recipe_hash, resolve_path
from .mixers import options_model
from .schema import Recipe, recipe_model
from .sections import (EVAL_POINTS, UNSEEN_AUTO, AutoKeep, BudgetCurve, ConvertSection, EvalSection, EveryNth, TaskSpec,
                       expand_layers)
from .teacher_check import check_against_teacher

__all__ = ["REPO_ROOT", "RecipeError", "located", "Strict", "TextSource", "load_recipe", "recipe_hash", "resolve_path",
           "options_model", "Recipe", "recipe_model", "EVAL_POINTS", "AutoKeep", "BudgetCurve", "ConvertSection",
           "EvalSection", "EveryNth", "TaskSpec", "expand_layers", "check_against_teacher", "UNSEEN_AUTO"]
