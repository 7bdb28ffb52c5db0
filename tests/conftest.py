import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the kernel tests run on CPU tensors under Triton's interpreter (set before triton compiles), or compiled on a GPU
# with RNNIFY_TEST_DEVICE=cuda (eval/gpu_check.py)
TEST_DEVICE = os.environ.get("RNNIFY_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
ARCH_CONFIGS = {
    "llama": dict(TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mistral": dict(TINY, sliding_window=None),
    "qwen2": dict(TINY),
    "qwen3": dict(TINY, head_dim=24),
    "phi3": dict(TINY, pad_token_id=0),
}
MIXERS = [{"type": "hedgehog"}, {"type": "hedgehog", "window": 5}, {"type": "hedgehog", "window": 5, "sink": True},
          {"type": "mamba2"}, {"type": "mamba2", "feature_map": "hedgehog", "normalise": True, "norm": False},
          {"type": "gla"}, {"type": "gated_deltanet"}]


def make_teacher(arch: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **{**ARCH_CONFIGS[arch], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "qwen2":   # random biases so the q/k/v bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.2)
    return model


def randomize_mixers(student, seed=1):
    """Move the new mixer parameters off their (often identity/zero) init so tests see every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".self_attn." in name and ".attn." not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return student


@pytest.fixture(scope="session")
def tokenizer():
    from convert.teachers import tokenizer_training_text, train_tokenizer
    return train_tokenizer(tokenizer_training_text(), vocab_size=300)


@pytest.fixture
def cli(capsys):
    """``python -m convert ARGS`` as this process's call of the CLI's ``main`` (no interpreter start-up, which is
    seconds per process here): returns (exit status, stdout, stderr).  Tests of what a process shows (no traceback,
    a fresh interpreter loading the student) keep a subprocess."""
    from rnnify.cli import main

    def call(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return call
