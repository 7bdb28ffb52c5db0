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


def fake_sdist(folder, marker):
    """An sdist whose setup.py writes ``marker`` when pip runs it (to build its metadata)."""
    import io
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rnnify_fake_sdist-1.0.tar.gz"
    files = {"setup.py": f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                         "from setuptools import setup\nsetup(name='rnnify_fake_sdist', version='1.0', py_modules=[])\n",
             "PKG-INFO": "Metadata-Version: 2.1\nName: rnnify_fake_sdist\nVersion: 1.0\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"rnnify_fake_sdist-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_sdist_that_is_not_the_pinned_one_is_refused_before_any_of_its_code_runs(local_index, tmp_path,
                                                                                   monkeypatch):
    marker = tmp_path / "setup.py-ran"
    sdist = fake_sdist(local_index, marker)
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")   # pip builds with this environment's setuptools (offline)
    with pytest.raises(store.FetchError, match="does not match the pinned 00"):
        store.pip_download("rnnify_fake_sdist==1.0", binary=False, sha256="00" * 32)
    assert not marker.exists()
    # the pinned file is fetched; pip builds its metadata only then (the marker shows that this setup.py does run)
    name, data = store.pip_download("rnnify_fake_sdist==1.0", binary=False,
                                    sha256=hashlib.sha256(sdist.read_bytes()).hexdigest())
    assert name == sdist.name and data == sdist.read_bytes() and marker.exists()


WRITER = """
import json, sys
from pathlib import Path
from rnnify import store
me, out = sys.argv[1], Path(sys.argv[2])
for i in range(int(sys.argv[3])):
    store.write_json_atomically(out / "r.json", {"writer": me, "i": i, "pad": "x" * 50000})
    if i % 10 == 0:
        store.write_folder_atomically(out / "folder", lambda tmp: [(tmp / n).write_text(f"{me} {i}") for n in "abc"])
"""


def test_concurrent_writers_each_leave_a_complete_result_and_no_temporary_files(tmp_path):
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name, str(tmp_path), "200"], stderr=subprocess.PIPE,
                              text=True) for name in ("one", "two")]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    final = json.loads((tmp_path / "r.json").read_text())
    assert final["i"] == 199 and final["writer"] in ("one", "two") and len(final["pad"]) == 50000
    contents = {(tmp_path / "folder" / n).read_text() for n in "abc"}
    assert len(contents) == 1 and contents.pop().split()[1] == "190"   # one writer's last folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "r.json"]
