"""Speed and memory against context length: a model with its cache (teacher: KV cache; student: recurrent
state, window, and the KV cache of any layer that kept attention), the same prompts, one run.

For each context length L: prefill time of an L-token prompt, decode throughput of ``new_tokens`` greedy
tokens after it (tokens/s, batch ``batch_size``), and decode memory = the bytes the cache holds after
decoding (every tensor of every cache layer, counted once), plus the allocator's peak on CUDA.
Cache bytes are exact and device-independent; they are what grows with context.

    python eval/speed.py TEACHER_DIR STUDENT_DIR --lengths 512 1024 2048 4096 8192
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def cache_bytes(cache) -> int:
    """Bytes of every tensor held by the cache's layers (shared storage counted once)."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.device)
            if key not in seen and value.numel():
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for layer in getattr(cache, "layers", []):
        visit(vars(layer))
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model, context_len: int, *, new_tokens: int = 32, batch_size: int = 1, seed: int = 0,
            prompt: torch.Tensor | None = None) -> dict:
    """Prefill ``context_len`` tokens, then decode ``new_tokens`` greedily with the model's own cache.

    ``prompt`` [batch_size, >= context_len] token ids (default: seeded random ids).  Returns prefill
    seconds, decode tokens/s (all rows), cache MB after decoding, and CUDA peak MB (None on CPU).
    """
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    if prompt is None:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (batch_size, context_len), generator=g)
    ids = prompt[:, :context_len].to(device)
    cache = DynamicCache(config=model.config)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    _sync(device)
    prefill = time.perf_counter() - t0
    token = logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - t0
    return {"context": context_len, "prefill_s": prefill, "decode_tokens_per_s": new_tokens * ids.shape[0] / decode,
            "cache_mb": cache_bytes(cache) / 2 ** 20,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def profile(model, name: str, lengths: list[int], *, new_tokens: int = 32, batch_size: int = 1, warmup: int = 64,
            prompt: torch.Tensor | None = None) -> list[dict]:
    """``measure`` ``model`` at every length (rows tagged ``model: name``), after an untimed warm-up at ``warmup``
    tokens so that one-time costs (allocation, kernel selection) are not timed.  Without ``prompt`` the ids
    are seeded, hence the same for every model of a vocabulary."""
    measure(model, min(warmup, lengths[0]), new_tokens=2, batch_size=batch_size, prompt=prompt)
    return [{"model": name, **measure(model, length, new_tokens=new_tokens, batch_size=batch_size, prompt=prompt)}
            for length in lengths]


def summarize(rows: list[dict], reference: str, **meta) -> dict:
    """Rows of several models -> the result the table, plot and report read: rows, crossovers, settings."""
    return {"rows": rows, "crossover": crossovers(rows, reference=reference), **meta}


def compare(models: dict, lengths: list[int], *, new_tokens: int = 32, batch_size: int = 1, warmup: int = 64) -> dict:
    """``profile`` every model at every length on the same prompts; returns rows and the crossovers.

    ``models``: name -> model, the first is the reference (the teacher).
    """
    vocab = min(m.config.vocab_size for m in models.values())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, max(lengths)), generator=g)
    rows = [row for name, model in models.items()
            for row in profile(model, name, lengths, new_tokens=new_tokens, batch_size=batch_size, warmup=warmup,
                               prompt=prompt)]
    return summarize(rows, next(iter(models)), lengths=lengths, new_tokens=new_tokens, batch_size=batch_size,
                     device=str(next(next(iter(models.values())).parameters()).device))


def crossovers(rows: list[dict], reference: str) -> dict:
    """Per model and metric: the smallest measured context from which on it beats the reference at every
    longer measured context (None if it never does)."""
    better = {"decode_tokens_per_s": lambda a, b: a > b, "prefill_s": lambda a, b: a < b,
              "cache_mb": lambda a, b: a < b}
    ref = {r["context"]: r for r in rows if r["model"] == reference}
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] != reference):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        out[name] = {}
        for metric, wins in better.items():
            since = None
            for r in reversed(mine):
                if not wins(r[metric], ref[r["context"]][metric]):
                    break
                since = r["context"]
            out[name][metric] = since
    return out


def markdown(result: dict) -> str:
    """The table: one row per context length, teacher and student side by side, with ratios."""
    names = list(dict.fromkeys(r["model"] for r in result["rows"]))
    ref, others = names[0], names[1:]
    by = {(r["model"], r["context"]): r for r in result["rows"]}
    head = ["context"]
    for n in names:
        head += [f"{n} prefill s", f"{n} decode tok/s", f"{n} cache MB"]
    for n in others:
        head += [f"{n} decode speedup", f"{n} cache ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for L in sorted({r["context"] for r in result["rows"]}):
        cells = [f"{L:,}"]
        for n in names:
            r = by[(n, L)]
            cells += [f"{r['prefill_s']:.2f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['cache_mb']:.1f}"]
        for n in others:
            r, t = by[(n, L)], by[(ref, L)]
            cells += [f"{r['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}×",
                      f"{r['cache_mb'] / t['cache_mb']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for n, cross in result["crossover"].items():
        labels = {"decode_tokens_per_s": "decode speed", "prefill_s": "prefill time", "cache_mb": "cache memory"}
        parts = [f"{labels[metric]} " + (f"from {L:,} tokens on" if L else "at none of the measured lengths")
                 for metric, L in cross.items()]
        notes.append(f"{n} beats {ref} on " + "; ".join(parts))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def plot(result: dict, path: Path) -> None:
    """Three panels against context length: prefill seconds, decode tokens/s and cache memory, a line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("prefill_s", "prefill time (s)"), ("decode_tokens_per_s", "decode tokens/s"),
              ("cache_mb", "cache memory (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for name in dict.fromkeys(r["model"] for r in result["rows"]):
        mine = sorted((r for r in result["rows"] if r["model"] == name), key=lambda r: r["context"])
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["context"] for r in mine], [r[key] for r in mine], marker="o", label=name)
    for ax, (_, label) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"prefill, decode speed and memory vs context ({result['device']}, batch {result['batch_size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models = {"teacher": AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype),
              "student": AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype, trust_remote_code=True)}
    models = {k: m.to(args.device).eval() for k, m in models.items()}
    result = compare(models, args.lengths, new_tokens=args.new_tokens, batch_size=args.batch_size)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
