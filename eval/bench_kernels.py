"""Benchmark of the sequence-mixing ops: one markdown table per op, every ratio measured in the same run.

    python eval/bench_kernels.py --device cpu            # naive, chunked PyTorch, SDPA (causal)
    python eval/bench_kernels.py --device cuda --record  # + Triton, + flash-linear-attention if installed;
                                                         # --record: the dispatcher's default on this GPU

Columns: shape (B, H, T, D), backend, forward time (median of the repeats, with their range), forward+backward
time (median), achieved TFLOP/s and GB/s of the forward, GB/s as a fraction of the device's copy bandwidth
measured in the same run (a large tensor copied, read + write: the bandwidth a kernel can reach), and speed
ratios of medians (> 1: the row is faster) against the naive recurrence (forward, and forward+backward), the
chunked PyTorch form and ``scaled_dot_product_attention`` (causal), all forward.

FLOPs count the chunked algorithm's matmuls per (batch, head): 2·T·(C·Dk + C·Dv + 2·Dk·Dv) for the
gated ops (C = chunk) and 2·T·(3·C·Dk + 2·C·Dv + 3·Dk·Dv) for the delta rule; SDPA counts
2·T²·(Dk + Dv)·½ (causal half).  Bytes count one read of q, k, v, gates and one write of o.

``--record`` writes, for this GPU model, the backend (torch | triton | fla) with the lowest total
forward+backward time per op into ``rnnify_kernels.dispatch.fastest_file()``; ``rnnify_kernels`` then runs it by default.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rnnify_kernels import decay_scalar, decay_vector, delta  # noqa: E402
from rnnify_kernels.torch_ops import DEFAULT_CHUNK  # noqa: E402
from rnnify.store import write_json_atomically  # noqa: E402

OPS = {"decay_scalar": decay_scalar, "decay_vector": decay_vector, "delta": delta}


def make_inputs(op, B, T, H, D, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    gate = -torch.rand((B, T, H, D) if op == "decay_vector" else (B, T, H), generator=g) * 0.1
    args = [q, k, v, gate] + ([torch.rand(B, T, H, generator=g)] if op == "delta" else [])
    return [a.to(device=device, dtype=dtype).requires_grad_(grad) for a in args]


def flops(op, B, T, H, D):
    C = DEFAULT_CHUNK[op]
    per = 3 * C * D + 2 * C * D + 3 * D * D if op == "delta" else C * D + C * D + 2 * D * D
    return 2 * B * H * T * per


def io_bytes(op, B, T, H, D, dtype):
    elt = torch.finfo(dtype).bits // 8
    gates = B * T * H * (D if op == "decay_vector" else 1) + (B * T * H if op == "delta" else 0)
    return (4 * B * T * H * D + gates) * elt


def timed(fn, device, repeats) -> list[float]:
    """``repeats`` wall times in seconds, after one warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device, repeats=5) -> float:
    """GB/s of copying a large tensor (read + write), the best of ``repeats``."""
    n = (256 if device == "cuda" else 64) * 2 ** 20 // 4
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    return 2 * n * 4 / min(timed(lambda: y.copy_(x), device, repeats)) / 1e9


def forward_backward(run):
    def step():
        out = run()
        out.float().sum().backward()
    return step


def fla_op(op):
    """flash-linear-attention's chunked op, when installed (CUDA only), through rnnify's ``fla`` mapping."""
    if importlib.util.find_spec("fla") is None:
        return None
    return lambda *args: OPS[op].chunk(*args, backend="fla")[0]


