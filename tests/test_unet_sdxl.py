"""Tests of models/unet_sdxl.py against the real SDXL key list and diffusers as an oracle."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from models.unet_sdxl import PRESETS, TINY, UNet, UNetConfig, config_from_shapes, timestep_embedding

KEYS = os.path.join(os.path.dirname(__file__), "fixtures", "keys", "sdxl_base.json")
PREFIX = "model.diffusion_model."
SDXL_UNET_PARAMS = 2_567_463_684  # CONVENTIONS.md: sd_xl_base_1.0 `model.diffusion_model.*`
SIZE_EMB_DIM = 256  # sgm ConcatTimestepEmbedderND outdim for the 6 size/crop numbers


def _base_shapes() -> dict[str, tuple[int, ...]]:
    with open(KEYS) as f:
        return {k[len(PREFIX):]: tuple(v) for k, v in json.load(f).items() if k.startswith(PREFIX)}


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial random weights: every bias and norm affine differs from its default, so a mis-mapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))


def _inputs(cfg: UNetConfig, b: int = 2, hw: int = 16, tokens: int = 77, seed: int = 1):
    """x, timesteps, context, pooled text vector and the 6 raw size/crop numbers per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, hw, hw, generator=g)
    t = torch.tensor([17, 930])[:b]
    context = torch.randn(b, tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(b, cfg.adm_in_channels - 6 * SIZE_EMB_DIM, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 16.0, 0.0, 1024.0, 896.0]])[:b]
    return x, t, context, pooled, time_ids


