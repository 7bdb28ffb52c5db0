"""The stages a recipe can list, one registry: each stage is one file here holding its recipe section (a pydantic
model whose ``name`` is its tag) and its runner.  ``register_stage`` adds one; the recipe schema and the pipeline
read ``STAGES`` only.  Importing this package registers the built-in stages."""
from .registry import STAGES, Stage, TrainingStage, register_stage, train_options
from . import attention_transfer, distill  # noqa: E402,F401  (register the built-in stages)

__all__ = ["STAGES", "Stage", "TrainingStage", "register_stage", "train_options"]
