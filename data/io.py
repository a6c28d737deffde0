"""Reading tables (JSONL, JSON, CSV, Parquet) and writing files atomically.

Every user-facing input error is an :class:`InputError` whose message names the file, the row and the
field; the CLI prints it on one line and exits with code 2. A write that fails (a full disk, a read-only
directory) is an :class:`OutputError`: the file it was replacing is left as it was.

What is read as well-formed: UTF-8 with or without a byte order mark, LF or CRLF line ends, a trailing newline.
What is refused, with the row and field: bytes that are not UTF-8, a bad JSON line, duplicate keys or columns,
a CSV row with more or fewer cells than its header, and any text value over :data:`MAX_FIELD_CHARS`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
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


def _read_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line, object_pairs_hook=_object))
        except json.JSONDecodeError as error:
            raise InputError(path, f"malformed JSON line: {error.msg}", row=i) from None
    return records


def _read_json(path: Path, text: str) -> list[Any]:
    try:
        loaded = json.loads(text, object_pairs_hook=_object) if text.strip() else []
    except json.JSONDecodeError as error:
        raise InputError(path, f"malformed JSON: {error.msg} (line {error.lineno})") from None
    if isinstance(loaded, dict):  # {"data": [...]} or a single column-oriented object
        lists = [v for v in loaded.values() if isinstance(v, list)]
        loaded = lists[0] if len(lists) == 1 else [loaded]
    return loaded


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
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
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise InputError(path, f"not a readable Parquet file ({str(error).splitlines()[0]})") from None
    names = table.column_names
    for name in names:
        if names.count(name) > 1:
            raise InputError(path, "duplicate column", field=name)
    return table.to_pylist()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL, JSON (list of objects), CSV or Parquet file into a list of dicts."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not a file")
    if not path.is_file():
        raise InputError(path, "file not found")
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
    except OSError:
        return False


def check_output(path: str | Path, *inputs: str | Path | None, directory: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: the input itself, a directory where a file
    goes (or a file where a directory goes), a parent that is a file, or a directory that is not writable."""
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise InputError(path, "the output is the input file; write the output to another path")
    if directory and path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a directory; give a directory for the output")
    if not directory and path.is_dir():
        raise InputError(path, "is a directory; give a file path for the output")
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
_SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if len(v) >= 8 and _SECRET_NAME.search(k)]


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with secrets replaced by ``***``: the values of ``--token``/``--api-key``-like options, tokens
    that look like one (``hf_...``, ``sk-...``), and the value of any environment variable whose name says it
    is a secret (``HF_TOKEN``, ``OPENAI_API_KEY``, ``..._SECRET``, ``..._PASSWORD``)."""
    for value in _secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return _TOKEN_VALUE.sub(lambda m: m.group(0)[:3] + "***", _TOKEN_OPTION.sub(r"\1***", text))


def scrub_all(obj: Any, secrets: list[str] | None = None) -> Any:
    """:func:`scrub` applied to every string inside nested dicts and lists (keys included)."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return scrub(obj, secrets)
    if isinstance(obj, dict):
        return {scrub_all(k, secrets): scrub_all(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_all(v, secrets) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically, with secrets scrubbed (:func:`scrub`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(scrub_all(obj), indent=2, default=str) + "\n", encoding="utf-8")


def write_parquet(path: str | Path, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    """Write ``table`` as zstd Parquet, with ``metadata`` (JSON-encoded) under the schema key ``icm``."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing[b"icm"] = json.dumps(scrub_all(metadata), default=str).encode()
        table = table.replace_schema_metadata(existing)
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_metadata(path: str | Path) -> dict[str, Any]:
    """The ``icm`` metadata written by :func:`write_parquet`, or ``{}``."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"icm")
    return json.loads(raw) if raw else {}
