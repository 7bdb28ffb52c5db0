"""``budget_curve:``: quality against the number of layers that keep softmax attention, from one attention-transfer
stage over all converted layers."""
from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

from convert.convert import restore_attention
from distill.layer_selection import kl_gains, rank_by_error, rank_by_kl

from ..recipe import Recipe
from ..stages.registry import stage_dir
from .training import run_stage, stage_fingerprint

log = logging.getLogger("rnnify.pipeline")


def rankings_of(recipe: Recipe, snapshot, stage_summary: dict, held) -> dict:
    """{ranking: {"order": layers best first, ...}} for each of ``budget_curve.rank_by``."""
    curve = recipe.budget_curve
    rankings = {}
    for by in curve.rank_by:
        if by == "kl":
            gains = kl_gains(snapshot, held.select(range(min(curve.kl_rows, len(held)))), recipe.stages[0].batch_size)
            rankings[by] = {"order": rank_by_kl(gains), "kl_gain": {str(i): g for i, g in gains.items()}}
        else:
            rankings[by] = {"order": rank_by_error(stage_summary["layer_errors"], by)}
    return rankings


def run_budget_curve(recipe: Recipe, snapshot, stage_summary: dict, held, evaluation, device: str, key: str,
                     final: dict | None, all_rows: dict) -> dict:
    """From ``snapshot`` (the student right after stage ``after_stage``, whose summary is ``stage_summary``), for
    each ranking and each K, give the K top-ranked layers their softmax attention back, run the later stages again
    under ``<out>/budget_curve/<ranking>-K<K>/`` and evaluate: held-out perplexity, the recipe's lm-eval tasks and
    passkey retrieval, and cache memory at ``cache_context`` tokens.  ``final``: the main run's final figures,
    reused for K = 0 when the main run is that student.  ``all_rows``: every stage's rows."""
    from eval.speed import measure

    curve = recipe.budget_curve
    out: Path = evaluation.out
    rankings = rankings_of(recipe, snapshot, stage_summary, held)
    later = {i: all_rows[i][:2] for i in range(curve.after_stage + 1, len(recipe.stages))}   # same rows for every K
    rows, trained = [], {}   # trained: kept layers -> the row that trained that hybrid
    for K in sorted(set(curve.keep)):
        for by in (curve.rank_by[:1] if K == 0 else curve.rank_by):   # K = 0 is the same student for every ranking
            kept = sorted(rankings[by]["order"][:K])
            name = f"{'none' if K == 0 else by}-K{K}"
            log.info("budget curve %s: softmax attention back in layers %s", name, kept)
            if tuple(kept) in trained:   # another ranking chose the same layers: the same hybrid, not trained twice
                rows.append({**trained[tuple(kept)], "rank_by": by, "same_as": trained[tuple(kept)]["rank_by"]})
                continue
            if K == 0 and final is not None:
                student, figures = None, dict(final)
            else:
                student = restore_attention(copy.deepcopy(snapshot), kept)
                stage_key = hashlib.sha256(f"{key}|{name}".encode()).hexdigest()[:16]
                for i, (rows_i, held_i) in later.items():
                    section = recipe.stages[i]
                    stage_key = stage_fingerprint(section, stage_key, rows_i)
                    student, _ = run_stage(section, student, rows_i, held_i, stage_dir(out / "budget_curve" / name, i,
                                                                                       section),
                                           recipe, device, stage_key)
                figures = {"perplexity": evaluation.perplexity(student),
                           "tasks": evaluation.tasks(student, f"budget_{name}", None, cached=False),
                           "recall": evaluation.recall(student)}
            # the cache depends on which layers attend, not on trained weights: the snapshot stands in for K = 0
            model = student if student is not None else snapshot
            figures["cache_mb"] = measure(model, curve.cache_context, new_tokens=1)["cache_mb"]
            rows.append({"keep": K, "rank_by": by if K else None, "layers": kept, **figures})
            trained[tuple(kept)] = rows[-1]
            del student
    return {"rankings": rankings, "rows": rows, "cache_context": curve.cache_context,
            "kept_attend": f"last {recipe.convert.attention_window:,} tokens" if recipe.convert.attention_window
            else "full context (KV cache grows)"}
