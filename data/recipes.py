"""Recipes: every ``icm`` command reads its options from ``--config FILE.yaml`` and writes the resolved ones.

A recipe is a YAML mapping in TRL's style: the keys are the long option names without the leading dashes
(``max-steps`` or ``max_steps``), positional arguments go by their name (``input``, ``questions``, ...),
and a boolean pair ``--lora/--no-lora`` is ``lora: true|false`` (``no_lora: true`` works too). A command
may group its options in sections (``icm transfer``: ``generate``, ``label``, ``pairs``, ``dpo``), where a
key is the option name or its short form (``label: {iterations: 96}`` for ``--icm-iterations``). Flags on
the command line override the file: the file's values become the context's ``default_map``, which click
consults only for options the command line did not give.

A finished command writes every option's value (defaults included; not ``--resume``, ``--overwrite``,
``--stop-after``) as ``recipe.yaml`` in its run directory (or ``NAME.recipe.yaml`` next to its output
file), so ``icm CMD --config that/recipe.yaml`` reruns it exactly. Commands get this from
:class:`RecipeTyper`, so an option added to a command is a recipe key with no further code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from icm.data.console import console, quiet_libraries, set_quiet
from icm.data.io import (
    InputError,
    OutputError,
    add_secret,
    add_secrets,
    atomic_path,
    clear_secrets,
    regular_file,
    scrub,
    scrub_all,
)

RECIPE_FILE = "recipe.yaml"
RUN_CONTROL = frozenset({"resume", "overwrite", "stop_after"})  # how to run, not what: never written
COMMON = ("recipe", "quiet", "verbose", "icm_context")  # options every command gets, handled here and not passed on


class RecipeError(ValueError):
    """A bad recipe file: one line naming the file and the key."""


@dataclass(frozen=True)
class RecipeSpec:
    """Where a command writes its resolved recipe, and how its options are grouped in one.

    ``path`` maps the command's parameter values to the file (None: nowhere, e.g. no output file given);
    ``sections`` maps a section name to ``{key in the section: parameter name}``.
    """

    path: Callable[[dict[str, Any]], Path | None] | None = None
    sections: dict[str, dict[str, str]] = field(default_factory=dict)


SPECS: dict[str, RecipeSpec] = {}


def normalize(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def option_keys(params: list[Any]) -> dict[str, tuple[Any, bool]]:
    """Recipe key -> (parameter, inverted) for a command's exposed parameters: an option by each of its long
    names (the first is the one written), a boolean pair's second name inverted, an argument by its name."""
    keys: dict[str, tuple[Any, bool]] = {}
    for param in params:
        if not param.expose_value or param.name in COMMON:
            continue
        if getattr(param, "param_type_name", "") == "argument":
            keys[normalize(param.name)] = (param, False)
            continue
        for opt in [o for o in param.opts if o.startswith("--")] or [param.name]:
            keys[normalize(opt.lstrip("-"))] = (param, False)
        for opt in getattr(param, "secondary_opts", []):
            if opt.startswith("--"):
                keys[normalize(opt.lstrip("-"))] = (param, True)
    return keys


