"""Reading tables (JSONL, JSON, CSV, Parquet) and writing files atomically.

Every user-facing input error is an :class:`InputError` whose message names the file, the row and the
field; the CLI prints it on one line and exits with code 2. A write that fails (a full disk, a read-only
directory) is an :class:`OutputError`: the file it was replacing is left as it was.

What is read as well-formed: UTF-8 with or without a byte order mark, LF or CRLF line ends, a trailing newline.
What is refused, with the row and field: bytes that are not UTF-8, a bad JSON line, duplicate keys or columns,
a CSV row with more or fewer cells than its header, an integer of more digits than Python converts (4,300), a
Parquet value Python cannot represent (a timestamp out of range), and any text value over :data:`MAX_FIELD_CHARS`.
Only regular files are read (:func:`regular_file`): a FIFO, a device or a directory is refused before it is
opened, so nothing blocks on it.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_FIELD_CHARS = 1_000_000
"""Longest text value read (about 250k tokens, beyond any model's context): a longer one is an error, not a
prompt that silently fills the memory."""


class InputError(ValueError):
    """Bad user input: the message is one line naming the file, row (1-based) and field."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, field: str | None = None):
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field = str(path), row, field


class OutputError(RuntimeError):
    """A file could not be written (disk full, read-only, ...); the file it replaces is unchanged."""


class ServerError(RuntimeError):
    """An inference server failed mid-run, after the client's retries (``icm.server``); one line: which server
    and what happened."""


def _not_found(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "is a symbolic link loop"
    if os.path.islink(path):
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "file not found"
    return f"cannot read the file ({error.strerror or error})"


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def regular_file(path: str | Path) -> Path:
    """``path`` when it names a regular file (through symbolic links); else an :class:`InputError` that says what it
    is: missing, a directory, a FIFO, a device, a broken link or a link loop. It is not opened, so a FIFO cannot
    block the reader."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise InputError(path, _not_found(path, error)) from None
    if stat.S_ISDIR(mode):
        raise InputError(path, "is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise InputError(path, f"is {_file_kind(mode)}, not a regular file")
    return path


def read_json(path: str | Path, fix: str = "", keys: tuple[str, ...] | None = None) -> Any:
    """The JSON content of a state file (``run.json``, ``split.json``, ...). A file that is not regular, not UTF-8,
    not valid JSON or, with ``keys``, not an object holding every key, is an :class:`InputError`:
    ``damaged (why); fix``."""
    path = regular_file(path)
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise InputError(path, f"cannot read the file ({error.strerror or error}){hint}") from None
    except ValueError as error:  # JSONDecodeError, not UTF-8, an integer too long to convert
        why = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise InputError(path, f"damaged ({why}){hint}") from None
    if keys is not None:
        if not isinstance(data, dict):
            raise InputError(path, f"damaged (a JSON object expected, got {_kind(data)}){hint}")
        if missing := [k for k in keys if k not in data]:
            raise InputError(path, f"damaged or of another icm version (no {', '.join(map(repr, missing))}){hint}")
    return data


class _Object(dict):
    """A JSON object that remembers its first duplicate key (``json`` keeps the last value silently)."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        obj.duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
    return obj


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a byte order mark is dropped); a bad byte is an error naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                         "save the file as UTF-8", row=line) from None


