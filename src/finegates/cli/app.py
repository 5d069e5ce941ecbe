"""The `finegates` command line: a thin layer over the Python API. This module holds the Typer
app and the error handling every command shares; the commands register into `app` from train.py
and commands.py (cli/__init__.py imports them, in the order `--help` lists them).

Errors that are the user's (bad data, bad options, unsupported model) print one line and exit 2;
nothing half-written is left behind.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Finetune a frozen transformer by learning which weight rows and columns to switch off, "
    "then cut them out (FineGates).",
)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Call `fn`, turning the errors a user can fix into a one-line message and exit code 2."""
    from ..training.loop import TrainingError

    try:
        return fn(*args, **kwargs)
    except TrainingError as e:
        fail(str(e), code=3)
    except USER_ERRORS as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


OVERWRITE_HELP = "Replace this command's own earlier output at the target (only once the new one is complete)."


def option(config: type, name: str, *flags: str, default=MISSING, **kwargs):
    """A Typer option for the field `name` of the dataclass `config`: its help text, and its default
    unless the command decides one (`default=`), so the CLI and the Python API say the same."""
    f = {f.name: f for f in fields(config)}[name]
    if default is MISSING:
        default = f.default_factory() if f.default_factory is not MISSING else f.default
    return typer.Option(None if default is MISSING else default, *flags, help=f.metadata["help"], **kwargs)


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty items."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def main() -> None:  # pragma: no cover
    app()

