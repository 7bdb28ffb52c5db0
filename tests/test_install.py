"""rnnify installs beside the ecosystem's packages: its import names are the design's folders (convert, distill, eval)
and names that start with ``rnnify``; ``kernels`` stays Hugging Face's kernel hub, which transformers imports, from
the repo root as from anywhere else, and from a wheel as from the editable install."""
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from convert.convert import convert, save_student
from tests.conftest import randomize_mixers

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_IMPORT_NAMES = {"convert", "distill", "eval", "rnnify", "rnnify_kernels"}


def python(code: str, cwd: Path, **env) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env}, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def hugging_face_kernels() -> Path:
    """Where Hugging Face's ``kernels`` distribution put its package (it must be installed: a dev dependency)."""
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels")).resolve()


def test_import_kernels_from_the_repo_root_is_hugging_faces_and_transformers_imports_it():
    out = python("import kernels, transformers.modeling_utils\n"
                 "from transformers.utils.import_utils import is_kernels_available\n"
                 "import rnnify_kernels\n"
                 "print(kernels.__file__); print(is_kernels_available()); print(rnnify_kernels.__file__)",
                 cwd=REPO_ROOT)
    hf_file, available, ours = out.splitlines()[-3:]
    assert Path(hf_file).resolve().parent == hugging_face_kernels()
    assert available == "True"
    assert Path(ours).resolve() == REPO_ROOT / "kernels" / "rnnify_kernels" / "__init__.py"   # the editable install


def test_wheel_installs_only_our_import_names_and_runs_beside_hugging_faces_kernels(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    source = shutil.copytree(REPO_ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("rnnify-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == OUR_IMPORT_NAMES
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert set(zipfile.ZipFile(wheel).read(top_level).decode().split()) == OUR_IMPORT_NAMES
    # what the folders hold besides Python: the fused steps' C sources and the offline lm-eval task files
    assert {"rnnify_kernels/hedgehog_window/step.c", "rnnify_kernels/ssm_step/step.c",
            "eval/tasks/piqa_offline.yaml"} <= set(names)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert install.returncode == 0, install.stderr[-3000:]
    # the wheel first on the path, run from elsewhere: our names come from it, `kernels` from Hugging Face
    out = python("import kernels, rnnify_kernels, rnnify.cli, convert.export, transformers.modeling_utils\n"
                 "print(kernels.__file__); print(rnnify_kernels.__file__)", cwd=tmp_path, PYTHONPATH=str(target))
    hf_file, ours = out.splitlines()[-2:]
    assert Path(hf_file).resolve().parent == hugging_face_kernels()
    assert Path(ours).resolve() == (target / "rnnify_kernels" / "__init__.py").resolve()
    help_text = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True, text=True,
                               cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
                               stdin=subprocess.DEVNULL)
    assert help_text.returncode == 0 and "run" in help_text.stdout, help_text.stderr[-3000:]


def test_exported_student_loads_and_runs_where_hugging_faces_kernels_is_installed(tmp_path, tokenizer):
    """transformers.modeling_utils imports Hugging Face's kernels; the saved student loads through it and runs
    rnnify's kernels (the same logits as in this process)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    student = randomize_mixers(convert(LlamaForCausalLM(cfg).eval(), {"type": "gated_deltanet"}, [1]))
    folder = save_student(student, tmp_path / "student", tokenizer)
    ids = torch.tensor([tokenizer("The if statement is used for")["input_ids"]])
    with torch.no_grad():
        torch.save({"ids": ids, "logits": student(ids).logits}, tmp_path / "ref.pt")
    out = python(f"""
import sys, torch, transformers.modeling_utils, kernels
from transformers import AutoModelForCausalLM
d = torch.load({str(tmp_path / 'ref.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
with torch.no_grad():
    print((m(d["ids"]).logits - d["logits"]).abs().max().item())
print(kernels.__file__); print("rnnify_kernels" in sys.modules)
""", cwd=REPO_ROOT, HF_HOME=str(tmp_path / "hf"))
    diff, hf_file, ours_used = out.splitlines()[-3:]
    assert float(diff) < 1e-5
    assert Path(hf_file).resolve().parent == hugging_face_kernels()
    assert ours_used == "True"
