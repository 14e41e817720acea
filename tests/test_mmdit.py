"""MMDiT: key contract against the released checkpoints and numerical parity with diffusers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models.mmdit import PRESETS, MMDiT, MMDiTConfig, config_from_shapes

KEYS = os.path.join(os.path.dirname(__file__), "fixtures", "keys")
PREFIX = "model.diffusion_model."
# Parameter counts without pos_embed (a buffer), from shared/reference/CONVENTIONS.md.
PARAM_COUNTS = {"sd3_medium": 2_028_328_000, "sd35_medium": 2_243_171_520, "sd35_large": 8_056_627_520}


def released_shapes(name: str) -> dict[str, list[int]]:
    with open(os.path.join(KEYS, f"{name}.json")) as f:
        keys = json.load(f)
    return {k[len(PREFIX) :]: v for k, v in keys.items() if k.startswith(PREFIX)}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_key_contract_full_size_on_meta(name: str) -> None:
    """Reference: key -> shape lists of the released single files; conversion: strip the prefix only."""
    with torch.device("meta"):
        model = MMDiT(PRESETS[name])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = released_shapes(name)
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_config_from_shapes_recovers_preset(name: str) -> None:
    """Reference: the released key -> shape lists; the derived config must equal the hand-written preset."""
    assert config_from_shapes(released_shapes(name)) == PRESETS[name]


def test_config_from_shapes_tiny_roundtrip() -> None:
    """Reference: our own tiny state dict shapes (round trip of every tiny variant)."""
    for name in ("tiny", "tiny_qk", "tiny_x"):
        shapes = {k: list(v.shape) for k, v in MMDiT(PRESETS[name]).state_dict().items()}
        assert config_from_shapes(shapes) == PRESETS[name]


def test_bad_inputs_give_clear_errors() -> None:
    """Reference: analytic limits (patch multiple, pos_embed_max_size * patch, channel counts)."""
    model = MMDiT(PRESETS["tiny"])
    t, y, ctx = torch.zeros(1), torch.zeros(1, 64), torch.zeros(1, 3, 64)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.zeros(1, 16, 7, 8), t, y, ctx)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        model(torch.zeros(1, 16, 66, 8), t, y, ctx)
    with pytest.raises(ValueError, match="context must be"):
        model(torch.zeros(1, 16, 8, 8), t, y, torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="x_block_self_attn_layers"):
        MMDiTConfig(depth=2, x_block_self_attn_layers=(1,))
    with pytest.raises(KeyError, match="pos_embed"):
        config_from_shapes({"x_embedder.proj.weight": [128, 16, 2, 2]})


def _randomize(model: torch.nn.Module) -> None:
    """Random weights with a non-trivial scale everywhere (adaLN gates, norms and pos_embed included)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                p.add_(1.0)


def _diffusers_model(cfg: MMDiTConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ref = diffusers.SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size * cfg.patch_size // 2,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=64,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_channels,
        out_channels=cfg.in_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm == "rms" else None,
    )
    original = {PREFIX + k: v.clone() for k, v in state.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny_qk", "tiny_x"])
def test_parity_with_diffusers(name: str) -> None:
    """Reference: diffusers SD3Transformer2DModel; conversion: diffusers' own
    convert_sd3_transformer_checkpoint_to_diffusers on our state dict under `model.diffusion_model.`.
    Non-square latent 12x20 (6x10 patches) on a 32x32 table, so the centred crop is exercised."""
    cfg = PRESETS[name]
    model = MMDiT(cfg).eval()
    _randomize(model)
    ref = _diffusers_model(cfg, model.state_dict())
    x = torch.randn(2, cfg.in_channels, 12, 20)
    t = torch.tensor([999.0, 137.5])
    y = torch.randn(2, cfg.adm_in_channels)
    ctx = torch.randn(2, 9, cfg.context_in_dim)
    with torch.no_grad():
        ours = model(x, t, y, ctx)
        theirs = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert ours.shape == theirs.shape == x.shape
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_gradient_checkpointing_same_grads() -> None:
    """Reference: the same model without checkpointing (checkpointing must not change the math)."""
    cfg = PRESETS["tiny_x"]
    model = MMDiT(cfg)
    _randomize(model)
    x = torch.randn(1, cfg.in_channels, 8, 12)
    args = (torch.tensor([500.0]), torch.randn(1, cfg.adm_in_channels), torch.randn(1, 5, cfg.context_in_dim))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, *args).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_forward_runs() -> None:
    """Reference: the fp32 forward of the same weights (bf16 must stay close, not bit-equal)."""
    cfg = PRESETS["tiny_qk"]
    model = MMDiT(cfg).eval()
    _randomize(model)
    inputs = (torch.randn(1, 16, 8, 8), torch.tensor([300.0]), torch.randn(1, 64), torch.randn(1, 4, 64))
    with torch.no_grad():
        ref = model(*inputs)
        out = model.to(torch.bfloat16)(*inputs)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 5e-2
