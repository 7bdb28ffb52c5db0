"""Text for distillation and evaluation: load -> tokenize (cached) -> pack into rows that keep document boundaries.

A dataset is named the way users name them:

- ``builtin:<name>``: a bundled corpus (``distill.corpora``), split ``train`` or ``heldout``;
- a local file, folder or glob of ``.txt``/``.md`` (one document per file), ``.jsonl``/``.json``,
  ``.parquet`` or ``.csv`` (one document per row, text in ``text_column``);
- anything else is a Hugging Face Hub dataset id, loaded by ``datasets.load_dataset`` (its cache
  serves it offline once downloaded).

Packing concatenates shuffled documents, each followed by EOS, and cuts the stream into rows of
``seq_len`` tokens.  ``position_ids`` restart at 0 at every document start and at every row start,
which is the packed-sequence convention of transformers: attention masks and recurrent mixers read
the boundaries from it, so no token ever sees another document (nor its state).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from .corpora import BUILTIN_CORPORA, CorpusError, corpus_file

log = logging.getLogger("rnnify")

LOCAL_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                 ".csv": "csv"}
IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset cannot be used as asked; the message names the dataset and what to change."""


def _local_files(source: str) -> list[str] | None:
    """The files a local ``source`` names (file, folder, glob), or None when it does not look local."""
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
    if any(c in source for c in "*?["):
        return sorted(glob.glob(str(path), recursive=True))
    if source.startswith((".", "/", "~")) or path.suffix in LOCAL_FORMATS:
        raise DataError(f"{source}: no such file or folder")
    return None


def _load_local(source: str, files: list[str]):
    import datasets

    if not files:
        raise DataError(f"{source}: no data files ({', '.join(LOCAL_FORMATS)}) found there")
    kinds = {LOCAL_FORMATS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{source}: files must all be one of {', '.join(LOCAL_FORMATS)} "
                        f"(found {', '.join(sorted({Path(f).suffix or '(none)' for f in files}))})")
    builder = kinds.pop()
    extra = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **extra)
    except Exception as e:   # datasets raises many types for unreadable files; name the file, keep the cause
        raise DataError(f"{source}: cannot read as {builder}: {str(e).splitlines()[0]}") from None


def _load_hub(source: str, subset: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, subset, split=split)
    except Exception as e:   # not found, gated, offline and not cached, unknown split, ...
        offline = " (offline: HF_HUB_OFFLINE is set and it is not in the local datasets cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
        raise DataError(f"{source}: cannot load Hub dataset{offline}: {str(e).splitlines()[0]}") from None


def load_documents(source: str, *, split: str | None = None, text_column: str = "text", subset: str | None = None):
    """Documents named by ``source`` as a ``datasets.Dataset`` with one column ``text`` (empty texts dropped).

    ``split``: for builtin corpora ``train`` (default) or ``heldout``; for Hub datasets any split
    (default ``train``); local files have a single split and ignore it.
    """
    if source.startswith("builtin:"):
        import datasets
        try:
            path = corpus_file(source.split(":", 1)[1], split or "train")
        except CorpusError as e:
            raise DataError(f"{source}: {e}") from None
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        files = _local_files(source)
        ds = _load_local(source, files) if files is not None else _load_hub(source, subset, split or "train")
    if text_column not in ds.column_names:
        raise DataError(f"{source}: no column {text_column!r} (columns: {', '.join(ds.column_names)}); "
                        "set text_column to the one holding the text")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True,
                   desc="dropping empty documents")
    if len(ds) == 0:
        raise DataError(f"{source}: no documents with text" + (f" in split {split!r}" if split else ""))
    return ds


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of a tokenizer (vocabulary, merges, special tokens, settings)."""
    from datasets.fingerprint import Hasher
    return Hasher.hash(tokenizer)


def tokenize_documents(docs, tokenizer):
    """Documents -> column ``input_ids`` (the tokenizer's own specials, then EOS), cached by ``datasets``.

    The cache key is the documents' fingerprint and the tokenizer's, so a second call with the same
    text and tokenizer reads the tokenized set from disk instead of tokenizing again.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate packed documents")

    def encode(batch):
        ids = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": [x if x and x[-1] == eos else x + [eos] for x in ids]}

    key = hashlib.sha256(f"{docs._fingerprint}|{tokenizer_fingerprint(tokenizer)}|eos-v1".encode()).hexdigest()[:16]
    return docs.map(encode, batched=True, remove_columns=docs.column_names, new_fingerprint=key,
                    desc="tokenizing")


def _pack_batch(batch, seq_len: int):
    """Concatenate a batch of tokenized documents and cut it into full rows; the tail (< seq_len) is dropped."""
    lengths = [len(x) for x in batch["input_ids"]]
    flat = np.fromiter((t for x in batch["input_ids"] for t in x), dtype=np.int64, count=sum(lengths))
    pos = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, np.int64)
    rows = len(flat) // seq_len
    ids = flat[:rows * seq_len].reshape(rows, seq_len)
    pos = pos[:rows * seq_len].reshape(rows, seq_len)
    # a document cut by a row boundary restarts at position 0: rows are independent sequences
    before_first_start = np.cumsum(pos == 0, axis=1) == 0
    pos = np.where(before_first_start, pos - pos[:, :1], pos)
    return {"input_ids": ids.tolist(), "position_ids": pos.tolist()}


