"""A recipe against its teacher's config.json, before any weights load: the recipe's expectations, layer indices in
range, a mixer window the kept layers' cache can share."""
from __future__ import annotations

from convert.convert import kept_layers_window
from convert.student.arch_registry import get_architecture

from .base import RecipeError, located
from .sections import AutoKeep, expand_layers


def check_against_teacher(recipe, teacher_config, source: str | None = None) -> list[int]:
    """Raise RecipeError when the recipe cannot apply to this teacher (naming ``source``, the recipe file, if
    given); return the layers to convert."""
    with located(source):
        return _check(recipe, teacher_config)


def _check(recipe, teacher_config) -> list[int]:
    mt = teacher_config.model_type
    try:
        arch = get_architecture(mt)
    except ValueError as e:
        raise RecipeError(f"teacher: {e}") from None
    heads, kv_heads, head_dim = arch.heads(teacher_config)
    actual = {"model_type": mt, "num_hidden_layers": teacher_config.num_hidden_layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "vocab_size": teacher_config.vocab_size}
    for key, want in recipe.expect.model_dump().items():
        if want is not None and actual[key] != want:
            raise RecipeError(f"expect.{key}: recipe expects {want}, teacher config.json has {actual[key]}")
    n = teacher_config.num_hidden_layers
    field, spec = recipe.convert.selection()
    if isinstance(spec, AutoKeep):
        if spec.auto >= n:
            raise RecipeError(f"{field}.auto: keeping {spec.auto} of {n} layers converts none; "
                              f"use at most {n - 1}")
        spec = "all"
    bad = [i for i in expand_layers(spec, n) if i >= n]
    if bad:
        raise RecipeError(f"{field}: layer {bad[0]} is out of range (teacher has {n} layers: 0-{n - 1})")
    layers = recipe.convert.mixer_layers(n)
    mixer = recipe.convert.mixer
    if getattr(mixer, "window", None) and not recipe.convert.attention_window:
        teacher_window = getattr(teacher_config, "sliding_window", None)
        # with {auto: K} any layer may end up kept
        converted = [] if isinstance(recipe.convert.keep_attention, AutoKeep) else layers
        kept_layers = set(range(n)) - set(converted)
        # all-sliding kept layers keep the teacher's window through attention_window; other mixes cannot
        if teacher_window and kept_layers and teacher_window != mixer.window and \
                kept_layers_window(teacher_config, {"window": mixer.window}, converted) is None:
            raise RecipeError(f"convert.mixer.window: the teacher mixes full and sliding-window "
                              f"({teacher_window}) attention in the kept layers {sorted(kept_layers)[:4]}...; a "
                              "different mixer window "
                              "cannot share the cache config: set convert.attention_window (every kept layer then "
                              "attends to that many tokens), use the mixer window "
                              f"{teacher_window}, or convert those layers")
    if recipe.budget_curve and max(recipe.budget_curve.keep) > len(layers):
        raise RecipeError(f"budget_curve.keep: {max(recipe.budget_curve.keep)} layers cannot get attention "
                          f"back: only {len(layers)} are converted")
    if getattr(mixer, "feature_dim", None) and mixer.feature_dim > 4 * head_dim:
        raise RecipeError(f"convert.mixer.feature_dim: {mixer.feature_dim} is over 4 x head_dim ({head_dim})")
    return layers
