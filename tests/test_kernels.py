"""Chunked forms (PyTorch and Triton) and decode steps against the fp32 reference recurrences.

The Triton kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set in conftest
before triton compiles anything): the same kernels, checked on small shapes.  With RNNIFY_TEST_DEVICE=cuda
every tensor is made on the GPU and the kernels run compiled, with head dim 128 added (eval/gpu_check.py).
"""
import pytest
import torch

from rnnify_kernels import decay_scalar, decay_vector, delta
from tests.conftest import TEST_DEVICE

OPS = {"decay_scalar": decay_scalar, "decay_vector": decay_vector, "delta": delta}
BACKENDS = ["torch", "triton"]
HEAD_DIMS = [16, 32, 64] + ([128] if TEST_DEVICE != "cpu" else [])


@pytest.fixture(autouse=True)
def on_test_device():
    """Every tensor a test makes without a device goes to RNNIFY_TEST_DEVICE (cpu by default)."""
    torch.set_default_device(TEST_DEVICE)
    yield
    torch.set_default_device("cpu")


def make_inputs(op, B=2, T=37, H=4, Hkv=None, Dk=16, Dv=24, dtype=torch.float32, strong=False, seed=0):
    g = torch.Generator().manual_seed(seed)   # seeded on the CPU, the same numbers on every device
    Hkv = Hkv or H
    q = torch.randn(B, T, H, Dk, generator=g, device="cpu")
    k = torch.randn(B, T, Hkv, Dk, generator=g, device="cpu")
    v = torch.randn(B, T, Hkv, Dv, generator=g, device="cpu")
    shape = (B, T, H, Dk) if op == "decay_vector" else (B, T, H)
    log_decay = -torch.rand(shape, generator=g, device="cpu") * (8.0 if strong else 0.5)
    args = [q, k, v, log_decay]
    if op == "delta":
        args[1] = torch.nn.functional.normalize(k, dim=-1)
        args.append(torch.rand(B, T, H, generator=g, device="cpu"))
    return [a.to(device=TEST_DEVICE, dtype=dtype) for a in args]


def call(fn, args, **kw):
    return fn(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 37, 64, 130])
