"""Speed and memory against context length: a model with its cache (teacher: KV cache; student: recurrent
state, window, and the KV cache of any layer that kept attention), the same prompts, one run.

For each context length L: prefill time of an L-token prompt, decode throughput of ``new_tokens`` greedy
tokens after it (tokens/s, batch ``batch_size``) timed ``repeats`` times — the median and the range are reported —
and decode memory = the bytes the cache holds after the first ``new_tokens`` (every tensor of every cache layer,
counted once), plus the allocator's peak on CUDA.  Cache bytes are exact and device-independent; they are what
grows with context.  ``compare`` times the models' decoding in alternating rounds, so that a ratio to the teacher
is taken round by round (median and range over the rounds) and a machine whose speed drifts slows both sides of
it alike; a ratio whose range crosses 1 is not read as a win.

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


class Decoding:
    """One model decoding greedily with its own cache: a timed prefill of ``ids`` [B, L] on construction, then
    ``round(n)`` times n more tokens (tokens/s over all rows; each round continues the same cache).

    ``cache_mb`` is taken after the first round; on CUDA ``peak_mb`` is the allocator's peak during the prefill and
    first round above what was allocated before (cache and activations: not the weights, not another model's
    cache)."""

    @torch.inference_mode()
    def __init__(self, model, ids: torch.Tensor):
        from transformers.cache_utils import DynamicCache

        self.model, self.device = model, next(model.parameters()).device
        self.context, self.rows = ids.shape[1], ids.shape[0]
        self.cache = DynamicCache(config=model.config)
        self.rates, self.cache_mb, self.peak_mb = [], None, None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._allocated = torch.cuda.memory_allocated(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids.to(self.device), past_key_values=self.cache, use_cache=True,
                       logits_to_keep=1).logits
        _sync(self.device)
        self.prefill_s = time.perf_counter() - t0
        self.token = logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def round(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            logits = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True).logits
            self.token = logits[:, -1:].argmax(-1)
        _sync(self.device)
        self.rates.append(n * self.rows / (time.perf_counter() - t0))
        if self.cache_mb is None:
            self.cache_mb = cache_bytes(self.cache) / 2 ** 20
            if self.device.type == "cuda":
                self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._allocated) / 2 ** 20
        return self.rates[-1]

    def row(self) -> dict:
        """prefill seconds, decode tokens/s (median over the rounds, ``decode_range`` [min, max]), cache MB, peak MB."""
        return {"context": self.context, "prefill_s": self.prefill_s,
                "decode_tokens_per_s": statistics.median(self.rates),
                "decode_range": [min(self.rates), max(self.rates)], "repeats": len(self.rates),
                "cache_mb": self.cache_mb, "peak_mb": self.peak_mb}


def _prompt(vocab_size: int, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def measure(model, context_len: int, *, new_tokens: int = 32, batch_size: int = 1, seed: int = 0,
            prompt: torch.Tensor | None = None, repeats: int = 1) -> dict:
    """Prefill ``context_len`` tokens, then decode ``new_tokens`` greedily with the model's own cache, ``repeats``
    times in a row (each repeat continues the same cache: the context grows by ``new_tokens`` per repeat).

    ``prompt`` [batch_size, >= context_len] token ids (default: seeded random ids).  Returns ``Decoding.row``.
    """
    if prompt is None:
        prompt = _prompt(model.config.vocab_size, batch_size, context_len, seed)
    run = Decoding(model, prompt[:, :context_len])
    for _ in range(repeats):
        run.round(new_tokens)
    return run.row()


def decode_ratio(row: dict, ref: dict) -> tuple[float, float, float]:
    """``row``'s decode speed over ``ref``'s: (ratio, lowest, highest).  Rows timed in alternation with the reference
    (``compare``) carry the ratio of each round, ``decode_speedup`` [median, min, max]; otherwise the ratio of the
    medians and the range it can take over the repeats (one model's slowest against the other's fastest)."""
    if row.get("decode_speedup"):
        return tuple(row["decode_speedup"])
    lo, hi = row.get("decode_range") or [row["decode_tokens_per_s"]] * 2
    ref_lo, ref_hi = ref.get("decode_range") or [ref["decode_tokens_per_s"]] * 2
    return row["decode_tokens_per_s"] / ref["decode_tokens_per_s"], lo / ref_hi, hi / ref_lo


def prefill_ratio(row: dict, ref: dict) -> tuple[float, float, float]:
    """``row``'s prefill time over ``ref``'s: (ratio, lowest, highest) over the alternating prefill rounds
    (``compare``'s ``prefill_ratio``), or the ratio of single timings (no spread)."""
    if row.get("prefill_ratio"):
        return tuple(row["prefill_ratio"])
    ratio = row["prefill_s"] / ref["prefill_s"]
    return ratio, ratio, ratio


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
            repeats: int = 1, prefill_repeats: int = 1) -> dict:
    """Every model at every length on the same prompt, their prefill and decoding timed in alternation; rows and
    crossovers.

    ``models``: name -> model, the first is the reference (the teacher).  At each length the models prefill the
    prompt ``prefill_repeats`` times in alternating rounds (reversed every other round; each round starts from an
    empty cache), then each decodes a first round of ``new_tokens`` from its last prefill, one model after the
    other; then ``repeats`` - 1 more rounds alternate between the models, in reverse order every other round.  A slow
    phase of a shared machine thus slows every model alike.  Rows carry ``prefill_s`` (median over the prefill
    rounds) and ``prefill_range`` [min, max]; each other model's row carries ``prefill_ratio`` and
    ``decode_speedup``: its time (rate) over the reference's in the same round, [median, min, max] over the rounds.
    """
    vocab = min(m.config.vocab_size for m in models.values())
    prompt = _prompt(vocab, batch_size, max(lengths))
    for model in models.values():   # untimed: allocations, first calls
        measure(model, min(warmup, lengths[0]), new_tokens=2, batch_size=batch_size, prompt=prompt)
    reference = next(iter(models))
    rows = []
    for length in lengths:
        runs, prefills = {}, {name: [] for name in models}
        for r in range(prefill_repeats):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                runs.pop(name, None)   # the previous round's cache, before this prefill
                runs[name] = Decoding(models[name], prompt[:, :length])
                prefills[name].append(runs[name].prefill_s)
        for name in models:
            runs[name].round(new_tokens)
        runs = {name: runs[name] for name in models}
        order = list(runs.values())
        for r in range(1, repeats):
            for run in (order if r % 2 == 0 else order[::-1]):
                run.round(new_tokens)
        for name, run in runs.items():
            times = prefills[name]
            row = {"model": name, **run.row(), "prefill_s": statistics.median(times),
                   "prefill_range": [min(times), max(times)], "prefill_repeats": len(times)}
            if name != reference:
                ratios = [a / b for a, b in zip(run.rates, runs[reference].rates)]
                row["decode_speedup"] = [statistics.median(ratios), min(ratios), max(ratios)]
                ratios = [a / b for a, b in zip(times, prefills[reference])]
                row["prefill_ratio"] = [statistics.median(ratios), min(ratios), max(ratios)]
            rows.append(row)
        del runs, order, run   # the caches of this length, before the next length's prefill
    return summarize(rows, reference, lengths=lengths, new_tokens=new_tokens, batch_size=batch_size,
                     repeats=repeats, prefill_repeats=prefill_repeats, paired=True,
                     device=str(next(next(iter(models.values())).parameters()).device))


