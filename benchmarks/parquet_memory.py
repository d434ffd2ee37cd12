"""Peak memory of reading a Pick-a-Pic-layout parquet folder vs its size: it must stay flat.

    python benchmarks/parquet_memory.py [--sizes-mb 64 256 1024] [--rows-read 400]

For each size: a folder of parquet shards in the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1,
label_0, label_1, are_different, has_label, ...) whose images are incompressible 48 KB blobs, 64
rows per row group, 32 row groups per shard. A fresh process opens it with spoxl's reader
(spoxl.data.tables.Table.open, as PreferencePairDataset does) and reads `--rows-read` random rows'
image bytes, then reports its peak RSS (VmHWM; the Python interpreter with pyarrow is ~60 MB of it). Prints a table and the ratio of the largest to the
smallest peak; writes benchmarks/results/parquet_memory_cpu.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_BYTES = 48 * 1024
ROWS_PER_GROUP = 64
GROUPS_PER_SHARD = 32


def write_folder(folder: Path, size_mb: int) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = max(1, size_mb * 2**20 // (2 * IMAGE_BYTES))
    per_shard = ROWS_PER_GROUP * GROUPS_PER_SHARD
    rng = np.random.default_rng(0)
    for s, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        blob = lambda: [rng.bytes(IMAGE_BYTES) for _ in range(n)]  # noqa: E731
        table = pa.table({
            "caption": [f"prompt {start + i}" for i in range(n)], "jpg_0": blob(), "jpg_1": blob(),
            "label_0": [float(i % 2) for i in range(n)], "label_1": [float(1 - i % 2) for i in range(n)],
            "are_different": [True] * n, "has_label": [True] * n, "user_id": list(range(n)),
        })  # fmt: skip
        pq.write_table(table, folder / f"train-{s:05d}.parquet", row_group_size=ROWS_PER_GROUP)
    return rows


def measure(folder: Path, rows_read: int) -> dict:
    code = f"""
import json, random
from spoxl.data.tables import Table
t = Table.open({str(folder)!r}, ["jpg_0", "jpg_1", "label_0", "caption"], optional=("are_different", "has_label"))
rng = random.Random(0)
n = 0
for _ in range({rows_read}):
    r = t.row(rng.randrange(len(t)))
    n += len(r["jpg_0"]) + len(r["jpg_1"])
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (it survives exec),
# and the parent has just written the data set.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"rows": len(t), "bytes_read": n, "peak_rss_mib": hwm / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--rows-read", type=int, default=400)
    p.add_argument("--results", default="benchmarks/results/parquet_memory_cpu.csv")
    args = p.parse_args(argv)
    table = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SPOXL_BENCH_TMP")) as tmp:
        for size in args.sizes_mb:
            folder = Path(tmp) / f"pickapic_{size}mb"
            folder.mkdir()
            rows = write_folder(folder, size)
            on_disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            m = measure(folder, args.rows_read)
            table.append({"dataset_mib": round(on_disk), "rows": rows, "shards": len(list(folder.iterdir())),
                          "rows_read": args.rows_read, "peak_rss_mib": round(m["peak_rss_mib"])})
            print(table[-1], flush=True)
            for f in folder.iterdir():
                f.unlink()
    print("| dataset | rows | shards | rows read | peak RSS |")
    print("|---|---|---|---|---|")
    for r in table:
        print(f"| {r['dataset_mib']} MiB | {r['rows']} | {r['shards']} | {r['rows_read']} | {r['peak_rss_mib']} MiB |")
    ratio = table[-1]["peak_rss_mib"] / table[0]["peak_rss_mib"]
    print(f"peak RSS, largest / smallest dataset: {ratio:.2f}x for "
          f"{table[-1]['dataset_mib'] / table[0]['dataset_mib']:.0f}x the data")
    out = ROOT / args.results
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
