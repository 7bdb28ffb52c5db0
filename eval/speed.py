"""Speed and memory against context length: a model with its cache (teacher: KV cache; student: recurrent
state, window, and the KV cache of any layer that kept attention), the same prompts, one run.

For each context length L: prefill time of an L-token prompt, decode throughput of ``new_tokens`` greedy
tokens after it (tokens/s, batch ``batch_size``) timed ``repeats`` times in a row — the median and the range are
reported, and a ratio to the teacher carries the range it can take (one model's slowest repeat against the
other's fastest), so that a ratio whose range crosses 1 is not read as a win — and decode memory = the bytes
the cache holds after the first ``new_tokens`` (every tensor of every cache layer, counted once), plus the
allocator's peak on CUDA.  Cache bytes are exact and device-independent; they are what grows with context.

    python eval/speed.py TEACHER_DIR STUDENT_DIR --lengths 512 1024 2048 4096 8192
"""
from __future__ import annotations

import argparse
import statistics
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
            prompt: torch.Tensor | None = None, repeats: int = 1) -> dict:
    """Prefill ``context_len`` tokens, then decode ``new_tokens`` greedily with the model's own cache, ``repeats``
    times in a row (each repeat continues the same cache: the context grows by ``new_tokens`` per repeat).

    ``prompt`` [batch_size, >= context_len] token ids (default: seeded random ids).  Returns prefill
    seconds, decode tokens/s (all rows; the median over repeats, and ``decode_range`` [min, max]), cache MB
    after the first repeat, and CUDA peak MB (None on CPU).
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
    rates, cache_mb = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
        _sync(device)
        rates.append(new_tokens * ids.shape[0] / (time.perf_counter() - t0))
        cache_mb = cache_bytes(cache) / 2 ** 20 if cache_mb is None else cache_mb
    return {"context": context_len, "prefill_s": prefill, "decode_tokens_per_s": statistics.median(rates),
            "decode_range": [min(rates), max(rates)], "repeats": repeats, "cache_mb": cache_mb,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def decode_ratio(row: dict, ref: dict) -> tuple[float, float, float]:
    """``row``'s decode speed over ``ref``'s: (ratio of medians, lowest, highest it can be over the repeats)."""
    lo, hi = row.get("decode_range") or [row["decode_tokens_per_s"]] * 2
    ref_lo, ref_hi = ref.get("decode_range") or [ref["decode_tokens_per_s"]] * 2
    return row["decode_tokens_per_s"] / ref["decode_tokens_per_s"], lo / ref_hi, hi / ref_lo


def profile(model, name: str, lengths: list[int], *, new_tokens: int = 32, batch_size: int = 1, warmup: int = 64,
            prompt: torch.Tensor | None = None, repeats: int = 1) -> list[dict]:
    """``measure`` ``model`` at every length (rows tagged ``model: name``), after an untimed warm-up at ``warmup``
    tokens so that one-time costs (allocation, kernel selection) are not timed.  Without ``prompt`` the ids
    are seeded, hence the same for every model of a vocabulary."""
    measure(model, min(warmup, lengths[0]), new_tokens=2, batch_size=batch_size, prompt=prompt)
    return [{"model": name, **measure(model, length, new_tokens=new_tokens, batch_size=batch_size, prompt=prompt,
                                      repeats=repeats)}
            for length in lengths]


def summarize(rows: list[dict], reference: str, **meta) -> dict:
    """Rows of several models -> the result the table, plot and report read: rows, crossovers, settings."""
    return {"rows": rows, "crossover": crossovers(rows, reference=reference), **meta}


def compare(models: dict, lengths: list[int], *, new_tokens: int = 32, batch_size: int = 1, warmup: int = 64,
            repeats: int = 1) -> dict:
    """``profile`` every model at every length on the same prompts; returns rows and the crossovers.

    ``models``: name -> model, the first is the reference (the teacher).
    """
    vocab = min(m.config.vocab_size for m in models.values())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, max(lengths)), generator=g)
    rows = [row for name, model in models.items()
            for row in profile(model, name, lengths, new_tokens=new_tokens, batch_size=batch_size, warmup=warmup,
                               prompt=prompt, repeats=repeats)]
    return summarize(rows, next(iter(models)), lengths=lengths, new_tokens=new_tokens, batch_size=batch_size,
                     repeats=repeats,
                     device=str(next(next(iter(models.values())).parameters()).device))


def crossovers(rows: list[dict], reference: str) -> dict:
    """Per model and metric: the smallest measured context from which on it beats the reference at every
    longer measured context (None if it never does).  Decode beats only when it is faster over its whole
    range of repeats (its slowest repeat against the reference's fastest)."""
    better = {"decode_tokens_per_s": lambda a, b: decode_ratio(a, b)[1] > 1,
              "prefill_s": lambda a, b: a["prefill_s"] < b["prefill_s"],
              "cache_mb": lambda a, b: a["cache_mb"] < b["cache_mb"]}
    ref = {r["context"]: r for r in rows if r["model"] == reference}
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] != reference):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        out[name] = {}
        for metric, wins in better.items():
            since = None
            for r in reversed(mine):
                if not wins(r, ref[r["context"]]):
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
        head += [f"{n} prefill ratio", f"{n} decode speedup (range)", f"{n} cache ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for L in sorted({r["context"] for r in result["rows"]}):
        cells = [f"{L:,}"]
        for n in names:
            r = by[(n, L)]
            rate = f"{r['decode_tokens_per_s']:.1f}"
            if r.get("decode_range") and r.get("repeats", 1) > 1:
                rate += f" ({r['decode_range'][0]:.1f}–{r['decode_range'][1]:.1f})"
            cells += [f"{r['prefill_s']:.2f}", rate, f"{r['cache_mb']:.1f}"]
        for n in others:
            r, t = by[(n, L)], by[(ref, L)]
            ratio, lo, hi = decode_ratio(r, t)
            # bold only a speedup that holds over the whole range of repeats
            speedup = f"{ratio:.2f}× ({lo:.2f}–{hi:.2f})"
            cells += [f"{r['prefill_s'] / t['prefill_s']:.2f}×", f"**{speedup}**" if lo > 1 else speedup,
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
            line, = ax.plot([r["context"] for r in mine], [r[key] for r in mine], marker="o", label=name)
            if key == "decode_tokens_per_s" and all(r.get("decode_range") for r in mine):   # the repeats' range
                ax.fill_between([r["context"] for r in mine], [r["decode_range"][0] for r in mine],
                                [r["decode_range"][1] for r in mine], color=line.get_color(), alpha=0.2)
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
    parser.add_argument("--repeats", type=int, default=5, help="decode timings per length (median and range)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models = {"teacher": AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype),
              "student": AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype, trust_remote_code=True)}
    models = {k: m.to(args.device).eval() for k, m in models.items()}
    result = compare(models, args.lengths, new_tokens=args.new_tokens, batch_size=args.batch_size,
                     repeats=args.repeats)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