def test_chunk_matches_naive_outputs_and_state(op, T, backend):
    args = make_inputs(op, T=T)
    S0 = torch.randn(2, 4, 16, 24)
    o_ref, s_ref = OPS[op].naive(*args, initial_state=S0, output_final_state=True)
    o, s = OPS[op].chunk(*args, initial_state=S0, output_final_state=True, backend=backend)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strong", [False, True], ids=["weak-decay", "strong-decay"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_chunk_gradients_match_naive(op, backend, strong):
    """dq, dk, dv, d log_decay, dβ and d initial_state, with GQA heads and T not a multiple of the chunk;
    strong decay (log decay down to -8 per step) takes the overflow-safe paths and must not give NaN."""
    H, Hkv = (2, 1) if backend == "triton" else (4, 2)   # the interpreter runs one program after another
    args = [a.double().requires_grad_() for a in make_inputs(op, T=45, B=2, H=H, Hkv=Hkv, Dk=8, Dv=12, strong=strong)]
    S0 = torch.randn(2, H, 8, 12, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (OPS[op].naive, lambda *a, **k: OPS[op].chunk(*a, backend=backend, **k)):
        o, s = fn(*args, initial_state=S0, output_final_state=True)
        (o.float().square().sum() + s.square().sum()).backward()
        grads.append([a.grad.clone() for a in args] + [S0.grad.clone()])
        for a in args + [S0]:
            a.grad = None
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_continuation_equals_one_call(op, backend):
    args = make_inputs(op, T=50)
    o_all, s_all = OPS[op].chunk(*args, output_final_state=True, backend=backend)
    first = [a[:, :23] for a in args]
    second = [a[:, 23:] for a in args]
    o1, s1 = OPS[op].chunk(*first, output_final_state=True, backend=backend)
    o2, s2 = OPS[op].chunk(*second, initial_state=s1, output_final_state=True, backend=backend)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, s_all, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_recurrent_steps_equal_chunk(op, backend):
    args = make_inputs(op, T=12, Hkv=2, Dv=80)    # GQA, and Dv spanning two column blocks of the Triton step
    o_ref, s_ref = OPS[op].naive(*args, output_final_state=True)
    state, outs = None, []
    for t in range(12):
        o, state = OPS[op].recurrent_step(*[a[:, t:t + 1] for a in args], initial_state=state, backend=backend)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_varlen_equals_separate_calls_with_gradients(op, backend):
    lens = [5, 17, 9]
    full = make_inputs(op, B=1, T=sum(lens))
    full = [a.requires_grad_() for a in full]
    cu = torch.tensor([0, 5, 22, 31])
    S0 = torch.randn(3, 4, 16, 24)
    o, s = OPS[op].chunk(*full, initial_state=S0, output_final_state=True, cu_seqlens=cu, backend=backend)
    o.square().sum().backward()
    packed_grads = [a.grad.clone() for a in full]
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = [x.detach()[:, a:b].clone().requires_grad_() for x in full]
        o_i, s_i = OPS[op].naive(*part, initial_state=S0[i:i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_i, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s[i:i + 1], s_i, rtol=1e-4, atol=1e-4)
        o_i.square().sum().backward()
        for g_packed, x in zip(packed_grads, part):
            torch.testing.assert_close(g_packed[:, a:b], x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_and_gqa(op, D, backend):
    args = make_inputs(op, T=20, H=4, Hkv=2, Dk=D, Dv=D, B=1)
    o_ref, _ = OPS[op].naive(*args)
    o, _ = OPS[op].chunk(*args, backend=backend)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("Dk,Dv", [(64, 64), (128, 128), (256, 129)], ids=["64", "128", "hedgehog-2x128"])
def test_tiled_triton_kernels_at_model_head_dims(op, Dk, Dv):
    """Model-size heads (Hedgehog: 2·128 feature keys, values + the normaliser column) split over several value
    blocks per head, with grouped kv heads, packed sequences and initial states: outputs, final states and every
    gradient against the reference."""
    from rnnify_kernels.triton_gated import value_block
    assert -(-Dv // value_block(Dk, Dv)) >= (1 if Dv <= 64 else 2)     # the larger heads really are tiled
    args = make_inputs(op, B=1, T=20, H=2, Hkv=1, Dk=Dk, Dv=Dv)   # 2 query heads share 1 kv head
    g = torch.Generator().manual_seed(5)
    h0 = (torch.randn(2, 2, Dk, Dv, generator=g, device="cpu") * 0.1).to(TEST_DEVICE)
    kw = dict(cu_seqlens=torch.tensor([0, 9, 20]), output_final_state=True)
    results = []
    for form in (lambda *a, **k: OPS[op].naive(*a, **k), lambda *a, **k: OPS[op].chunk(*a, backend="triton", **k)):
        leaves = [a.detach().clone().requires_grad_() for a in args] + [h0.clone().requires_grad_()]
        o, state = form(*leaves[:-1], initial_state=leaves[-1], **kw)
        (o * torch.linspace(-1, 1, o.shape[-1])).sum().add((state ** 2).sum() * 0.1).backward()
        results.append([o, state] + [x.grad for x in leaves])
    names = ["o", "state", "dq", "dk", "dv", "dg"] + (["dbeta"] if op == "delta" else []) + ["dh0"]
    for name, ref, got in zip(names, *results):
        # fp32 sums over up to 256 channels and 20 steps (the decay gradient is a difference of such sums)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, ref.abs().max().item()), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_bf16_inputs_close_to_fp32_reference(op, backend):
    """bf16 inputs, fp32 state: outputs and every gradient within 2e-2 relative of the fp32 reference."""
    args = make_inputs(op, T=40, H=2, Hkv=1)   # grouped heads, as in the models
    ref = [a.clone().requires_grad_() for a in args]
    low = [a.bfloat16().requires_grad_() for a in args]
    o_ref, _ = OPS[op].naive(*ref)
    o, s = OPS[op].chunk(*low, output_final_state=True, backend=backend)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(o, o_ref) < 2e-2
    do = torch.randn_like(o_ref)
    (o_ref * do).sum().backward()
    (o.float() * do).sum().backward()
    for a, b in zip(low, ref):
        assert a.grad.dtype == torch.bfloat16 and rel(a.grad, b.grad) < 2e-2


@pytest.mark.parametrize("op", OPS)
def test_long_sequence_strong_decay_stays_accurate_bf16(op):
    """bf16 inputs over a long sequence with strong decay: the chunked form (fp32 state) stays within the field's
    bf16 tolerance of the fp32 reference, outputs and final state (relative RMSE < 5e-3; ~3.5e-3 measured)."""
    T = 65536 if op != "decay_vector" else 16384
    args = make_inputs(op, B=1, T=T, H=1, Dk=16, Dv=16, strong=True)
    o, s = OPS[op].chunk(*[a.bfloat16() for a in args], output_final_state=True)
    o_ref, s_ref = OPS[op].naive(*args, output_final_state=True)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(o, o_ref) < 5e-3 and rel(s, s_ref) < 5e-3


def test_bad_shapes_name_the_argument():
    q, k, v, g = make_inputs("decay_scalar")
    with pytest.raises(ValueError, match="log_decay"):
        decay_scalar.chunk(q, k, v, g[..., :-1])
    with pytest.raises(ValueError, match="beta"):
        delta.chunk(q, k, v, g, None)
    with pytest.raises(ValueError, match="T == 1"):
        decay_scalar.recurrent_step(q, k, v, g)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    args = [a.cpu() for a in make_inputs("delta", T=4)]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' on CPU tensors needs TRITON_INTERPRET=1"):
        delta.chunk(*args, backend="triton")


def test_default_backend_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    from rnnify_kernels.dispatch import select_backend
    monkeypatch.delenv("RNNIFY_KERNELS_BACKEND", raising=False)
    cpu = torch.zeros(1, device="cpu")
    assert select_backend("delta", cpu, None) == "torch"
    monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "triton")
    assert select_backend("delta", cpu, None) == "triton"
    assert select_backend("delta", cpu, "torch") == "torch"     # the argument wins


def test_default_on_cuda_is_the_backend_measured_fastest_for_that_gpu(monkeypatch, tmp_path):
    """``eval/bench_kernels.py --record`` writes {GPU model: {op: backend}}; the dispatcher follows it per op, and
    falls back to triton for an op (or a GPU) without a measurement or whose backend is not installed."""
    import json
    import types

    from rnnify_kernels import dispatch, fla_backend
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path))
    dispatch.fastest_file().parent.mkdir(parents=True)
    dispatch.fastest_file().write_text(json.dumps({"Some GPU": {"delta": "fla", "decay_scalar": "triton"}}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(fla_backend, "available", lambda: True)
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    backend, why = dispatch.default_backend("delta", on_gpu)
    assert backend == "fla" and "fastest measured on Some GPU" in why
    assert dispatch.default_backend("decay_vector", on_gpu)[0] == "triton"     # not measured
    monkeypatch.setattr(fla_backend, "available", lambda: False)
    assert dispatch.default_backend("delta", on_gpu)[0] == "triton"            # measured, but not installed here
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Another GPU")
    assert dispatch.default_backend("decay_scalar", on_gpu)[0] == "triton"
    assert dispatch.default_backend("delta", torch.zeros(1))[0] == "torch"
    for broken in ("{not json", "[1, 2]", json.dumps({"Some GPU": "fla"})):   # a corrupt or foreign file: defaults
        dispatch.fastest_file().write_text(broken)
        dispatch.measured_fastest.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
        assert dispatch.default_backend("delta", on_gpu) == (
            "triton", "default on CUDA (no measurement for this GPU: python eval/bench_kernels.py --record)")
    dispatch.measured_fastest.cache_clear()


def test_triton_step_updates_the_state_in_place():
    args = make_inputs("decay_vector", T=1)
    state = torch.randn(2, 4, 16, 24)
    before = state.clone()
    _, new = decay_vector.recurrent_step(*args, initial_state=state, backend="triton")
    assert new.data_ptr() == state.data_ptr() and not torch.equal(state, before)
    _, ref = decay_vector.recurrent_step(*args, initial_state=before, backend="torch")
    torch.testing.assert_close(state, ref, rtol=1e-5, atol=1e-5)


def test_backend_choice_argument_and_environment(monkeypatch):
    args = make_inputs("decay_scalar", T=4)
    with pytest.raises(ValueError, match="unknown backend backend='cuda-magic'"):
        decay_scalar.chunk(*args, backend="cuda-magic")
    monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="RNNIFY_KERNELS_BACKEND"):
        decay_scalar.chunk(*args)
    monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "torch")
    decay_scalar.chunk(*args)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="eval/gpu_check.py runs the benchmark on the GPU itself")
