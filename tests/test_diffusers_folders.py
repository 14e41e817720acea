"""Diffusers folders in and out (models/diffusers_layout.py), with diffusers / transformers as the oracles.

In: tiny SDXL and SD3 pipelines built from diffusers / transformers classes with configs matching our tiny presets
are written by diffusers' own `save_pretrained` (SDXL sharded, SD3 as the fp16 variant file names); `models.load`
reads the folder and every part's outputs equal the diffusers / transformers part's within 1e-5.
Out: `save.save_model_as = "diffusers"`'s writer, read back by diffusers' / transformers' `from_pretrained`
(subfolder=...), outputs equal ours.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import models
from models.checkpoint import CheckpointError
from models.tokenizers import EOT

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tests.test_text_encoders import _hf_config  # noqa: E402
from tests.test_unet_sdxl import _diffusers_config, _inputs, _sgm_y  # noqa: E402

ATOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights everywhere (norm affines and biases too), so a mis-mapped or swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            else:  # norm weights about 1, biases about 0
                p.copy_(float(name.endswith("weight")) + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(vocab: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 3, (b, 77), generator=g)
    ids[:, 0], ids[0, 9:], ids[1, 30:] = vocab - 2, EOT if vocab > EOT else vocab - 1, 0
    ids[0, 9], ids[1, 30] = vocab - 1, vocab - 1  # end-of-text = the argmax id, where CLIP pools
    return ids


def _vae_kwargs(cfg) -> dict:
    widths = [cfg.ch * m for m in cfg.ch_mult]
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(widths),
                up_block_types=["UpDecoderBlock2D"] * len(widths), block_out_channels=widths,
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
                scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor or None,
                use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv)


def _clip_cfg(cfg):
    return _hf_config(cfg)


def _sdxl_parts(v_pred: bool = False):
    from models.sdxl import preset_configs
    c = preset_configs("tiny")
    unet = _randomize(diffusers.UNet2DConditionModel(**_diffusers_config(c["unet"])), 1)
    vae = _randomize(diffusers.AutoencoderKL(**_vae_kwargs(c["vae"])), 2)
    te1 = _randomize(transformers.CLIPTextModel(_clip_cfg(c["te1"])), 3)
    te2 = _randomize(transformers.CLIPTextModelWithProjection(_clip_cfg(c["te2"])), 4)
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction" if v_pred else "epsilon",
                                             rescale_betas_zero_snr=v_pred)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=sched, tokenizer=None, tokenizer_2=None)


def _sd3_parts():
    from models.sd3 import preset_configs
    c = preset_configs("tiny")
    m = c["mmdit"]
    transformer = _randomize(diffusers.SD3Transformer2DModel(
        sample_size=m.pos_embed_max_size * m.patch_size // 2, patch_size=m.patch_size, in_channels=m.in_channels,
        num_layers=m.depth, attention_head_dim=64, num_attention_heads=m.num_heads, joint_attention_dim=m.context_in_dim,
        caption_projection_dim=m.hidden_size, pooled_projection_dim=m.adm_in_channels, out_channels=m.in_channels,
        pos_embed_max_size=m.pos_embed_max_size), 5)
    vae = _randomize(diffusers.AutoencoderKL(**_vae_kwargs(c["vae"])), 6)
    te1 = _randomize(transformers.CLIPTextModelWithProjection(_clip_cfg(c["clip_l"])), 7)
    te2 = _randomize(transformers.CLIPTextModelWithProjection(_clip_cfg(c["clip_g"])), 8)
    t = c["t5"]
    te3 = _randomize(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
        num_heads=t.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0)), 9)
    return dict(transformer=transformer, vae=vae, text_encoder=te1, text_encoder_2=te2, text_encoder_3=te3,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=None, tokenizer_2=None,
                tokenizer_3=None)


def _save_pipeline(cls_name: str, parts: dict, path: str, **kw) -> None:
    pipe = getattr(diffusers, cls_name)(**parts)
    pipe.save_pretrained(path, **kw)


@torch.no_grad()
def _check_vae(ours, ref) -> None:
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, _ = ours.encode(img)
    torch.testing.assert_close(mean, ref.encode(img).latent_dist.mean, atol=ATOL, rtol=0)
    z = torch.randn(1, ours.cfg.z_channels, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=ATOL, rtol=0)


@torch.no_grad()
def _check_clip(ours, ref, project: bool) -> None:
    ids = _ids(ours.cfg.vocab_size)
    h, pooled = ours(ids, layer=-2)
    out = ref(ids, output_hidden_states=True)
    torch.testing.assert_close(h, out.hidden_states[-2], atol=ATOL, rtol=0)
    want = out.text_embeds if project else out.last_hidden_state[torch.arange(2), ids.argmax(-1)]
    torch.testing.assert_close(pooled, want, atol=ATOL, rtol=0)


@torch.no_grad()
def _check_sdxl(comp, parts) -> None:
    cfg = comp.unet.cfg
    x, t, context, pooled, time_ids = _inputs(cfg)
    want = parts["unet"](x, t, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(comp.unet(x, t, context, _sgm_y(pooled, time_ids)), want, atol=ATOL, rtol=0)
    _check_vae(comp.vae, parts["vae"])
    _check_clip(comp.te1, parts["text_encoder"], project=False)
    _check_clip(comp.te2, parts["text_encoder_2"], project=True)


@torch.no_grad()
def _check_sd3(comp, parts) -> None:
    cfg = comp.mmdit.cfg
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, cfg.in_channels, 8, 12, generator=g), torch.randn(2, 7, cfg.context_in_dim, generator=g)
    y, t = torch.randn(2, cfg.adm_in_channels, generator=g), torch.tensor([250.0, 900.0])
    want = parts["transformer"](hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    torch.testing.assert_close(comp.mmdit(x, t, y, ctx), want, atol=ATOL, rtol=0)
    _check_vae(comp.vae, parts["vae"])
    _check_clip(comp.clip_l, parts["text_encoder"], project=False)  # SD3 reference: CLIP-L pooled not projected
    _check_clip(comp.clip_g, parts["text_encoder_2"], project=True)
    ids = torch.randint(0, comp.t5.cfg.vocab_size, (2, 20), generator=g)
    torch.testing.assert_close(comp.t5(ids), parts["text_encoder_3"](ids).last_hidden_state, atol=ATOL, rtol=0)


def test_sdxl_folder_written_by_diffusers_sharded(tmp_path) -> None:
    """Reference: StableDiffusionXLPipeline.save_pretrained(max_shard_size=...) of diffusers / transformers parts
    (unet shards + index json); a v-prediction / zero-terminal-SNR scheduler shows as the v_pred / ztsnr markers."""
    parts = _sdxl_parts(v_pred=True)
    path = str(tmp_path / "sdxl")
    _save_pipeline("StableDiffusionXLPipeline", parts, path, max_shard_size="300KB")
    assert any("-of-" in f for f in os.listdir(os.path.join(path, "unet")))  # really sharded
    comp = models.load(path)
    assert comp.family == "sdxl" and comp.v_parameterization and comp.zero_terminal_snr
    assert comp.vae.cfg.scaling_factor == parts["vae"].config.scaling_factor
    _check_sdxl(comp, parts)
    # the [model] table's path takes the folder too: family, markers, one part alone
    from core.config import Config, ModelConfig
    cfg = Config(model=ModelConfig(pretrained_model_name_or_path=path))
    resolved, notes = models.resolve_prediction(cfg)
    assert models.family_of(cfg.model) == "sdxl" and resolved.model.v_parameterization and resolved.loss.zero_terminal_snr
    assert any("v_pred" in n for n in notes)
    vae = models.load_vae(cfg.model)
    torch.testing.assert_close(vae.state_dict(), comp.vae.state_dict())


def test_sd3_folder_written_by_diffusers_fp16_variant(tmp_path) -> None:
    """Reference: StableDiffusion3Pipeline.save_pretrained(variant="fp16") (file names *.fp16.safetensors)."""
    parts = _sd3_parts()
    path = str(tmp_path / "sd3")
    _save_pipeline("StableDiffusion3Pipeline", parts, path, variant="fp16")
    assert os.path.isfile(os.path.join(path, "transformer", "diffusion_pytorch_model.fp16.safetensors"))
    comp = models.load(path)
    assert comp.family == "sd3"
    _check_sd3(comp, parts)


def test_diffusers_folder_missing_parts_one_line(tmp_path) -> None:
    parts = _sdxl_parts()
    path = str(tmp_path / "sdxl")
    _save_pipeline("StableDiffusionXLPipeline", parts, path)
    for f in os.listdir(os.path.join(path, "text_encoder_2")):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(path, "text_encoder_2", f))
    import shutil
    shutil.rmtree(os.path.join(path, "vae"))
    with pytest.raises(CheckpointError) as e:
        models.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "vae/" in msg and "text_encoder_2/ (weights" in msg
    os.remove(os.path.join(path, "model_index.json"))
    with pytest.raises(CheckpointError, match="without model_index.json"):
        models.load(path)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_diffusers_export_loads_in_diffusers(tmp_path, family) -> None:
    """Reference: diffusers / transformers from_pretrained(subfolder=...) of our writer's folder; outputs equal ours.
    The tokenizer folders load as transformers' CLIPTokenizer and give our token ids."""
    from models.diffusers_layout import save_diffusers
    comp = models.build(family, "tiny", seed=3)
    for m in comp.parts().values():
        _randomize(m, 11)
    path = str(tmp_path / "out")
    save_diffusers(comp, path, comp.export_state_dict(), {"modelspec.title": "x"})
    assert not [f for f in os.listdir(tmp_path) if f != "out"]  # no temporary left
    index = json.load(open(os.path.join(path, "model_index.json")))
    sub = dict(subfolder=None)

    def part(name, cls, lib=diffusers):
        sub["subfolder"] = name
        return getattr(lib, cls).from_pretrained(path, subfolder=name).eval()

    if family == "sdxl":
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        parts = dict(unet=part("unet", "UNet2DConditionModel"), vae=part("vae", "AutoencoderKL"),
                     text_encoder=part("text_encoder", "CLIPTextModel", transformers),
                     text_encoder_2=part("text_encoder_2", "CLIPTextModelWithProjection", transformers))
        _check_sdxl(comp, parts)
        sched = diffusers.EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        assert sched.config.prediction_type == "epsilon"
    else:
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        parts = dict(transformer=part("transformer", "SD3Transformer2DModel"), vae=part("vae", "AutoencoderKL"),
                     text_encoder=part("text_encoder", "CLIPTextModelWithProjection", transformers),
                     text_encoder_2=part("text_encoder_2", "CLIPTextModelWithProjection", transformers),
                     text_encoder_3=part("text_encoder_3", "T5EncoderModel", transformers))
        _check_sd3(comp, parts)
    tok = transformers.CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    caption = "a photo of a cat, masterpiece"
    assert tok(caption)["input_ids"] == [49406, *comp.tokenizer.encode(caption), EOT]
    # and back into ours: the same weights
    again = models.load(path)
    for name, m in comp.parts().items():
        got = again.parts()[name].state_dict()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=f"{name}.{k}")


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses to rebuild it."""


def test_ckpt_and_pt_weights_only(tmp_path) -> None:
    """A .ckpt with the LDM `state_dict` wrapper (plus non-tensor counters and model_ema copies) loads like the
    .safetensors of the same weights; a file holding a pickled object is refused in one line, nothing run."""
    comp = models.build("sdxl", "tiny", seed=1, parts=("vae",))
    sd = {k: v.clone() for k, v in comp.export_state_dict().items()}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**sd, "model_ema.decay": torch.tensor(0.999)}, "global_step": 7, "epoch": 1}, ckpt)
    got = models.load(str(ckpt), "sdxl", parts=("vae",))
    torch.testing.assert_close(got.vae.state_dict(), comp.vae.state_dict(), atol=0, rtol=0)
    pt = tmp_path / "m.pt"
    torch.save(sd, pt)  # no wrapper
    assert models.load(str(pt), "sdxl", parts=("vae",)).vae is not None
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd, "hook": _Pickled()}, bad)
    with pytest.raises(CheckpointError) as e:
        models.load(str(bad), "sdxl", parts=("vae",))
    assert "weights_only=True" in str(e.value) and "\n" not in str(e.value)


def test_train_exports_diffusers_folders(tmp_path) -> None:
    """train.py with save.save_model_as = "diffusers": periodic and final exports are folders (no temporaries, 0644
    files under umask 022, modelspec in the UNet's header), save_last_n prunes folders; the final one loads in ours
    and in diffusers with equal UNet outputs."""
    import stat

    import train
    from data.demo import make_demo_dataset
    from safetensors import safe_open
    make_demo_dataset(str(tmp_path / "data"), n=2, size=(64, 64))
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train.main(["configs/demo.toml", f"data.image_dirs=['{tmp_path / 'data'}']", "cache.cache_dir=",
                           f"output_dir={out}", "train.max_train_steps=3", "optimizer.lr_warmup_steps=0",
                           "sample.sample_every_n_steps=0", "save.save_every_n_steps=1", "save.save_last_n=1",
                           "save.save_state=false", "save.save_model_as=diffusers", "data.batch_size=2",
                           "data.resolution=64"]) == 0
    finally:
        os.umask(old)
    assert sorted(os.listdir(out / "models")) == ["demo", "demo-step00000002"]
    folder = out / "models" / "demo"
    for root, _dirs, files in os.walk(folder):
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o644, f
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    comp = models.load(str(folder))
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()
    x, t, context, pooled, time_ids = _inputs(comp.unet.cfg)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        torch.testing.assert_close(comp.unet(x, t, context, _sgm_y(pooled, time_ids)), want.sample, atol=ATOL, rtol=0)