def read_recipe(path: Path, ctx: Any) -> dict[str, Any]:
    """The recipe at ``path`` as ``{parameter name: value}`` for ``ctx.command``, each value checked against
    its option's type; a :class:`RecipeError` names the file and the key."""
    import yaml

    command = ctx.command
    try:
        data = yaml.safe_load(regular_file(path).read_text(encoding="utf-8"))
    except InputError as error:  # missing, a directory, a FIFO (never opened), a device
        raise RecipeError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot be read ({error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})") from None
    except (ValueError, RecursionError) as error:  # an integer of 4,300+ digits, nesting deeper than Python goes
        raise RecipeError(f"{path}: not a readable recipe ({type(error).__name__}: {error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of option names to values, got {type(data).__name__}")
    keys = option_keys(command.params)
    sections = SPECS.get(command.name, RecipeSpec()).sections
    values: dict[str, Any] = {}
    given: dict[str, str] = {}

    def put(label: str, key: str, value: Any) -> None:
        param, inverted = keys[key]
        if param.name in given:
            raise RecipeError(f"{path}: {label}: given twice (also as {given[param.name]})")
        if inverted:
            if not isinstance(value, bool):
                raise RecipeError(f"{path}: {label}: must be true or false")
            value = not value
        if param.multiple and isinstance(value, str):
            value = [value]
        try:
            if value is not None:
                param.process_value(ctx, value)
        except Exception as error:  # the option's own check (type, range), as for a flag on the command line
            message = getattr(error, "message", None) or str(error)
            raise RecipeError(f"{path}: {label}: {message.splitlines()[0] if message else 'invalid value'}") from None
        given[param.name] = label
        values[param.name] = value

    for raw, value in data.items():
        key = normalize(raw)
        if key in sections and isinstance(value, dict):
            members = sections[key]
            for raw_sub, sub_value in value.items():
                sub = normalize(raw_sub)
                name = members.get(sub, sub if sub in members.values() else None)
                match = [k for k, (p, inv) in keys.items() if p.name == name and not inv]
                if not match:
                    raise RecipeError(f"{path}: unknown key '{raw}.{raw_sub}' (the {key} section of "
                                      f"icm {command.name} has: {', '.join(members)})")
                put(f"{raw}.{raw_sub}", match[0], sub_value)
        elif key in keys:
            put(str(raw), key, value)
        else:
            option = "--" + key.replace("_", "-")
            raise RecipeError(f"{path}: unknown key '{raw}' (icm {command.name} has no option {option})")
    return values


def _plain(value: Any) -> Any:
    """A parameter value as YAML writes it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_recipe(command: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Every exposed parameter's value (run control left out), grouped in the command's sections."""
    keys: dict[str, str] = {}
    for key, (param, inverted) in option_keys(command.params).items():
        if not inverted:
            keys.setdefault(param.name, key)  # the first long name
    sections = SPECS.get(command.name, RecipeSpec()).sections
    section_of = {name: section for section, members in sections.items() for name in members.values()}
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {section: {} for section in sections}
    for name, key in keys.items():
        if name in RUN_CONTROL or name not in params:
            continue
        target = grouped[section_of[name]] if name in section_of else top
        target[key] = _plain(params[name])
    return top | {section: members for section, members in grouped.items() if members}


def write_recipe(path: Path, command: Any, params: dict[str, Any]) -> None:
    import yaml

    from icm.data.console import version

    header = (f"# icm {command.name} recipe (icm {version()}): every option's value; rerun with\n"
              f"#   icm {command.name} --config {path}\n# Flags given with --config override these values.\n")
    text = yaml.safe_dump(scrub_all(resolved_recipe(command, params)), sort_keys=False, allow_unicode=True, width=120)
    with atomic_path(path) as tmp:
        tmp.write_text(scrub(header + text), encoding="utf-8")


def _read_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config``: the recipe's values become defaults of this invocation (eager: before the other options)."""
    if value is None or ctx.resilient_parsing:
        return value
    from icm.data.console import error

    try:
        values = read_recipe(value, ctx)
    except RecipeError as problem:
        error(str(problem))
        raise typer.Exit(2) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under `accelerate launch`, the first process writes


def plain_help(text: str | None) -> str | None:
    """Help text as the terminal shows it: ``code`` and `code` (reST, Markdown) become 'code'."""
    return re.sub(r"``?([^`]+?)``?", r"'\1'", text) if text else text


