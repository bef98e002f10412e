"""Reading a YAML file as eosbranch does everywhere: safe loading, no aliases, every problem one
:class:`SpecError` line naming the file (and the line, where the reader says)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from .errors import SpecError


def _refuse_aliases(text: str) -> None:
    """Safe YAML without aliases: ``*name`` can expand a small file into an unbounded tree (an
    alias bomb), and no spec needs one; refused with the line it is on, before anything is built."""
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"alias *{ev.anchor} is not allowed in a spec "
                                              "(aliases can expand without bound; write the value out)", ev.start_mark)


def read_yaml(path: Union[str, Path]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        text = path.read_text()
        _refuse_aliases(text)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(err, "problem", None) or err).split())  # one line, whatever the reader says
        raise SpecError(f"{path}:{where} not valid YAML ({why})") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not valid YAML (not UTF-8 text: byte {err.start} is {err.object[err.start:err.start + 1]!r})") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML for a spec (nested too deeply)") from None
