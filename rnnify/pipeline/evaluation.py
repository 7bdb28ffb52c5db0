"""The recipe's ``eval:`` section at each evaluation point of a run: held-out perplexity, lm-eval tasks, passkey
retrieval, speed and memory against the teacher, and what the recurrence adds (the component ablation).  Results
of a run are cached in ``<output_dir>/evaluations.json`` under a key, so that a rerun reuses them."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from eval.perplexity import perplexity as score_windows

from ..recipe import EvalSection
from ..store import write_json_atomically
from .provenance import changes, code_version

log = logging.getLogger("rnnify.pipeline")
EVALUATIONS_FILE = "evaluations.json"


def perplexity(model, windows, batch_size: int) -> float:
    """Held-out perplexity; under several processes each scores its share of the windows (all must call it)."""
    return score_windows(model, windows, batch_size, split_across_processes=True)


def evaluate_tasks(model, tokenizer, section: EvalSection, seed: int, out: Path, point: str,
                   saved_path: str | None) -> dict:
    """``eval.tasks`` on ``model`` (lm-eval's JSON under ``<out>/lm_eval/<point>/``)."""
    if not section.tasks:
        return {}
    from eval.harness import TaskRequest, run_tasks
    requests = [TaskRequest(t.name, t.num_fewshot, t.limit) for t in section.tasks]
    log.info("lm-eval on %s: %s", point, ", ".join(t.name for t in section.tasks))
    return run_tasks(model, tokenizer, requests, batch_size=section.tasks_batch_size,
                     out_dir=out / "lm_eval" / point, saved_path=saved_path, seed=seed)


def measure_recall(model, tokenizer, section: EvalSection, seed: int) -> list[dict] | None:
    spec = section.recall
    if spec is None:
        return None
    from eval.recall import passkey_accuracy
    return passkey_accuracy(model, tokenizer, spec.lengths, depths=spec.depths, trials=spec.trials, seed=seed)


def measure_speed(load_teacher_model, student, section: EvalSection) -> dict | None:
    """Speed/memory of the teacher (loaded again by ``load_teacher_model()`` for this only) and the student at
    ``eval.speed``'s context lengths, their decoding timed in alternating rounds (``eval.speed.compare``)."""
    spec = section.speed
    if spec is None:
        return None
    from eval.speed import compare
    log.info("speed/memory of teacher and student at %s tokens, decoding in alternation", spec.lengths)
    return compare({"teacher": load_teacher_model(), "student": student}, spec.lengths, new_tokens=spec.new_tokens,
                   batch_size=spec.batch_size, repeats=spec.repeats, prefill_repeats=spec.prefill_repeats)


def component_ablation(student, windows, batch_size: int, student_perplexity: float) -> dict | None:
    """The student with its recurrent part off beside itself as trained, when anything in it keeps a softmax
    window (windowed mixers, or kept layers limited to an attention window); None otherwise."""
    mixer_window = student.config.mixer.get("window")
    if not student.config.mixer_layers or not (mixer_window or student.config.attention_window):
        return None
    with student.recurrent_part_off():
        window_only = perplexity(student, windows, batch_size)
    shares = student.window_shares()
    return {"student": student_perplexity, "window_only": window_only,
            "off_means": "window and sink only" if mixer_window else "mixers output zero",
            "carries_context": window_only > student_perplexity,
            "window_share": {str(i): v for i, v in shares.items()}}


def cached_evaluation(out: Path, name: str, key: dict, main: bool, evaluate):
    """``evaluate()``, or its result from an earlier run of this output_dir with the same ``key``."""
    path = out / EVALUATIONS_FILE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    earlier = cache.get(name, {})
    if earlier.get("key") == key:
        log.info("evaluation of %s: reused from %s", name, path)
        return earlier["result"]
    now = code_version()
    if earlier and earlier.get("code") != now:
        log.info("evaluation of %s: measured again: the earlier one was made by other code (%s)", name,
                 changes(earlier.get("code"), now))
    result = evaluate()
    if main:   # only this process writes the file, so the cache read above is current
        cache[name] = {"key": key, "result": result, "code": now}
        write_json_atomically(path, cache)
    return result


@contextmanager
def own_peak(model):
    """Within: a new peak of memory on ``model``'s device (``distill.training.reset_peak_memory``); yields a dict
    whose ``"gb"`` holds that peak once the block has run."""
    from distill.training import peak_memory_gb, reset_peak_memory
    device = next(model.parameters()).device
    reset_peak_memory(device)
    peak = {}
    yield peak
    peak["gb"] = peak_memory_gb(device)


class Evaluation:
    """``eval:`` at each evaluation point of a run (the teacher, the student after conversion, after each stage,
    the final student), on the models it is handed; ``run`` and ``convert eval`` share it.

    With ``key`` (``run``), a result this output_dir already holds under the same key (evaluations.json) is
    reused; without (``convert eval``), everything is measured again.  lm-eval, speed and passkey run in the
    main process only (see ``inputs.EVALUATION_WAIT``); held-out perplexity is split across all processes.
    ``load_teacher_model()``: the teacher again, for the speed comparison at the final point.
    """

    def __init__(self, section: EvalSection, seed: int, tokenizer, windows: list, out: Path, main: bool,
                 load_teacher_model, key: dict | None = None, unseen: tuple[str, list] | None = None,
                 position_windows: list | None = None):
        self.section, self.seed, self.tokenizer, self.windows, self.out = section, seed, tokenizer, windows, out
        self.main, self.key, self.load_teacher_model = main, key, load_teacher_model
        self.unseen, self.position_windows = unseen, position_windows   # (source, windows) of the second domain

    def _cached(self, name: str, evaluate):
        return evaluate() if self.key is None else cached_evaluation(self.out, name, self.key, self.main, evaluate)

    def perplexity(self, model, name: str | None = None) -> float:
        """Held-out perplexity (cached as ``name`` when one is given)."""
        measure = partial(perplexity, model, self.windows, self.section.batch_size)
        return measure() if name is None else self._cached(name, measure)

    def unseen_perplexity(self, model, name: str | None = None) -> float | None:
        """Perplexity on the second domain, which no stage trains on (None without one; cached as
        ``unseen_<name>``)."""
        if self.unseen is None:
            return None
        measure = partial(perplexity, model, self.unseen[1], self.section.batch_size)
        return measure() if name is None else self._cached(f"unseen_{name}", measure)

    def position_loss(self, model, name: str | None = None) -> dict | None:
        """Mean loss by position on ``eval.position_loss``'s long windows (main process; None elsewhere or when
        off; cached as ``position_loss_<name>``)."""
        if self.position_windows is None or not self.main:
            return None
        from eval.perplexity import loss_by_position
        measure = partial(loss_by_position, model, self.position_windows, self.section.position_loss.batch_size)
        return measure() if name is None else self._cached(f"position_loss_{name}", measure)

    def tasks(self, model, point: str, saved_path: str | None = None, cached: bool = True) -> dict:
        """lm-eval at ``point`` (cached as ``tasks_<point>``); {} in the other processes."""
        if not self.main:
            return {}
        measure = partial(evaluate_tasks, model, self.tokenizer, self.section, self.seed, self.out, point, saved_path)
        return self._cached(f"tasks_{point}", measure) if cached else measure()

    def recall(self, model) -> list[dict] | None:
        """Passkey retrieval (main process; None elsewhere or when ``eval.recall`` is off)."""
        return measure_recall(model, self.tokenizer, self.section, self.seed) if self.main else None

    def after_stage(self, student, i: int, last: bool, saved_path: str | None) -> dict:
        """A stage's point: held-out perplexity, and lm-eval if ``tasks_at`` names stages (or this is the ``last``
        stage and it names the student: ``saved_path`` is where that student will be saved); its own peak memory
        (``eval_peak_memory_gb``)."""
        with own_peak(student) as peak:
            point = {"perplexity": self.perplexity(student), "unseen_perplexity": self.unseen_perplexity(student)}
            if "stages" in self.section.tasks_at or (last and "student" in self.section.tasks_at):
                point["tasks"] = self.tasks(student, f"after_stage_{i}", saved_path if last else None, cached=False)
        return {**point, "eval_peak_memory_gb": peak["gb"]}

    def teacher(self, teacher, location: str) -> dict:
        """The teacher's point: perplexity, tasks (if ``tasks_at`` names it) and passkey (speed: at ``final``), and
        its own peak memory (``peak_memory_gb``: what was measured in this run; a reused result costs nothing)."""
        with own_peak(teacher) as peak:
            point = {"perplexity": self.perplexity(teacher, "teacher"),
                     "unseen_perplexity": self.unseen_perplexity(teacher, "teacher"),
                     "position_loss": self.position_loss(teacher, "teacher"), "tasks": None, "recall": None}
            if "teacher" in self.section.tasks_at:
                point["tasks"] = self.tasks(teacher, "teacher", location)
            if self.section.recall:
                point["recall"] = self.recall(teacher)
        return {**point, "peak_memory_gb": peak["gb"]}

    def final(self, student, teacher_point: dict, student_perplexity: float, student_tasks: dict | None,
              recall: dict | None = None) -> dict:
        """The final student's point beside the teacher's: component ablation, speed/memory against the teacher
        loaded again (speed.png) and passkey (``recall`` may already hold the student's, from the budget curve);
        ``student_tasks`` as measured; the teacher's and this point's own peak memory (``eval_peak_memory_gb``)."""
        with own_peak(student) as peak:
            point = self._final(student, teacher_point, student_perplexity, student_tasks, recall)
        return {**point, "eval_peak_memory_gb": {"teacher_eval": teacher_point["peak_memory_gb"],
                                                 "final_eval": peak["gb"]}}

    def _final(self, student, teacher_point, student_perplexity, student_tasks, recall) -> dict:
        ablation = component_ablation(student, self.windows, self.section.batch_size, student_perplexity)
        tasks = {}
        if teacher_point["tasks"] is not None:
            tasks["teacher"] = teacher_point["tasks"]
        if student_tasks is not None:
            tasks["student"] = student_tasks
        speed = None
        if recall is None and teacher_point["recall"] is not None:
            recall = {"teacher": teacher_point["recall"]}
        if self.main:
            speed = measure_speed(self.load_teacher_model, student, self.section)
            if speed is not None:
                from eval.speed import plot
                plot(speed, self.out / "speed.png")
            if recall is not None and "student" not in recall:   # the budget curve may have measured it already
                recall["student"] = self.recall(student)
        position = None
        if teacher_point.get("position_loss") is not None:
            student_curve = self.position_loss(student)
            position = {"seq_len": self.section.position_loss.seq_len, "bins": student_curve["bins"],
                        "tokens": student_curve["tokens"], "teacher": teacher_point["position_loss"]["loss"],
                        "student": student_curve["loss"]}
            from eval.report import plot_position_loss
            plot_position_loss(position, self.out / "position_loss.png")
        return {"component_ablation": ablation, "tasks": tasks, "speed": speed, "recall": recall,
                "position_loss": position}
