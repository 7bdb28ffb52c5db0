"""The cache every package shares: pinned wheels unpacked there (downloaded by pip, never installed), atomic writes."""
import hashlib
import importlib.metadata
import json
import zipfile

import pytest

from rnnify import store


def fake_wheel(folder, name="rnnify_fake_pkg", version="1.0"):
    """A minimal wheel (pkg/data.txt + dist-info) in a folder pip can use as its only index."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.txt", "payload")
        z.writestr(f"{name}/__init__.py", "raise ImportError('never imported')")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")                      # pip's own settings apply: a local index only
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return tmp_path / "index"


def test_a_pinned_wheel_is_unpacked_into_the_cache_and_never_installed(local_index, monkeypatch):
    wheel = fake_wheel(local_index)
    folder = store.package_folder("rnnify_fake_pkg", "1.0", prefix="rnnify_fake_pkg/",
                                  sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    assert (folder / "rnnify_fake_pkg" / "data.txt").read_text() == "payload"
    assert not (folder / "rnnify_fake_pkg-1.0.dist-info").exists()            # only the files under prefix
    assert json.loads((folder / "RNNIFY_PACKAGE.json").read_text())["wheel"] == wheel.name
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("rnnify_fake_pkg")                          # the environment is untouched

    def no_download(*a, **k):
        raise AssertionError("downloaded again instead of reusing the unpacked folder")
    monkeypatch.setattr(store, "pip_download", no_download)
    assert store.package_folder("rnnify_fake_pkg", "1.0") == folder


def test_a_wheel_that_is_missing_or_not_the_pinned_one_is_a_clear_error(local_index):
    with pytest.raises(store.FetchError, match=r"cannot download rnnify_fake_pkg==1.0 \(wheel\) with pip"):
        store.package_folder("rnnify_fake_pkg", "1.0")
    fake_wheel(local_index)
    with pytest.raises(store.FetchError, match="does not match the pinned 00"):
        store.package_folder("rnnify_fake_pkg", "1.0", sha256="00" * 32)
    assert not (store.cache_root() / "packages" / "rnnify_fake_pkg-1.0").exists()   # nothing half-written


def test_atomic_writes_leave_the_previous_version_whole(tmp_path):
    folder = tmp_path / "thing"
    store.write_folder_atomically(folder, lambda tmp: (tmp / "a").write_text("1"))

    def broken(tmp):
        (tmp / "a").write_text("2")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        store.write_folder_atomically(folder, broken)
    assert (folder / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["thing"]
    store.write_json_atomically(tmp_path / "r.json", {"x": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1} and not (tmp_path / "r.json.tmp").exists()
