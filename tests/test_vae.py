"""Tests of models/vae.py: key contract against the real checkpoints, parity with diffusers, conversions."""

import json
import math
import os

import pytest
import torch

from models.diffusers_layout import convert_diffusers_vae, is_diffusers_vae
from models.vae import (
    PRESETS,
    AutoencoderKL,
    VAEConfig,
    config_from_shapes,
)

KEYS_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "keys")
PREFIX = "first_stage_model."


def _fixture_shapes(name: str) -> dict[str, list[int]]:
    with open(os.path.join(KEYS_DIR, f"{name}.json")) as f:
        keys = json.load(f)
    return {k[len(PREFIX) :]: v for k, v in keys.items() if k.startswith(PREFIX)}


def _random_vae(cfg: VAEConfig) -> AutoencoderKL:
    """Tiny VAE whose GroupNorm affines are randomised too (defaults 1/0 would hide swapped norms)."""
    vae = AutoencoderKL(cfg)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae.eval()


def _diffusers_vae(vae: AutoencoderKL):
    """diffusers AutoencoderKL with our weights, converted by diffusers' own single-file converter."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = vae.cfg
    n = len(cfg.ch_mult)
    config = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_quant_conv,
    )
    ref = diffusers.AutoencoderKL(**config).eval()
    ldm = {PREFIX + k: v for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, config), strict=True)
    return ref


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (ours.float() - ref.float()).abs().max().item()
    assert ours.shape == ref.shape and err <= rtol * scale, f"max abs err {err} (scale {scale})"


# --- key contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset,fixture,params", [("sdxl", "sdxl_base", 83_653_863), ("sd3", "sd3_medium", None)])
def test_key_contract_matches_real_checkpoint(preset, fixture, params):
    """Reference: key -> shape lists of the released SDXL / SD3-medium files (first_stage_model.* with prefix removed)."""
    with torch.device("meta"):
        vae = AutoencoderKL(PRESETS[preset])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    ref = _fixture_shapes(fixture)
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref
    if params is not None:  # CONVENTIONS.md: SDXL VAE 83,653,863 params
        assert sum(p.numel() for p in vae.parameters()) == params
    assert all(p.is_meta for p in vae.parameters())


@pytest.mark.parametrize("preset,fixture", [("sdxl", "sdxl_base"), ("sd3", "sd3_medium")])
def test_config_from_real_shapes(preset, fixture):
    """Reference: the released files' shapes (fixtures) must give the documented preset and latent constants."""
    cfg = config_from_shapes(_fixture_shapes(fixture))
    assert cfg == PRESETS[preset]
    expected = {"sdxl": (0.13025, 0.0), "sd3": (1.5305, 0.0609)}[preset]  # CONVENTIONS.md
    assert (cfg.scaling_factor, cfg.shift_factor) == expected


@pytest.mark.parametrize("preset", ["tiny", "tiny16"])
def test_config_from_shapes_round_trip(preset):
    """Analytic: config -> meta model -> state-dict shapes -> config is the identity; overrides and bad input."""
    with torch.device("meta"):
        vae = AutoencoderKL(PRESETS[preset])
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    assert config_from_shapes(shapes) == PRESETS[preset]
    assert config_from_shapes(shapes, scaling_factor=0.5, shift_factor=0.25).scaling_factor == 0.5
    with pytest.raises(ValueError, match="first_stage_model"):
        config_from_shapes({PREFIX + k: v for k, v in shapes.items()})


def test_config_from_shapes_unknown_latent_channels():
    """Analytic: an 8-channel VAE has no documented constants, so they must be given."""
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}
    with pytest.raises(ValueError, match="scaling_factor"):
        config_from_shapes(shapes)
    assert config_from_shapes(shapes, 0.3, 0.1) == VAEConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, scaling_factor=0.3, shift_factor=0.1
    )


# --- numerical parity with diffusers --------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny16"])
def test_parity_with_diffusers(preset):
    """Reference: diffusers AutoencoderKL (fp32, CPU) loaded via diffusers' convert_ldm_vae_checkpoint;
    16-channel case with use_quant_conv=False, use_post_quant_conv=False. Encode mean/logvar and decode."""
    vae = _random_vae(PRESETS[preset])
    ref = _diffusers_vae(vae)
    x = torch.rand(2, 3, 48, 40) * 2 - 1  # non-square catches transposed height/width
    z = torch.randn(2, vae.cfg.z_channels, 5, 7)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        dist = ref.encode(x).latent_dist
        _close(mean, dist.mean)
        _close(logvar, dist.logvar)
        assert mean.shape == (2, vae.cfg.z_channels, 6, 5)
        _close(vae.decode(z), ref.decode(z).sample)


def test_logvar_is_clamped():
    """Analytic: the original DiagonalGaussianDistribution clamps logvar to [-30, 20]."""
    vae = _random_vae(PRESETS["tiny"])
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 1e4  # logvar channels pushed far above the clamp
        _, logvar = vae.encode(torch.zeros(1, 3, 16, 16))
    assert torch.all(logvar == 20.0)


