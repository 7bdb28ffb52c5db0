"""Where data meets the student: text loading and packing (``data``, ``corpora``), the shared training loop
(``training``), stage 1 attention transfer, stage 2 end-to-end distillation, and layer selection."""
