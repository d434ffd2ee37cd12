"""Image-caption and preference-pair datasets: formats, SDXL preprocessing, ties, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from spoxl.data import build_dataset
from spoxl.data.captions import ImageCaptionDataset
from spoxl.data.images import to_pixels
from spoxl.data.pairs import PreferencePairDataset
from spoxl.data.synthetic import shape_image, write_caption_folder, write_caption_table, write_pair_table
from spoxl.errors import SpoxlError


def one_line_error(fn, *words):
    with pytest.raises(SpoxlError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, msg
    return msg


# ---- image-caption --------------------------------------------------------------------------


def test_folder_center_crop_time_ids_and_pixels(tmp_path):
    folder = write_caption_folder(tmp_path / "imgs", n=3, size=(96, 64))  # width 96, height 64
    ds = ImageCaptionDataset(folder, resolution=64)
    assert len(ds) == 3
    item = ds[0]
    assert item["caption"] == "a red circle"
    assert item["pixels"].shape == (3, 64, 64)
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    # short side already 64: no resize; center crop keeps columns 16..80
    assert item["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]
    expected = to_pixels(Image.open(folder / "0000.png").convert("RGB").crop((16, 0, 80, 64)))
    torch.testing.assert_close(item["pixels"], expected)


def test_resize_shortest_side_then_crop(tmp_path):
    folder = write_caption_folder(tmp_path / "imgs", n=1, size=(128, 96))
    item = ImageCaptionDataset(folder, resolution=64)[0]
    orig_h, orig_w, top, left, th, tw = item["time_ids"].tolist()
    assert (orig_h, orig_w, th, tw) == (96, 128, 64, 64)
    # resized to 85 x 64: the crop sits in the middle of the 21 spare columns
    assert top == 0 and left == 10
    assert item["original_size"].tolist() == [96, 128] and item["crop_top_left"].tolist() == [0, 10]


def test_random_crop_is_seeded_per_item_and_epoch(tmp_path):
    folder = write_caption_folder(tmp_path / "imgs", n=6, size=(64, 112))  # spare rows to crop from
    a = ImageCaptionDataset(folder, 64, crop="random", seed=3)
    b = ImageCaptionDataset(folder, 64, crop="random", seed=3)
    crops_a = [a[i]["crop_top_left"].tolist() for i in range(6)]
    assert crops_a == [b[i]["crop_top_left"].tolist() for i in range(6)]
    assert len({tuple(c) for c in crops_a}) > 1  # really random across items
    b.set_epoch(1)
    assert crops_a != [b[i]["crop_top_left"].tolist() for i in range(6)]
    for i in range(6):  # the pixels are the crop the time_ids claim
        top, left = crops_a[i]
        img = Image.open(folder / f"{i:04d}.png").convert("RGB").crop((left, top, left + 64, top + 64))
        torch.testing.assert_close(a[i]["pixels"], to_pixels(img))


def test_hflip_flips_some_items(tmp_path):
    folder = write_caption_folder(tmp_path / "imgs", n=8)
    plain = ImageCaptionDataset(folder, 64)
    flipped = ImageCaptionDataset(folder, 64, hflip=True, seed=0)
    was_flipped = []
    for i in range(8):
        p, f = plain[i]["pixels"], flipped[i]["pixels"]
        if torch.equal(p, f):
            was_flipped.append(False)
        else:
            torch.testing.assert_close(f, p.flip(-1))
            was_flipped.append(True)
    assert any(was_flipped) and not all(was_flipped)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet-paths", "parquet-bytes"])
def test_table_formats_match_folder(tmp_path, fmt):
    folder = write_caption_folder(tmp_path / "imgs", n=3, size=(64, 80))
    suffix = "jsonl" if fmt == "jsonl" else "parquet"
    table = write_caption_table(tmp_path / f"data.{suffix}", n=3, size=(64, 80), inline_bytes=fmt == "parquet-bytes")
    a, b = ImageCaptionDataset(folder, 64), build_dataset("captions", table, 64)
    assert len(a) == len(b) == 3
    for i in range(3):
        assert a[i]["caption"] == b[i]["caption"]
        torch.testing.assert_close(a[i]["pixels"], b[i]["pixels"])
        assert a[i]["time_ids"].tolist() == b[i]["time_ids"].tolist()


def test_caption_column_alias_and_collate(tmp_path):
    shape_image("red", "circle").save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "hi"}) + "\n")
    ds = ImageCaptionDataset(tmp_path / "d.jsonl", 64)
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["caption"] == ["hi", "hi"] and batch["pixels"].shape == (2, 3, 64, 64)
    assert batch["time_ids"].shape == (2, 6)


def test_caption_dataset_errors(tmp_path):
    one_line_error(lambda: ImageCaptionDataset(tmp_path / "nope", 64), "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: ImageCaptionDataset(tmp_path / "empty", 64), "no images")
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(lambda: ImageCaptionDataset(tmp_path / "empty.jsonl", 64), "empty")
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    shape_image("red", "circle").save(nocap / "a.png")
    one_line_error(lambda: ImageCaptionDataset(nocap, 64), "a.png", "no caption")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"image": "a.png", "label": "x"}) + "\n")
    one_line_error(lambda: ImageCaptionDataset(tmp_path / "cols.jsonl", 64), "no column 'caption'")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    one_line_error(lambda: ImageCaptionDataset(tmp_path / "bad.jsonl", 64), "line 1", "not valid JSON")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (corrupt / "broken.txt").write_text("a caption")
    ds = ImageCaptionDataset(corrupt, 64)
    one_line_error(lambda: ds[0], "cannot read image", "broken.png")
    one_line_error(lambda: ImageCaptionDataset(corrupt, 60), "multiple of 8")


# ---- preference pairs -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,inline", [("jsonl", False), ("parquet", True)])
def test_pairs_drop_ties_and_order_winner_first(tmp_path, suffix, inline):
    path = write_pair_table(tmp_path / f"pairs.{suffix}", n=6, ties=2, inline_bytes=inline)
    ds = PreferencePairDataset(path, 64)
    assert len(ds) == 4  # rows 0, 1 are ties
    kept = PreferencePairDataset(path, 64, drop_ties=False)
    assert len(kept) == 6 and kept[0]["tie"] and not kept[2]["tie"]
    red = torch.tensor([220, 30, 30]) / 127.5 - 1
    for i in range(4):
        item = ds[i]
        assert item["pixels_w"].shape == item["pixels_l"].shape == (3, 64, 64)
        # the winner matches its caption; with alternating label_0 the winner is sometimes jpg_1
        colour = item["caption"].split()[1]
        if colour == "red":
            has_red = lambda px: ((px.permute(1, 2, 0) - red).abs().sum(-1) < 0.05).any()  # noqa: E731
            assert has_red(item["pixels_w"]) and not has_red(item["pixels_l"])


def test_pairs_label_zero_swaps_and_resizes_jpg1(tmp_path):
    shape_image("red", "circle", 96, 64).save(tmp_path / "a.png")
    shape_image("blue", "square", 48, 32).save(tmp_path / "b.png")
    rows = [
        {"caption": "a blue square", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0},
        {"caption": "a red circle", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PreferencePairDataset(tmp_path / "p.jsonl", 64)
    swapped, straight = ds[0], ds[1]
    assert swapped["time_ids"].tolist() == [64, 96, 0, 16, 64, 64]  # jpg_0's size and crop
    torch.testing.assert_close(swapped["pixels_w"], straight["pixels_l"])
    torch.testing.assert_close(swapped["pixels_l"], straight["pixels_w"])
    resized_b = Image.open(tmp_path / "b.png").convert("RGB").resize((96, 64), Image.BILINEAR).crop((16, 0, 80, 64))
    torch.testing.assert_close(straight["pixels_l"], to_pixels(resized_b))


def test_pairs_flip_jointly(tmp_path):
    path = write_pair_table(tmp_path / "pairs.jsonl", n=8)
    plain, flip = PreferencePairDataset(path, 64), PreferencePairDataset(path, 64, hflip=True)
    flips = []
    for i in range(8):
        w_flipped = not torch.equal(plain[i]["pixels_w"], flip[i]["pixels_w"])
        l_flipped = not torch.equal(plain[i]["pixels_l"], flip[i]["pixels_l"])
        assert w_flipped == l_flipped
        if w_flipped:
            torch.testing.assert_close(flip[i]["pixels_l"], plain[i]["pixels_l"].flip(-1))
        flips.append(w_flipped)
    assert any(flips) and not all(flips)


def test_pair_dataset_errors(tmp_path):
    one_line_error(lambda: PreferencePairDataset(tmp_path / "none.parquet", 64), "does not exist")
    path = write_pair_table(tmp_path / "ties.jsonl", n=2, ties=2)
    one_line_error(lambda: PreferencePairDataset(path, 64), "no usable pairs")
    (tmp_path / "nolabel.jsonl").write_text(json.dumps({"caption": "c", "jpg_0": "a", "jpg_1": "b"}) + "\n")
    one_line_error(lambda: PreferencePairDataset(tmp_path / "nolabel.jsonl", 64), "no column 'label_0'")
    (tmp_path / "badlabel.jsonl").write_text(json.dumps({"caption": "c", "jpg_0": "a", "jpg_1": "b", "label_0": 3}) + "\n")
    one_line_error(lambda: PreferencePairDataset(tmp_path / "badlabel.jsonl", 64), "row 0", "not in [0, 1]")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"caption": "c", "jpg_0": "gone.png", "jpg_1": "b.png", "label_0": 1}) + "\n")
    ds = PreferencePairDataset(tmp_path / "missing.jsonl", 64)
    one_line_error(lambda: ds[0], "gone.png", "does not exist")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [b"garbage"], "jpg_1": [b"garbage"], "label_0": [1.0]}), tmp_path / "g.parquet")
    ds = PreferencePairDataset(tmp_path / "g.parquet", 64)
    one_line_error(lambda: ds[0], "cannot read image", "row 0 jpg_0")


def test_pairs_independent_flip_option(tmp_path):
    path = write_pair_table(tmp_path / "pairs.jsonl", n=12)
    plain = PreferencePairDataset(path, 64)
    indep = PreferencePairDataset(path, 64, hflip=True, joint_flip=False)
    differs = 0
    for i in range(12):
        w_flipped = not torch.equal(plain[i]["pixels_w"], indep[i]["pixels_w"])
        l_flipped = not torch.equal(plain[i]["pixels_l"], indep[i]["pixels_l"])
        differs += w_flipped != l_flipped
    assert differs > 0  # some pairs flip only one image
