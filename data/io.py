"""Reading tables (JSONL, JSON, CSV, Parquet) and writing files atomically.

Every user-facing input error is an :class:`InputError` whose message names the file, the row and the
field; the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL, JSON (list of objects), CSV or Parquet file into a list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(path, f"unsupported file type '{suffix}' (expected one of {', '.join(TABLE_SUFFIXES)})")
    if suffix == ".parquet":
        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(path, f"not a readable Parquet file ({error})") from None
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            records = [dict(row) for row in csv.DictReader(f)]
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            raise InputError(path, f"malformed JSON: {error.msg}", row=None) from None
        if isinstance(loaded, dict):  # {"data": [...]} or a single column-oriented object
            lists = [v for v in loaded.values() if isinstance(v, list)]
            loaded = lists[0] if len(lists) == 1 else [loaded]
        records = loaded
    else:
        records = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(path, f"malformed JSON line: {error.msg}", row=i) from None
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise InputError(path, f"expected an object, got {type(record).__name__}", row=i)
    if not records:
        raise InputError(path, "file has no rows")
    return records


def require_fields(path: str | Path, records: list[dict[str, Any]], fields: list[str]) -> None:
    """Fail on the first row that lacks one of ``fields`` or has it empty."""
    for i, record in enumerate(records, start=1):
        for field in fields:
            value = record.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(path, "missing or empty", row=i, field=field)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def write_parquet(path: str | Path, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    """Write ``table`` as zstd Parquet, with ``metadata`` (JSON-encoded) under the schema key ``icm``."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing[b"icm"] = json.dumps(metadata, default=str).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_metadata(path: str | Path) -> dict[str, Any]:
    """The ``icm`` metadata written by :func:`write_parquet`, or ``{}``."""
    raw = (pq.read_schema(path).metadata or {}).get(b"icm")
    return json.loads(raw) if raw else {}
