"""One registry shape for every extension point (data sets, models, optimizers, losses, ...).

A registry is a dict from a name to an :class:`Entry` holding a pydantic parameter model and a
function. ``@REGISTRY.register("name", Params)`` adds one; a YAML section ``{kind: name, ...}``
selects it and is validated against ``Params``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import SpecError, format_validation_error


class Params(BaseModel):
    """Base for registry parameter models: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed_range(cls, v):
        # numpy's and torch's generators take seeds in 0..2**32-1; beyond, they raise or wrap
        if isinstance(v, int) and not 0 <= v < 2**32:
            raise ValueError(f"a seed is an integer in 0..{2**32 - 1}, got {v}")
        return v


@dataclass(frozen=True)
class Entry:
    name: str
    params: type[BaseModel]
    fn: Callable[..., Any]


class Registry(dict):
    """Name -> :class:`Entry`. ``what`` names the extension point in error messages."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, params: type[BaseModel] = Params):
        def deco(fn):
            if name in self:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self[name] = Entry(name, params, fn)
            return fn

        return deco

    def entry(self, name: str, where: str = "kind") -> Entry:
        if name not in self:
            near = difflib.get_close_matches(str(name), list(self), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SpecError(
                f"{where}: unknown {self.what} {name!r}; allowed: {', '.join(sorted(self))}{hint}"
            )
        return self[name]

    def parse(self, section: Any, where: str, source: str = "") -> tuple[Entry, BaseModel]:
        """Validate a ``{kind: ..., **params}`` mapping; errors name ``source`` and ``where``."""
        prefix = f"{source}: " if source else ""
        if isinstance(section, str):
            section = {"kind": section}
        if not isinstance(section, dict) or "kind" not in section:
            raise SpecError(
                f"{prefix}{where}: expected a mapping with a 'kind' field "
                f"(one of {', '.join(sorted(self))})"
            )
        params = dict(section)
        entry = self.entry(params.pop("kind"), where=f"{prefix}{where}.kind")
        try:
            return entry, entry.params.model_validate(params)
        except ValidationError as err:
            raise SpecError(format_validation_error(err, source, where, model=entry.params)) from None
