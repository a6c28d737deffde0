"""The ``icm`` command line: generate -> label -> pairs -> dpo -> eval (and transfer, push).

Each command parses its options and calls into ``data/``, ``icm/`` or ``dpo/``; no logic lives here.
Bad input is reported on one line (file, row, field) with exit code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Optional  # noqa: F401  (typer needs real Optional at runtime on 3.10)

import typer
from rich.console import Console

from data.io import InputError
from icm.models import DEFAULT_MODEL, ModelNotFoundError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console(stderr=True)

MODEL_HELP = "Hub id, local HF directory, .gguf file, or alias (smollm2-135m, gemma3-270m)."


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn known user errors into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, ModelNotFoundError, FileNotFoundError) as error:
            fail(str(error).splitlines()[0] if str(error) else repr(error))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- icm generate (issue 3) -------------------------------------------------------------------------

# ---- icm label (issue 2) ----------------------------------------------------------------------------

# ---- icm pairs / icm push (issue 4) -----------------------------------------------------------------

# ---- icm dpo / icm eval / icm transfer (issue 5) -----------------------------------------------------


if __name__ == "__main__":
    app()
