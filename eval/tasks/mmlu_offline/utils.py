# lm-eval loads `!function utils.x` from the YAML's own folder: the loaders live one level up
from eval.tasks.utils import load_saved  # noqa: F401
