"""User-facing errors: one line, no traceback, exit code 2 in the CLI."""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ValidationError


class EosbranchError(Exception):
    """A mistake the user can fix (bad spec, missing file, corrupt checkpoint).

    The CLI prints ``str(err)`` on one line and exits with code 2.
    """


class SpecError(EosbranchError):
    """An invalid spec, group or intervention file."""


class CheckpointError(EosbranchError):
    """A checkpoint that is missing, corrupt (sha256 mismatch) or unreadable."""


class DivergenceError(EosbranchError):
    """Training produced a NaN or inf loss."""


class Interrupted(EosbranchError):
    """Training was stopped by a signal after saving a checkpoint (the CLI exits with 130)."""


class StorageError(EosbranchError):
    """A write to the run store failed (no space left, quota, file too large); nothing was replaced."""


class EosbranchWarning(UserWarning):
    """Damage found and worked around (a corrupt checkpoint skipped, a table rebuilt); one line.
    The CLI prints it as ``warning: ...`` on stderr."""


def _loc(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    # a key quoted from the user's file stays on one line (e.g. a YAML key holding a newline)
    parts += [str(p) if str(p).isprintable() else repr(str(p)) for p in loc if p not in ("function-after",)]
    return ".".join(parts) or "<root>"


def _fields_at(model, loc: tuple) -> list[str]:
    """Names of the fields allowed where ``loc`` points (walks nested pydantic models)."""
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str = "", prefix: str = "", model=None) -> str:
    """Turn a pydantic error into one line: ``file: field.path: what is wrong``.

    Only the first problem is reported, so the message stays on one line; fixing it and
    re-running reveals the next one. ``model`` (the validated class) lets an unknown field be
    answered with the allowed names and the nearest one.
    """
    errors = err.errors(include_url=False)
    # A misspelt field also makes the real one "missing": report the misspelling first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, first["loc"]) if model is not None else []
        msg = "unknown field"
        if allowed:
            near = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
            msg += f"; allowed: {', '.join(allowed)}" + (f" (did you mean {near[0]!r}?)" if near else "")
    elif first["type"] == "missing":
        msg = "required field is missing"
    where = f"{source}: " if source else ""
    extra = f" ({len(err.errors())} problems; first shown)" if len(err.errors()) > 1 else ""
    return f"{where}{_loc(prefix, first['loc'])}: {msg}{extra}"