def crossovers(rows: list[dict], reference: str) -> dict:
    """Per model and metric: the smallest measured context from which on it beats the reference at every
    longer measured context (None if it never does).  Decode beats only when it is faster over its whole
    range of repeats (its slowest repeat against the reference's fastest)."""
    better = {"decode_tokens_per_s": lambda a, b: decode_ratio(a, b)[1] > 1,
              "prefill_s": lambda a, b: prefill_ratio(a, b)[2] < 1,
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
        head += [f"{n} prefill time ratio (range)", f"{n} decode speedup (range)", f"{n} cache ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for L in sorted({r["context"] for r in result["rows"]}):
        cells = [f"{L:,}"]
        for n in names:
            r = by[(n, L)]
            rate = f"{r['decode_tokens_per_s']:.1f}"
            if r.get("decode_range") and r.get("repeats", 1) > 1:
                rate += f" ({r['decode_range'][0]:.1f}–{r['decode_range'][1]:.1f})"
            prefill = f"{r['prefill_s']:.2f}"
            if r.get("prefill_repeats", 1) > 1:
                prefill += f" ({r['prefill_range'][0]:.2f}–{r['prefill_range'][1]:.2f})"
            cells += [prefill, rate, f"{r['cache_mb']:.1f}"]
        for n in others:
            r, t = by[(n, L)], by[(ref, L)]
            ratio, lo, hi = decode_ratio(r, t)
            # bold only a speedup that holds over the whole range of repeats
            speedup = f"{ratio:.2f}× ({lo:.2f}–{hi:.2f})"
            p_ratio, p_lo, p_hi = prefill_ratio(r, t)
            prefill = f"{p_ratio:.2f}×" + (f" ({p_lo:.2f}–{p_hi:.2f})" if r.get("prefill_ratio") else "")
            cells += [f"**{prefill}**" if p_hi < 1 else prefill, f"**{speedup}**" if lo > 1 else speedup,
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
    parser.add_argument("--repeats", type=int, default=5,
                        help="decode rounds per length, the models in alternation (median and range)")
    parser.add_argument("--prefill-repeats", type=int, default=1,
                        help="prefill rounds per length, the models in alternation (median and range)")
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
                     repeats=args.repeats, prefill_repeats=args.prefill_repeats)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
