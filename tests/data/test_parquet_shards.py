"""Pick-a-Pic v2 as published: a folder (or glob) of parquet shards read by row group on demand,
are_different / has_label honoured, column names and ties set from the recipe."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spoxl.config import load_config
from spoxl.data.pairs import PreferencePairDataset
from spoxl.data.tables import ParquetTable, Table
from spoxl.errors import SpoxlError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def rows_for(shard: int, n: int) -> list[dict]:
    """Row r of shard s: the winner is red, the loser blue; which side is jpg_0 alternates. Every 5th
    row is a tie, every 7th has are_different False, every 11th has_label False."""
    out = []
    for r in range(n):
        g = shard * 100 + r
        red_first = g % 2 == 0
        label = 0.5 if g % 5 == 4 else (1.0 if red_first else 0.0)
        out.append({"caption": f"pair {g}", "jpg_0": png(RED if red_first else BLUE),
                    "jpg_1": png(BLUE if red_first else RED), "label_0": label, "label_1": 1 - label,
                    "are_different": g % 7 != 6, "has_label": g % 11 != 10, "best_image_uid": f"u{g}",
                    "user_id": g, "model_0": "sdxl", "model_1": "sd2"})
    return out


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "pickapic"
    folder.mkdir()
    everything = []
    for s, n in enumerate((9, 12, 5)):
        rows = rows_for(s, n)
        everything += rows
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{s:05d}-of-00003.parquet", row_group_size=4)
    return folder, everything


def expected_rows(everything, ties="drop"):
    keep = []
    for r in everything:
        if not r["are_different"] or not r["has_label"]:
            continue
        if ties == "drop" and r["label_0"] not in (0.0, 1.0):
            continue
        keep.append(r)
    return keep


@pytest.mark.parametrize("form", ["folder", "glob"])
def test_shards_read_as_one_dataset_with_flags_honoured(shards, form):
    folder, everything = shards
    path = folder if form == "folder" else str(folder / "train-*.parquet")
    ds = PreferencePairDataset(path, resolution=16)
    keep = expected_rows(everything)
    assert len(ds) == len(keep) and 0 < len(keep) < len(everything)
    for i in range(len(ds)):
        item = ds[i]
        assert item["caption"] == keep[i]["caption"]
        # The winner is the red image whichever side it was stored on.
        assert item["pixels_w"][0].mean() > 0.9 and item["pixels_w"][2].mean() < -0.9, i
        assert item["pixels_l"][2].mean() > 0.9 and item["pixels_l"][0].mean() < -0.9, i


def test_images_are_read_by_row_group_with_a_bounded_cache(shards):
    folder, everything = shards
    table = Table.open(folder, ["jpg_0", "jpg_1", "label_0", "caption"])
    assert isinstance(table, ParquetTable) and len(table) == len(everything)
    assert set(table._bulky) == {"jpg_0", "jpg_1"} and "caption" in table._small
    assert len(table._groups) == 3 + 3 + 2  # row groups of 4 rows
    for i in range(len(table)):
        assert table.row(i)["jpg_0"] == everything[i]["jpg_0"]
        assert len(table._cache) <= ParquetTable.CACHED_ROW_GROUPS


def test_columns_and_ties_come_from_the_recipe(tmp_path):
    from spoxl.data.streams import pair_dataset

    rows = [{"prompt": r["caption"], "img_a": r["jpg_0"], "img_b": r["jpg_1"], "pref_a": r["label_0"]}
            for r in rows_for(0, 10)]
    path = tmp_path / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    sets = [f"data.path={path}", "data.image_0_column=img_a", "data.image_1_column=img_b", "data.label_column=pref_a",
            "data.caption_column=prompt", "data.resolution=16"]
    dropped = pair_dataset(load_config("configs/tiny_dpo.yaml", sets))
    kept = pair_dataset(load_config("configs/tiny_dpo.yaml", [*sets, "data.ties=keep"]))
    assert len(dropped) == 8 and len(kept) == 10  # rows 4 and 9 are ties
    assert [kept[i]["tie"] for i in range(10)] == [i % 5 == 4 for i in range(10)]
    with pytest.raises(SpoxlError, match="has no column 'jpg_0'"):
        pair_dataset(load_config("configs/tiny_dpo.yaml", [f"data.path={path}", "data.resolution=16"]))


def test_empty_folder_and_glob_are_one_line_errors(tmp_path):
    with pytest.raises(SpoxlError, match="folder without .parquet shards"):
        PreferencePairDataset(tmp_path, resolution=16)
    with pytest.raises(SpoxlError, match="matches no .parquet file"):
        PreferencePairDataset(str(tmp_path / "train-*.parquet"), resolution=16)