class _LongInteger(ValueError):
    """An integer of more digits than Python converts (``sys.get_int_max_str_digits``)."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _LongInteger(f"an integer of {len(text.lstrip('-')):,} digits (at most "
                           f"{sys.get_int_max_str_digits():,}); quote it to read it as text") from None


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object, parse_int=_integer)


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_loads(line))
        except json.JSONDecodeError as error:
            raise InputError(path, f"malformed JSON line: {error.msg}", row=i) from None
        except _LongInteger as error:
            raise InputError(path, str(error), row=i) from None
    return records


def _read_json(path: Path, text: str) -> list[Any]:
    try:
        loaded = _loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        raise InputError(path, f"malformed JSON: {error.msg} (line {error.lineno})") from None
    except _LongInteger as error:
        raise InputError(path, str(error)) from None
    if isinstance(loaded, dict):  # {"data": [...]} or a single column-oriented object
        lists = [v for v in loaded.values() if isinstance(v, list)]
        loaded = lists[0] if len(lists) == 1 else [loaded]
    if not isinstance(loaded, list):
        raise InputError(path, f"expected a JSON list of objects, got {_kind(loaded)}")
    return loaded


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    # csv's own cap (131,072 characters) is below MAX_FIELD_CHARS; the cap on text values is checked per field below
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise InputError(path, f"malformed CSV ({error})") from None
    if not rows:
        return []
    header, records = rows[0], []
    for name in header:
        if header.count(name) > 1:
            raise InputError(path, "duplicate column in the header", field=name)
    for i, cells in enumerate(rows[1:], start=1):
        if not cells:  # a blank line
            continue
        if len(cells) != len(header):
            raise InputError(path, f"{len(cells)} cells where the header has {len(header)} columns", row=i)
        records.append(dict(zip(header, cells)))
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as error:
        raise InputError(path, f"not a readable Parquet file ({first_line(error)})") from None
    names = table.column_names
    for name in names:
        if names.count(name) > 1:
            raise InputError(path, "duplicate column", field=name)
    try:
        return table.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError) as error:  # e.g. a timestamp beyond year 9999
        for name, column in zip(names, table.columns):
            try:
                column.to_pylist()
            except (pa.ArrowException, ValueError, OverflowError) as problem:
                raise InputError(path, f"a {column.type} value Python cannot represent ({first_line(problem)})",
                                 field=name) from None
        raise InputError(path, f"values Python cannot represent ({first_line(error)})") from None


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL, JSON (list of objects), CSV or Parquet file into a list of dicts."""
    path = regular_file(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(path, f"unsupported file type '{suffix}' (expected one of {', '.join(TABLE_SUFFIXES)})")
    try:
        if suffix == ".parquet":
            records = _read_parquet(path)
        else:
            text = _decode(path, path.read_bytes())
            reader = {".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl}[suffix]
            records = reader(path, text)
    except OSError as error:
        raise InputError(path, f"cannot read the file ({error.strerror or error})") from None
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise InputError(path, f"expected an object, got {_kind(record)}", row=i)
        if getattr(record, "duplicate", None) is not None:
            raise InputError(path, "duplicate key in the same row", row=i, field=record.duplicate)
        for key, value in record.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                raise InputError(path, f"{len(value):,} characters, over the limit of {MAX_FIELD_CHARS:,}",
                                 row=i, field=key)
    if not records:
        raise InputError(path, "file has no rows")
    return [dict(r) for r in records]


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, bytes):
        return "bytes"
    return type(value).__name__


def is_missing(value: Any) -> bool:
    """None, NaN, or a string of only whitespace."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or (isinstance(value, str) and not value.strip()))


def text_value(path: str | Path, row: int, field: str, value: Any, required: bool = True) -> str | None:
    """``value`` as text: a string, or a number written out. A JSON object, list or boolean where text is
    expected is an error; a missing or empty value is one when ``required`` (else None)."""
    if is_missing(value):
        if required:
            raise InputError(path, "missing or empty", row=row, field=field)
        return None
    if isinstance(value, (dict, list, tuple, bool, bytes)):
        raise InputError(path, f"expected text, got {_kind(value)}", row=row, field=field)
    return str(value)


def require_fields(path: str | Path, records: list[dict[str, Any]], fields: list[str]) -> None:
    """Fail on the first row that lacks one of ``fields`` or has it empty."""
    for i, record in enumerate(records, start=1):
        for field in fields:
            value = record.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(path, "missing or empty", row=i, field=field)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return False


def _unusable_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be written through (a loop, a broken link), or None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as error:
        return _not_found(path, error)
    return None


def check_output(path: str | Path, *inputs: str | Path | None, directory: bool = False,
                 what: str = "the output") -> Path:
    """Refuse, before any work, an output that cannot be written: one of the inputs (by any spelling: a symbolic or
    hard link, ``./x``, ``../dir/x``), a directory where a file goes (or a file where a directory goes), a FIFO or
    device, a symbolic link loop or broken link on the way, a parent that is a file, or a directory that is not
    writable. ``what`` names the output in the message (a sibling file the command also writes)."""
    path = Path(path)
    for p in (path, *path.parents):
        if (why := _unusable_link(p)) is not None:
            raise InputError(path, f"{why}; give another path" if p == path else f"{p} {why}")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise InputError(path, f"{what} is the input file {source}; write the output to another path")
    if path.exists():
        mode = path.stat().st_mode
        if directory and not stat.S_ISDIR(mode):
            raise InputError(path, "exists and is not a directory; give a directory for the output")
        if not directory and stat.S_ISDIR(mode):
            raise InputError(path, "is a directory; give a file path for the output")
        if not directory and not stat.S_ISREG(mode):
            raise InputError(path, f"exists and is {_file_kind(mode)}; give a regular file path for the output")
    parent = path if directory else path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(path, f"cannot create the directory {parent}: {existing} is a file")
    try:  # os.access says yes to root on a read-only mount; a real file says the truth
        fd, probe = tempfile.mkstemp(prefix=".icm-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(path, f"cannot write in {existing} ({error.strerror or error})") from None
    return path


def files_of(path: str | Path) -> list[Path]:
    """The files of a local path: a directory's files, or the file itself (none for a name like a Hub id). A local
    model's files are inputs that no output may replace."""
    path = Path(path).expanduser()
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path] if path.is_file() else []


