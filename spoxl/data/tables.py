"""Row tables from .jsonl or .parquet files, read lazily enough for Pick-a-Pic-sized parquet.

API
  Table.open(path, columns) -> Table   (checks the path and the columns; one-line errors)
  len(table); table.row(i) -> {column: value}; table.column(name) -> list (one column, whole)
  table.base_dir: folder that relative image paths in the table are resolved against
  resolve_image(value, base_dir) -> a path (str) or the raw bytes/dict, ready for open_image

Parquet stays a pyarrow Table (columnar, memory-mapped, only the needed columns), so a 335 GB
Pick-a-Pic shard is not turned into Python objects up front; jsonl is parsed into dicts.
"""

from __future__ import annotations

import json
from pathlib import Path

from spoxl.errors import SpoxlError

TABLE_SUFFIXES = (".jsonl", ".parquet")


class Table:
    def __init__(self, path: Path, rows=None, arrow=None):
        self.path = path
        self.base_dir = path.parent
        self._rows = rows
        self._arrow = arrow

    @classmethod
    def open(cls, path, columns: list[str]) -> "Table":
        path = Path(path)
        if not path.exists():
            raise SpoxlError(f"dataset {path} does not exist")
        if path.suffix == ".jsonl":
            table = cls(path, rows=_read_jsonl(path))
            present = set().union(*(r.keys() for r in table._rows)) if table._rows else set()
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
            except Exception as e:
                raise SpoxlError(f"cannot read parquet {path}: {str(e).splitlines()[0]}") from None
            present = set(schema.names)
            missing = [c for c in columns if c not in present]
            if missing:
                raise SpoxlError(f"dataset {path} has no column {missing[0]!r} (columns: {', '.join(sorted(present))})")
            table = cls(path, arrow=pq.read_table(path, columns=columns, memory_map=True))
        else:
            raise SpoxlError(f"dataset {path} must be a folder, a .jsonl or a .parquet file")
        if len(table) == 0:
            raise SpoxlError(f"dataset {path} is empty")
        missing = [c for c in columns if c not in present]
        if missing:
            raise SpoxlError(f"dataset {path} has no column {missing[0]!r} (columns: {', '.join(sorted(present))})")
        if table._rows is not None:
            for i, row in enumerate(table._rows):
                absent = [c for c in columns if c not in row]
                if absent:
                    raise SpoxlError(f"dataset {path} row {i} has no {absent[0]!r}")
        return table

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else self._arrow.num_rows

    def row(self, i: int) -> dict:
        if self._rows is not None:
            return self._rows[i]
        return self._arrow.slice(i, 1).to_pylist()[0]

    def column(self, name: str) -> list:
        if self._rows is not None:
            return [r[name] for r in self._rows]
        return self._arrow.column(name).to_pylist()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SpoxlError(f"{path} line {n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise SpoxlError(f"{path} line {n} is not a JSON object")
            rows.append(row)
    return rows


def resolve_image(value, base_dir: Path):
    """Paths are relative to the table's folder; bytes and {"bytes"/"path"} dicts pass through."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if not isinstance(value, str) or not value:
        raise SpoxlError(f"image entry {value!r} is neither a path nor image bytes")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)
