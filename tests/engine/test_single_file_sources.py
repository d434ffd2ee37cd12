"""ZeRO-3's single-file UNet key map (spoxl.engine.sharded.single_file_sources), in-process: the
LDM layout of A1111 / ComfyUI checkpoints and the diffusers layout map to the UNet's parameter
names the way diffusers' own from_single_file loads them."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spoxl.engine.sharded import single_file_sources
from spoxl.errors import SpoxlError
from spoxl.models.loading import load_sdxl
from spoxl.models.tiny import build_tiny_sdxl
from tests.engine.ldm_keys import to_ldm


@pytest.fixture(scope="module")
def other():
    return build_tiny_sdxl(7).unet


def _save(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _read(sources):
    handles = {}
    out = {}
    for name, (path, key) in sources.items():
        handles.setdefault(path, safe_open(str(path), "pt"))
        out[name] = handles[path].get_tensor(key)
    return out


def test_ldm_single_file_maps_like_diffusers_from_single_file(tmp_path, tiny_dir, other):
    f = _save(tmp_path / "ldm.safetensors", to_ldm(other.state_dict(), dict(other.config)))
    oracle = load_sdxl(tiny_dir, unet_file=f).unet.state_dict()  # diffusers' own converter, whole
    assert all(torch.equal(oracle[k], v) for k, v in other.state_dict().items())  # the helper's file is right
    unet = build_tiny_sdxl(0).unet
    mapped = _read(single_file_sources(f, unet))
    assert set(mapped) == set(oracle)
    assert all(torch.equal(mapped[k], oracle[k]) for k in oracle)


def test_diffusers_keyed_single_file_is_read_as_is(tmp_path, other):
    f = _save(tmp_path / "diffusers.safetensors", other.state_dict())
    sources = single_file_sources(f, build_tiny_sdxl(0).unet)
    assert all(key == name for name, (_, key) in sources.items())
    assert all(torch.equal(t, other.state_dict()[k]) for k, t in _read(sources).items())


def test_bad_single_files_are_one_line_errors(tmp_path, other):
    unet = build_tiny_sdxl(0).unet
    with pytest.raises(SpoxlError, match="does not exist"):
        single_file_sources(tmp_path / "nope.safetensors", unet)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SpoxlError, match="could not load unet checkpoint"):
        single_file_sources(junk, unet)
    foreign = _save(tmp_path / "foreign.safetensors", {"some.other.model.weight": torch.zeros(2, 2)})
    with pytest.raises(SpoxlError) as e:
        single_file_sources(foreign, unet)
    assert "neither diffusers- nor LDM-keyed" in str(e.value) and "\n" not in str(e.value)


def test_a_conversion_that_computes_a_tensor_is_refused(tmp_path, other, monkeypatch):
    """A converter step that builds a new tensor (a reshape, a concatenation) has no stored key to
    read lazily: refused, naming the parameter, instead of loading something else."""
    import diffusers.loaders.single_file_utils as single_file_utils

    f = _save(tmp_path / "ldm.safetensors", to_ldm(other.state_dict(), dict(other.config)))
    real = single_file_utils.convert_ldm_unet_checkpoint

    def reshaping(checkpoint, config, **kw):
        out = real(checkpoint, config, **kw)
        out["conv_in.weight"] = out["conv_in.weight"].reshape(out["conv_in.weight"].shape)  # a new tensor
        return out

    monkeypatch.setattr(single_file_utils, "convert_ldm_unet_checkpoint", reshaping)
    with pytest.raises(SpoxlError, match=r"conv_in\.weight is computed from the file's tensors"):
        single_file_sources(f, build_tiny_sdxl(0).unet)
