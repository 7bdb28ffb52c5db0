"""What made a result: rnnify's version and a digest of its source, and the versions of the packages that shape a
trained or measured figure.  Every fingerprint of a run (conversion, stages, evaluations) includes it, so that a
result made by other code is not reused, and ``changes`` says in one line what differs."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

SHAPING_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "triton")
OUR_PACKAGES = ("convert", "distill", "eval", "rnnify", "rnnify_kernels")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex digits) over rnnify's own source files (Python and C), in a stable order."""
    import importlib.util
    digest = hashlib.sha256()
    for package in OUR_PACKAGES:
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, str | None]:
    """{"rnnify": version, "rnnify_source": digest, package: version for the packages that shape results}."""
    return {"rnnify": installed_version("rnnify"), "rnnify_source": source_digest(),
            **{name: installed_version(name) for name in SHAPING_PACKAGES}}


def changes(before: dict | None, now: dict) -> str:
    """What differs between two ``code_version()`` dicts, as ``name old -> new, ...`` (or why it cannot tell)."""
    if not before:
        return "made by a version of rnnify that did not record its code version"
    diff = [f"{name} {before.get(name)} -> {value}" for name, value in now.items() if before.get(name) != value]
    return ", ".join(diff) or "same code"
