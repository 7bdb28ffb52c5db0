"""The pipeline: recipe -> teacher -> student -> stages -> evaluation -> report.  The only place that composes
packages.  ``inputs`` (what a run reads and checks before weights load), ``training`` (conversion and the stages),
``evaluation`` (the evaluation points), ``budget_curve``, ``run`` (the run and ``convert eval``)."""
from .inputs import check_tasks, resolve_device, validate
from .run import evaluate_saved, run

__all__ = ["check_tasks", "resolve_device", "validate", "evaluate_saved", "run"]
