"""Named YAML entries of the catalogs: ``examples/``, ``groups/``, ``interventions/``.

In a checkout (and an editable install) they are read from the repository's top-level folders;
in an installed wheel from the copies shipped as ``eosbranch._catalog.<kind>``.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from .errors import SpecError

KINDS = ("examples", "groups", "interventions")


def catalog_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown catalog {kind!r}; one of {KINDS}")
    repo = Path(__file__).resolve().parent.parent / kind
    if repo.is_dir():
        return repo
    return Path(str(resources.files(f"eosbranch._catalog.{kind}")))


def names(kind: str) -> list[str]:
    return sorted(p.stem for p in catalog_dir(kind).glob("*.yaml"))


def entry_path(kind: str, name: str) -> Path:
    """The file of a named entry; an unknown name lists the valid ones and suggests the nearest."""
    path = catalog_dir(kind) / f"{name}.yaml"
    if not path.is_file():
        valid = names(kind)
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SpecError(f"no {kind} entry named {name!r}; available: {', '.join(valid)}{hint}")
    return path


def example_path(name: str) -> Path:
    return entry_path("examples", name)