def with_common_options(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with ``--config``, ``-q/--quiet`` and ``-v/--verbose`` added; it runs with third-party output
    silenced (unless verbose) and, when it returns, writes the resolved recipe where the command's
    :class:`RecipeSpec` says."""
    signature = inspect.signature(fn, eval_str=True)
    extra = [
        inspect.Parameter("icm_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None, default=typer.Option(
            None, "--config", is_eager=True, callback=_read_config, dir_okay=False, metavar="FILE.yaml",
            help="Recipe: a YAML file of option values (keys: the long option names); flags given here override "
                 "it. A finished run writes its resolved recipe (recipe.yaml in its run directory).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="Print only errors and the final result line.")),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--verbose", "-v", help="Also show the libraries' progress bars, logs and warnings.")),
    ]
    taken = set(signature.parameters)
    if taken & set(COMMON):
        raise TypeError(f"icm {name}: parameters {sorted(taken & set(COMMON))} are reserved for every command")
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p
              for p in signature.parameters.values()]
    for p in params:
        if isinstance(getattr(p.default, "help", None), str):
            p.default.help = plain_help(p.default.help)

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        ctx = kwargs["icm_context"]
        for key in COMMON:
            kwargs.pop(key, None)
        quiet = bool(ctx.params.get("quiet") or ctx.meta.get("icm.quiet"))
        verbose = bool(ctx.params.get("verbose") or ctx.meta.get("icm.verbose"))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else level)
        set_quiet(quiet)
        add_secrets(list(kwargs.values()))  # a token given in any option reaches no file this command writes
        if isinstance(kwargs.get("api_key_env"), str):
            add_secret(os.environ.get(kwargs["api_key_env"]))
        try:
            with quiet_libraries(not verbose):
                out = fn(**kwargs)
            spec = SPECS.get(name)
            target = spec.path(ctx.params) if spec and spec.path else None
            if target is not None and _main_process():
                write_recipe(Path(target), ctx.command, {k: v for k, v in ctx.params.items() if k not in COMMON})
                console.print(f"[dim]recipe: {escape(str(target))}[/]", highlight=False)
        finally:
            clear_secrets()
            set_quiet(False)
            root.setLevel(level)
        return out

    wrapper.__signature__ = signature.replace(parameters=params + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, **{p.name: p.annotation for p in extra}}
    wrapper.__doc__ = plain_help(fn.__doc__)
    del wrapper.__wrapped__  # typer reads the signature above, not fn's
    return wrapper


def usage_error_line(error: Exception) -> str:
    """A click usage error (a bad option value, a missing or unknown option) as one line naming the command."""
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "icm"
    message = " ".join(error.format_message().split()).replace("Value error, ", "")
    return f"{where}: {message} (see '{where} -h')"


class OneLineErrorsGroup(TyperGroup):
    """The ``icm`` group: a usage error is printed as one line (``error: ...``) with click's exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as error:  # click's exceptions are the vendored copy's: recognised by what they offer
            if isinstance(error, (InputError, OutputError)):  # writing the recipe after the command, say
                from icm.data.console import error as print_error

                print_error(str(error))
                sys.exit(2 if isinstance(error, InputError) else 1)
            if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
                raise
            if type(error).__name__ == "NoArgsIsHelpError":  # `icm` alone: the help, as click shows it
                error.show()
            else:
                from icm.data.console import error as print_error

                print_error(usage_error_line(error))
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


class RecipeTyper(typer.Typer):
    """A Typer app whose commands all take ``--config``, ``-q`` and ``-v`` (see :func:`with_common_options`), with
    usage errors on one line (:class:`OneLineErrorsGroup`).

    ``recipe``: the command's :class:`RecipeSpec` (where it writes ``recipe.yaml``, its sections)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=OneLineErrorsGroup, **kwargs)

    def command(self, name: str | None = None, *, recipe: RecipeSpec | None = None,  # type: ignore[override]
                **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(name, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            command_name = name or fn.__name__.strip("_").replace("_", "-")
            SPECS[command_name] = recipe or RecipeSpec()
            register(with_common_options(fn, command_name))
            return fn

        return decorator
