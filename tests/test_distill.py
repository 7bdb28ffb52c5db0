"""Stage 1 (attention transfer) on a tiny model: mixers learn their layer's attention output, nothing else moves."""
import json
import math

import torch

from convert.convert import convert
from distill.attention_transfer import layer_errors, mixer_parameters, train_attention_transfer
from distill.data import pack_documents
from tests.conftest import make_teacher


def rows(n_docs=40, seed=0):
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 97, (int(torch.randint(8, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(Dataset.from_dict({"input_ids": docs}), 32, seed=0)


def test_attention_transfer_lowers_every_layer_error_and_trains_only_mixers(tmp_path):
    student = convert(make_teacher("llama"), {"type": "hedgehog", "window": 4}, [0, 2])
    frozen = {n: p.clone() for n, p in student.named_parameters()}
    own = {id(p) for _, p in mixer_parameters(student)}
    train, held = rows(), rows(12, seed=1)
    summary = train_attention_transfer(student, train, out_dir=tmp_path, lr=3e-2, batch_size=4, seed=0,
                                       eval_rows=held, log_every=1)
    assert summary["steps"] == -(-len(train) // 4) and summary["tokens"] == len(train) * 32
    for layer, err in summary["layer_errors"].items():
        assert err["after"]["mse"] < 0.9 * err["before"]["mse"], (layer, err)
    for name, p in student.named_parameters():
        if id(p) not in own:
            assert torch.equal(p, frozen[name]), f"{name} is the teacher's and must stay frozen"
    assert any(not torch.equal(p, frozen[n]) for n, p in student.named_parameters() if id(p) in own)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps"] and set(json.loads(lines[0])["layers"]) == {"0", "2"}
    assert json.loads((tmp_path / "layer_errors.json").read_text())["2"]["after"]["mse"] > 0


def test_layer_errors_measure_each_converted_layer():
    student = convert(make_teacher("llama"), {"type": "gla"}, [1])
    errors = layer_errors(student, rows(6), batch_size=2)
    assert set(errors) == {1} and errors[1]["mse"] > 0 and math.isfinite(errors[1]["relative_mse"])
