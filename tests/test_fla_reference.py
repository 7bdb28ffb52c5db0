"""A second reference for the kernels: flash-linear-attention's own naive recurrences (``fla-core``, a dev extra;
they run on CPU).  Our chunked form and our reference must agree with theirs, outputs and final states, from a
non-zero initial state — an independent check of layouts, scales and gates."""
import inspect

import pytest
import torch

import rnnify_kernels as kernels

# fla-core is a dev dependency: a module it renames fails here instead of skipping the comparison
import fla.ops.gated_delta_rule.naive as fla_gated_delta  # noqa: E402
import fla.ops.gla.naive as fla_gla  # noqa: E402
import fla.ops.simple_gla.naive as fla_simple_gla  # noqa: E402

B, T, H, D = 2, 37, 3, 16


def inputs(vector_gate: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    log_decay = -torch.rand((B, T, H, D) if vector_gate else (B, T, H), generator=g) * 0.5
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, D, D, generator=g) * 0.1
    return q, k, v, log_decay, beta, state


def check(ours: tuple, theirs: tuple):
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)   # outputs [B, T, H, D]
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-4)   # final states [B, H, Dk, Dv]


def test_decay_scalar_matches_fla_simple_gla():
    q, k, v, g, _, s = inputs(False)
    theirs = fla_simple_gla.naive_recurrent_simple_gla(q, k, v, g, initial_state=s.clone(), output_final_state=True)
    for form in (kernels.decay_scalar.naive, kernels.decay_scalar.chunk):
        check(form(q, k, v, g, initial_state=s, output_final_state=True), theirs)


def test_decay_vector_matches_fla_gla():
    q, k, v, g, _, s = inputs(True)
    theirs = fla_gla.naive_recurrent_gla(q, k, v, g, initial_state=s.clone(), output_final_state=True)
    for form in (kernels.decay_vector.naive, kernels.decay_vector.chunk):
        check(form(q, k, v, g, initial_state=s, output_final_state=True), theirs)


def test_delta_matches_fla_gated_delta_rule():
    q, k, v, g, beta, s = inputs(False)
    theirs = fla_gated_delta.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=s.clone(),
                                                              output_final_state=True)
    for form in (kernels.delta.naive, kernels.delta.chunk):
        check(form(q, k, v, g, beta, initial_state=s, output_final_state=True), theirs)


@pytest.mark.parametrize("op", ["decay_scalar", "decay_vector", "delta"])
def test_fla_backend_mapping_equals_our_reference(op):
    """``backend='fla'`` hands fla our arguments through ``rnnify_kernels.fla_backend``; on CPU its naive form runs with the
    same mapping: grouped kv heads, packed sequences with their own initial states, a scale that is not Dk^-½."""
    from rnnify_kernels import fla_backend
    from tests.test_kernels import make_inputs

    args = make_inputs(op, B=1, T=30, H=4, Hkv=2, Dk=16, Dv=24)
    kw = dict(initial_state=torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(3)) * 0.1,
              output_final_state=True, cu_seqlens=torch.tensor([0, 11, 30]), scale=0.3)
    check(fla_backend.run(op, "naive", *args, **kw), getattr(kernels, op).naive(*args, **kw))
    for form in ("chunk", "step"):   # the CUDA forms take the keywords the mapping hands them (CPU: no call)
        fn = fla_backend.function(op, form)
        calls = [{**kw, "cu_seqlens": None, "initial_state": None}]   # one sequence (run splits packed ones ...)
        if "cu_seqlens" in inspect.signature(fn).parameters:         # ... unless fla takes them packed)
            calls.append(kw)
        for call_kw in calls:
            inspect.signature(fn).bind(**fla_backend.keywords(fn, fla_backend.arguments(op, *args, **call_kw)))


def test_fla_backend_needs_cuda_tensors_and_the_package(monkeypatch):
    from rnnify_kernels import fla_backend
    from tests.test_kernels import make_inputs

    args = make_inputs("delta", T=4)
    with pytest.raises(ValueError, match="'fla' needs CUDA tensors"):
        kernels.delta.chunk(*args, backend="fla")
    monkeypatch.setattr(fla_backend, "available", lambda: False)
    with pytest.raises(ValueError, match="pip install 'rnnify\\[fla\\]'"):
        kernels.delta.chunk(*args, backend="fla")