def pack_documents(tokenized, seq_len: int, *, seed: int, docs_per_group: int = 1000):
    """Tokenized documents -> rows ``input_ids``/``position_ids`` of exactly ``seq_len`` tokens.

    Documents are shuffled with ``seed`` first (deterministic), then packed ``docs_per_group`` at a
    time; each group's last partial row is dropped (at most ``seq_len - 1`` tokens per group).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    shuffled = tokenized.shuffle(seed=seed)
    return shuffled.map(_pack_batch, batched=True, batch_size=docs_per_group, fn_kwargs={"seq_len": seq_len},
                        remove_columns=shuffled.column_names, desc=f"packing rows of {seq_len}")


def take_tokens(rows, tokens: int, *, source: str = "dataset"):
    """The first ``ceil(tokens / seq_len)`` packed rows: a stage's token budget."""
    if tokens <= 0:
        raise DataError(f"{source}: the token budget must be positive, got {tokens}")
    seq_len = len(rows[0]["input_ids"]) if len(rows) else 0
    if seq_len == 0:
        raise DataError(f"{source}: no complete row: every document group is shorter than one row")
    need = math.ceil(tokens / seq_len)
    if need > len(rows):
        raise DataError(f"{source}: token budget {tokens:,} is larger than the data: {len(rows):,} rows of "
                        f"{seq_len} = {len(rows) * seq_len:,} tokens after packing; lower the budget or add data")
    return rows.select(range(need))


def packed_rows(source: str, tokenizer, *, seq_len: int, tokens: int, seed: int, split: str | None = None,
                text_column: str = "text", subset: str | None = None):
    """load -> tokenize -> pack -> budget, in one call: the rows a training stage consumes."""
    docs = load_documents(source, split=split, text_column=text_column, subset=subset)
    rows = pack_documents(tokenize_documents(docs, tokenizer), seq_len, seed=seed)
    return take_tokens(rows, tokens, source=source)


def collate_packed(rows: list[dict]) -> dict:
    """Packed rows -> tensors ``input_ids``, ``position_ids`` [B, L] and ``labels`` [B, L].

    ``labels`` ignore (-100) the first token of every document: it has no context in its row, and
    the previous token belongs to another document.
    """
    import torch

    input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    position_ids = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
    labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def document_windows(tokenized, seq_len: int, max_tokens: int, *, seed: int = 0) -> list:
    """Evaluation windows: documents in a seeded order, each cut into windows of at most ``seq_len`` tokens.

    No window spans two documents; a window shorter than 2 tokens (nothing to predict) is skipped.
    Stops once ``max_tokens`` tokens are collected (the last window is trimmed to fit).
    Returns a list of 1-D LongTensors.
    """
    import torch

    windows, total = [], 0
    for doc in tokenized.shuffle(seed=seed):
        ids = doc["input_ids"]
        for i in range(0, len(ids), seq_len):
            w = ids[i:i + seq_len][:max_tokens - total]
            if len(w) >= 2:
                windows.append(torch.tensor(w, dtype=torch.long))
                total += len(w)
            if total >= max_tokens:
                return windows
    if not windows:
        raise DataError("no evaluation window of 2 tokens or more")
    return windows


__all__ = ["BUILTIN_CORPORA", "DataError", "load_documents", "tokenize_documents", "tokenizer_fingerprint",
           "pack_documents", "take_tokens", "packed_rows", "collate_packed", "document_windows", "LOCAL_FORMATS"]
