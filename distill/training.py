"""The training loop every stage shares: accelerate, AdamW + schedule, progress, JSONL log, loss plot, fail-safe.

A stage hands in a module whose ``forward(input_ids, position_ids, labels)`` returns ``(loss, extras)``
(``extras``: numbers or 1-D tensors to log) — one module, so that DDP/FSDP wrap and sync it — and the
parameters to train.  The loop stops before the optimizer step when the loss or the gradient norm is
not finite, naming the step and the likely causes.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("rnnify")


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; no optimizer step was taken with it."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as asked (e.g. another number of processes)."""


@dataclass
class TrainOptions:
    lr: float
    batch_size: int
    seed: int = 0
    gradient_accumulation_steps: int = 1
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    cpu: bool = True
    log_every: int = 10
    checkpoint_every: int = 0      # optimizer steps between checkpoints (0: none); the last step always saves
    keep_checkpoints: int = 2
    fingerprint: str = ""          # what the checkpoints belong to; others are ignored, not resumed
    trackers: tuple[str, ...] = ()  # accelerate trackers (tensorboard, wandb), logging under out_dir


STATE_FILE = "state.pt"


def latest_checkpoint(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint (its state file is written last, then the folder renamed) of this fingerprint."""
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))
    for path in reversed(done):
        if (path / "FINGERPRINT").read_text() == fingerprint:
            return path
    return None


def save_checkpoint(folder: Path, step: int, tokens: int, params, optimizer, scheduler, fingerprint: str,
                    num_processes: int, keep: int) -> None:
    """Write ``step-<N>`` atomically (temp folder, then rename), then prune the oldest beyond ``keep``."""
    import random

    import numpy as np

    final = folder / f"step-{step:06d}"
    tmp = folder / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "FINGERPRINT").write_text(fingerprint)
    torch.save({"step": step, "tokens": tokens, "num_processes": num_processes,
                "params": [p.detach().cpu().clone() for p in params], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}},
               tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    complete = sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))
    for old in complete[:-keep]:             # only after the new one is complete
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, params, optimizer, scheduler, num_processes: int) -> tuple[int, int]:
    import random

    import numpy as np

    state = torch.load(path / STATE_FILE, weights_only=False)
    if state["num_processes"] != num_processes:
        raise ResumeError(f"{path}: written by {state['num_processes']} process(es), resumed with {num_processes}: "
                         "the batches would differ; resume with the same number of processes, or delete the "
                         "checkpoints folder to restart the stage")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved.to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["tokens"]


def _number(x):
    if isinstance(x, dict):
        return x
    return x.tolist() if isinstance(x, torch.Tensor) and x.dim() > 0 else float(x)


def train(module, params: list, rows, opts: TrainOptions, out_dir: Path, name: str) -> dict:
    """One pass over ``rows`` (packed rows) training ``params`` of ``module``; returns the stage summary.

    ``params``: tensors, or AdamW parameter groups (dicts with ``params`` and, e.g., their own ``lr``).

    Writes ``<out_dir>/log.jsonl`` (one line per optimizer step: loss, lr, tokens, grad norm, extras) and
    ``<out_dir>/loss.png``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import collate_packed

    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(opts.seed)
    accelerator = Accelerator(cpu=opts.cpu, mixed_precision=opts.mixed_precision,
                              gradient_accumulation_steps=opts.gradient_accumulation_steps,
                              log_with=list(opts.trackers) or None, project_dir=out_dir)
    loader = DataLoader(rows, batch_size=opts.batch_size, shuffle=False, collate_fn=collate_packed)
    steps = math.ceil(len(loader) / opts.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    if params and isinstance(params[0], dict):
        params = [p for group in params for p in group["params"]]
    scheduler = get_scheduler(opts.lr_schedule, optimizer, num_warmup_steps=opts.warmup_steps,
                              num_training_steps=steps)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    module.train()

    history, step, tokens, started = [], 0, 0, time.perf_counter()
    main = accelerator.is_main_process   # one process writes the log, the plot and the checkpoints
    ckpt_dir = out_dir / "checkpoints"
    resume = latest_checkpoint(ckpt_dir, opts.fingerprint) if opts.checkpoint_every else None
    batches = loader
    if resume is not None:
        step, tokens = load_checkpoint(resume, params, optimizer, scheduler, accelerator.num_processes)
        history = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()][:step]
        batches = accelerator.skip_first_batches(loader, step * opts.gradient_accumulation_steps)
        log.info("%s: resuming from %s (step %d of %d)", name, resume, step, steps)
    if main:   # the log holds exactly the steps taken so far
        (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if opts.trackers:
        accelerator.init_trackers(name, config={k: v for k, v in vars(opts).items() if k != "trackers"})
    accelerator.wait_for_everyone()
    bar = tqdm(total=steps, initial=step, desc=name, unit="step", disable=not accelerator.is_local_main_process)
    with open(out_dir / "log.jsonl", "a") if main else nullcontext() as log_file:
        for batch in batches:
            with accelerator.accumulate(module):
                loss, extras = module(**batch)
                if not torch.isfinite(loss.detach()).all():
                    raise NonFiniteError(_why(name, "loss", loss.item(), step + 1, opts, ckpt_dir))
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                    if not torch.isfinite(grad_norm):
                        raise NonFiniteError(_why(name, "gradient norm", grad_norm.item(), step + 1, opts, ckpt_dir))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += batch["input_ids"].numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.gather(loss.detach()[None]).mean().item()
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                      "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 3),
                      **{k: _number(v) for k, v in extras.items()}}
            history.append(record)
            if main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if opts.trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                step=step)
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if step % opts.log_every == 0:
                log.info("%s step %d/%d loss %.4g", name, step, steps, loss_value)
            if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == steps):
                if main:
                    save_checkpoint(ckpt_dir, step, tokens, params, optimizer, scheduler, opts.fingerprint,
                                    accelerator.num_processes, opts.keep_checkpoints)
                accelerator.wait_for_everyone()
    bar.close()
    if opts.trackers:
        accelerator.end_training()
    wall = time.perf_counter() - started
    if main:
        plot_loss(history, out_dir / "loss.png", name)
    accelerator.wait_for_everyone()
    return {"name": name, "steps": step, "tokens": tokens, "seq_len": len(rows[0]["input_ids"]),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "final_loss": history[-1]["loss"] if history else None, "peak_memory_gb": peak_memory_gb(accelerator.device)}


def peak_memory_gb(device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)   # ru_maxrss is in KiB on Linux


def _why(name: str, what: str, value: float, step: int, opts: TrainOptions, ckpt_dir: Path) -> str:
    causes = [f"learning rate too high (lr={opts.lr:g})"]
    if opts.mixed_precision == "fp16":
        causes.append("fp16 overflow (use mixed_precision: bf16)")
    causes.append("a degenerate batch (check the data)")
    last = latest_checkpoint(ckpt_dir, opts.fingerprint) if ckpt_dir.is_dir() else None
    resume = f"last good checkpoint: {last}" if last else "no checkpoint yet (a rerun starts the stage over)"
    return (f"{name}: the {what} is {value} at step {step}; stopped before the optimizer step, nothing of this step "
            f"was applied or saved; {resume}; likely causes: {'; '.join(causes)}")


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["tokens"] for r in history], [r["loss"] for r in history])
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    if history and min(r["loss"] for r in history) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
