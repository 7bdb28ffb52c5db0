"""Passkey probe: prompts of the asked length with the key at the asked depth; scoring reads the first number."""
import pytest

from eval.recall import FILLER, first_number, passkey_accuracy, passkey_prompt


@pytest.mark.parametrize("length", [320, 900])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_length_and_the_key_at_the_depth(tokenizer, length, depth):
    prompt = passkey_prompt(tokenizer, length, depth, 12345)
    n = len(tokenizer(prompt)["input_ids"])
    assert abs(n - length) <= max(12, 0.05 * length), n
    fillers = prompt.count(FILLER)
    before = prompt[:prompt.index("12345")].count(FILLER)
    assert fillers > 0 and abs(before / fillers - depth) <= 1 / fillers   # the key sits at that depth of the filler
    assert prompt.endswith("The pass key is") and prompt.count("12345") == 2


def test_first_number_is_the_answer():
    assert first_number(" 48213. Remember") == 48213 and first_number(" no idea") is None


def test_accuracy_rows_on_a_small_model(tokenizer):
    from convert.convert import convert
    from tests.conftest import make_teacher
    student = convert(make_teacher("llama", vocab_size=300), {"type": "gla"}, [0, 2])
    rows = passkey_accuracy(student, tokenizer, [200, 260], depths=(0.5,), trials=2)
    assert [r["context"] for r in rows] == [200, 260] and all(r["prompts"] == 2 for r in rows)
    # a random model cannot produce a 5-digit key it was told once: a scorer that counted anything else as a hit
    # would fail here; the real-teacher test (tests/test_real_teacher.py) checks that a model that can recall scores 1
    assert all(r["accuracy"] == 0.0 for r in rows), rows
