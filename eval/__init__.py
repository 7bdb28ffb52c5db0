"""Evaluation of teacher and student: perplexity now; lm-eval tasks and speed/memory to come."""