def check_outputs(outputs: dict[str, str | Path | None], inputs: list[str | Path | None]) -> None:
    """:func:`check_output` for every file a command writes (``{what: path}``: the output and the files written next
    to it), against every input, and against each other (two outputs at one path)."""
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        check_output(path, *inputs, what=what)
        key = Path(os.path.realpath(path))
        if key in seen:
            raise InputError(path, f"{what} and {seen[key]} are the same file; give them different paths")
        seen[key] = what


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds. An OSError
    while writing (a full disk, ...) becomes an :class:`OutputError`, and ``path`` keeps its old content."""
    path = Path(path)
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({_describe(error)}); {kept}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({_describe(error)}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_TOKEN_OPTION = re.compile(r"(--(?:[\w-]*[-_])?(?:token|key|secret|password)(?:=|\s+))(?:'[^']*'|\"[^\"]*\"|\S+)",
                           re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9_]{4,}|\b(?:sk|ghp|github_pat)[-_][A-Za-z0-9_-]{20,}")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
_SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
_COMMAND_SECRETS: set[str] = set()


def add_secrets(values: list[Any]) -> None:
    """Also scrub, from every file written until :func:`clear_secrets`, the tokens inside these option values of the
    running command (a token given as ``--push-to-hub``, ``--revision``, ...: anything that looks like one; paths
    are not option values that hold tokens)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            add_secrets(list(value))
        elif isinstance(value, str):
            _COMMAND_SECRETS.update(m.group(0) for m in _TOKEN_VALUE.finditer(value))


def add_secret(value: str | None) -> None:
    """Scrub this exact value too (e.g. the API key read from the variable named by ``--api-key-env``)."""
    if value and len(value) >= 8:
        _COMMAND_SECRETS.add(value)


def clear_secrets() -> None:
    _COMMAND_SECRETS.clear()


def _secret_values() -> list[str]:
    found = {v for k, v in os.environ.items() if len(v) >= 8 and _SECRET_NAME.search(k)} | _COMMAND_SECRETS
    return sorted(found, key=len, reverse=True)  # a longer secret first: no piece of it is left behind


