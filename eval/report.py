"""REPORT.md from report.json: what the conversion lost and gained, as tables a paper or model card can take.

Sections: perplexity at every evaluated point (with ratios to the teacher), lm-eval tasks side by side
(with the delta to the teacher, per task, never only an average), speed and memory against context
length with the crossover, training stages (tokens, wall time, tokens/s, peak memory), and the
``lm_eval`` command lines that reproduce each task figure.
"""
from __future__ import annotations

from pathlib import Path

from rnnify.store import write_text_atomically

# headline metric per lm-eval metric name, and whether higher is better
_METRIC_ORDER = ("acc_norm", "acc", "exact_match", "perplexity", "word_perplexity")


def headline_metric(metrics: dict) -> str | None:
    return next((m for m in _METRIC_ORDER if m in metrics), None)


def perplexity_rows(report: dict) -> list[tuple[str, float, float | None]]:
    """(point, held-out perplexity, unseen-domain perplexity or None) at every evaluated point.  Points measured on
    other tokens than the teacher's (null after ``convert eval`` with another text) are left out; the saved student,
    measured again, then has its own row."""
    ppl = report["perplexity"]
    unseen = (report.get("unseen") or {}).get("perplexity", {})
    points = [("student after init", ppl.get("student_after_init"), unseen.get("student_after_init"))]
    points += [(f"after stage {i} ({s['name']})", s.get("perplexity"), s.get("unseen_perplexity"))
               for i, s in enumerate(report.get("stages", []))]
    rows = [("teacher", ppl["teacher"], unseen.get("teacher"))] + [p for p in points if p[1] is not None]
    if any(p[1] is None for p in points):
        rows.append(("student (saved), evaluated again", ppl["student"], unseen.get("student")))
    return rows


