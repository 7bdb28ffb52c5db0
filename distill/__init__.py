"""Distillation stages (attention transfer, end-to-end distillation). No stage is implemented yet:
recipes that list stages are rejected by the validator (see convert/recipe.py)."""