def test_benchmark_prints_one_table_per_op_with_ratios(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "eval" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--T", "48", "--D", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    for op in OPS:
        assert f"#### {op} (cpu, float32" in out
    assert "| of copy BW | × naive | × naive fwd+bwd | × torch chunk | × SDPA |" in out
    assert "copy bandwidth (read + write of a large tensor, best of 5):" in out
    rows = [line for line in out.splitlines() if line.startswith("| (1, 4, 48, 16)")]
    assert len(rows) == 3 * 3 and all(line.count("|") == 12 for line in rows)   # naive, torch chunk, sdpa per op
    assert "fastest forward+backward per op: decay_scalar torch, decay_vector torch, delta torch" in out
    with pytest.raises(SystemExit):   # the dispatcher's measured default is a CUDA thing
        bench.main(["--device", "cpu", "--record"])


def test_benchmark_records_the_fastest_backend_per_op_for_the_dispatcher(monkeypatch, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    from rnnify_kernels import dispatch
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parent.parent / "eval" /
                                                  "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {"delta": [{"backend": "torch chunk", "fwdbwd_ms": 9.0}, {"backend": "triton", "fwdbwd_ms": 4.0},
                      {"backend": "fla", "fwdbwd_ms": 2.0}, {"backend": "sdpa (causal)", "fwdbwd_ms": 1.0},
                      {"backend": "triton", "fwdbwd_ms": 4.0}, {"backend": "fla", "fwdbwd_ms": 7.0}],
            "decay_scalar": [{"backend": "torch chunk", "fwdbwd_ms": 3.0}, {"backend": "triton", "fwdbwd_ms": 1.0}]}
    choice = bench.fastest_backends(rows)
    assert choice == {"delta": "triton", "decay_scalar": "triton"}   # totals over shapes; SDPA is no backend
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path))
    bench.record("GPU A", {"delta": "fla"})
    bench.record("GPU B", choice)
    bench.record("GPU A", {"decay_scalar": "torch"})
    assert json.loads(dispatch.fastest_file().read_text()) == {
        "GPU A": {"delta": "fla", "decay_scalar": "torch"}, "GPU B": choice}


