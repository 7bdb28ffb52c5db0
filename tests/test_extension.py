"""A new mixer and a new stage go where README's "Where things go" says, and nowhere else: a mixer is one class
registered with ``register_mixer`` (its options become ``convert.mixer``'s recipe fields), a stage is one
``Stage`` registered with ``register_stage`` (its section becomes a ``stages[i]`` entry, its runner the pipeline's).
Both are declared here, in the test, and reach the recipe schema, the converter and the pipeline untouched."""
import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field

from convert.convert import convert
from convert.student.mixer_registry import MIXERS, ROPE, Mixer, Option, register_mixer
from rnnify.recipe import RecipeError, load_recipe
from rnnify.stages import STAGES, Stage, TrainingStage, register_stage
from tests.conftest import make_teacher

REPO = Path(__file__).resolve().parent.parent


class DecayedLinear(Mixer):
    """A toy mixer: o_t = scale · Σ_{j≤t} decay^{t-j} (q_t·k_j) v_j over the teacher's own q/k/v ([B, T, H, D])."""
    name = "toy_decayed_linear"
    options = {"rope": ROPE, "decay": Option(0.9, float, "per-token decay of the state", gt=0, le=1),
               "floor": Option(None, float, "smallest decay a recipe may set", optional=True, gt=0)}

    @classmethod
    def check_options(cls, opts):
        if opts["floor"] is not None and opts["decay"] < opts["floor"]:
            raise ValueError(f"decay ({opts['decay']}) is below floor ({opts['floor']})")
        return opts

    def reset_rnnify_parameters(self):
        pass   # no parameters of its own

    def mix(self, x, position_embeddings, valid, cache, packed=None):
        q, k, v = self.project(x, position_embeddings)
        k, v = self.expand(k), self.expand(v)
        log_decay = torch.full(q.shape[:3], math.log(self.opts["decay"]), dtype=torch.float32)
        return self.recurrence("decay_scalar", q, k, v, log_decay, None, cache, scale=self.head_dim ** -0.5,
                               packed=packed)


class RowCountStage(TrainingStage):
    """A toy stage's recipe section: its own field beside every training stage's (data, tokens, ...)."""
    name: Literal["toy_row_count"]
    scale: float = Field(1.0, gt=0)


@pytest.fixture
def registered():
    """The toy mixer and stage registered for one test, the registries as they were afterwards."""
    mixers, stages = dict(MIXERS), dict(STAGES)
    calls = []

    def run(student, section, rows, held, out_dir, opts):
        calls.append({"rows": len(rows), "scale": section.scale, "out_dir": out_dir, "lr": opts.lr})
        return student, {"steps": 0, "rows_seen": len(rows)}

    register_mixer(DecayedLinear)
    register_stage(Stage("toy_row_count", RowCountStage, run))
    yield calls
    for registry, before in ((MIXERS, mixers), (STAGES, stages)):
        registry.clear()
        registry.update(before)


def recipe_file(tmp_path, **changes) -> Path:
    data = yaml.safe_load((REPO / "tests/recipes/tiny.yaml").read_text())
    data.update(output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_registered_mixer_is_a_recipe_section_with_its_options_checked(tmp_path, registered):
    path = recipe_file(tmp_path, convert={"mixer": {"type": "toy_decayed_linear", "decay": 0.5}, "layers": [1, 2]})
    recipe, resolved = load_recipe(path)
    assert resolved["convert"]["mixer"] == {"type": "toy_decayed_linear", "rope": True, "decay": 0.5, "floor": None}
    with pytest.raises(RecipeError, match=r"toy\.yaml: convert\.mixer\.decay: Input should be less than or equal "
                                          r"to 1 \(got 1\.5\)"):
        load_recipe(path, ["convert.mixer.decay=1.5"])
    with pytest.raises(RecipeError, match=r"convert\.mixer: decay \(0\.5\) is below floor \(0\.6\)"):
        load_recipe(path, ["convert.mixer.floor=0.6"])
    with pytest.raises(RecipeError, match=r"convert\.mixer\.window: unknown key \(allowed here: type, rope, decay, "
                                          r"floor\)"):
        load_recipe(path, ["convert.mixer.window=4"])
    # the converter builds it from the recipe's options, and its parallel form equals prefill + decode
    student = convert(make_teacher("llama"), recipe.convert.mixer.model_dump(), [1, 2])
    assert type(student.model.layers[1].self_attn) is DecayedLinear
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :8], use_cache=True)
        step = student(ids[:, 8:9], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, 8], rtol=1e-4, atol=1e-4)


def test_a_registered_stage_is_a_recipe_section_and_the_pipeline_runs_it(tmp_path, registered, cli):
    stages = [{"name": "toy_row_count", "data": "builtin:python-docs", "tokens": 1024, "seq_len": 128,
               "batch_size": 4, "scale": 2.0}]
    path = recipe_file(tmp_path, stages=stages)
    with pytest.raises(RecipeError, match=r"stages\.0\.scale: Input should be greater than 0"):
        load_recipe(path, ["stages.0.scale=0"])
    code, _, stderr = cli("run", path)
    assert code == 0, stderr[-2000:]
    assert registered == [{"rows": 8, "scale": 2.0, "out_dir": tmp_path / "out" / "stages" / "0-toy_row_count",
                           "lr": 1e-3}]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][0]["rows_seen"] == 8 and report["stage_data"][0]["name"] == "toy_row_count"
    assert report["perplexity"]["student"] == report["stages"][0]["perplexity"]
