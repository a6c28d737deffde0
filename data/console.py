"""The console of the ``icm`` commands: one rich console for progress, tables and notes (silent with
``-q``), one for errors and the final result line (always shown), and third-party output kept out of it.

Without ``--verbose``, :func:`quiet_libraries` silences, for the duration of a command and in this process
only, what the libraries print on their own: progress bars (transformers' "Loading weights", the GGUF
"Converting and de-quantizing" bar, datasets' map bars, huggingface_hub's downloads, any plain tqdm bar),
their log records below ERROR (transformers, TRL, accelerate, PEFT, datasets, huggingface_hub, torch) and
Python warnings (e.g. torch's FutureWarning about gradient checkpointing). Each stage shows its own rich
progress display instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partialmethod
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)  # progress displays, tables, notes: silenced by -q
_always = Console(stderr=True)  # errors and the final result line

# Read by the libraries when they are imported: covers a library first imported during the command.
LIBRARY_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "HF_HUB_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "HF_DATASETS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
LIBRARY_LOGGERS = ("transformers", "trl", "accelerate", "peft", "datasets", "huggingface_hub", "torch")


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("icm-dpo")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def set_quiet(quiet: bool) -> None:
    """``-q``: only errors and the final result line."""
    console.quiet = quiet


def result(message: str) -> None:
    """The command's final result line (shown in quiet mode too), printed as it is (no markup)."""
    _always.print(message, markup=False, highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    """``text`` on one line with its markup shown as it is: file names like ``claims [v2].jsonl`` print unchanged,
    and a new line (in a file name, in a library's message) is written as ``\\n``."""
    return escape(text.replace("\r", "\\r").replace("\n", "\\n"))


def error(message: str) -> None:
    """One line on stderr: ``error: MESSAGE``."""
    _always.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)


def summary(title: str, rows: dict[str, Any]) -> Table:
    """A two-column table of a command's results (None values are left out)."""
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        if value is not None:
            table.add_row(key, escape(str(value)))
    return table


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set the variables the user has not set; restore the environment afterwards."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def _logger_levels(names: tuple[str, ...], level: int) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)


@contextmanager
def _library_bars() -> Iterator[None]:
    """Progress bars of the libraries imported before the command started (the others read ``LIBRARY_ENV``)."""
    undo = []
    if "tqdm" in sys.modules:  # plain tqdm bars, e.g. transformers' GGUF conversion: disabled unless asked for
        from tqdm import std

        init = std.tqdm.__init__
        std.tqdm.__init__ = partialmethod(init, disable=True)
        undo.append(lambda: setattr(std.tqdm, "__init__", init))
    if "huggingface_hub" in sys.modules:  # transformers follows huggingface_hub's switch
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Silence third-party progress bars, logs below ERROR and warnings inside the block (see the module doc)."""
    if not enabled:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(_environment(LIBRARY_ENV))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_logger_levels(LIBRARY_LOGGERS, logging.ERROR))
        stack.enter_context(_library_bars())
        yield


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