def hedgehog_window_inputs(B=2, H=6, Hkv=2, D=16, S=7, F=8, Dv=12, seed=0):
    """A ring of S slots whose normalisers are 1 (real), 0 (empty/padding) or 0.5 (a general score bias)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cpu")

    values = randn(B, Hkv, S, Dv + 1)
    values[..., -1] = torch.tensor([1, 1, 0, 1, 0.5, 1, 0])[:S]
    return dict(q=randn(B, H, D), k=randn(B, Hkv, D), v=randn(B, Hkv, Dv), keys=randn(B, Hkv, S, D), values=values,
                state=torch.rand(B, H, 2 * F, Dv + 1, generator=g, device="cpu"), feature_q=randn(H, D, F) / 2,
                feature_k=randn(H, D, F) / 2, share=torch.rand(H, generator=g, device="cpu"))


@pytest.mark.parametrize("rope", [None, "full", "partial-shared"])
@pytest.mark.parametrize("push", [True, False], ids=["key-leaves-window", "ring-filling"])
@pytest.mark.parametrize("valid", [None, [1.0, 0.0]], ids=["unpadded", "padded-row"])
@pytest.mark.parametrize("shape", [dict(H=6, Hkv=2), dict(H=4, Hkv=4, D=64, F=64, Dv=64, S=5, B=1)],
                         ids=["gqa", "mha-64"])
def test_fused_hedgehog_window_step_matches_its_reference(push, valid, shape, rope):
    """The fused C step (in place) against the reference (new tensors): output, ring and state; RoPE applied in
    the step over all dims per row, or over the first half of the dims with one cos/sin row for the batch."""
    from rnnify_kernels import hedgehog_window

    inputs = hedgehog_window_inputs(**shape)
    B, D = inputs["q"].shape[0], inputs["q"].shape[-1]
    valid = None if valid is None else torch.tensor(valid[:B], device="cpu")
    kw = dict(slot=2, push=push, scaling=0.25, eps=1e-6, valid=valid)
    if rope is not None:
        rows, R = (B, D) if rope == "full" else (1, D // 2)
        angle = torch.rand(rows, R, generator=torch.Generator().manual_seed(1), device="cpu") * 6
        kw.update(cos=angle.cos(), sin=angle.sin())
    assert hedgehog_window.usable(inputs["q"], inputs["keys"], inputs["values"], inputs["state"])
    o_ref, keys_ref, values_ref, state_ref = hedgehog_window.naive(**inputs, **kw)
    fused = {name: x.clone() for name, x in inputs.items()}
    o = hedgehog_window.decode_step(**fused, **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["keys"], keys_ref, rtol=1e-6, atol=1e-6)   # rotated: a rounding apart
    torch.testing.assert_close(fused["values"], values_ref, rtol=0, atol=0)
    torch.testing.assert_close(fused["state"], state_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused["state"], inputs["state"]) != push   # the state changes exactly when a key leaves


def test_fused_hedgehog_window_step_says_when_it_cannot_run(monkeypatch, tmp_path, caplog):
    """No compiler, a failing build, a forced PyTorch backend, another dtype or device: ``usable`` is False (the
    caller runs its PyTorch step) and the reason is logged; bad shapes name every shape; a step whose ring is
    gone says so instead of writing freed memory."""
    from rnnify_kernels import hedgehog_window
    from rnnify_kernels.hedgehog_window import cpu

    inputs = hedgehog_window_inputs()
    ring = (inputs["q"], inputs["keys"], inputs["values"], inputs["state"])
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path))
    try:
        for cc, said in (("no-such-compiler", "no C compiler"), ("false", "could not build step.c")):
            monkeypatch.setenv("CC", cc)
            cpu.library.cache_clear()
            with caplog.at_level("INFO", logger="rnnify.kernels"):
                assert not hedgehog_window.usable(*ring)
            assert said in caplog.text
        assert not list(tmp_path.glob("kernels/*"))   # nothing half-built left behind
    finally:
        cpu.library.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "torch")
    assert not hedgehog_window.usable(*ring)
    monkeypatch.delenv("RNNIFY_KERNELS_BACKEND")
    assert hedgehog_window.usable(*ring)   # built into this test's cache
    assert not hedgehog_window.usable(inputs["q"].double(), *ring[1:])
    with pytest.raises(ValueError, match=r"shapes do not match \(keys \(2, 2, 7, 16\), values \(2, 2, 7, 13\), "
                                         r"state \(2, 6, 15, 13\)"):
        hedgehog_window.decode_step(**{**inputs, "state": inputs["state"][:, :, 1:]}, slot=0, push=True,
                                    scaling=1.0, eps=1e-6)
    with pytest.raises(ValueError, match=r"does not fit the ring \(q \(2, 6, 16\), k \(2, 2, 8\)"):
        hedgehog_window.decode_step(**{**inputs, "k": inputs["k"][..., :8]}, slot=0, push=True, scaling=1.0, eps=1e-6)
    with pytest.raises(ValueError, match=r"cos/sin \(2, 15\)/\(2, 15\)"):   # RoPE pairs need an even R
        hedgehog_window.decode_step(**inputs, slot=0, push=True, scaling=1.0, eps=1e-6, cos=torch.ones(2, 15),
                                    sin=torch.ones(2, 15))
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensors; got torch.float64"):
        hedgehog_window.decode_step(**{**inputs, "k": inputs["k"].double()}, slot=0, push=True, scaling=1.0, eps=1e-6)
    step = hedgehog_window.DecodeStep(*(inputs[name].clone() for name in ("keys", "values", "state")),
                                      inputs["feature_q"], inputs["feature_k"], inputs["share"], scaling=1.0, eps=1e-6)
    with pytest.raises(RuntimeError, match="the ring or state this step was bound to is gone"):
        step(inputs["q"], inputs["k"], inputs["v"], slot=0, push=True)


def test_fused_hedgehog_window_step_refuses_shapes_past_its_stack_bound_and_runs_at_it():
    """step.c keeps a KV head's work on the stack: shapes up to ``STACK_BYTES_MAX`` run (and match the reference at
    the bound), one slot more is a clear error, and ``usable`` says no (the caller runs its PyTorch step)."""
    from rnnify_kernels import hedgehog_window

    H = Hkv = 1
    D = F = Dv = 8
    at_bound = (hedgehog_window.STACK_BYTES_MAX - 8 * (H // Hkv)) // 4 - (4 * F + (Dv + 1) * 3 + 2 * D)
    assert hedgehog_window.stack_bytes(H, Hkv, D, F, Dv, at_bound) == hedgehog_window.STACK_BYTES_MAX
    for slots in (at_bound, at_bound + 1):
        g = torch.Generator().manual_seed(0)
        values = torch.randn(1, Hkv, slots, Dv + 1, generator=g)
        values[..., -1] = 1.0
        inputs = dict(q=torch.randn(1, H, D, generator=g), k=torch.randn(1, Hkv, D, generator=g),
                      v=torch.randn(1, Hkv, Dv, generator=g), keys=torch.randn(1, Hkv, slots, D, generator=g) / 4,
                      values=values, state=torch.rand(1, H, 2 * F, Dv + 1, generator=g),
                      feature_q=torch.randn(H, D, F, generator=g) / 2, feature_k=torch.randn(H, D, F, generator=g) / 2,
                      share=torch.rand(H, generator=g))
        kw = dict(slot=slots - 1, push=True, scaling=0.25, eps=1e-6)
        ring = (inputs["q"], inputs["keys"], inputs["values"], inputs["state"])
        if slots == at_bound:
            assert hedgehog_window.usable(*ring)
            o_ref = hedgehog_window.naive(**inputs, **kw)[0]
            torch.testing.assert_close(hedgehog_window.decode_step(**inputs, **kw), o_ref, rtol=1e-5, atol=1e-5)
        else:
            assert not hedgehog_window.usable(*ring)
            with pytest.raises(ValueError, match=rf"{slots} window slots with H=1, Hkv=1, D=8, F=8, Dv=8 need "
                                                 r"262,148 bytes of stack in the C step, over its bound of 262,144"):
                hedgehog_window.decode_step(**inputs, **kw)


def test_fused_step_builds_with_a_compiler_command_keyed_by_its_version_and_prunes_stale_files(monkeypatch,
                                                                                               tmp_path):
    """``$CC`` may carry arguments (``env gcc``); the library's name changes with the compiler's version; builds
    abandoned by a killed process and libraries unused for 30 days are removed, the one in use is kept."""
    import os
    import shutil
    import time

    from rnnify_kernels import cpu_build
    from rnnify_kernels.hedgehog_window import cpu

    prefix = cpu_build.build_prefix("hedgehog_window")

    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    abandoned, unused = folder / f"{prefix}x1.so", folder / "hedgehog_window-0123456789abcdef.so"
    for path, age in ((abandoned, 2 * cpu_build.STALE_BUILD_S), (unused, 2 * cpu_build.UNUSED_LIBRARY_S)):
        path.write_bytes(b"")
        os.utime(path, (time.time() - age,) * 2)
    fresh = folder / f"{prefix}x2.so"   # another process building right now
    fresh.write_bytes(b"")
    monkeypatch.setenv("CC", "env gcc")
    assert cpu_build.compiler() == [shutil.which("env"), "gcc"]
    built = {}
    try:
        for version in ("gcc (fake) 1.0", "gcc (fake) 2.0"):
            monkeypatch.setattr(cpu_build, "compiler_version", lambda cc, v=version: v)
            cpu.library.cache_clear()
            assert cpu.library() is not None
            built[version] = set(folder.glob("hedgehog_window-*.so"))
    finally:
        cpu.library.cache_clear()
    first, second = built.values()
    assert len(first) == 1 and len(second - first) == 1   # another version, another library
    assert not abandoned.exists() and not unused.exists() and fresh.exists()


def ssm_step_inputs(mode, K=4, B=2, H=6, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cpu")

    C = (H + 2 * Hkv) * D
    args = dict(qkv=randn(B, C), state=randn(B, H, D, D), gate_logit=randn(B, H) * 3, a_log=randn(H) / 2,
                norm_weight=randn(H, D), norm_bias=randn(H, D))
    kw = dict(mode=mode, heads=H, kv_heads=Hkv, scale=0.25, eps=1e-6, z=randn(B, H * D))
    if K:
        kw.update(conv_state=randn(B, C, K), conv_weight=randn(C, K))
    kw.update(decay_logit=randn(B, H) * 3) if mode == "delta" else kw.update(d_skip=randn(H))
    return args, kw


@pytest.mark.parametrize("mode", ["delta", "decay"])
@pytest.mark.parametrize("K", [0, 4])
@pytest.mark.parametrize("rope", [None, "full", "partial-shared"])
@pytest.mark.parametrize("valid", [None, [1.0, 0.0]], ids=["unpadded", "padded-row"])
def test_fused_ssm_step_matches_its_reference(mode, K, rope, valid):
    """The fused C step of Gated DeltaNet (delta) and Mamba2 (decay), conv and recurrent state in place, against
    the reference (new tensors): output, state and conv state; a padded row leaves its state as it was."""
    from rnnify_kernels import ssm_step

    args, kw = ssm_step_inputs(mode, K)
    B, D = args["qkv"].shape[0], args["state"].shape[-1]
    if valid is not None:
        kw["valid"] = torch.tensor(valid)
    if rope is not None:
        rows, R = (B, D) if rope == "full" else (1, D // 2)
        angle = torch.rand(rows, R, generator=torch.Generator().manual_seed(1)) * 6
        kw.update(cos=angle.cos(), sin=angle.sin())
    assert ssm_step.usable(args["qkv"], args["state"], kw.get("conv_state"), 2)
    o_ref, state_ref, conv_ref = ssm_step.naive(**args, **kw)
    state = args["state"].clone()
    conv = {"conv_state": kw["conv_state"].clone()} if K else {}
    o = ssm_step.decode_step(**{**args, "state": state}, **{**kw, **conv})
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    if K:
        torch.testing.assert_close(conv["conv_state"], conv_ref, rtol=0, atol=0)
    if valid is not None:   # decay 1, no input: the padded row's state is untouched
        torch.testing.assert_close(state[1], args["state"][1], rtol=0, atol=0)


def test_fused_ssm_step_says_when_it_cannot_run(monkeypatch):
    """A forced PyTorch backend, another dtype, or shapes past its stack bound: ``usable`` is False (the caller
    runs its PyTorch step); bad arguments are errors that name the argument and the shape expected."""
    from rnnify_kernels import ssm_step

    args, kw = ssm_step_inputs("delta")
    assert ssm_step.usable(args["qkv"], args["state"], kw["conv_state"], 2)
    monkeypatch.setenv("RNNIFY_KERNELS_BACKEND", "torch")
    assert not ssm_step.usable(args["qkv"], args["state"], kw["conv_state"], 2)
    monkeypatch.delenv("RNNIFY_KERNELS_BACKEND")
    assert not ssm_step.usable(args["qkv"].double(), args["state"], kw["conv_state"], 2)
    assert not ssm_step.usable(args["qkv"], torch.zeros(1, 256, 128, 128), None, 256)   # 256 KiB of stack or more
    with pytest.raises(ValueError, match=r"gate_logit has shape \(2, 5\); expected \(2, 6\)"):
        ssm_step.decode_step(**{**args, "gate_logit": args["gate_logit"][:, 1:].contiguous()}, **kw)
    with pytest.raises(ValueError, match="mode 'delta' needs decay_logit"):
        ssm_step.decode_step(**args, **{**kw, "decay_logit": None})
    with pytest.raises(ValueError, match="conv_state and conv_weight go together"):
        ssm_step.decode_step(**args, **{**kw, "conv_weight": None})
    with pytest.raises(ValueError, match=r"cos/sin must be given together, \[2 or 1, R\] with R even"):
        ssm_step.decode_step(**args, **kw, cos=torch.ones(2, 15), sin=torch.ones(2, 15))
    with pytest.raises(ValueError, match="qkv must be a contiguous fp32 CPU tensor; got torch.float64"):
        ssm_step.decode_step(**{**args, "qkv": args["qkv"].double()}, **kw)
