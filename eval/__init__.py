"""Evaluation of teacher and student: held-out perplexity, lm-eval tasks (offline copies in ``tasks/``), passkey
retrieval, decode speed and cache memory against context, kernel benchmarks, and the report (markdown, JSON, plots)."""
