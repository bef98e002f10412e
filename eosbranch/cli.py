"""The command line: a thin skin over the API (typer + rich).

Results go to stdout (the run directory on the last line); progress and one-line errors go to
stderr. User mistakes exit with code 2 and no traceback; set ``EOSBRANCH_DEBUG=1`` to see it.

This module holds the typer app, the order of its commands and its generated reference (``cli/``);
the commands are in cli_run.py (train, demo, runs, fork, sweep) and cli_study.py (compare, groups
show, opposing, report), their shared consoles and error handling in cli_console.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer._completion_shared import get_completion_script
from typer.cli import get_docs_for_click

from . import cli_run, cli_study
from .cli_console import user_errors

app = typer.Typer(
    name="eosbranch",
    help="Causal studies of the edge of stability: train, fork into branches, measure per group.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
# In this order in `eosbranch --help` and the reference.
for command in (cli_run.train, cli_run.demo, cli_run.runs, cli_run.fork, cli_study.compare, cli_run.sweep):
    app.command()(user_errors(command))
groups_app = typer.Typer(help="Group specs: sizes and geometry.", no_args_is_help=True)
app.add_typer(groups_app, name="groups")
groups_app.command("show")(user_errors(cli_study.groups_show))
for command in (cli_study.opposing, cli_study.report):
    app.command()(user_errors(command))


def reference() -> dict[str, str]:
    """The generated documentation in ``cli/``: the command reference (Markdown, from the typer
    app, as ``typer ... utils docs`` makes it) and shell-completion scripts. ``make cli-docs``
    writes them; a test fails when the committed files are stale."""
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="eosbranch")
    ctx.ensure_object(dict)
    head = "<!-- Generated from the typer app by `make cli-docs`; tests/test_cli.py fails when it is stale. -->\n\n"
    tail = ("\n## Shell completion\n\n`eosbranch --install-completion` installs it for the current shell; or "
            "source the script for yours from `cli/completion/` (bash, zsh, fish), e.g. "
            "`source cli/completion/eosbranch.bash`.\n")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="eosbranch").strip() + "\n"
    files = {"README.md": head + docs + tail}
    for shell in ("bash", "zsh", "fish"):  # what `eosbranch --show-completion` prints in that shell
        files[f"completion/eosbranch.{shell}"] = get_completion_script(
            prog_name="eosbranch", complete_var="_EOSBRANCH_COMPLETE", shell=shell) + "\n"
    return files


def write_reference(directory: str = "cli") -> None:
    for name, text in reference().items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
