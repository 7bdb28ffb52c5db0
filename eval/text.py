"""Held-out text for perplexity: a bundled corpus (split by document) or a local UTF-8 .txt file."""
from __future__ import annotations

from pathlib import Path

# builtin corpora: name -> loader of documents. `python-docs` is the Python reference topics that ship
# with CPython itself (pydoc_data), real English technical prose available on every machine.
def _python_docs() -> list[str]:
    from pydoc_data.topics import topics
    # several topic keys share one text: dedupe so that no held-out text is also a training text
    return list(dict.fromkeys(topics[k] for k in sorted(topics)))


BUILTIN_CORPORA = {"python-docs": _python_docs}
HELDOUT_EVERY = 5   # every 5th document is held out; the rest may be used for training


def corpus_documents(spec: str, split: str = "heldout") -> list[str]:
    """Documents of ``spec`` (``builtin:<name>`` or a file path); builtin corpora split by document."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
        docs = BUILTIN_CORPORA[name]()
        keep = (lambda i: i % HELDOUT_EVERY == 0) if split == "heldout" else (lambda i: i % HELDOUT_EVERY != 0)
        return [d for i, d in enumerate(docs) if keep(i)]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {spec}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file is empty: {spec}")
    return [text]


def tokenize_documents(tokenizer, docs: list[str], max_tokens: int):
    """Concatenate documents (each followed by EOS when the tokenizer has one) into one id tensor."""
    import torch
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
