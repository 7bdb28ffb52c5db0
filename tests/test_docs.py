"""Every command the documents give for a figure still runs as written: each ``python -m convert run|validate|eval
recipes/<recipe>.yaml [overrides]`` in README.md and BENCHMARKS.md (inline code or code blocks) names a recipe that
exists, and the recipe with those overrides passes validation (``load_recipe``: the schema and every recipe check;
no weights)."""
import re
import shlex
from pathlib import Path

import pytest

from rnnify.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"python -m convert (run|validate|eval) (\S+\.ya?ml)((?:\s+\S+=\S+|\s+'[^']+')*)")


def commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, recipe, overrides) of each command in ``text``'s inline code spans and code blocks."""
    spans = [(m.start(1), m.group(1)) for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]
    prose = re.sub(r"```[a-z]*\n.*?```", lambda m: " " * len(m.group(0)), text, flags=re.S)
    spans += [(m.start(1), m.group(1)) for m in re.finditer(r"`([^`]+)`", prose)]
    found = []
    for start, span in spans:
        flat = re.sub(r"\\\n", "  ", span).replace("\n", " ")   # shell line continuations, then line breaks
        for m in COMMAND.finditer(flat):
            if "<" in m.group(2):   # a placeholder: recipes/<name>.yaml
                continue
            line = text.count("\n", 0, start + flat.index(m.group(0))) + 1
            found.append((line, m.group(2), shlex.split(m.group(3))))
    return found


def test_the_scanner_finds_commands_in_spans_blocks_and_across_lines():
    text = "a `python -m convert run\nrecipes/x.yaml a.b=1 'c=[]'` b\n```bash\npython -m convert validate recipes/y.yaml \\\n" \
           "  d=2\n```\n`python -m convert run recipes/<name>.yaml`"
    assert commands(text) == [(4, "recipes/y.yaml", ["d=2"]), (1, "recipes/x.yaml", ["a.b=1", "c=[]"])]


@pytest.mark.parametrize("document", ["README.md", "BENCHMARKS.md"])
def test_every_recipe_command_in_the_documents_validates(document):
    found = commands((REPO / document).read_text())
    assert found, document
    failures = []
    for line, recipe, overrides in found:
        try:
            load_recipe(REPO / recipe, overrides)
        except RecipeError as e:
            failures.append(f"{document}:{line}: {e}")
    assert failures == []
