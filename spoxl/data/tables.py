"""Row tables from .jsonl or .parquet files, read lazily enough for Pick-a-Pic-sized parquet.

API
  Table.open(path, columns, optional=()) -> Table   (checks the path and the columns; one-line errors)
  len(table); table.row(i) -> {column: value}; table.column(name) -> list (one column, whole)
  table.base_dir: folder that relative image paths in the table are resolved against
  resolve_image(value, base_dir) -> a path (str) or the raw bytes/dict, ready for open_image

`path`: a .jsonl file, a .parquet file, a FOLDER of .parquet shards (Pick-a-Pic v2 as published:
train-00000-of-00645.parquet, ...) or a glob of them ("data/train-*.parquet"). Shards are read in
sorted name order as one table.

Parquet is read by row group, on demand: the small columns (labels, captions, flags) are read for
every row up front; binary columns (the images) only when a row is used, one row group at a time,
with the last few row groups kept (ParquetTable.CACHED_ROW_GROUPS). Memory is bounded by a few row
groups per process whatever the dataset size (benchmarks/parquet_memory.py measures it).
`optional` columns are read when present (Pick-a-Pic's are_different / has_label).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from spoxl.errors import SpoxlError

TABLE_SUFFIXES = (".jsonl", ".parquet")


def parquet_shards(path) -> list[Path] | None:
    """The .parquet files behind `path` (a file, a folder of shards or a glob), or None when `path` is
    not parquet."""
    import glob

    text = str(path)
    if any(ch in text for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)) if p.endswith(".parquet"))
        if not shards:
            raise SpoxlError(f"dataset glob {text} matches no .parquet file")
        return shards
    path = Path(path).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        return shards or None
    return [path] if path.suffix == ".parquet" else None


class Table:
    def __init__(self, path: Path, rows=None):
        self.path = path
        self.columns = sorted(set().union(*(r.keys() for r in rows))) if rows else []
        self.base_dir = path.parent if not path.is_dir() else path
        self._rows = rows

    @classmethod
    def open(cls, path, columns: list[str], optional: tuple[str, ...] = ()) -> "Table":
        shards = parquet_shards(path)
        if shards is not None:
            return ParquetTable(Path(path), shards, list(columns), tuple(optional))
        path = Path(path)
        if not path.exists():
            raise SpoxlError(f"dataset {path} does not exist")
        if path.suffix == ".jsonl":
            table = cls(path, rows=_read_jsonl(path))
            present = set().union(*(r.keys() for r in table._rows)) if table._rows else set()
        else:
            raise SpoxlError(f"dataset {path} must be an image folder, a .jsonl, a .parquet file or a folder of .parquet shards")
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
        return len(self._rows)

    def row(self, i: int) -> dict:
        return self._rows[i]

    def column(self, name: str) -> list:
        return [r.get(name) for r in self._rows]


def _is_bulky(arrow_type) -> bool:
    """Binary columns (image bytes, also inside a {"bytes", "path"} struct) are read on demand."""
    import pyarrow as pa

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        return any(_is_bulky(arrow_type.field(k).type) for k in range(arrow_type.num_fields))
    return False


class ParquetTable(Table):
    """One table over parquet shards: small columns in memory, bulky ones read by row group."""

    CACHED_ROW_GROUPS = 2  # per process; a row group of Pick-a-Pic v2 is ~20-40 MB of JPEG bytes

    def __init__(self, path: Path, shards: list[Path], columns: list[str], optional: tuple[str, ...]):
        import pyarrow.parquet as pq

        super().__init__(path)
        self.base_dir = shards[0].parent
        self._shards, self._groups = shards, []  # groups: (shard index, row group, first global row, rows)
        self._open: tuple[int, object] | None = None  # the one shard kept open for row-group reads
        self._small: dict[str, list] = {}
        start = 0
        for k, shard in enumerate(shards):
            if not shard.is_file():
                raise SpoxlError(f"dataset {shard} does not exist")
            try:
                f = pq.ParquetFile(shard, memory_map=False)
            except Exception as e:
                raise SpoxlError(f"cannot read parquet {shard}: {str(e).splitlines()[0]}") from None
            schema = f.schema_arrow
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise SpoxlError(f"dataset {shard} has no column {missing[0]!r} (columns: {', '.join(sorted(schema.names))})")
            if k == 0:
                self.columns = [*columns, *(c for c in optional if c in schema.names and c not in columns)]
                self._bulky = [c for c in self.columns if _is_bulky(schema.field(c).type)]
                self._small = {c: [] for c in self.columns if c not in self._bulky}
            for g in range(f.metadata.num_row_groups):
                n = f.metadata.row_group(g).num_rows
                self._groups.append((k, g, start, n))
                start += n
            if self._small:  # labels, captions, flags: small, read whole (never the image bytes)
                part = f.read(columns=[c for c in self._small if c in schema.names])
                for c in self._small:
                    values = part.column(c).to_pylist() if c in part.column_names else [None] * part.num_rows
                    self._small[c].extend(values)
            f.close()
        self._n = start
        self._starts = [g[2] for g in self._groups]
        self._cache: dict[int, dict] = {}  # group index -> {column: list}, insertion-ordered (LRU)
        if self._n == 0:
            raise SpoxlError(f"dataset {path} is empty")

    def __len__(self) -> int:
        return self._n

    def column(self, name: str) -> list:
        if name in self._small:
            return list(self._small[name])
        return [self.row(i)[name] for i in range(self._n)]  # bulky: reads every row group once

    def _group_rows(self, gi: int) -> dict:
        if gi in self._cache:
            self._cache[gi] = self._cache.pop(gi)  # most recently used last
            return self._cache[gi]
        import pyarrow.parquet as pq

        k, g, _, _ = self._groups[gi]
        if self._open is None or self._open[0] != k:
            if self._open is not None:
                self._open[1].close()
            self._open = (k, pq.ParquetFile(self._shards[k], memory_map=False))
        data = self._open[1].read_row_group(g, columns=self._bulky)
        rows = {c: data.column(c).to_pylist() for c in self._bulky}
        self._cache[gi] = rows
        while len(self._cache) > self.CACHED_ROW_GROUPS:
            self._cache.pop(next(iter(self._cache)))
        return rows

    def row(self, i: int) -> dict:
        import bisect

        if not 0 <= i < self._n:
            raise IndexError(i)
        out = {c: v[i] for c, v in self._small.items()}
        if self._bulky:
            gi = bisect.bisect_right(self._starts, i) - 1
            rows = self._group_rows(gi)
            offset = i - self._groups[gi][2]
            out.update({c: rows[c][offset] for c in self._bulky})
        return out


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
