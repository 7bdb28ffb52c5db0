"""Where the teacher comes from: a Hub name, a local folder, or a builtin teacher prepared offline.

Builtin teachers are tiny models of each supported architecture with random (untrained) weights and
a byte-level BPE tokenizer trained on the builtin text; they exist so that the pipeline and its tests
run anywhere, offline.  Their perplexities say nothing about conversion quality.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

MARKER = "RNNIFY_TEACHER.json"
_TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
BUILTIN_TEACHERS: dict[str, dict] = {
    "tiny-llama": {"model_type": "llama", **_TINY},
    "tiny-mistral": {"model_type": "mistral", **_TINY, "sliding_window": None},
    "tiny-qwen2": {"model_type": "qwen2", **_TINY},
    "tiny-qwen3": {"model_type": "qwen3", **_TINY, "head_dim": 48},
    "tiny-phi3": {"model_type": "phi3", **_TINY, "tie_word_embeddings": False},
}
TOKENIZER_CORPUS = "builtin:python-docs"


def cache_dir() -> Path:
    return Path(os.environ.get("RNNIFY_CACHE", Path.home() / ".cache" / "rnnify"))


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


def build_tiny_teacher(name: str, folder: Path, docs: list[str]) -> Path:
    """Write builtin teacher ``name`` (random weights, seed 0) with its tokenizer into ``folder``, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(BUILTIN_TEACHERS[name])
    tokenizer = train_tokenizer(docs)
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"name": name, "untrained": True,
                                          "note": "random weights: the pipeline runs, the figures mean nothing"}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def teacher_info(folder: Path) -> dict:
    """The builtin marker of a prepared teacher folder ({} for other teachers)."""
    marker = Path(folder) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}