def scrub(text: str, secrets: list[str] | None = None, patterns: bool = True) -> str:
    """``text`` with secrets replaced by ``***``: the value of any environment variable whose name says it is a
    secret (``HF_TOKEN``, ``OPENAI_API_KEY``, ``..._SECRET``, ``..._PASSWORD``), the tokens given in the running
    command's options (:func:`add_secrets`) and, with ``patterns``, the values of ``--token``/``--api-key``-like
    options, tokens that look like one (``hf_...``, ``sk-...``) and the password of a URL (``https://user:***@``)."""
    for value in _secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    if not patterns:
        return text
    text = _URL_CREDENTIALS.sub("***@", _TOKEN_OPTION.sub(r"\1***", text))
    return _TOKEN_VALUE.sub(lambda m: m.group(0)[:3] + "***", text)


def scrub_text(text: str) -> str:
    """``text`` with the exact secrets (:func:`scrub` without the patterns) replaced: for data such as completions
    and questions, where a string that merely looks like a token is kept."""
    return scrub(text, patterns=False)


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])~?(?:/[^\s'\"`<>|(){}\[\],;=/]+)+/?")


def without_local_paths(text: str) -> str:
    """``text`` with every absolute path (``/home/me/runs/pairs.parquet``, ``~/x``) cut to its last component
    (``pairs.parquet``): what is published names no folder of this machine. URLs and relative paths stay."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def scrub_all(obj: Any, secrets: list[str] | None = None, patterns: bool = True) -> Any:
    """:func:`scrub` applied to every string inside nested dicts and lists (keys included)."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return scrub(obj, secrets, patterns)
    if isinstance(obj, dict):
        return {scrub_all(k, secrets, patterns): scrub_all(v, secrets, patterns) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_all(v, secrets, patterns) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically, with secrets scrubbed (:func:`scrub`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(scrub_text(json.dumps(scrub_all(obj), indent=2, default=str)) + "\n", encoding="utf-8")


def _scrub_table(table: pa.Table) -> pa.Table:
    """``table`` with the exact secrets (:func:`scrub_text`) replaced in its text columns (nested ones included)."""
    secrets = _secret_values()
    if not secrets:
        return table
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, spec in enumerate(table.schema):
        column = table.column(i)
        if pa.types.is_string(spec.type) or pa.types.is_large_string(spec.type):
            for secret in secrets:
                column = pc.replace_substring(column, secret, "***")
        elif pa.types.is_nested(spec.type) and any(s in json.dumps(column.to_pylist(), default=str) for s in secrets):
            column = pa.array(scrub_all(column.to_pylist(), secrets, patterns=False), spec.type)
        else:
            continue
        table = table.set_column(i, spec, column)
    return table


def write_parquet(path: str | Path, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    """Write ``table`` as zstd Parquet, with ``metadata`` (JSON-encoded) under the schema key ``icm``."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing[b"icm"] = json.dumps(scrub_all(metadata), default=str).encode()
        table = table.replace_schema_metadata(existing)
    import pyarrow.parquet as pq

    table = _scrub_table(table)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_metadata(path: str | Path) -> dict[str, Any]:
    """The ``icm`` metadata written by :func:`write_parquet`, or ``{}``; an unreadable file or damaged metadata is
    an :class:`InputError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = regular_file(path)
    try:
        raw = (pq.read_schema(path).metadata or {}).get(b"icm")
    except (pa.ArrowException, OSError, ValueError) as error:
        raise InputError(path, f"not a readable Parquet file ({first_line(error)})") from None
    try:
        metadata = json.loads(raw) if raw else {}
    except ValueError as error:
        raise InputError(path, f"damaged icm metadata ({first_line(error)})") from None
    return metadata if isinstance(metadata, dict) else {}
