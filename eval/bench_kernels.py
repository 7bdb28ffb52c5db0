"""Benchmark of the sequence-mixing ops: one markdown table per op, every ratio measured in the same run.

    python eval/bench_kernels.py --device cpu            # naive, chunked PyTorch, SDPA (causal)
    python eval/bench_kernels.py --device cuda           # + Triton, + flash-linear-attention if installed

Columns: shape (B, H, T, D), backend, forward time, forward+backward time, achieved TFLOP/s and GB/s of
the forward, and speed ratios (> 1: the row is faster) against the naive recurrence (forward, and
forward+backward), the chunked PyTorch form and ``scaled_dot_product_attention`` (causal), all forward.

FLOPs count the chunked algorithm's matmuls per (batch, head): 2·T·(C·Dk + C·Dv + 2·Dk·Dv) for the
gated ops (C = chunk) and 2·T·(3·C·Dk + 2·C·Dv + 3·Dk·Dv) for the delta rule; SDPA counts
2·T²·(Dk + Dv)·½ (causal half).  Bytes count one read of q, k, v, gates and one write of o.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import decay_scalar, decay_vector, delta  # noqa: E402
from kernels.torch_ops import DEFAULT_CHUNK  # noqa: E402

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


def timed(fn, device, repeats):
    """Best of ``repeats`` wall times (after one warm-up), seconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_backward(run):
    def step():
        out = run()
        out.float().sum().backward()
    return step


def fla_op(op):
    """flash-linear-attention's equivalent op, when installed (CUDA only), in our calling convention."""
    if importlib.util.find_spec("fla") is None:
        return None
    if op == "decay_scalar":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)[0]
    if op == "decay_vector":
        from fla.ops.gla import chunk_gla
        return lambda q, k, v, g: chunk_gla(q, k, v, g=g)[0]
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g=g, beta=b)[0]


def bench_op(op, shapes, device, dtype, repeats, naive_max_t):
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
        fwd, both = {}, {}
        for name, run in candidates.items():
            with torch.no_grad():
                fwd[name] = timed(run, device, repeats)
            both[name] = timed(forward_backward(run), device, max(1, repeats // 2))
        for name in candidates:
            if name == "sdpa (causal)":
                f = 2 * B * H * T * T * (2 * D) / 2
            else:
                f = flops(op, B, T, H, D)
            rows.append({
                "shape": f"({B}, {H}, {T}, {D})", "backend": name, "fwd_ms": fwd[name] * 1e3, "fwdbwd_ms": both[name] * 1e3,
                "tflops": f / fwd[name] / 1e12, "gbs": io_bytes(op, B, T, H, D, dtype) / fwd[name] / 1e9,
                "vs_naive": fwd["naive"] / fwd[name] if "naive" in fwd else None,
                "vs_naive_bwd": both["naive"] / both[name] if "naive" in both else None,
                "vs_torch": fwd["torch chunk"] / fwd[name], "vs_sdpa": fwd["sdpa (causal)"] / fwd[name]})
    return rows


def print_table(op, rows, device, dtype):
    print(f"\n#### {op} ({device}, {str(dtype).removeprefix('torch.')}; ratios = forward speed-up of the row "
          f"over the named baseline, > 1 is faster)\n")
    print("| shape (B, H, T, D) | backend | fwd ms | fwd+bwd ms | TFLOP/s | GB/s | × naive | × naive fwd+bwd "
          "| × torch chunk | × SDPA |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        naive = f"{r['vs_naive']:.1f}" if r["vs_naive"] is not None else "—"
        naive_bwd = f"{r['vs_naive_bwd']:.1f}" if r["vs_naive_bwd"] is not None else "—"
        print(f"| {r['shape']} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {r['tflops']:.3f} | "
              f"{r['gbs']:.2f} | {naive} | {naive_bwd} | {r['vs_torch']:.2f} | {r['vs_sdpa']:.2f} |")


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
    a = p.parse_args(argv)
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
    for op in a.ops:
        shapes = [(a.B, H, T, D) for D in Ds for T in Ts]
        print_table(op, bench_op(op, shapes, a.device, dtype, repeats, a.naive_max_t), a.device, dtype)


if __name__ == "__main__":
    main()
