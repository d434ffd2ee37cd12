"""NCP's "absolute winners" subset of a Pick-a-Pic pair set (the official `find_absolute_winners`,
methods.md 4.3): per prompt, keep the images that won at least once and never lost or tied, and
ONE pair per such image (the first row, in file order, where it won). The NCP v2 paper trains on
this subset (about 10x smaller than Pick-a-Pic).

    spoxl pairs absolute-winners --data /data/pickapic_v2/train --out /data/pickapic_abs_winners.parquet

An image is identified by its uid column when the table has one (Pick-a-Pic's image_0_uid /
image_1_uid), else by a digest of its bytes. Rows that are not comparisons (are_different or
has_label false) are skipped. The table is read by row group (shards of a folder or glob in name
order, as spoxl.data.tables), so memory stays at the small columns plus one row group; the output
is one parquet file with the same columns, written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from spoxl.errors import SpoxlError


def absolute_winner_rows(captions, ids_0, ids_1, labels, usable=None) -> list[int]:
    """The rows to keep (sorted): for each (caption, image) that won at least once and never lost
    or tied, the first row where it won. labels[i] = P(image 0 preferred): 1, 0 or 0.5 (a tie)."""
    wins: dict = {}
    spoiled: set = set()
    for row, (caption, a, b, label) in enumerate(zip(captions, ids_0, ids_1, labels)):
        if (usable is not None and not usable[row]) or label is None:  # not a comparison
            continue
        try:
            label = float(label)
        except (TypeError, ValueError):
            raise SpoxlError(f"row {row}: label {label!r} is not a number") from None
        if label == 1.0:
            winner, others = a, (b,)
        elif label == 0.0:
            winner, others = b, (a,)
        elif label == 0.5:
            winner, others = None, (a, b)
        else:
            raise SpoxlError(f"row {row}: label {label} is not 1, 0 or 0.5")
        if winner is not None:
            wins.setdefault((caption, winner), row)
        spoiled.update((caption, other) for other in others)
    return sorted(row for key, row in wins.items() if key not in spoiled)


def _digest(value) -> str:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        data = str(data).encode()
    return hashlib.sha256(data).hexdigest()


def filter_absolute_winners(src, out, *, caption_column="caption", image_0_column="jpg_0", image_1_column="jpg_1",
                            label_column="label_0", uid_columns=("image_0_uid", "image_1_uid"),
                            progress: bool = True) -> tuple[int, int]:
    """Write the absolute-winner rows of `src` (a .parquet file, folder of shards or glob) to `out`
    (.parquet). Returns (rows kept, rows read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from spoxl.data.tables import parquet_shards

    out = Path(out)
    if out.suffix != ".parquet":
        raise SpoxlError(f"--out {out} must end in .parquet")
    shards = parquet_shards(src)
    if not shards:
        raise SpoxlError(f"{src} is not a .parquet file, a folder of .parquet shards or a glob of them")
    for shard in shards:
        if not shard.is_file():
            raise SpoxlError(f"dataset {shard} does not exist")
    files = [pq.ParquetFile(s) for s in shards]
    names = files[0].schema_arrow.names
    for column in (caption_column, image_0_column, image_1_column, label_column):
        if column not in names:
            raise SpoxlError(f"dataset {shards[0]} has no column {column!r} (columns: {', '.join(names)})")
    use_uids = all(c in names for c in uid_columns)
    flags = [c for c in ("are_different", "has_label") if c in names]
    small = [caption_column, label_column, *flags, *(uid_columns if use_uids else ())]

    captions, labels, ids_0, ids_1, usable = [], [], [], [], []
    groups = sum(f.num_row_groups for f in files)
    bar = tqdm(total=2 * groups, desc="absolute winners", unit="row group", disable=not progress)
    for f in files:
        for g in range(f.num_row_groups):
            cols = small if use_uids else [*small, image_0_column, image_1_column]
            t = f.read_row_group(g, columns=cols).to_pydict()
            captions += t[caption_column]
            labels += t[label_column]
            n = len(t[label_column])
            usable += [all(bool(t[c][i]) for c in flags) for i in range(n)]
            if use_uids:
                ids_0 += t[uid_columns[0]]
                ids_1 += t[uid_columns[1]]
            else:
                ids_0 += [_digest(v) for v in t[image_0_column]]
                ids_1 += [_digest(v) for v in t[image_1_column]]
            bar.update(1)
    keep = set(absolute_winner_rows(captions, ids_0, ids_1, labels, usable))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    start = 0
    try:
        for f in files:
            for g in range(f.num_row_groups):
                table = f.read_row_group(g)
                local = [i - start for i in range(start, start + table.num_rows) if i in keep]
                start += table.num_rows
                if local:
                    part = table.take(pa.array(local))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, part.schema)
                    writer.write_table(part.cast(writer.schema))
                bar.update(1)
        if writer is None:  # nothing kept: an empty file with the source's columns
            writer = pq.ParquetWriter(tmp, files[0].schema_arrow)
        writer.close()
        writer = None
        tmp.replace(out)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return len(keep), len(labels)
