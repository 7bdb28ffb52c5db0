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

A stage's cost follows its token budget, not the dataset: ``budget_rows`` tokenizes documents in their
seeded order only until the budget's rows are packed (Hub datasets are streamed, never downloaded
whole), and caches the rows under ``<rnnify cache>/rows`` so that other processes and reruns read them.
``check_documents`` (what ``validate`` uses) reads only the first record of a source.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from .corpora import BUILTIN_CORPORA, CorpusError, cache_root, corpus_file, write_folder_atomically

log = logging.getLogger("rnnify.distill")

LOCAL_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                 ".csv": "csv"}
IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset cannot be used as asked; the message names the dataset and what to change."""


class BudgetError(DataError):
    """The data holds fewer packed tokens than a token budget asks for."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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


def _load_local(source: str, files: list[str], streaming: bool = False):
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
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **extra)
    except Exception as e:   # datasets raises many types for unreadable files; name the file, keep the cause
        raise DataError(f"{source}: cannot read as {builder}: {_first_line(e)}") from None


def _load_hub(source: str, subset: str | None, split: str, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(source, subset, split=split, streaming=streaming)
    except Exception as e:   # not found, gated, offline and not cached, unknown split, ...
        offline = " (offline: HF_HUB_OFFLINE is set and it is not in the local datasets cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
        raise DataError(f"{source}: cannot load Hub dataset{offline}: {_first_line(e)}") from None


def load_documents(source: str, *, split: str | None = None, text_column: str = "text", subset: str | None = None,
                   stream_hub: bool = False):
    """Documents named by ``source`` as a ``datasets.Dataset`` with one column ``text`` (empty texts dropped).

    ``split``: for builtin corpora ``train`` (default) or ``heldout``; for Hub datasets any split
    (default ``train``); local files have a single split and ignore it.  ``stream_hub``: a Hub dataset
    comes back as a streamed ``datasets.IterableDataset`` (nothing downloaded beyond what is read).
    """
    ds = _open(source, split, subset, stream_local=False, stream_hub=stream_hub)
    if isinstance(ds, _iterable_dataset_type()):
        return _streamed_text(ds, source, text_column)
    ds = _as_text_column(ds, source, text_column, ds.column_names)
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True,
                   desc="dropping empty documents")
    if len(ds) == 0:
        raise DataError(f"{source}: no documents with text" + (f" in split {split!r}" if split else ""))
    return ds


def _open(source: str, split: str | None, subset: str | None, *, stream_local: bool, stream_hub: bool):
    """The dataset ``source`` names, as ``datasets`` loads it (a builtin corpus or local files streamed with
    ``stream_local``, a Hub dataset with ``stream_hub``)."""
    import datasets
    if source.startswith("builtin:"):
        try:
            path = corpus_file(source.split(":", 1)[1], split or "train")
        except CorpusError as e:
            raise DataError(f"{source}: {e}") from None
        return datasets.load_dataset("json", data_files=str(path), split="train", streaming=stream_local)
    files = _local_files(source)
    if files is None:
        return _load_hub(source, subset, split or "train", streaming=stream_hub)
    return _load_local(source, files, streaming=stream_local)


def _require_column(columns, source: str, text_column: str) -> None:
    if text_column not in columns:
        raise DataError(f"{source}: no column {text_column!r} (columns: {', '.join(columns)}); "
                        "set text_column to the one holding the text")


def _as_text_column(ds, source: str, text_column: str, columns):
    """``ds`` reduced to its text column, named ``text`` (``columns``: the ones it has)."""
    _require_column(columns, source, text_column)
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def _iterable_dataset_type():
    import datasets
    return datasets.IterableDataset


def _first_record(ds, source: str) -> dict:
    try:
        return next(iter(ds))
    except StopIteration:
        raise DataError(f"{source}: the dataset is empty") from None
    except Exception as e:   # datasets raises many types for unreadable records; name the source, keep the cause
        raise DataError(f"{source}: cannot read its first record: {_first_line(e)}") from None


def _streamed_text(ds, source: str, text_column: str):
    """A streamed dataset -> column ``text`` without empty documents; the column is checked on the first record."""
    ds = _as_text_column(ds, source, text_column, list(_first_record(ds, source)))
    return ds.filter(lambda example: bool(example["text"] and example["text"].strip()))


