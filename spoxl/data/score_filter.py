"""LPO's data filter for LRM training: multi-preference consistent filtering (lpo.md 2).

A score table (CSV) has one row per pair of the pair file, in its order, with the columns
different_flag, aesthetic_gap, clipscore_gap, vqascore_gap (the official vqa_aes_clip_score_mp.csv:
the gaps of three other scorers between the pair's images). A pair is kept when its label and
the scorers agree: a decided pair (different_flag 1) whose CLIP-score and VQA-score gaps are
positive and whose aesthetic gap is above a floor, or a tie (different_flag 0) whose gaps are all
small. Strategy 2 (the released recipe) keeps 169k of Pick-a-Pic v1's pairs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from spoxl.errors import SpoxlError

COLUMNS = ("different_flag", "aesthetic_gap", "clipscore_gap", "vqascore_gap")
AESTHETIC_FLOOR = {1: 0.0, 2: -0.5, 3: -1.0}  # the strategies differ only here
TIE_LIMITS = {"aesthetic_gap": 0.2, "clipscore_gap": 0.03, "vqascore_gap": 0.07}


def keeps(row: dict, strategy: int = 2) -> bool:
    """Whether the official rule of `strategy` keeps a pair with these scores."""
    if row["different_flag"] == 1:
        return row["aesthetic_gap"] > AESTHETIC_FLOOR[strategy] and row["clipscore_gap"] > 0 and row["vqascore_gap"] > 0
    if row["different_flag"] == 0:
        return all(row[k] < limit for k, limit in TIE_LIMITS.items())
    return False


def read_score_table(path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpoxlError(f"score table {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SpoxlError(f"score table {path} lacks column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)})")
        rows = []
        for i, r in enumerate(reader):
            try:
                rows.append({"different_flag": int(float(r["different_flag"])),
                             **{c: float(r[c]) for c in COLUMNS[1:]}})  # fmt: skip
            except (TypeError, ValueError):
                raise SpoxlError(f"score table {path} row {i}: not a number in {[r[c] for c in COLUMNS]}") from None
    return rows


class ScoreFilteredPairs:
    """The pairs of `dataset` (a PreferencePairDataset) that the score table's rule keeps."""

    def __init__(self, dataset, table_path, strategy: int = 2):
        if strategy not in AESTHETIC_FLOOR:
            raise SpoxlError(f"filter strategy must be 1, 2 or 3, got {strategy}")
        rows = read_score_table(table_path)
        n_table = len(dataset.table)
        if len(rows) != n_table:
            raise SpoxlError(f"score table {table_path} has {len(rows)} rows, the pair file {n_table}: "
                             f"one row per pair, in the pair file's order, is needed")  # fmt: skip
        self.dataset = dataset
        self.items = [i for i, row in enumerate(dataset._rows) if keeps(rows[row], strategy)]
        if not self.items:
            raise SpoxlError(f"the score table's filter (strategy {strategy}) keeps none of {len(dataset)} pairs")

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        every = self.dataset.captions()
        return [every[i] for i in self.items]

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.items[i]]