def perplexity_table(report: dict) -> str:
    """Perplexity and its ratio to the teacher's at every point: on eval.text's held-out split, and on the domain
    no stage trained on (``unseen``) when the run measured one."""
    teacher = report["perplexity"]["teacher"]
    unseen = report.get("unseen")
    if not unseen:
        lines = ["| model | held-out perplexity | ratio to teacher |", "|---|---:|---:|"]
        for name, value, _ in perplexity_rows(report):
            lines.append(f"| {name} | {value:.2f} | {value / teacher:.2f}× |")
        return "\n".join(lines)
    other = unseen["perplexity"]["teacher"]
    lines = [f"| model | {report.get('eval_text', 'held-out text')} (trained on) | ratio | {unseen['text']} (unseen) "
             "| ratio |", "|---|---:|---:|---:|---:|"]
    for name, value, value_unseen in perplexity_rows(report):
        cells = ["–", "–"] if value_unseen is None else [f"{value_unseen:.2f}", f"{value_unseen / other:.2f}×"]
        lines.append(f"| {name} | {value:.2f} | {value / teacher:.2f}× | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def position_loss_section(report: dict) -> str:
    """Mean loss by position, teacher beside student, per log-spaced bin of positions ("" when not measured)."""
    curve = report.get("position_loss")
    if not curve:
        return ""
    lines = [f"Held-out windows of up to {curve['seq_len']:,} tokens; a position p predicts token p + 1 from p + 1 "
             "tokens of context; mean next-token loss (nats) per bin of positions.", "",
             "| positions | tokens | teacher | student | student − teacher |", "|---|---:|---:|---:|---:|"]
    for (lo, hi), n, t, s in zip(curve["bins"], curve["tokens"], curve["teacher"], curve["student"]):
        where = f"{lo:,}" if hi == lo + 1 else f"{lo:,}–{hi - 1:,}"
        lines.append(f"| {where} | {n:,} | {t:.3f} | {s:.3f} | {s - t:+.3f} |")
    return "\n".join(lines) + "\n\n![loss by position](position_loss.png)"


def plot_position_loss(curve: dict, path: Path) -> None:
    """Mean loss against position (log scale), teacher and student: where the student stops using context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    middles = [(lo + hi - 1) / 2 + 1 for lo, hi in curve["bins"]]   # 1-based, so that position 0 sits on a log axis
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("teacher", "student"):
        ax.plot(middles, curve[name], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("tokens of context (position + 1)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title("loss by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tasks_table(report: dict) -> str:
    """One row per task and metric, one column per evaluated point, then student − teacher."""
    tasks = report.get("tasks") or {}
    points = [p for p in tasks if tasks[p]]
    if not points:
        return ""
    names = list(dict.fromkeys(t for p in points for t in tasks[p]))
    head = ["task", "metric", "shots", "n"] + [p.replace("_", " ") for p in points]
    has_delta = "teacher" in points and "student" in points
    if has_delta:
        head.append("student − teacher")
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|" + "---:|" * (len(head) - 4)]
    for task in names:
        first = next(tasks[p][task] for p in points if task in tasks[p])
        metric = headline_metric(first["metrics"])
        if metric is None:
            continue
        cells = [task, metric, str(first["num_fewshot"]), str(first["samples"])]
        for p in points:
            m = tasks[p].get(task, {}).get("metrics", {})
            value, err = m.get(metric), m.get(f"{metric}_stderr")
            cells.append("–" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else ""))
        if has_delta and task in tasks["teacher"] and task in tasks["student"]:
            delta = tasks["student"][task]["metrics"][metric] - tasks["teacher"][task]["metrics"][metric]
            cells.append(f"{delta:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MEMORY_CAPTION = ("Peak memory of each phase alone (the CUDA allocator's peak on a GPU; on Linux the process's resident "
                  "high-water mark, reset at the start of each phase), so the phases' peaks do not include each other.")


def stages_table(report: dict) -> str:
    stages = report.get("stages") or []
    if not stages:
        return ""
    lines = ["| stage | tokens | steps | wall | tokens/s | peak memory | final loss | evaluation after it, peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, s in enumerate(stages):   # a stage that trains nothing (a custom one) has no training figures: "–"
        cells = [_figure(s, "tokens", "{:,}"), _figure(s, "steps", "{}"), _figure(s, "wall_s", "{:.0f} s"),
                 _figure(s, "tokens_per_s", "{:.0f}"), _figure(s, "peak_memory_gb", "{:.1f} GB"),
                 _figure(s, "final_loss", "{:.4g}"), _figure(s, "eval_peak_memory_gb", "{:.1f} GB")]
        lines.append(f"| {i} {s['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(summary: dict, key: str, form: str) -> str:
    value = summary.get(key)
    return "–" if value is None else form.format(value)


def speed_caption(speed: dict) -> str:
    """How the speed table was measured: rounds timed in alternation (``paired``) or one model after the other."""
    how = (f"Prefill an L-token prompt, then decode {speed['new_tokens']} tokens greedily, "
           f"{speed.get('repeats', 1)} times (batch {speed['batch_size']}, {speed['device']}): decode tok/s is the "
           "median (range over the repeats). ")
    if speed.get("paired"):
        how += ("The models decode in alternating rounds on the same prompt, so a slow phase of the machine slows "
                "both: a speedup is the median of the student's rate over the teacher's in the same round (range "
                "over the rounds), and only one above 1 in every round is bold or counts as a win. ")
    else:
        how += ("A speedup's range pairs one model's slowest repeat with the other's fastest, and only a speedup above "
                "1 over its whole range is bold or counts as a win. ")
    return how + ("Cache = every tensor the model's cache holds after the first repeat (KV for attention layers; "
                  "state and window for recurrent ones).")


RECALL_CAPTION = ("A 5-digit key stated once at several depths inside filler text of the given length; accuracy "
                  "of greedy recall.")


def ablation_section(report: dict) -> str:
    """The component ablation: the final student beside itself with its recurrent part off (window + sink
    only), the learned window shares, and a plain verdict on whether the recurrence carries context."""
    ab = report.get("component_ablation")
    if not ab:
        return ""
    teacher = report["perplexity"]["teacher"]
    lines = ["| student | held-out perplexity | ratio to teacher |", "|---|---:|---:|",
             f"| as trained | {ab['student']:.2f} | {ab['student'] / teacher:.2f}× |",
             f"| recurrent part off ({ab['off_means']}) | {ab['window_only']:.2f} | {ab['window_only'] / teacher:.2f}× |"]
    cost = ab["window_only"] / ab["student"] - 1
    verdict = (f"The recurrent part carries context: switching it off costs {cost:.1%} perplexity."
               if cost > 0 else
               f"**The recurrent part does not carry context: the student does not beat its own window-only "
               f"baseline** (switching the recurrence off changes perplexity by {cost:+.1%}).")
    shares = ab.get("window_share") or {}
    if shares:
        values = list(shares.values())
        verdict += (f" Learned window share f (0.5 at conversion), mean over heads per layer: "
                    f"{min(values):.3f}–{max(values):.3f} (mean {sum(values) / len(values):.3f}).")
    return "\n".join(lines) + "\n\n" + verdict


def budget_curve_table(report: dict) -> str:
    """Quality against the number of layers that keep softmax attention, one row per (K, ranking)."""
    curve = report.get("budget_curve")
    if not curve:
        return ""
    teacher = report["perplexity"]["teacher"]
    rows = curve["rows"]
    task_names = list(dict.fromkeys(t for r in rows for t in (r.get("tasks") or {})))
    recall_lengths = [x["context"] for x in (next((r["recall"] for r in rows if r.get("recall")), None) or [])]
    head = (["softmax layers", "ranked by", "layers", "perplexity", "ratio"] + task_names
            + [f"passkey {n:,}" for n in recall_lengths] + [f"cache at {curve['cache_context']:,} (MB)"])
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|---:|---:|" + "---:|" * (len(head) - 5)]
    for r in rows:
        ranked = (r["rank_by"] or "–") + (f" (same layers as {r['same_as']})" if r.get("same_as") else "")
        cells = [str(r["keep"]), ranked, ", ".join(map(str, r["layers"])) or "none",
                 f"{r['perplexity']:.2f}", f"{r['perplexity'] / teacher:.2f}×"]
        for name in task_names:
            metrics = (r.get("tasks") or {}).get(name, {}).get("metrics", {})
            metric = headline_metric(metrics)
            cells.append(f"{metrics[metric]:.3f}" if metric else "–")
        by_len = {x["context"]: x["accuracy"] for x in (r.get("recall") or [])}
        cells += [f"{by_len[n]:.2f}" if n in by_len else "–" for n in recall_lengths]
        cells.append(f"{r['cache_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    best = []
    for K in sorted({r["keep"] for r in rows if r["keep"]}):
        at = [r for r in rows if r["keep"] == K]
        if len(at) > 1:
            win = min(at, key=lambda r: r["perplexity"])
            best.append(f"K = {K}: {win['rank_by']}")
    note = (f"Kept layers attend over the {curve['kept_attend']}. Ranking with the lower perplexity per budget: "
            + "; ".join(best) + ".") if best else f"Kept layers attend over the {curve['kept_attend']}."
    return "\n".join(lines) + "\n\n" + note + "\n\n![quality vs attention kept](budget_curve.png)"


def plot_budget_curve(report: dict, path: Path) -> None:
    """Perplexity ratio to the teacher against the number of softmax layers kept, one line per ranking."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, teacher = report["budget_curve"], report["perplexity"]["teacher"]
    base = [r for r in curve["rows"] if r["keep"] == 0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for by in dict.fromkeys(r["rank_by"] for r in curve["rows"] if r["rank_by"]):
        points = sorted(base + [r for r in curve["rows"] if r["rank_by"] == by], key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in points], [r["perplexity"] / teacher for r in points], marker="o", label=by)
    if not any(r["rank_by"] for r in curve["rows"]):
        ax.plot([r["keep"] for r in base], [r["perplexity"] / teacher for r in base], marker="o")
    ax.axhline(1.0, color="gray", linestyle=":", label="teacher")
    ax.set_xlabel("layers that keep softmax attention")
    ax.set_ylabel("perplexity / teacher's")
    ax.set_title("quality vs attention kept")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_table(report: dict) -> str:
    """Passkey accuracy per context length, teacher beside student ("" when the run measured none)."""
    rec = report.get("recall")
    if not rec:
        return ""
    lines = ["| context | prompts | teacher | student |", "|---:|---:|---:|---:|"]
    for t, s in zip(rec["teacher"], rec["student"]):
        lines.append(f"| {t['context']:,} | {t['prompts']} | {t['accuracy']:.2f} | {s['accuracy']:.2f} |")
    return "\n".join(lines)


def render(report: dict) -> str:
    """The whole REPORT.md."""
    from .speed import markdown as speed_markdown

    n = len(report["mixer_layers"]) + len(report["attention_layers"])
    parts = [f"# {report['teacher']} → {report['mixer']['type']} student",
             f"{len(report['mixer_layers'])} of {n} layers converted to `{report['mixer']['type']}` "
             f"(options {report['mixer']}); softmax attention kept in layers {report['attention_layers'] or 'none'}"
             + kept_window(report) + ".",
             ]
    if report.get("teacher_untrained"):
        parts.append("**The teacher is untrained (random weights): these figures only show that the pipeline runs.**")
    unseen = report.get("unseen")
    parts += ["## Perplexity", f"Held-out text, {report['perplexity_tokens']:,} tokens"
              + (f"; and {unseen['tokens']:,} held-out tokens of `{unseen['text']}`, a domain no stage trained on."
                 if unseen else "."), perplexity_table(report)]
    table = budget_curve_table(report)
    if table:
        parts += ["## Quality vs attention kept", table]
    ablation = ablation_section(report)
    if ablation:
        parts += ["## What the recurrence adds", ablation]
    section = position_loss_section(report)
    if section:
        parts += ["## Loss by position", section]
    table = tasks_table(report)
    if table:
        parts += ["## lm-eval tasks", "Headline metric per task (± standard error). Averages hide what is lost: "
                  "read the rows.", table]
    if report.get("speed"):
        speed = report["speed"]
        parts += ["## Speed and memory against context",
                  speed_caption(speed),
                  speed_markdown(speed), "![speed and memory](speed.png)"]
    if report.get("recall"):
        parts += ["## Passkey retrieval", RECALL_CAPTION, recall_table(report)]
    table = stages_table(report)
    if table:
        parts += ["## Training", table]
    memory = report.get("eval_peak_memory_gb")
    if memory:
        parts += [MEMORY_CAPTION + f" Evaluation of the teacher: {memory['teacher_eval']:.1f} GB; of the final student "
                  f"(ablation, speed against the teacher loaded again, passkey): {memory['final_eval']:.1f} GB."
                  + (f" The whole run's peak: {report['run_peak_memory_gb']:.1f} GB." if report.get("run_peak_memory_gb")
                     else "")]
    commands = [(p, t, r["command"]) for p, ts in (report.get("tasks") or {}).items() for t, r in ts.items()
                if p == "student"]
    if commands:
        parts += ["## Reproduce the student's task figures with lm-eval",
                  "```bash\n" + "\n".join(c for _, _, c in commands) + "\n```"]
    return "\n\n".join(parts) + "\n"


def kept_window(report: dict) -> str:
    """How the kept softmax layers attend, when limited to a window (reports before windows had none)."""
    window = report.get("attention_window")
    if not window or not report["attention_layers"]:
        return ""
    sink = ", plus an attention sink standing in for the first token" if report.get("attention_sink") else ""
    return f", over their last {window:,} tokens{sink}"


def card_sections(report: dict) -> dict:
    """What a model card shows of a report, rendered: markdown per section ("" when the report has none), the
    kept layers' window phrase, and the headline metric of each lm-eval task of the final student."""
    from .speed import markdown as speed_markdown
    return {"kept_window": kept_window(report), "perplexity": perplexity_table(report),
            "tasks": tasks_table(report) or "",
            "recall": f"{RECALL_CAPTION}\n\n{recall_table(report)}" if report.get("recall") else "",
            "speed": speed_markdown(report["speed"]) if report.get("speed") else "",
            "stages": stages_table(report) if report.get("stages") else "",
            "headline_metrics": {task: headline_metric(result["metrics"])
                                 for task, result in (report.get("tasks") or {}).get("student", {}).items()}}


def write(report: dict, out_dir: Path) -> Path:
    if report.get("budget_curve"):
        plot_budget_curve(report, out_dir / "budget_curve.png")
    path = out_dir / "REPORT.md"
    write_text_atomically(path, render(report))
    return path


def compare(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: perplexities, task headline metrics, decode speed and cache at the longest
    context both measured; B − A in the last column."""
    lines = [f"| | {names[0]} | {names[1]} | B − A |", "|---|---:|---:|---:|"]

    def row(label, x, y, fmt="{:.4f}"):
        numbers = isinstance(x, (int, float)) and isinstance(y, (int, float))
        cells = [fmt.format(v) if isinstance(v, (int, float)) else "–" for v in (x, y)]
        delta = fmt.replace("{:", "{:+").format(y - x) if numbers else "–"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {delta} |")

    for key in ("teacher", "student_after_init", "student"):
        row(f"perplexity: {key.replace('_', ' ')}", a["perplexity"].get(key), b["perplexity"].get(key), "{:.2f}")
    for point in ("teacher", "student"):
        ta, tb = (r.get("tasks", {}).get(point, {}) for r in (a, b))
        for task in dict.fromkeys(list(ta) + list(tb)):
            metric = headline_metric((ta.get(task) or tb.get(task))["metrics"])
            row(f"{task} {metric}: {point}", ta.get(task, {}).get("metrics", {}).get(metric),
                tb.get(task, {}).get("metrics", {}).get(metric))
    if a.get("speed") and b.get("speed"):
        common = sorted(set(a["speed"]["lengths"]) & set(b["speed"]["lengths"]))
        if common:
            L = common[-1]
            pick = {name: {(r["model"], r["context"]): r for r in rep["speed"]["rows"]} for name, rep in (("a", a), ("b", b))}
            for metric, label in (("decode_tokens_per_s", "decode tok/s"), ("cache_mb", "cache MB")):
                row(f"student {label} at {L:,}", pick["a"][("student", L)][metric], pick["b"][("student", L)][metric],
                    "{:.1f}")
    return "\n".join(lines) + "\n"
