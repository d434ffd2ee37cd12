"""Tiny SDXL components: folder round-trip, single-file loading, prompt encoding as the pipeline does it."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from spoxl.errors import SpoxlError
from spoxl.models.loading import load_sdxl
from spoxl.models.text import encode_with_negative, make_time_ids
from spoxl.models.tiny import build_tiny_sdxl
from spoxl.sampling import guided_output


def _unet_out(components, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = encode_with_negative(components, ["a red circle", "a blue square"])
    with torch.no_grad():
        return guided_output(components.unet, x, 500, cond, uncond, make_time_ids(2, (64, 64)), 5.0)


def test_tiny_is_deterministic_per_seed():
    a, b, c = build_tiny_sdxl(0), build_tiny_sdxl(0), build_tiny_sdxl(1)
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k])
    assert not all(torch.equal(v, c.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())


def test_tiny_has_sdxl_architecture(tiny_components):
    unet = tiny_components.unet
    assert unet.config.addition_embed_type == "text_time"
    te1, te2 = tiny_components.text_encoder, tiny_components.text_encoder_2
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    # pooled text_embeds (projection of encoder 2) + 6 time ids x addition_time_embed_dim
    assert unet.config.projection_class_embeddings_input_dim == (
        te2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    )
    assert tiny_components.vae.config.scaling_factor == pytest.approx(0.13025)
    assert type(te2).__name__ == "CLIPTextModelWithProjection"


def test_tiny_folder_roundtrip(tiny_components, tiny_dir):
    loaded = load_sdxl(tiny_dir)
    for part in loaded.MODEL_PARTS:  # every weight survives bit for bit
        saved, orig = getattr(loaded, part).state_dict(), getattr(tiny_components, part).state_dict()
        assert saved.keys() == orig.keys()
        assert all(torch.equal(saved[k], orig[k]) for k in orig), part
    # Same outputs for a fixed seed (float32 kernels may pick another summation order for
    # differently allocated tensors, hence 1e-5 and not bit equality).
    torch.testing.assert_close(_unet_out(loaded), _unet_out(tiny_components), rtol=1e-5, atol=1e-5)
    # Tokenizers survive the save: identical ids for an arbitrary prompt.
    for name in ("tokenizer", "tokenizer_2"):
        prompt = "Ünïcode & punctuation, 123!"
        assert getattr(loaded, name)(prompt).input_ids == getattr(tiny_components, name)(prompt).input_ids
    model_index = json.loads((tiny_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"


def test_single_file_unet_replaces_folder_unet(tiny_dir, tmp_path):
    other = build_tiny_sdxl(7).unet
    f = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(f))
    loaded = load_sdxl(tiny_dir, unet_file=f)
    for k, v in other.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)


def test_prompt_encoding_matches_sdxl_pipeline(tiny_components):
    from diffusers import StableDiffusionXLPipeline

    c = tiny_components
    pipe = StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
    )
    prompts = ["a red circle on a white background", "blue"]
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompts, device=torch.device("cpu"), num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=["", ""],
    )
    cond, uncond = encode_with_negative(c, prompts)
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.embeds, pe)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(uncond.embeds, npe)
    torch.testing.assert_close(uncond.pooled, npooled)

    expected_ids = pipe._get_add_time_ids(
        (96, 128), (8, 16), (64, 64), dtype=torch.float32,
        text_encoder_projection_dim=c.text_encoder_2.config.projection_dim,
    )
    torch.testing.assert_close(make_time_ids(2, (96, 128), (8, 16), (64, 64)), expected_ids.repeat(2, 1))


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a folder"),
        (lambda p: p, "has no unet/ subfolder"),
    ],
)
def test_bad_model_paths_are_one_line_errors(tmp_path, make_bad, message):
    with pytest.raises(SpoxlError, match=message) as e:
        load_sdxl(make_bad(tmp_path))
    assert "\n" not in str(e.value)


def test_malformed_folder_names_the_broken_file(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SpoxlError, match=r"unet/config.json is not valid JSON"):
        load_sdxl(broken)
    (broken / "unet" / "config.json").write_text("{}")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SpoxlError, match=r"no weights in vae/"):
        load_sdxl(broken)


def test_bad_single_file_is_one_line_error(tiny_dir, tmp_path):
    with pytest.raises(SpoxlError, match="does not exist"):
        load_sdxl(tiny_dir, unet_file=tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SpoxlError, match="could not load unet checkpoint"):
        load_sdxl(tiny_dir, unet_file=junk)


def _variant_folder(tiny_components, path, variant, shard):
    """The tiny SDXL saved as a downloaded folder can look: only `variant` weight files, sharded or not."""
    tiny_components.save_pretrained(path)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for f in (path / part).iterdir():
            if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
                f.unlink()
        kw = {"max_shard_size": shard} if shard else {}
        # A half copy: casting the shared session fixture there and back would round its weights
        # to fp16 for every later test.
        copy.deepcopy(getattr(tiny_components, part)).to(torch.float16).save_pretrained(path / part, variant=variant, **kw)
    return path


@pytest.mark.parametrize("shard", [None, "100KB"], ids=["single", "sharded"])
def test_fp16_only_folder_loads_by_itself(tiny_components, tmp_path, shard):
    folder = _variant_folder(tiny_components, tmp_path / "sdxl_fp16", "fp16", shard)
    names = {f.name for f in (folder / "unet").iterdir()}
    assert all(".fp16" in n for n in names if n.endswith(".safetensors"))
    if shard:
        assert sum(n.endswith(".safetensors") for n in names) > 1 and any("index" in n for n in names)
    for variant in (None, "fp16"):  # automatic, and asked for
        loaded = load_sdxl(folder, variant=variant)
        assert loaded.unet.dtype == torch.float32  # upcast for training
        for part in ("unet", "vae", "text_encoder_2"):
            ref = getattr(tiny_components, part).state_dict()
            got = getattr(loaded, part).state_dict()
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k].half().float(), atol=0, rtol=0)


def test_a_missing_variant_and_missing_weights_are_named(tiny_components, tiny_dir, tmp_path):
    import shutil

    assert load_sdxl(tiny_dir, variant="fp16").unet is not None  # no fp16 files: the plain weights
    folder = _variant_folder(tiny_components, tmp_path / "sdxl_fp16", "fp16", None)
    with pytest.raises(SpoxlError, match=r"unet has no 'bf16' weights \(it has: fp16\)") as e:
        load_sdxl(folder, variant="bf16")
    assert "\n" not in str(e.value)

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    for f in (bare / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(SpoxlError, match=r"no weights in unet/: looked for diffusion_pytorch_model\[\.fp16\]"):
        load_sdxl(bare)


def test_sdxl_random_is_the_real_sdxl_architecture():
    """`sdxl-random[:SEED]` (benchmarks/real_size.py) builds the real SDXL UNet config; counted on
    the meta device here (building it takes half a minute and 10 GB)."""
    from spoxl.cluster.memory import meta_unet
    from spoxl.engine.sharded import unet_source

    config, weights, seed = unet_source("sdxl-random:7")
    assert weights is None and seed == 7
    assert sum(p.numel() for p in meta_unet(config).parameters()) == 2_567_463_684
    with pytest.raises(SpoxlError, match="the seed after ':' must be an integer"):
        load_sdxl("sdxl-random:x")
