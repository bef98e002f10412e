"""What every command of the command line shares: the two consoles (results on stdout, progress
and one-line reports on stderr) and the translation of user mistakes into one line and exit code 2."""

from __future__ import annotations

import functools
import os
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EosbranchError, EosbranchWarning, Interrupted

out = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn an EosbranchError into one line on stderr and exit code 2 (inside the app, so
    CliRunner tests see the same path as a user)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        shown = warnings.showwarning

        def show(message, category, *rest, **kw):  # the store's damage reports: one line each
            if issubclass(category, EosbranchWarning):
                return warn(str(message))
            return shown(message, category, *rest, **kw)

        warnings.showwarning = show
        try:
            return fn(*args, **kwargs)
        except EosbranchError as e:
            if os.environ.get("EOSBRANCH_DEBUG"):
                raise
            # escape: a message quoting the user's input (e.g. "[/x]") is text, not rich markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if isinstance(e, Interrupted) else 2)
        finally:
            warnings.showwarning = shown

    return wrapper


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)