def check_documents(source: str, *, split: str | None = None, text_column: str = "text",
                    subset: str | None = None) -> dict:
    """What ``validate`` checks without reading a dataset: ``source`` exists and its first record has
    ``text_column``.  Local files and Hub datasets are streamed (only the first record is read); a builtin
    corpus is prepared on first use (a few MB).  Returns that first record."""
    first = _first_record(_open(source, split, subset, stream_local=True, stream_hub=True), source)
    _require_column(list(first), source, text_column)
    return first


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


def _pack_arrays(documents: list, seq_len: int):
    """Concatenate tokenized documents and cut them into full rows (the tail < seq_len is dropped):
    ``(input_ids, position_ids)`` int64 arrays [rows, seq_len]."""
    lengths = [len(x) for x in documents]
    flat = np.fromiter((t for x in documents for t in x), dtype=np.int64, count=sum(lengths))
    pos = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, np.int64)
    rows = len(flat) // seq_len
    ids = flat[:rows * seq_len].reshape(rows, seq_len)
    pos = pos[:rows * seq_len].reshape(rows, seq_len)
    # a document cut by a row boundary restarts at position 0: rows are independent sequences
    before_first_start = np.cumsum(pos == 0, axis=1) == 0
    return ids, np.where(before_first_start, pos - pos[:, :1], pos)


def _pack_batch(batch, seq_len: int):
    ids, pos = _pack_arrays(batch["input_ids"], seq_len)
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


def token_batches(docs, tokenizer, *, seed: int, first_batch: int = 8, max_batch: int = 1024,
                  shuffle_buffer: int = 10_000):
    """Documents in their seeded order, tokenized a batch at a time: yields lists of EOS-terminated id lists.

    ``docs``: a ``Dataset`` (column ``text``, or already ``input_ids``), shuffled as ``Dataset.shuffle(seed)``
    does — a full permutation, so the order equals ``pack_documents``' —, or a streamed ``IterableDataset``
    (a shuffle buffer of ``shuffle_buffer`` documents).  Batches double from ``first_batch`` to ``max_batch``:
    at most about twice the documents consumed get tokenized, and large budgets get batches that the fast
    tokenizer encodes on all cores.
    """
    from itertools import islice

    eos = tokenizer.eos_token_id if tokenizer is not None else None
    if tokenizer is not None and eos is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate packed documents")

    def encode(texts):
        ids = tokenizer(texts)["input_ids"]
        return [x if x and x[-1] == eos else x + [eos] for x in ids]

    size = first_batch
    if isinstance(docs, _iterable_dataset_type()):
        stream = iter(docs.shuffle(seed=seed, buffer_size=shuffle_buffer))
        while batch := [d["text"] for d in islice(stream, size)]:
            yield encode(batch)
            size = min(2 * size, max_batch)
        return
    shuffled = docs.shuffle(seed=seed)
    column = "input_ids" if "input_ids" in shuffled.column_names else "text"
    start = 0
    while start < len(shuffled):
        batch = shuffled[start:start + size][column]
        yield batch if column == "input_ids" else encode(batch)
        start += size
        size = min(2 * size, max_batch)


