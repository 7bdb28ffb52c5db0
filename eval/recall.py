"""Passkey retrieval: can the model recall a number it read L tokens ago?  (Landmark-attention / LongLoRA probe.)

A random 5-digit key is stated once at a given depth inside filler text of about L tokens; after the filler
the prompt asks for it, and the model decodes greedily.  Accuracy = fraction of prompts whose first
generated digits equal the key.  Recurrent students are known to lose exactly this (a fixed-size state
must hold the key across the filler), so the report shows it per context length, beside the teacher.
"""
from __future__ import annotations

import random
import re

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = ("There is an important number hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about it.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> str:
    """About ``length`` tokens: intro, filler with ``The pass key is KEY. Remember it.`` at ``depth`` (0..1), question."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(INTRO + needle + QUESTION)["input_ids"])
    per_filler = max(1, len(tokenizer(FILLER * 8)["input_ids"]) / 8)
    n = max(0, round((length - fixed) / per_filler))
    before = round(n * depth)
    return INTRO + FILLER * before + needle + FILLER * (n - before) + QUESTION


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, lengths: list[int], *, depths=(0.1, 0.5, 0.9), trials: int = 2,
                     seed: int = 0) -> list[dict]:
    """Per context length: accuracy over ``len(depths) * trials`` prompts, and the prompts' mean token count."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        hits, tokens = 0, 0
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = tokenizer(passkey_prompt(tokenizer, length, depth, key), return_tensors="pt")["input_ids"]
                tokens += ids.shape[1]
                out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                     max_new_tokens=8, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                hits += first_number(answer) == key
        n = len(depths) * trials
        rows.append({"context": length, "accuracy": hits / n, "prompts": n, "mean_tokens": round(tokens / n)})
    return rows


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None
