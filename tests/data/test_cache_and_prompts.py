"""Latent/embedding cache (a warm cache never calls the VAE) and prompt-set loading/sharding."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import default_collate

from spoxl.data.cache import CachedDataset, encode_batch, maybe_encode
from spoxl.data.captions import ImageCaptionDataset
from spoxl.data.pairs import PreferencePairDataset
from spoxl.data.prompts import load_prompts, shard_prompts
from spoxl.data.synthetic import write_caption_folder, write_pair_table, write_prompt_file
from spoxl.errors import SpoxlError
from spoxl.models.text import encode_prompts


@pytest.fixture
def vae_calls(tiny_components, monkeypatch):
    """Counts images passed through the VAE encoder of the shared tiny components."""
    counter = {"images": 0}
    real = tiny_components.vae.encode

    def counting(x, *a, **k):
        counter["images"] += x.shape[0]
        return real(x, *a, **k)

    monkeypatch.setattr(tiny_components.vae, "encode", counting)
    return counter


def test_cache_hit_skips_encoding(tmp_path, tiny_components, vae_calls):
    ds = ImageCaptionDataset(write_caption_folder(tmp_path / "imgs", n=5), 64)
    first = CachedDataset(ds, tiny_components, tmp_path / "cache", batch_size=2, storage_dtype=torch.float32)
    assert first.build() == 5 and vae_calls["images"] == 5
    second = CachedDataset(ds, tiny_components, tmp_path / "cache", batch_size=2, storage_dtype=torch.float32)
    assert second.build() == 0
    items = [second[i] for i in range(5)]
    assert vae_calls["images"] == 5 and second.encoded == 0  # nothing re-encoded
    item = items[1]
    assert item["latents"].shape == (4, 8, 8) and item["caption"] == ds[1]["caption"]
    assert item["time_ids"].tolist() == ds[1]["time_ids"].tolist()
    # the cached embeddings are exactly what the text encoders give for the caption
    ref = encode_prompts(tiny_components, [item["caption"]])
    torch.testing.assert_close(item["prompt_embeds"], ref.embeds[0])
    torch.testing.assert_close(item["pooled_prompt_embeds"], ref.pooled[0])
    # and the latent is a sample of the VAE posterior: z-scores around its mean look standard normal
    vae = tiny_components.vae
    dist = vae.encode(ds[1]["pixels"][None]).latent_dist
    z = (item["latents"] / vae.config.scaling_factor - dist.mean[0]) / dist.std[0]
    assert 0.6 < z.pow(2).mean() < 1.4 and z.mean().abs() < 0.25
    assert not torch.equal(items[0]["latents"], items[1]["latents"])


def test_cache_keys_follow_resolution_and_model(tmp_path, tiny_components, vae_calls):
    folder = write_caption_folder(tmp_path / "imgs", n=2, size=(96, 96))
    CachedDataset(ImageCaptionDataset(folder, 64), tiny_components, tmp_path / "c").build()
    assert vae_calls["images"] == 2
    other_res = CachedDataset(ImageCaptionDataset(folder, 32), tiny_components, tmp_path / "c")
    assert other_res.build() == 2 and other_res[0]["latents"].shape == (4, 4, 4)
    other_model = CachedDataset(ImageCaptionDataset(folder, 64), tiny_components, tmp_path / "c", model_id="f" * 64)
    assert other_model.build() == 2
    # a miss at read time is encoded on the spot (no build() needed)
    lazy = CachedDataset(ImageCaptionDataset(folder, 64), tiny_components, tmp_path / "c2")
    assert lazy[1]["latents"].shape == (4, 8, 8) and lazy.encoded == 1


def test_cached_pairs_and_uncached_batches_share_keys(tmp_path, tiny_components):
    ds = PreferencePairDataset(write_pair_table(tmp_path / "p.jsonl", n=3), 64)
    cached = CachedDataset(ds, tiny_components, tmp_path / "cache")
    cached.build()
    batch = default_collate([cached[0], cached[1]])
    fresh = maybe_encode(tiny_components, default_collate([ds[0], ds[1]]))
    assert set(fresh) >= {"latents_w", "latents_l", "prompt_embeds", "pooled_prompt_embeds", "time_ids"}
    assert set(batch) >= set(fresh) - {"index"}
    assert batch["latents_w"].shape == fresh["latents_w"].shape == (2, 4, 8, 8)
    assert maybe_encode(tiny_components, batch) is batch  # already encoded: untouched
    # fp16 storage (the default) keeps embeddings to fp16 precision
    torch.testing.assert_close(batch["prompt_embeds"], fresh["prompt_embeds"], atol=2e-3, rtol=2e-3)


def test_encode_batch_is_seeded(tiny_components, tmp_path):
    ds = ImageCaptionDataset(write_caption_folder(tmp_path / "imgs", n=2), 64)
    batch = default_collate([ds[0], ds[1]])
    a = encode_batch(tiny_components, batch, generator=torch.Generator().manual_seed(1))
    b = encode_batch(tiny_components, batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["latents"], b["latents"])
    assert "pixels" not in a and a["caption"] == batch["caption"]


# ---- prompts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["txt", "json", "jsonl"])
def test_prompt_files(tmp_path, suffix):
    path = write_prompt_file(tmp_path / f"p.{suffix}", n=7, seed=1)
    prompts = load_prompts(path)
    assert len(prompts) == 7 and all(p.startswith("a ") for p in prompts)
    assert prompts == load_prompts(write_prompt_file(tmp_path / "ref.txt", n=7, seed=1))


def test_spo_prompt_layout(tmp_path):
    # the official SPO file: a JSON list of {"caption": ..., "trainset_idx": ...}
    entries = [{"caption": "a cat", "trainset_idx": 3}, {"caption": " a dog ", "trainset_idx": 9}]
    (tmp_path / "4k.json").write_text(json.dumps(entries))
    assert load_prompts(tmp_path / "4k.json") == ["a cat", "a dog"]


def test_shard_prompts_even_and_complete():
    prompts = [f"p{i}" for i in range(7)]
    shards = [shard_prompts(prompts, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # equal counts: ZeRO-3 ranks stay in step
    assert set().union(*shards) == set(prompts)
    assert shard_prompts(prompts, 0, 1) == prompts


def test_prompt_errors(tmp_path):
    for bad, content, words in [
        ("missing.txt", None, ["does not exist"]),
        ("empty.txt", "\n\n", ["holds no prompts"]),
        ("obj.json", '{"caption": "x"}', ["JSON list"]),
        ("keys.json", '[{"title": "x"}]', ["entry 0", "'caption'"]),
        ("broken.jsonl", '{"caption": "x"}\n{oops\n', ["line 2"]),
        ("p.csv", "a,b", [".txt, .json or .jsonl"]),
    ]:
        path = tmp_path / bad
        if content is not None:
            path.write_text(content)
        with pytest.raises(SpoxlError) as info:
            load_prompts(path)
        assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(SpoxlError, match="rank 3 of world size 2"):
        shard_prompts(["a"], 3, 2)


def test_dataset_from_config_with_cache(tmp_path, tiny_components, vae_calls):
    from spoxl.config import load_config
    from spoxl.data import dataset_from_config

    folder = write_caption_folder(tmp_path / "imgs", n=3)
    cfg = load_config(None, [f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", "data.hflip=true"])
    ds = dataset_from_config(cfg.data, "captions", seed=0, components=tiny_components)
    assert isinstance(ds, CachedDataset) and vae_calls["images"] == 3
    ds.set_epoch(5)  # the cached augmentation stays: no re-encoding in later epochs
    assert ds[2]["latents"].shape == (4, 8, 8) and vae_calls["images"] == 3
    plain = dataset_from_config(load_config(None, [f"data.path={folder}"]).data)
    assert isinstance(plain, ImageCaptionDataset) and "pixels" in plain[0]
