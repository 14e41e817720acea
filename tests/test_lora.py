"""LoRA / LoCon (networks/lora.py): our kohya-format files against diffusers' kohya loader (SDXL UNet and both
text encoders), SD3 names against ComfyUI's key rule, merging, third-party (diffusers-named) files.

References: diffusers' `StableDiffusionXLLoraLoaderMixin.load_lora_weights` (its kohya converter
`_convert_non_diffusers_lora_to_diffusers` + peft) on the diffusers / transformers equivalents of our tiny parts,
built with diffusers' own single-file conversions; ComfyUI's `model_lora_keys_unet` rule, encoded below.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
from networks import lora

SOT, EOT = 49406, 49407


def _cfg(**kw):
    from core.config import config_from_dict
    return config_from_dict({"model": {"model_preset": "tiny"}, "network": {"network_module": "lora", **kw}})


def _randomize_adapters(net: lora.LoRANetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.adapters.values():
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.2)


def _sdxl(seed: int = 0):
    from test_unet_sdxl import _randomize
    comp = models.build("sdxl", "tiny", seed=seed, parts=["unet", "te1", "te2"])
    _randomize(comp.unet, seed)
    with torch.no_grad():  # text encoders: perturb every parameter (biases, norms) off their init
        for te in (comp.te1, comp.te2):
            for p in te.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    for m in comp.parts().values():
        m.eval()
    return comp


def _diffusers_parts(comp):
    """diffusers UNet2DConditionModel and transformers CLIP-L / bigG equal to our tiny parts (diffusers' own
    single-file conversions)."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from test_text_encoders import _hf_config, _load_into_hf
    from test_unet_sdxl import _diffusers_config
    import transformers
    dcfg = _diffusers_config(comp.unet.cfg)
    unet = UNet2DConditionModel(**dcfg).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in
                                                      comp.unet.state_dict().items()}, dcfg), strict=True)
    te1 = transformers.CLIPTextModel(_hf_config(comp.te1.cfg)).eval()
    _load_into_hf(te1, comp.te1.state_dict())
    te2 = transformers.CLIPTextModelWithProjection(_hf_config(comp.te2.cfg)).eval()
    prefix = "conditioner.embedders.1.model."
    _load_into_hf(te2, convert_open_clip_checkpoint(te2, {prefix + k: v for k, v in comp.te2.state_dict().items()},
                                                    prefix=prefix))
    return unet, te1, te2


def _ids(b: int = 2, pad: int = EOT) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.full((b, 77), pad)
    ids[:, 0] = SOT
    for i, n in enumerate((9, 30)[:b]):
        ids[i, 1:n] = torch.randint(1, 400, (n - 1,), generator=g)
        ids[i, n] = EOT
    return ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_sdxl_lora_file_loads_in_diffusers_with_equal_outputs(tmp_path):
    """Our file (UNet + te1 + te2 adapters, random up weights, alpha != dim) through diffusers' load_lora_weights:
    UNet output and both text encoders' hidden states equal ours with the LoRA applied (1e-5 relative)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    comp = _sdxl()
    unet, te1, te2 = _diffusers_parts(comp)
    net = lora.create_network(comp, _cfg(network_dim=4, network_alpha=2.0).network, unet=True, text=True)
    _randomize_adapters(net)
    names = set(net.adapters)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj" in names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any("in_layers" in n or "time_embed" in n for n in names)  # lora: no convs, no embeddings
    path = tmp_path / "l.safetensors"
    lora.save_lora(str(path), net.kohya_state_dict(), {"ss_network_module": "networks.lora"}, precision="fp32")

    class Pipe(StableDiffusionXLLoraLoaderMixin):  # the three parts load_lora_weights reads
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder, self.text_encoder_2 = unet, te1, te2
            self.components = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    Pipe().load_lora_weights(str(path))

    net.apply_to()
    from test_unet_sdxl import _inputs, _sgm_y
    x, t, context, pooled, time_ids = _inputs(comp.unet.cfg)
    with torch.no_grad():
        ours = comp.unet(x, t, context, _sgm_y(pooled, time_ids))
        ref = unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert _rel(ours, ref) <= 1e-5
    for ids, ours_te, hf, key in ((_ids(pad=EOT), comp.te1, te1, None), (_ids(pad=0), comp.te2, te2, "text_embeds")):
        with torch.no_grad():
            h, p = ours_te(ids, layer=-2)
            r = hf(input_ids=ids, output_hidden_states=True)
        assert _rel(h, r.hidden_states[-2]) <= 1e-5
        if key:
            assert _rel(p, r[key]) <= 1e-5
    # the LoRA matters (so the equality covers it), and remove() restores the base exactly
    with torch.no_grad():
        net.set_multiplier(0.0)
        plain = comp.unet(x, t, context, _sgm_y(pooled, time_ids))
        net.set_multiplier(1.0)
        net.remove()
        again = comp.unet(x, t, context, _sgm_y(pooled, time_ids))
    assert _rel(plain, ours) > 1e-3
    assert torch.equal(plain, again)
