"""Where a decode step's time goes, teacher beside student: per generated token, the time inside each kind of
module of the decoder (the token mixers: softmax attention or a recurrent mixer, projections included; the MLPs;
the norms; the LM head) and the rest (embedding, residuals, masks, the decoder loop), at one context length.

    python eval/decode_profile.py TEACHER_DIR STUDENT_DIR --context 512 --tokens 64 --repeats 3
    python eval/decode_profile.py TEACHER_DIR STUDENT_DIR --context 512 --tokens 8 --paired 16
    python eval/decode_profile.py TEACHER_DIR STUDENT_DIR --context 512 --tokens 16 --paired 8 --pytorch-step
    python eval/decode_profile.py TEACHER_DIR STUDENT_DIR --context 1024 --prefill --repeats 3

Each module kind is timed by forward hooks around every module of that class, in the same process and on the
same prompt for both models; hooks add the same small cost per call to both, so read the columns side by side
(the per-token total is measured without hooks).  Reported: the median over ``repeats`` runs of ``tokens``
decoded tokens, each after a prefill of ``context`` tokens.  With ``--paired ROUNDS`` it times the two models'
decoding in alternating rounds instead, without hooks (``eval.speed.compare``): on a shared machine whose speed
drifts, the ratio of adjacent rounds is steadier than the ratio of two models timed one after the other.
``--pytorch-step`` adds a second copy of the student that decodes with the PyTorch step instead of the fused C
step of its Hedgehog layers (``rnnify_kernels.hedgehog_window``): the fused step's gain, in the same rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def module_kind(module: torch.nn.Module) -> str | None:
    """The column a module's time goes to, or None (its time stays in its parent's)."""
    name = type(module).__name__
    if hasattr(module, "mix") or name.endswith("Attention"):
        return "token mixer"
    if name.endswith("MLP"):
        return "MLP"
    if name.endswith("RMSNorm") or name.endswith("LayerNorm"):
        return "norms"
    return None


@torch.inference_mode()
def profile_decode(model, context: int, tokens: int, repeats: int = 3, seed: int = 0, prefill: bool = False) -> dict:
    """Per-token milliseconds of ``model`` decoding ``tokens`` greedy tokens after ``context``: 'total' (no hooks)
    and one entry per module kind (hooked run), medians over ``repeats``; 'modules_timed': modules per kind.
    ``prefill``: the milliseconds of the prefill of ``context`` tokens instead (one forward with the cache)."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    head = model.get_output_embeddings()

    def decode(timed_kinds: dict | None):
        cache = DynamicCache(config=model.config)
        if timed_kinds is not None:
            timed_kinds.clear()
        t0 = time.perf_counter()
        token = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        if prefill:
            return (time.perf_counter() - t0) * 1e3
        if timed_kinds is not None:
            timed_kinds.clear()
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / tokens * 1e3

    totals = [decode(None) for _ in range(repeats)]
    spent, started, handles = defaultdict(float), {}, []
    kinds = {module: module_kind(module) for module in model.modules()}
    kinds[head] = "LM head"

    def enter(module, args):
        started[module] = time.perf_counter()

    def leave(module, args, output):
        spent[kinds[module]] += time.perf_counter() - started.pop(module)

    parents = {child: parent for parent in model.modules() for child in parent.children()}
    timed = defaultdict(int)
    for module, kind in kinds.items():
        if kind is not None and not any(kinds.get(p) for p in _ancestors(parents, module)):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
            timed[kind] += 1
    runs = []
    try:
        for _ in range(repeats):
            decode(spent)
            runs.append({kind: seconds / (1 if prefill else tokens) * 1e3 for kind, seconds in spent.items()})
    finally:
        for h in handles:
            h.remove()
    out = {"total": statistics.median(totals)}
    for kind in ("token mixer", "MLP", "norms", "LM head"):
        out[kind] = statistics.median(r.get(kind, 0.0) for r in runs)
    out["rest"] = out["total"] - sum(out[k] for k in ("token mixer", "MLP", "norms", "LM head"))
    out["modules_timed"] = dict(timed)
    return out


def _ancestors(parents: dict, module) -> list:
    """Modules that contain ``module`` (so that a kind is timed once, at its outermost module)."""
    chain = []
    while module in parents:
        module = parents[module]
        chain.append(module)
    return chain


def with_pytorch_step(forward):
    """``forward`` run with ``$RNNIFY_KERNELS_BACKEND=torch``: the mixers it drives bind their decode rings to the
    PyTorch step instead of the fused one (they decide when a ring is bound; the variable is restored after)."""
    import os

    from rnnify_kernels.dispatch import ENV_VAR

    def run(*args, **kwargs):
        saved = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = "torch"
        try:
            return forward(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = saved
    return run


def markdown(rows: dict[str, dict], context: int, tokens: int, prefill: bool = False) -> str:
    """One row per model: ms per token (or per prefill) by module kind, and the ratio of totals to the first
    model's."""
    names = list(rows)
    ref = rows[names[0]]["total"]
    kinds = ["token mixer", "MLP", "norms", "LM head", "rest"]
    what = (f"prefill of {context:,} tokens, ms (median of repeats)" if prefill else
            f"decode at {context:,} tokens of context, ms per token ({tokens} tokens; median of repeats)")
    rate = "prompt tokens/s" if prefill else "tokens/s"
    lines = [what, "", "| model | total | " + " | ".join(kinds) + f" | {rate} | × {names[0]} |",
             "|---|" + "---:|" * (len(kinds) + 3)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['total']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in kinds)
                     + f" | {(context if prefill else 1) * 1e3 / r['total']:.1f} | {ref / r['total']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="instead: time the two models' decoding in alternating rounds (no hooks)")
    parser.add_argument("--pytorch-step", action="store_true",
                        help="with --paired: also a second copy of the student that decodes with the PyTorch step "
                             "instead of the fused one (rnnify_kernels.hedgehog_window), in the same rounds")
    parser.add_argument("--batch", type=int, default=1, help="with --paired: rows decoded at once")
    parser.add_argument("--prefill", action="store_true", help="instead of decoding: where the prefill of "
                                                               "--context tokens spends its time")
    args = parser.parse_args(argv)
    if args.paired:   # eval/speed.py's alternating rounds at this one length
        from eval.speed import compare
        from eval.speed import markdown as speed_markdown
        paths = [("teacher", args.teacher), ("student", args.student)]
        if args.pytorch_step:
            paths.append(("student, PyTorch step", args.student))
        models = {name: load(path, student=name != "teacher") for name, path in paths}
        if args.pytorch_step:
            models["student, PyTorch step"].forward = with_pytorch_step(models["student, PyTorch step"].forward)
        print(speed_markdown(compare(models, [args.context], new_tokens=args.tokens, repeats=args.paired,
                                     batch_size=args.batch)))
        return 0
    rows = {}
    for name, path in (("teacher", args.teacher), ("student", args.student)):
        model = load(path, student=name == "student")
        profile_decode(model, min(64, args.context), 4, repeats=1)   # warm-up: allocations, first calls
        rows[name] = profile_decode(model, args.context, args.tokens, args.repeats, prefill=args.prefill)
        del model
    print(markdown(rows, args.context, args.tokens, prefill=args.prefill))
    return 0


def load(path: str, student: bool):
    """A model in fp32 for inference; only the student's folder runs its own code (rnnify's modeling files): the
    teacher, which may be any Hub id, is loaded with transformers' built-in classes only."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=student, dtype=torch.float32).eval()


if __name__ == "__main__":
    sys.exit(main())