def bench_op(op, shapes, device, dtype, repeats, naive_max_t, copy_gbs):
    rows = []
    for B, H, T, D in shapes:
        args = make_inputs(op, B, T, H, D, dtype, device, grad=True)
        candidates = {"torch chunk": lambda: OPS[op].chunk(*args, backend="torch")[0]}
        if T <= naive_max_t:
            candidates["naive"] = lambda: OPS[op].naive(*args)[0]
        if device == "cuda":
            candidates["triton"] = lambda: OPS[op].chunk(*args, backend="triton")[0]
            fla = fla_op(op)
            if fla is not None:
                candidates["fla"] = lambda: fla(*args)
        qs, ks, vs = (a.detach().transpose(1, 2).contiguous().requires_grad_() for a in args[:3])
        candidates["sdpa (causal)"] = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        fwd, both, spread = {}, {}, {}
        for name, run in candidates.items():
            with torch.no_grad():
                times = timed(run, device, repeats)
            fwd[name], spread[name] = statistics.median(times), (min(times), max(times))
            both[name] = statistics.median(timed(forward_backward(run), device, max(1, repeats // 2)))
        for name in candidates:
            if name == "sdpa (causal)":
                f = 2 * B * H * T * T * (2 * D) / 2
            else:
                f = flops(op, B, T, H, D)
            gbs = io_bytes(op, B, T, H, D, dtype) / fwd[name] / 1e9
            rows.append({
                "shape": f"({B}, {H}, {T}, {D})", "backend": name, "fwd_ms": fwd[name] * 1e3,
                "fwd_range_ms": [t * 1e3 for t in spread[name]], "fwdbwd_ms": both[name] * 1e3,
                "tflops": f / fwd[name] / 1e12, "gbs": gbs, "of_copy_bw": gbs / copy_gbs,
                "vs_naive": fwd["naive"] / fwd[name] if "naive" in fwd else None,
                "vs_naive_bwd": both["naive"] / both[name] if "naive" in both else None,
                "vs_torch": fwd["torch chunk"] / fwd[name], "vs_sdpa": fwd["sdpa (causal)"] / fwd[name]})
    return rows


def print_table(op, rows, device, dtype):
    print(f"\n#### {op} ({device}, {str(dtype).removeprefix('torch.')}; ratios = forward speed-up of the row "
          f"over the named baseline, > 1 is faster)\n")
    print("| shape (B, H, T, D) | backend | fwd ms (range) | fwd+bwd ms | TFLOP/s | GB/s | of copy BW | × naive "
          "| × naive fwd+bwd | × torch chunk | × SDPA |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        naive = f"{r['vs_naive']:.1f}" if r["vs_naive"] is not None else "—"
        naive_bwd = f"{r['vs_naive_bwd']:.1f}" if r["vs_naive_bwd"] is not None else "—"
        lo, hi = r["fwd_range_ms"]
        print(f"| {r['shape']} | {r['backend']} | {r['fwd_ms']:.2f} ({lo:.2f}–{hi:.2f}) | {r['fwdbwd_ms']:.2f} | "
              f"{r['tflops']:.3f} | {r['gbs']:.2f} | {r['of_copy_bw']:.0%} | {naive} | {naive_bwd} | "
              f"{r['vs_torch']:.2f} | {r['vs_sdpa']:.2f} |")


BACKEND_OF = {"torch chunk": "torch", "triton": "triton", "fla": "fla"}


def fastest_backends(rows_per_op: dict[str, list[dict]]) -> dict[str, str]:
    """{op: backend} with the lowest forward+backward time summed over the measured shapes."""
    choice = {}
    for op, rows in rows_per_op.items():
        totals = {}
        for r in rows:
            if r["backend"] in BACKEND_OF:
                totals[BACKEND_OF[r["backend"]]] = totals.get(BACKEND_OF[r["backend"]], 0.0) + r["fwdbwd_ms"]
        choice[op] = min(totals, key=totals.get)
    return choice


def record(device_name: str, choice: dict[str, str]) -> Path:
    """Merge {op: backend} for ``device_name`` into the dispatcher's file (other GPUs' entries are kept)."""
    from rnnify_kernels.dispatch import fastest_file
    path = fastest_file()
    table = json.loads(path.read_text()) if path.exists() else {}
    table[device_name] = {**table.get(device_name, {}), **choice}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, table)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--T", nargs="+", type=int, default=None, help="sequence lengths")
    p.add_argument("--D", nargs="+", type=int, default=None, help="head dims")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--naive-max-t", type=int, default=2048, help="skip the (slow) naive recurrence above this T")
    p.add_argument("--record", action="store_true",
                   help="make the fastest backend per op the dispatcher's default on this GPU model (CUDA only)")
    a = p.parse_args(argv)
    if a.record and a.device != "cuda":
        p.error("--record applies to CUDA (the dispatcher's default elsewhere is torch)")
    cpu = a.device == "cpu"
    dtype = getattr(torch, a.dtype or ("float32" if cpu else "bfloat16"))
    Ts = a.T or ([512, 2048] if cpu else [2048, 4096, 8192, 16384, 32768])
    Ds = a.D or ([64] if cpu else [64, 128])
    H = a.H or (4 if cpu else 16)
    repeats = a.repeats or (10 if cpu else 20)
    if cpu:
        torch.set_num_threads(torch.get_num_threads())
    print(f"# kernel benchmark: device {a.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if not cpu else f' ({torch.get_num_threads()} threads)'}, "
          f"torch {torch.__version__}, flash-linear-attention "
          f"{'installed' if importlib.util.find_spec('fla') else 'not installed'}")
    copy_gbs = copy_bandwidth(a.device)
    print(f"\ncopy bandwidth (read + write of a large tensor, best of 5): {copy_gbs:.1f} GB/s")
    results = {}
    for op in a.ops:
        shapes = [(a.B, H, T, D) for D in Ds for T in Ts]
        results[op] = bench_op(op, shapes, a.device, dtype, repeats, a.naive_max_t, copy_gbs)
        print_table(op, results[op], a.device, dtype)
    choice = fastest_backends(results)
    print("\nfastest forward+backward per op: " + ", ".join(f"{op} {b}" for op, b in choice.items()))
    if a.record:
        print(f"recorded for {torch.cuda.get_device_name()} in {record(torch.cuda.get_device_name(), choice)}")


if __name__ == "__main__":
    main()
