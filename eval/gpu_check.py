"""One command for a GPU machine: what CI cannot run on CPU, checked in one go, with one summary table.

    python eval/gpu_check.py                 # on one CUDA device; about 10 minutes
    python eval/gpu_check.py --device cpu    # the same steps on CPU (Triton interpreted), to rehearse the script

Steps:
1. **kernels compiled**: ``tests/test_kernels.py`` (+ head dim 128) and ``tests/test_fla_reference.py`` with
   ``RNNIFY_TEST_DEVICE=cuda``: every op's chunked form, decode step and gradients against the references in
   fp32 and bf16, Triton compiled (not interpreted);
2. **a two-stage run in bf16**: ``tests/recipes/tiny.yaml`` with ``dtype: bfloat16`` and ``mixed_precision: bf16``
   in both stages on the device (held-out perplexity of teacher and student, each stage's tokens/s);
3. **kernel benchmark**: ``eval/bench_kernels.py`` on the device (its own markdown tables: ours, flash-linear-
   attention's when installed, SDPA; bf16, T = 2K…32K, D = 64 and 128), recording the fastest backend per op
   as the dispatcher's default on this GPU model (``--record``).

Prints the summary table (step, result, seconds, key figure) and writes everything under ``--out``.
Exit status 0 only if every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_step(name: str, cmd: list[str], env: dict, log: Path, timeout: int) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = -1, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    log.write_text(output)
    return {"step": name, "ok": code == 0, "seconds": round(time.perf_counter() - started, 1), "output": output,
            "log": str(log)}


def pytest_figure(output: str) -> str:
    found = re.findall(r"(\d+ (?:passed|failed|skipped|error)\w*)", output)
    return ", ".join(found) or "no test summary"


def run_figure(report_path: Path) -> str:
    if not report_path.is_file():
        return "no report"
    report = json.loads(report_path.read_text())
    ppl = report["perplexity"]
    speeds = ", ".join(f"{s['name']} {s['tokens_per_s']:,.0f} tok/s" for s in report["stages"])
    return f"perplexity teacher {ppl['teacher']:.2f}, student {ppl['student']:.2f}; {speeds}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "run", "bench"])
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device visible: run on a GPU machine, or --device cpu to rehearse", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RNNIFY_TEST_DEVICE": args.device, "HF_HUB_OFFLINE": "1"}
    if args.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    results = []
    if "kernels" not in args.skip:
        r = run_step("kernels (compiled)" if args.device == "cuda" else "kernels (interpreted)",
                     [sys.executable, "-m", "pytest", "tests/test_kernels.py", "tests/test_fla_reference.py", "-q",
                      "-p", "no:cacheprovider"], env, args.out / "kernels.log", timeout=420)
        r["figure"] = pytest_figure(r["output"])
        results.append(r)
    if "run" not in args.skip:
        run_dir = args.out / "tiny_bf16"
        r = run_step("two-stage run, bf16", [
            sys.executable, "-m", "convert", "run", "tests/recipes/tiny.yaml", f"output_dir={run_dir}",
            f"device={args.device}", "dtype=bfloat16", "stages.0.mixed_precision=bf16",
            "stages.1.mixed_precision=bf16"], env, args.out / "run.log", timeout=300)
        r["figure"] = run_figure(run_dir / "report.json")
        results.append(r)
    if "bench" not in args.skip:
        bench = [sys.executable, "eval/bench_kernels.py", "--device", args.device]
        if args.device == "cpu":   # a rehearsal: the smallest shapes
            bench += ["--T", "64", "--D", "16", "--repeats", "1"]
        else:
            bench += ["--record"]
        r = run_step("kernel benchmark", bench, env, args.out / "bench.md", timeout=600)
        r["figure"] = f"{r['output'].count('#### ')} tables in {r['log']}"
        results.append(r)
    lines = [f"## GPU check ({args.device})", "", "| step | result | seconds | figure |", "|---|---|---:|---|"]
    lines += [f"| {r['step']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']:.0f} | {r['figure']} |"
              for r in results]
    summary = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(summary)
    print(summary)
    for r in results:
        if not r["ok"]:
            print(f"--- {r['step']}: last lines of {r['log']}\n" + "\n".join(r["output"].splitlines()[-30:]))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