def _sgm_y(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """sgm vector conditioning: concat(pooled, 256-d sinusoid of each of the 6 numbers)."""
    b = time_ids.shape[0]
    return torch.cat([pooled, timestep_embedding(time_ids.flatten(), SIZE_EMB_DIM).reshape(b, -1)], dim=1)


def _diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel config equivalent to an sgm SDXL UNet config."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)]
    assert cfg.transformer_depth[-1] == cfg.transformer_depth_middle, "diffusers' mid block takes the last level's depth"
    return dict(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up, block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=[w // cfg.num_head_channels for w in widths],  # diffusers reads this as the head count
        transformer_layers_per_block=[max(d, 1) for d in cfg.transformer_depth],  # ignored on plain levels
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMB_DIM,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
        norm_num_groups=32,
    )


# ---------------------------------------------------------------- key contract


def test_base_keys_and_param_count_match_checkpoint():
    """Reference: the real sd_xl_base_1.0 key->shape list (tests/fixtures/keys/sdxl_base.json), prefix stripped."""
    with torch.device("meta"):
        model = UNet(PRESETS["base"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = _base_shapes()
    assert sorted(set(ours) - set(ref)) == [] and sorted(set(ref) - set(ours)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == SDXL_UNET_PARAMS


def test_config_from_shapes():
    """Reference: the real checkpoint's shapes must give the `base` preset; a tiny model's state_dict gives `tiny`."""
    assert config_from_shapes(_base_shapes()) == PRESETS["base"]
    tiny_shapes = {k: tuple(v.shape) for k, v in UNet(TINY).state_dict().items()}
    assert config_from_shapes(tiny_shapes) == TINY
    # a non-preset variant keeps every shape-derived field
    with torch.device("meta"):
        other = UNetConfig(model_channels=64, channel_mult=(1, 2), transformer_depth=(1, 3), transformer_depth_middle=2,
                           context_dim=128, adm_in_channels=300, num_res_blocks=1, in_channels=8)
        other_shapes = {k: tuple(v.shape) for k, v in UNet(other).state_dict().items()}
    assert config_from_shapes(other_shapes) == other


def test_config_from_shapes_rejects_other_layouts():
    """Analytic: garbage, a prefixed key set, a missing key, and a wrong shape all raise ValueError."""
    base = _base_shapes()
    with pytest.raises(ValueError, match="not an SDXL"):
        config_from_shapes({"foo.weight": (3, 3)})
    with pytest.raises(ValueError, match="prefix"):
        config_from_shapes({PREFIX + k: v for k, v in base.items()})
    dropped = dict(base)
    del dropped["output_blocks.5.1.transformer_blocks.1.ff.net.2.bias"]
    with pytest.raises(ValueError, match="missing output_blocks.5.1"):
        config_from_shapes(dropped)
    wrong = dict(base)
    wrong["input_blocks.4.1.proj_in.weight"] = (640, 640, 1, 1)  # conv proj_in (SD 1.x style)
    with pytest.raises(ValueError, match="proj_in"):
        config_from_shapes(wrong)


# ---------------------------------------------------------------- numerics


def test_timestep_embedding_matches_diffusers_and_formula():
    """References: diffusers get_timestep_embedding(flip_sin_to_cos=True, shift 0) and cos(0)=1, sin(0)=0."""
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 17.5, 999.0, 1024.0])
    ours = timestep_embedding(t, 256)
    ref = emb_mod.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.dtype == torch.float32 and ours.shape == (5, 256)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    # highest frequency is exp(0)=1 (first column), lowest exp(-ln(1e4) * 127/128)
    assert ours[3, 0].item() == pytest.approx(math.cos(999.0), abs=1e-4)
    assert ours[3, 127].item() == pytest.approx(math.cos(999.0 * math.exp(-math.log(1e4) * 127 / 128)), abs=1e-5)
    assert timestep_embedding(t, 7)[:, -1].abs().sum() == 0  # odd dims: zero pad like sgm


@pytest.mark.parametrize("tokens", [77, 154])
def test_tiny_matches_diffusers(tokens: int):
    """Reference: diffusers UNet2DConditionModel loaded through diffusers' own single-file conversion
    (convert_ldm_unet_checkpoint) from our state_dict with the `model.diffusion_model.` prefix; diffusers
    embeds the raw time_ids itself, we get y = concat(pooled, sinusoid(time_ids)) as sgm builds it."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = UNet(TINY).eval()
    _randomize(ours)
    dcfg = _diffusers_config(TINY)
    ref = UNet2DConditionModel(**dcfg).eval()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, dcfg)
    ref.load_state_dict(converted, strict=True)

    x, t, context, pooled, time_ids = _inputs(TINY, tokens=tokens)
    if tokens == 154:
        t = t.float() + 0.25  # fractional timesteps too
    with torch.no_grad():
        out = ours(x, t, context, _sgm_y(pooled, time_ids))
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    scale = expected.abs().max().item()
    assert scale > 0.1 and expected.std() > 0.05  # not degenerate
    assert (out - expected).abs().max().item() <= 1e-4 * scale
    # the conditioning matters: a different y changes the output (so parity covers label_emb)
    with torch.no_grad():
        other = ours(x, t, context, _sgm_y(pooled, time_ids.flip(0)))
    assert (other - out).abs().max().item() > 1e-3 * scale


def test_gradient_checkpointing_same_output_and_grads():
    """Reference: the same model without checkpointing; a hook proves blocks are recomputed when it is on."""
    model = UNet(TINY).train()
    _randomize(model)
    x, t, context, pooled, time_ids = _inputs(TINY)
    y = _sgm_y(pooled, time_ids)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = model(xi, t, context, y)
        (out.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads["x"] = xi.grad.clone()
        return out.detach(), grads

    calls = []
    model.output_blocks[3].register_forward_pre_hook(lambda *_: calls.append(1))
    out0, g0 = run()
    assert len(calls) == 1
    model.gradient_checkpointing = True
    calls.clear()
    out1, g1 = run()
    assert len(calls) == 2  # forward + recompute during backward (pre-hook: recompute stops early)
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_half_precision():
    """Reference: fp32 forward of the same weights; bf16 autocast must stay close, pure bf16/fp16 weights finite."""
    model = UNet(TINY).eval()
    _randomize(model)
    x, t, context, pooled, time_ids = _inputs(TINY)
    y = _sgm_y(pooled, time_ids)
    with torch.no_grad():
        ref = model(x, t, context, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, context, y)
        assert (auto.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
        for dtype in (torch.bfloat16, torch.float16):
            half = UNet(TINY).eval()
            half.load_state_dict(model.state_dict())
            half.to(dtype)
            out = half(x, t, context, y)  # fp32 inputs are cast to the weights' dtype
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_bad_inputs_raise_clear_errors():
    """Analytic: wrong shapes are rejected before the network runs, naming the expected shape."""
    model = UNet(TINY)
    x, t, context, pooled, time_ids = _inputs(TINY)
    y = _sgm_y(pooled, time_ids)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[..., :32], y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, context, pooled)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(x[..., :15, :15], t, context, y)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1], context, y)
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetConfig(model_channels=40 * 8, num_head_channels=48)
