"""What every part of the recipe schema shares: the error type, strict models, and a text source."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(Exception):
    """A recipe problem, phrased as one line for the user: ``<recipe file>: <field>: <what is wrong>``.  Code below
    the entry raises it without the file (``source`` None); the entry adds the file once (``located``)."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.message, self.source = message, source

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


@contextmanager
def located(source):
    """Recipe errors raised inside name the recipe file ``source`` (once)."""
    try:
        yield
    except RecipeError as e:
        if e.source is None and source is not None:
            e.source = str(source)
        raise


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSource(Strict):
    """A dataset as users name it: ``builtin:<corpus>``, a local file/folder/glob, or a Hub dataset id.

    A plain string in the YAML is shorthand for ``{source: <string>}``.
    """
    source: Annotated[str, Field(min_length=1)]
    split: str | None = Field(None, description="builtin: train|heldout; Hub: any split; local files: ignored")
    subset: str | None = Field(None, description="Hub dataset configuration name (e.g. wikitext-2-raw-v1)")
    text_column: Annotated[str, Field(min_length=1)] = "text"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"source": value} if isinstance(value, str) else value