def budget_rows(docs, tokenizer, *, seq_len: int, tokens: int, seed: int, source: str = "dataset",
                docs_per_group: int = 1000):
    """The first ``ceil(tokens / seq_len)`` packed rows of ``docs``, tokenizing only the documents they need.

    The rows equal ``take_tokens(pack_documents(tokenize_documents(docs), seq_len, seed), tokens)``: the same
    seeded order, groups of ``docs_per_group`` documents packed on their own (a group's partial last row is
    dropped) — a group's first rows need only its first documents, so the walk stops as soon as the budget is
    packed.  Returns ``(rows, documents_tokenized)``: a ``Dataset`` with ``input_ids``/``position_ids`` [need, L].
    """
    from datasets import Dataset, Features, Sequence, Value

    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if tokens <= 0:
        raise DataError(f"{source}: the token budget must be positive, got {tokens}")
    need = math.ceil(tokens / seq_len)
    ids_parts, pos_parts, have, group, group_tokens, tokenized = [], [], 0, [], 0, 0

    def pack() -> int:
        ids, pos = _pack_arrays(group, seq_len)
        ids_parts.append(ids[:need - have])
        pos_parts.append(pos[:need - have])
        return have + len(ids_parts[-1])

    for batch in token_batches(docs, tokenizer, seed=seed):
        tokenized += len(batch)
        for ids in batch:
            group.append(ids)
            group_tokens += len(ids)
            # a group's first k rows need only its first k * seq_len tokens: pack as soon as they are there
            if len(group) == docs_per_group or group_tokens >= (need - have) * seq_len:
                have = pack()
                if have == need:
                    features = Features({"input_ids": Sequence(Value("int32")),
                                         "position_ids": Sequence(Value("int64"))})
                    return Dataset.from_dict({"input_ids": np.concatenate(ids_parts),
                                              "position_ids": np.concatenate(pos_parts)}, features=features), tokenized
                group, group_tokens = [], 0
    if group:
        have = pack()
    raise BudgetError(f"{source}: token budget {tokens:,} is larger than the data: {have:,} rows of "
                      f"{seq_len} = {have * seq_len:,} tokens after packing; lower the budget or add data")


ROWS_CACHE_VERSION = 1   # bump when packing changes, so that cached rows are rebuilt


def packed_rows(source: str, tokenizer, *, seq_len: int, tokens: int, seed: int, split: str | None = None,
                text_column: str = "text", subset: str | None = None, cache: bool = True):
    """load -> tokenize -> pack -> budget, in one call: the rows a training stage consumes, and how many
    documents were tokenized for them (``(rows, documents_tokenized)``; 0 when read from the cache).

    With ``cache``, rows are kept under ``<rnnify cache>/rows/<key>`` (written atomically); the key is the
    documents' identity (``datasets``' fingerprint of the loaded files, or the Hub id/subset/split of a
    streamed set), the tokenizer's, ``seq_len``, ``seed`` and the budget's row count.  Under several
    processes, let the main one call first (``PartialState().main_process_first()``): the others read its rows.
    """
    import datasets

    docs = load_documents(source, split=split, text_column=text_column, subset=subset, stream_hub=True)
    identity = getattr(docs, "_fingerprint", None) or f"hub:{source}|{subset}|{split}|{text_column}"
    key = hashlib.sha256(f"{identity}|{tokenizer_fingerprint(tokenizer)}|{seq_len}|{seed}|"
                         f"{math.ceil(tokens / max(seq_len, 1))}|v{ROWS_CACHE_VERSION}".encode()).hexdigest()[:20]
    folder = cache_root() / "rows" / key
    if cache and (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder)), 0
    rows, tokenized = budget_rows(docs, tokenizer, seq_len=seq_len, tokens=tokens, seed=seed, source=source)
    rows = datasets.Dataset(rows.data, info=rows.info, fingerprint=key)   # the same rows, the same fingerprint
    log.info("%s: %d rows of %d tokens from %d tokenized documents", source, len(rows), seq_len, tokenized)
    if not cache:
        return rows, tokenized
    write_folder_atomically(folder, lambda tmp: rows.save_to_disk(str(tmp)))
    return datasets.load_from_disk(str(folder)), tokenized


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


def document_windows(docs, seq_len: int, max_tokens: int, *, seed: int = 0, tokenizer=None) -> list:
    """Evaluation windows: documents in a seeded order, each cut into windows of at most ``seq_len`` tokens.

    ``docs``: tokenized documents (column ``input_ids``), or documents (column ``text``) with ``tokenizer``:
    then only the documents the windows need are tokenized.
    No window spans two documents; a window shorter than 2 tokens (nothing to predict) is skipped.
    Stops once ``max_tokens`` tokens are collected (the last window is trimmed to fit).
    Returns a list of 1-D LongTensors.
    """
    import torch

    windows, total = [], 0
    for ids in (ids for batch in token_batches(docs, tokenizer, seed=seed) for ids in batch):
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


__all__ = ["BUILTIN_CORPORA", "BudgetError", "DataError", "load_documents", "check_documents", "tokenize_documents",
           "tokenizer_fingerprint", "token_batches", "pack_documents", "take_tokens", "budget_rows", "packed_rows",
           "collate_packed", "document_windows", "LOCAL_FORMATS"]