# --- diffusers naming -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny16"])
def test_convert_diffusers_vae_inverts_diffusers_conversion(preset):
    """Reference: diffusers' convert_ldm_vae_checkpoint (original -> diffusers names, conv attn -> Linear);
    our convert_diffusers_vae must give back exactly our keys, shapes and values. Also the old
    diffusers attention names (query/key/value/proj_attn)."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = _random_vae(PRESETS[preset])
    ours = vae.state_dict()
    n = len(vae.cfg.ch_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    diff = convert_ldm_vae_checkpoint({PREFIX + k: v for k, v in ours.items()}, config)
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    assert is_diffusers_vae(diff) and not is_diffusers_vae(ours)

    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in diff.items():
        for new, old in old_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    for sd in (diff, legacy):
        back = convert_diffusers_vae(sd)
        assert sorted(back) == sorted(ours)
        for k, v in ours.items():
            assert back[k].shape == v.shape and torch.equal(back[k], v), k


# --- tiling, latent scaling, dtypes, bad input ----------------------------------------------


def test_tile_blending_is_exact_for_a_local_encoder(monkeypatch):
    """Analytic: with a stand-in encoder that is local (8x8 average pool, then pointwise), every tile gives
    the exact values on its area, so correct tile placement and weights that sum to 1 make tiled == untiled."""
    vae = _random_vae(PRESETS["tiny"])

    def local_moments(images):
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, H/8, W/8)
        return torch.tanh(torch.cat([pooled, pooled * 2, pooled - 1], dim=1))[:, :8] * 3

    monkeypatch.setattr(vae, "_moments", local_moments)
    img = torch.randn(2, 3, 136, 200)  # not a multiple of the tile size: the last tiles overlap more
    mean, logvar = vae.encode(img)
    t_mean, t_logvar = vae.encode(img, tile_size=64)
    assert torch.allclose(t_mean, mean, atol=1e-6) and torch.allclose(t_logvar, logvar, atol=1e-6)


def test_tiled_encode_close_to_untiled():
    """Reference: diffusers' own tiled encode (enable_tiling, same tile size and 25% overlap) on identical
    weights. With random weights, per-tile GroupNorm statistics and zero padding at tile borders make any
    tiled encode approximate; ours must be closer to the untiled encode than diffusers' and than hard seams.
    A tile covering the whole image is exactly the untiled encode."""
    vae = _random_vae(PRESETS["tiny"])
    ref = _diffusers_vae(vae)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 64, 8
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    # Smooth and stationary: every tile holds whole periods, so tile statistics resemble the image's.
    img = torch.stack(
        [0.6 * torch.sin(2 * math.pi * xx / 32), 0.5 * torch.cos(2 * math.pi * yy / 16), 0.3 * torch.sin(2 * math.pi * (xx + yy) / 32)]
    )[None]
    with torch.no_grad():
        mean, _ = vae.encode(img)
        t_mean, t_logvar = vae.encode(img, tile_size=64)
        ref_tiled = ref.encode(img).latent_dist.mean
        seams = torch.cat(
            [torch.cat([vae.encode(img[:, :, y : y + 64, x : x + 64])[0] for x in (0, 64)], dim=3) for y in (0, 64)], dim=2
        )
        whole, _ = vae.encode(img, tile_size=128)
    assert t_mean.shape == mean.shape == (1, 4, 16, 16)
    assert torch.equal(whole, mean)
    err = lambda t: ((t - mean).abs().mean() / mean.std()).item()  # noqa: E731
    assert err(t_mean) < 0.5
    assert err(t_mean) < err(ref_tiled) and err(t_mean) < err(seams), (err(t_mean), err(ref_tiled), err(seams))
    assert torch.isfinite(t_logvar).all()
    with pytest.raises(ValueError, match="tile_size"):
        vae.encode(img, tile_size=60)


@pytest.mark.parametrize("preset,scale,shift", [("sdxl", 0.13025, 0.0), ("sd3", 1.5305, 0.0609)])
def test_latent_scaling_constants(preset, scale, shift):
    """Analytic: CONVENTIONS.md constants, latents = (z - shift) * scale, and from_latents inverts it."""
    with torch.device("meta"):
        vae = AutoencoderKL(PRESETS[preset])
    z = torch.randn(2, vae.cfg.z_channels, 4, 4)
    assert torch.allclose(vae.to_latents(z), (z - shift) * scale)
    assert torch.allclose(vae.from_latents(vae.to_latents(z)), z, atol=1e-6)


def test_bf16_runs_and_tracks_fp32():
    """Analytic: the bf16 copy of the same weights gives outputs close to fp32 (bf16 has ~3 significant digits)."""
    vae = _random_vae(PRESETS["tiny16"])
    vae_bf16 = _random_vae(PRESETS["tiny16"]).to(torch.bfloat16)
    vae_bf16.load_state_dict(vae.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode(x)
        mean16, logvar16 = vae_bf16.encode(x)
        img16 = vae_bf16.decode(mean16)
    assert mean16.dtype == logvar16.dtype == img16.dtype == torch.bfloat16
    assert ((mean16.float() - mean).abs().max() / mean.abs().max()) < 0.05


def test_bad_input_shapes_are_explained():
    """Analytic: sizes that are not multiples of 8 or wrong channel counts raise a clear error."""
    vae = _random_vae(PRESETS["tiny"])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        vae.decode(torch.zeros(1, 16, 4, 4))
