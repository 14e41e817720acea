"""The public model API: full-file key contracts, save/reload, separate part files, clear load errors.

References: the released checkpoints' key -> shape lists (tests/fixtures/keys, copied from
shared/reference/keys) and diffusers' own single-file VAE conversion as the oracle for the
diffusers-named standalone VAE layout.
"""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models.checkpoint import CheckpointError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "keys")


def keys_json(name):
    with open(os.path.join(FIX, name)) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_sdxl_full_file_layout_matches_release():
    comp = models.build("sdxl", "base", device="meta")
    assert shapes_of(comp.export_state_dict()) == keys_json("sdxl_base.json")


@pytest.mark.parametrize("preset,name", [("sd3_medium", "sd3_medium.json"), ("sd35_medium", "sd35_medium.json"),
                                         ("sd35_large", "sd35_large.json")])
def test_sd3_full_file_layout_matches_release(preset, name):
    comp = models.build("sd3", preset, device="meta")
    want = {**keys_json(name), **keys_json("sd3_text_encoders.json")}
    assert shapes_of(comp.export_state_dict()) == want
    assert comp.modelspec()["architecture"].startswith("stable-diffusion-v3")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_save_reload_bit_exact(tmp_path, family, precision):
    comp = models.build(family, "tiny", seed=3)
    path = str(tmp_path / "m.safetensors")
    models.save(comp, path, precision=precision, extra_metadata={"note": "x"})
    back = models.load(path)
    assert back.family == family
    dt = models.DTYPES[precision]
    a, b = comp.export_state_dict(), back.export_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        ref = a[k].to(dt) if a[k].is_floating_point() else a[k]
        assert b[k].dtype == ref.dtype and torch.equal(b[k], ref), k
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["note"] == "x"
    # saving again from the reloaded components gives the same file content
    path2 = str(tmp_path / "m2.safetensors")
    models.save(back, path2, precision=precision)
    x, y = load_file(path), load_file(path2)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_same_seed_same_weights_and_part_alone():
    a = models.build("sdxl", "tiny", seed=1)
    vae_alone = models.build("sdxl", "tiny", seed=1, parts=("vae",)).vae
    for (k, v), (k2, v2) in zip(a.vae.state_dict().items(), vae_alone.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    b = models.build("sdxl", "tiny", seed=2)
    assert not torch.equal(a.unet.out[2].weight, b.unet.out[2].weight)


def _corrupt(tmp_path, fn):
    comp = models.build("sdxl", "tiny")
    sd = {k: v.contiguous() for k, v in comp.export_state_dict().items()}
    fn(sd)
    p = str(tmp_path / "bad.safetensors")
    save_file(sd, p)
    return p


def test_missing_extra_misshaped_keys_fail_clearly(tmp_path):
    p = _corrupt(tmp_path, lambda sd: sd.pop("model.diffusion_model.input_blocks.1.0.in_layers.2.bias"))
    with pytest.raises(CheckpointError, match="input_blocks.1.0.in_layers.2.bias"):
        models.load(p)
    p = _corrupt(tmp_path, lambda sd: sd.__setitem__("model.diffusion_model.extra_thing.weight", torch.zeros(2)))
    with pytest.raises((CheckpointError, ValueError), match="extra_thing"):
        models.load(p)
    p = _corrupt(tmp_path, lambda sd: sd.__setitem__("junk.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="junk.weight"):
        models.load(p)

    def misshape(sd):
        sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    p = _corrupt(tmp_path, misshape)
    with pytest.raises((CheckpointError, ValueError), match="conv_out"):
        models.load(p)
    with pytest.raises(CheckpointError):
        models.load(str(tmp_path / "does_not_exist.safetensors"))


def test_known_harmless_extras_are_ignored(tmp_path):
    comp = models.build("sdxl", "tiny")
    sd = {k: v.contiguous() for k, v in comp.export_state_dict().items()}
    sd["denoiser.sigmas"] = torch.linspace(0, 1, 1000)
    p = str(tmp_path / "extras.safetensors")
    save_file(sd, p)
    back = models.load(p)
    assert torch.equal(back.unet.out[2].weight, comp.unet.out[2].weight)


def test_separate_vae_file_original_and_diffusers_naming(tmp_path):
    """The separate VAE overrides the checkpoint's; diffusers naming is produced by diffusers' own conversion."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    base = models.build("sdxl", "tiny", seed=0)
    ckpt = str(tmp_path / "model.safetensors")
    models.save(base, ckpt, "fp32")
    other = models.build("sdxl", "tiny", seed=9).vae
    orig = str(tmp_path / "vae_orig.safetensors")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, orig)
    comp = models.load(ckpt, vae=orig)
    assert all(torch.equal(a, b) for a, b in zip(comp.vae.state_dict().values(), other.state_dict().values()))
    c = other.cfg
    n = len(c.ch_mult)
    diff_cfg = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * n,
                "up_block_types": ("UpDecoderBlock2D",) * n, "block_out_channels": [c.ch * m for m in c.ch_mult],
                "layers_per_block": c.num_res_blocks, "latent_channels": c.z_channels, "norm_num_groups": 32}
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in other.state_dict().items()}, diff_cfg)
    dpath = str(tmp_path / "vae_diffusers.safetensors")
    save_file({k: v.contiguous() for k, v in converted.items()}, dpath)
    comp2 = models.load(ckpt, vae=dpath)
    for (k, a), b in zip(comp2.vae.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_sd3_separate_comfy_text_encoder_files(tmp_path):
    """ComfyUI-style clip_l / clip_g / t5xxl files (no prefix; clip_l with a projection SD3 ignores)."""
    comp = models.build("sd3", "tiny", seed=0)
    main = {k: v.contiguous() for k, v in comp.export_state_dict().items() if not k.startswith("text_encoders.")}
    p = str(tmp_path / "sd3_noTE.safetensors")
    save_file(main, p)
    files = {}
    for name, prefix in (("clip_l", "text_encoders.clip_l.transformer."), ("clip_g", "text_encoders.clip_g.transformer."),
                         ("t5xxl", "text_encoders.t5xxl.transformer.")):
        sd = {k[len(prefix):]: v.clone().contiguous() for k, v in comp.export_state_dict().items() if k.startswith(prefix)}
        if name == "clip_l":
            sd["text_projection.weight"] = torch.eye(32)
        if name == "t5xxl":
            sd.pop("encoder.embed_tokens.weight", None)
        files[name] = str(tmp_path / f"{name}.safetensors")
        save_file(sd, files[name])
    back = models.load(p, clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=files["t5xxl"])
    t1 = comp.encode_text(["a red circle"])
    t2 = back.encode_text(["a red circle"])
    assert torch.allclose(t1["context"], t2["context"]) and torch.allclose(t1["pooled"], t2["pooled"])
    with pytest.raises(CheckpointError, match="clip_l"):
        models.load(p, parts=("mmdit", "clip_l"))


def test_sdxl_conditioning_layout():
    """context = [CLIP-L penultimate ++ bigG penultimate] per 77-token chunk; y = pooled ++ 6 sinusoids."""
    from models.unet_sdxl import timestep_embedding
    comp = models.build("sdxl", "tiny", max_token_length=150)
    caps = ["a red circle, " * 40, "blue"]
    text = comp.encode_text(caps)
    assert text["context"].shape == (2, 154, 64) and text["pooled"].shape == (2, 32)
    ids1 = comp.tokenizer(caps, pad_token=49407, max_token_length=150)
    h1, _ = comp.te1(ids1[:, 77:], layer=-2)
    assert torch.allclose(text["context"][:, 77:, :32], h1)
    orig = torch.tensor([[512, 768], [1024, 1024]])
    crop = torch.tensor([[0, 16], [8, 0]])
    tgt = torch.tensor([[512, 768], [1024, 1024]])
    y = comp.conditioning(text, orig, crop, tgt)["y"]
    assert y.shape == (2, 32 + 1536)
    want = timestep_embedding(torch.tensor([1024.0]), 256)[0]
    assert torch.allclose(y[1, 32:32 + 256], want) and torch.allclose(y[1, 32 + 256:32 + 512], want)
    assert torch.allclose(y[0, 32 + 512 + 256:32 + 1024], timestep_embedding(torch.tensor([16.0]), 256)[0])
    unc = comp.uncond_text(text)
    assert float(unc["context"].abs().sum()) == 0 and float(unc["pooled"].abs().sum()) == 0


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_family_record_matches_the_built_model(name):
    """models.family(name) describes the components models.build makes: parts in file order, the trained network,
    the text encoders (trained ones with [optimizer] fields that exist), block lists FSDP / compile wrap, LoRA
    prefixes of real parts and default targets that each match layers of the model, kohya's per-variant versions of
    its released architectures."""
    import dataclasses

    from core.config import OptimizerConfig
    from diffusion.objectives import OBJECTIVES
    from networks.lora import lora_targets

    rec = models.family(name)
    comp = models.build(name, "tiny", device="meta")
    assert rec.name == comp.family and list(rec.prefix) == list(comp.parts())
    assert comp.network is getattr(comp, rec.network) and rec.text_encoders == tuple(comp.text_encoders())
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    assert set(rec.trainable_text_lr) <= set(rec.text_encoders) and set(rec.trainable_text_lr.values()) <= fields
    assert set(rec.optional_parts) <= set(rec.text_encoders) and rec.objective in OBJECTIVES
    assert all(len(getattr(comp.network, b)) > 0 for b in rec.blocks)
    assert set(rec.lora_prefixes) <= set(rec.prefix)
    names = list(lora_targets(comp))
    for pattern in (*rec.lora_targets, *rec.lora_conv_targets):
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    released = {models.build(name, p, device="meta", parts=[rec.network]).modelspec()["architecture"]
                for p in rec.presets if p not in ("tiny", "micro")}
    assert set(rec.model_versions) <= released and len(released) == (3 if name == "sd3" else 1)
    with pytest.raises(ValueError, match="unknown model family"):
        models.family("sd15")
