"""NCP's absolute-winners filter (`spoxl pairs absolute-winners`): per prompt, the images that won
at least once and never lost or tied, one pair each (their first win), read by row group."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spoxl.cli import main
from spoxl.data.absolute_winners import absolute_winner_rows
from spoxl.errors import SpoxlError

# (caption, image 0, image 1, label_0, are_different)
ROWS = [
    ("p", "A", "B", 1.0, True),   # 0: A wins (its first win), B loses
    ("p", "A", "C", 1.0, True),   # 1: A wins again: not a second pair
    ("p", "C", "D", 0.5, True),   # 2: a tie spoils C and D
    ("p", "E", "F", 0.0, True),   # 3: F wins, E loses
    ("p", "F", "G", 0.0, True),   # 4: G wins, F loses: F is out
    ("q", "A", "B", 0.0, True),   # 5: another prompt: B wins there (A lost in q only)
    ("p", "X", "Y", 1.0, False),  # 6: not a comparison (are_different false): ignored
    ("q", "H", "B", 0.0, True),   # 7: B wins in q again
]
EXPECTED = [0, 4, 5]  # (p, A) at row 0, (p, G) at row 4, (q, B) at row 5


def test_the_rule_by_hand():
    captions, a, b, labels, usable = zip(*ROWS)
    assert absolute_winner_rows(captions, a, b, labels, usable) == EXPECTED
    # a loss anywhere in the prompt removes a winner: A loses in p at a later row
    assert 0 not in absolute_winner_rows([*captions, "p"], [*a, "Z"], [*b, "A"], [*labels, 1.0], [*usable, True])
    with pytest.raises(SpoxlError, match="label 0.3"):
        absolute_winner_rows(["p"], ["A"], ["B"], [0.3])


@pytest.mark.parametrize("with_uids", [True, False])
def test_cli_filters_a_sharded_table_by_row_group(tmp_path, with_uids, capsys):
    columns = {"caption": [r[0] for r in ROWS], "jpg_0": [f"png-{r[1]}".encode() for r in ROWS],
               "jpg_1": [f"png-{r[2]}".encode() for r in ROWS], "label_0": [r[3] for r in ROWS],
               "label_1": [1.0 - r[3] for r in ROWS], "are_different": [r[4] for r in ROWS],
               "has_label": [True] * len(ROWS)}  # fmt: skip
    if with_uids:
        columns["image_0_uid"] = [f"uid-{r[1]}" for r in ROWS]
        columns["image_1_uid"] = [f"uid-{r[2]}" for r in ROWS]
    table = pa.table(columns)
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 5), shards / "train-00000.parquet", row_group_size=2)
    pq.write_table(table.slice(5), shards / "train-00001.parquet", row_group_size=2)
    out = tmp_path / "abs.parquet"
    assert main(["pairs", "absolute-winners", "--data", str(shards), "--out", str(out), "--no-progress"]) == 0
    assert f"kept {len(EXPECTED)} of {len(ROWS)} pairs" in capsys.readouterr().out
    kept = pq.read_table(out)
    assert kept.column_names == table.column_names
    assert kept.to_pylist() == [table.slice(i, 1).to_pylist()[0] for i in EXPECTED]
    assert not (tmp_path / "abs.parquet.tmp").exists()


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    assert main(["pairs", "absolute-winners", "--data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o.parquet")]) == 2
    pq.write_table(pa.table({"caption": ["p"], "label_0": [1.0]}), tmp_path / "t.parquet")
    assert main(["pairs", "absolute-winners", "--data", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o.parquet")]) == 2
    assert main(["pairs", "absolute-winners", "--data", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "does not exist" in err[0] and "no column 'jpg_0'" in err[1] and "must end in .parquet" in err[2]
