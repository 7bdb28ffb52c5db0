"""The recipe section of each mixer (``convert.mixer``), derived from the mixer class itself: its ``options``
(``convert.student.mixer_registry.Option``: default, type, bounds, description) become the fields, its
``check_options`` the cross-field checks.  A mixer is declared once, in its own file under ``convert/student/``."""
from __future__ import annotations

import functools
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from .base import Strict


@functools.lru_cache(maxsize=None)
def options_model(mixer) -> type[BaseModel]:
    """The pydantic model of ``convert.mixer`` for mixer class ``mixer`` (``type: Literal[mixer.name]``)."""
    fields = {"type": (Literal[mixer.name], ...)}
    for name, opt in mixer.options.items():
        bounds = {k: v for k, v in (("gt", opt.gt), ("ge", opt.ge), ("le", opt.le)) if v is not None}
        kind = Annotated[opt.kind, Field(**bounds)] if bounds else opt.kind
        fields[name] = (Optional[kind] if opt.optional else kind, Field(opt.default, description=opt.doc or None))

    def mixer_checks(self):
        resolved = mixer.check_options({name: getattr(self, name) for name in mixer.options})
        for name, value in resolved.items():
            setattr(self, name, value)
        return self

    return create_model(f"{mixer.__name__}Options", __base__=Strict,
                        __validators__={"mixer_checks": model_validator(mode="after")(mixer_checks)}, **fields)
