"""Reading a recipe: YAML, ``dotted.key=value`` overrides, validation into one line per error naming the file and
the dotted field, and paths resolved beside the recipe."""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .base import REPO_ROOT, RecipeError, located
from .schema import Recipe, recipe_model
from .sections import LAYER_SPEC_MODELS, LAYER_SPEC_TAGS


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    """Set ``a.b.c`` (``stages.1.lr``: list items by index) in ``data`` to the YAML value ``raw``."""
    keys = dotted.split(".")
    node = data
    for n, key in enumerate(keys):
        last = n == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"override {dotted}: {'.'.join(keys[:n])} has {len(node)} items; "
                                  f"{key!r} is not one of their indices")
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"override {dotted}: {'.'.join(keys[:n])} is not a section")
        elif not last:
            node.setdefault(key, {})
        if last:
            node[key] = yaml.safe_load(raw) if raw != "" else ""
        else:
            node = node[key]


def _tagged_sections(model: type[Recipe]) -> dict[str, type[BaseModel]]:
    """{tag: model} of the tagged sections in validation-error locations: mixer types, stage names, layer specs."""
    mixer = model.model_fields["convert"].annotation.model_fields["mixer"].annotation
    stage = model.model_fields["stages"].annotation.__args__[0]
    tagged = {}
    for kind, tag in ((mixer, "type"), (stage, "name")):
        for m in _union_members(kind):
            tagged[m.model_fields[tag].annotation.__args__[0]] = m
    return {**tagged, **LAYER_SPEC_MODELS}


def _union_members(annotation) -> list[type[BaseModel]]:
    """The models of a (possibly Annotated) union of models, or the one model."""
    while getattr(annotation, "__metadata__", None) is not None:   # Annotated[X, ...] -> X
        annotation = annotation.__origin__
    args = getattr(annotation, "__args__", None)
    return [a for a in args if isinstance(a, type)] if args else [annotation]


def _format_error(err: dict) -> str:
    model = recipe_model()
    tagged = _tagged_sections(model)
    mixer_types = sorted(t for t, m in tagged.items() if "type" in m.model_fields)
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p in tagged or p in LAYER_SPEC_TAGS))]
    field = ".".join(loc)
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
        parent = _model_at(model, tagged, [str(p) for p in err["loc"][:-1]])
        if parent is not None:
            msg += f" (allowed here: {', '.join(parent.model_fields)})"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind.startswith("union_tag"):
        msg = f"mixer type must be one of {', '.join(mixer_types)}"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    if kind not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return f"{field}: {msg}" if field else msg   # recipe-wide checks name their fields


def _model_at(model: Any, tagged: dict, loc: list[str]):
    """The pydantic model at a validation-error location (a tag in ``loc`` selects that mixer, stage or form)."""
    for part in loc:
        if part.isdigit():   # a list index (stages[i]) stays on the list's item model
            continue
        if part in tagged:
            model = tagged[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe; returns it and its resolved dict (with defaults)."""
    path = Path(path)
    with located(path):
        recipe = _validated(path, _overridden(_read(path), overrides))
    recipe._source = path.resolve()
    return recipe, recipe.model_dump(mode="json")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError("recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _overridden(data: dict, overrides) -> dict:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            _set_dotted(data, key.strip(), raw)
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: value is not valid YAML") from None
    return data


def _validated(path: Path, data: dict) -> Recipe:
    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(e.errors()[0])) from None


def recipe_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def resolve_path(recipe: Recipe, value: str) -> Path | None:
    """A relative path is looked up beside the recipe, then at the repo root; None if neither exists."""
    p = Path(value).expanduser()
    pattern = any(c in value for c in "*?[")
    found = (lambda q: bool(glob.glob(str(q), recursive=True))) if pattern else (lambda q: q.exists())
    if p.is_absolute():
        return p if found(p) else None
    for base in (Path(getattr(recipe, "_source", REPO_ROOT)).parent, REPO_ROOT, Path.cwd()):
        if found(base / p):
            return (base / p) if pattern else (base / p).resolve()
    return None
