"""The training loop every stage shares: accelerate, AdamW + schedule, progress, JSONL log, loss plot, fail-safe.

A stage hands in a module whose ``forward(input_ids, position_ids, labels)`` returns ``(loss, extras)``
(``extras``: numbers or 1-D tensors to log) — one module, so that DDP/FSDP wrap and sync it — and the
parameters to train.  The loop stops before the optimizer step when the loss or the gradient norm is
not finite, naming the step and the likely causes.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnify.store import fsync_directory, make_durable, write_text_atomically

log = logging.getLogger("rnnify.distill")


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
    window_dropout: float = 0.0    # windowed mixers: start probability of a (row, head) without its window


STATE_FILE = "rnnify_state.json"   # written last: a checkpoint without it is incomplete


def latest_checkpoint(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint (its state file is written last, then the folder renamed) of this fingerprint."""
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))
    for path in reversed(done):
        if (path / "FINGERPRINT").read_text() == fingerprint:
            return path
    return None


def save_checkpoint(accelerator, folder: Path, step: int, tokens: int, fingerprint: str, keep: int) -> None:
    """``step-<N>`` through accelerate's ``save_state`` (which knows DDP, FSDP and DeepSpeed and keeps every
    process's RNG), atomically: every process writes into ``step-<N>.tmp``, then the main process adds the state
    file last and renames the folder; the oldest checkpoints beyond ``keep`` are pruned only after that."""
    final = folder / f"step-{step:06d}"
    tmp = folder / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "FINGERPRINT").write_text(fingerprint)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "tokens": tokens,
                                                  "num_processes": accelerator.num_processes}))
        make_durable(tmp)   # on disk before it counts as complete: a crash after the rename leaves it whole
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_directory(folder)
        complete = sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))
        for old in complete[:-keep]:             # only after the new one is complete
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path: Path, params: list | None = None) -> tuple[int, int]:
    """Restore what ``save_checkpoint`` wrote (trainable weights, optimizer, schedule, each process's RNG);
    returns ``(step, tokens)``.  Another number of processes would see other batches, and a trainable tensor
    (``params``) the checkpoint does not hold would silently start from scratch: both a ``ResumeError``."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise ResumeError(f"{path}: written by {state['num_processes']} process(es), resumed with "
                          f"{accelerator.num_processes}: the batches would differ; resume with "
                          f"{state['num_processes']} process(es), or delete the checkpoints folder to restart the stage")
    if params is not None:
        check_checkpoint_holds(accelerator, path, params)
    accelerator.load_state(str(path), strict=False)   # the checkpoint holds the trainable weights only
    return state["step"], state["tokens"]


def check_checkpoint_holds(accelerator, path: Path, params: list) -> None:
    """Every trainable tensor has its entry in the checkpoint's model files (accelerate's ``model.safetensors``,
    ``model_<i>.safetensors``).  FSDP and DeepSpeed write sharded files of their own, which they check on load."""
    from safetensors import safe_open
    ids = {id(p) for p in params}
    for i, model in enumerate(accelerator._models):
        file = path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not file.is_file():
            continue
        with safe_open(str(file), "pt") as f:
            held = set(f.keys())
        missing = [name for name, p in model.named_parameters() if id(p) in ids and name not in held]
        if missing:
            raise ResumeError(f"{path}: the checkpoint holds no {', '.join(missing[:3])}"
                              f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}: the trainable "
                              f"parameters changed since it was written (renamed or added); resuming would start "
                              f"them from scratch. Delete {path.parent} to restart the stage")


def save_only_trainable(params: list):
    """An accelerate save-state pre-hook: model files hold the trained tensors only (not the frozen teacher).
    Under FSDP/DeepSpeed accelerate writes its own sharded files and this hook sees no weights."""
    ids = {id(p) for p in params}

    def hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = {name for name, p in model.named_parameters() if id(p) in ids}
            for name in [k for k in state if k not in keep]:
                del state[name]
    return hook


def fresh_accelerator_state() -> None:
    """Forget the previous stage's accelerate settings, keeping the process group.

    accelerate keeps one global state per process and refuses another ``mixed_precision`` (or gradient
    accumulation) later in the same process; every stage builds its own ``Accelerator`` with its own, so the
    state is reset first — as transformers' ``TrainingArguments`` does for each Trainer.
    """
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def master_weights_in_fp32(params: list, mixed_precision: str) -> dict:
    """Under mixed precision, trainable tensors stored in bf16/fp16 are held in fp32 while they train (AdamW's
    updates are far below bf16's resolution); compute runs in the autocast dtype.  Returns ``{tensor: dtype}``
    to give each back its storage dtype afterwards (``restore_dtypes``).  Without mixed precision nothing
    changes (an fp32 weight would meet bf16 activations in a plain matmul)."""
    if mixed_precision == "no":
        low = sum(p.numel() for p in params if p.dtype in (torch.bfloat16, torch.float16))
        if low:
            log.warning("%d trainable values are stored in %s and mixed_precision is 'no': AdamW updates them in "
                        "that precision; set mixed_precision: bf16 for fp32 master weights", low,
                        next(p.dtype for p in params if p.dtype in (torch.bfloat16, torch.float16)))
        return {}
    original = {}
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            original[p] = p.dtype
            p.data = p.data.float()
    return original


def restore_dtypes(original: dict) -> None:
    for p, dtype in original.items():
        p.data = p.data.to(dtype)


def _number(x):
    if isinstance(x, dict):
        return x
    return x.tolist() if isinstance(x, torch.Tensor) and x.dim() > 0 else float(x)


def window_dropout_schedule(student, start: float):
    """The stage's window dropout: ``start`` at the first step, annealed linearly to 0 at the last (a progress
    callback for ``train``), or None when ``start`` is 0."""
    if not start:
        return None
    return lambda progress: student.set_window_dropout(start * (1.0 - progress))


def train(module, params: list, rows, opts: TrainOptions, out_dir: Path, name: str, progress=None) -> dict:
    """One pass over ``rows`` (packed rows) training ``params`` of ``module``; returns the stage summary.

    ``params``: tensors, or AdamW parameter groups (dicts with ``params`` and, e.g., their own ``lr``).
    ``progress``: called before each batch with the fraction of optimizer steps done (0 at the first, resumed runs
    included), and with 1.0 once the pass is over (a schedule, e.g. ``window_dropout_schedule``).

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
    fresh_accelerator_state()
    accelerator = Accelerator(cpu=opts.cpu, mixed_precision=opts.mixed_precision,
                              gradient_accumulation_steps=opts.gradient_accumulation_steps,
                              log_with=list(opts.trackers) or None, project_dir=out_dir)
    reset_peak_memory(accelerator.device)   # the stage reports its own peak, not the run's so far
    loader = DataLoader(rows, batch_size=opts.batch_size, shuffle=False, collate_fn=collate_packed)
    groups = params if params and isinstance(params[0], dict) else None
    if groups:
        params = [p for group in params for p in group["params"]]
    storage_dtypes = master_weights_in_fp32(params, opts.mixed_precision)
    optimizer = torch.optim.AdamW(groups or params, lr=opts.lr, weight_decay=opts.weight_decay)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    # planned from this process's shard of the rows: each optimizer step is one step of the schedule,
    # whatever the number of processes (the scheduler is stepped here, not by accelerate)
    steps = math.ceil(len(loader) / opts.gradient_accumulation_steps)
    scheduler = get_scheduler(opts.lr_schedule, optimizer, num_warmup_steps=opts.warmup_steps,
                              num_training_steps=steps)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(save_only_trainable(params))
    module.train()

    history, step, tokens, started = [], 0, 0, time.perf_counter()
    main = accelerator.is_main_process   # one process writes the log, the plot and the checkpoints
    ckpt_dir = out_dir / "checkpoints"
    resume = latest_checkpoint(ckpt_dir, opts.fingerprint) if opts.checkpoint_every else None
    batches = loader
    if resume is not None:
        step, tokens = load_checkpoint(accelerator, resume, params)
        history = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()][:step]
        batches = accelerator.skip_first_batches(loader, step * opts.gradient_accumulation_steps)
        log.info("%s: resuming from %s (step %d of %d)", name, resume, step, steps)
    if main:   # the log holds exactly the steps taken so far (the old log stays whole until the new one is there)
        write_text_atomically(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    if opts.trackers:
        accelerator.init_trackers(name, config={k: v for k, v in vars(opts).items() if k != "trackers"})
    accelerator.wait_for_everyone()
    bar = tqdm(total=steps, initial=step, desc=name, unit="step", disable=not accelerator.is_local_main_process)
    with open(out_dir / "log.jsonl", "a") if main else nullcontext() as log_file:
        for batch in batches:
            if progress is not None:
                progress(step / steps)
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
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
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
                save_checkpoint(accelerator, ckpt_dir, step, tokens, opts.fingerprint, opts.keep_checkpoints)
    bar.close()
    if progress is not None:
        progress(1.0)
    if opts.trackers:
        accelerator.end_training()
    restore_dtypes(storage_dtypes)
    # prepare() wrapped the module's forward in this stage's autocast; a later stage may use another precision
    accelerator.unwrap_model(module, keep_fp32_wrapper=False)
    wall = time.perf_counter() - started
    if main:
        plot_loss(history, out_dir / "loss.png", name)
    accelerator.wait_for_everyone()
    return {"name": name, "steps": step, "planned_steps": steps, "tokens": tokens, "seq_len": len(rows[0]["input_ids"]),
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "final_loss": history[-1]["loss"] if history else None, "peak_memory_gb": peak_memory_gb(accelerator.device)}


def release_freed_memory() -> None:
    """Hand memory that is no longer used back to the system: collect unreachable objects, then ask glibc to
    return the free pages of its heaps (``malloc_trim``; without it, tensors under glibc's mmap threshold, which
    grows to 32 MB as large tensors are freed, leave their pages resident after they die, and the next phase
    starts from the last one's peak: measured 7.8 GB resident for 1.3 GB live after the quickstart's stage 2).
    A no-op where the C library has no ``malloc_trim``."""
    gc.collect()
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def reset_peak_memory(device) -> None:
    """Start a new peak from what is live (``release_freed_memory``): the CUDA allocator's on a GPU; on Linux the
    process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs), so that each phase (a stage,
    an evaluation point) reports its own peak.  Elsewhere on CPU the peak stays the process's so far.  The peak
    so far is kept for ``process_peak_memory_gb``."""
    global _earlier_peak_gb
    _earlier_peak_gb = max(_earlier_peak_gb, peak_memory_gb(device))
    release_freed_memory()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


_earlier_peak_gb = 0.0   # the highest peak before the last reset_peak_memory


def process_peak_memory_gb(device) -> float:
    """The process's peak over its whole life, across the resets of ``reset_peak_memory`` (each reads the peak
    before starting a new one; resetting also resets what ``getrusage`` and ``/usr/bin/time`` report)."""
    return max(_earlier_peak_gb, peak_memory_gb(device))


def peak_memory_gb(device) -> float:
    """Peak memory since ``reset_peak_memory`` (else of this process so far): the CUDA allocator's peak on a GPU,
    the resident high-water mark on CPU (VmHWM on Linux, ``ru_maxrss`` elsewhere)."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
                     / 2 ** 20, 2)   # kB
    except (OSError, StopIteration, ValueError):
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)   # KiB on Linux


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
