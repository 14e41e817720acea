"""CLIP text encoders: key contract of the released files, parity with transformers / open_clip / diffusers."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from models.text_encoders import (
    IGNORABLE_KEYS,
    PRESETS,
    CLIPTextModel,
    OpenCLIPTextModel,
    config_from_shapes,
)

KEYS = os.path.join(os.path.dirname(__file__), "fixtures", "keys")
SOT, EOT = 49406, 49407
RTOL, ATOL = 1e-4, 1e-5


def _load_keys(name: str) -> dict:
    with open(os.path.join(KEYS, name)) as f:
        return json.load(f)


def _strip(shapes: dict, prefix: str, naming: str) -> dict[str, list[int]]:
    """Keys under `prefix` with the prefix removed and ignorable extras dropped."""
    out = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    assert out, f"no keys under {prefix}"
    return {k: v for k, v in out.items() if k not in IGNORABLE_KEYS[naming]}


# (fixture file, inner file for comfy, prefix, naming, expected config)
CONTRACTS = [
    ("sdxl_base.json", None, "conditioner.embedders.0.transformer.", "hf", PRESETS["clip_l"]),
    ("sdxl_base.json", None, "conditioner.embedders.1.model.", "open_clip", PRESETS["bigg"]),
    ("sd3_text_encoders.json", None, "text_encoders.clip_l.transformer.", "hf", PRESETS["clip_l"]),
    ("sd3_text_encoders.json", None, "text_encoders.clip_g.transformer.", "hf", PRESETS["clip_g"]),
    ("comfy_text_encoders.json", "clip_l.safetensors", "", "hf", dataclasses.replace(PRESETS["clip_l"], projection_dim=768)),
    ("comfy_text_encoders.json", "clip_g.safetensors", "", "hf", PRESETS["clip_g"]),
]


@pytest.mark.parametrize("fixture,inner,prefix,naming,expected", CONTRACTS, ids=lambda x: str(x)[:40])
def test_key_contract_full_size(fixture, inner, prefix, naming, expected) -> None:
    """Reference: exact key -> shape lists of the released checkpoints (tests/fixtures/keys); built on meta."""
    shapes = _load_keys(fixture)
    if inner is not None:
        shapes = shapes[inner]
    shapes = _strip(shapes, prefix, naming)
    cfg = config_from_shapes(shapes, naming)
    assert cfg == expected
    cls = CLIPTextModel if naming == "hf" else OpenCLIPTextModel
    with torch.device("meta"):
        model = cls(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == shapes
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(torch.Size(s).numel() for s in shapes.values())
    if prefix == "conditioner.embedders.0.transformer.":
        assert n_params == 123_060_480  # CONVENTIONS.md
    if prefix == "conditioner.embedders.1.model.":
        assert n_params == 694_659_840  # CONVENTIONS.md
    # Forward on the meta device gives the documented shapes.
    with torch.device("meta"):
        hidden, pooled = model(torch.zeros(2, 77, dtype=torch.long))
    assert hidden.shape == (2, 77, cfg.hidden_size)
    assert pooled.shape == (2, cfg.projection_dim or cfg.hidden_size)


def _input_ids(batch: int = 4, pad: int = EOT, seed: int = 0) -> torch.Tensor:
    """CLIP layouts of varied lengths: SOT + random ids + EOT + pad (incl. an empty and a full prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad, dtype=torch.long)
    for b, n in enumerate([0, 75, 10, 40][:batch]):
        ids[b, 0] = SOT
        ids[b, 1 : 1 + n] = torch.randint(0, SOT, (n,), generator=g)
        ids[b, 1 + n] = EOT
    return ids


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter so LayerNorm weights/biases and biases are not at their trivial init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_config(cfg, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.act,
        layer_norm_eps=1e-5,
        projection_dim=cfg.projection_dim or cfg.hidden_size,
        bos_token_id=SOT,
        eos_token_id=EOT,
        attn_implementation="eager",
        **kw,
    )


def _load_into_hf(hf_model: torch.nn.Module, state: dict) -> None:
    """Load HF-named weights; transformers 5's CLIPTextModel has no `text_model.` level (it renames on load)."""
    if not hasattr(hf_model, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)


@pytest.mark.parametrize("pad", [EOT, 0])
def test_clip_l_matches_transformers(pad: int) -> None:
    """Reference: transformers CLIPTextModel (eager attention, same tiny_l config); our HF-named state dict
    loaded with only the `text_model.` level removed (transformers 5 layout). Compares hidden_states[-2], hidden_states[0], last layer and pooler_output."""
    transformers = pytest.importorskip("transformers")
    model = _randomize(CLIPTextModel(PRESETS["tiny_l"]))
    hf = transformers.CLIPTextModel(_hf_config(model.cfg)).eval()
    _load_into_hf(hf, model.state_dict())
    ids = _input_ids(pad=pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        for layer in (-2, 0, -1):
            hidden, pooled = model(ids, layer=layer)
            torch.testing.assert_close(hidden, ref.hidden_states[layer], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(pooled, ref.pooler_output, rtol=RTOL, atol=ATOL)


def test_clip_g_hf_naming_matches_transformers_with_projection() -> None:
    """Reference: transformers CLIPTextModelWithProjection (SD3 / ComfyUI clip_g naming, GELU, bias-free
    text_projection Linear), our state dict loaded unchanged. Also project=False == unprojected EOT feature."""
    transformers = pytest.importorskip("transformers")
    model = _randomize(CLIPTextModel(PRESETS["tiny_g"]))
    hf = transformers.CLIPTextModelWithProjection(_hf_config(model.cfg)).eval()
    _load_into_hf(hf, model.state_dict())
    ids = _input_ids(pad=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        hidden, pooled = model(ids)
        _, unprojected = model(ids, project=False)
    torch.testing.assert_close(hidden, ref.hidden_states[-2], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pooled, ref.text_embeds, rtol=RTOL, atol=ATOL)
    eot = ids.argmax(-1)
    torch.testing.assert_close(unprojected, ref.last_hidden_state[torch.arange(4), eot], rtol=RTOL, atol=ATOL)


def _open_clip_text_transformer(cfg):
    transformer = pytest.importorskip("open_clip.transformer")
    return transformer.TextTransformer(
        context_length=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        width=cfg.hidden_size,
        heads=cfg.num_heads,
        layers=cfg.num_layers,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        output_dim=cfg.projection_dim,
        act_layer=torch.nn.GELU,
    ).eval()


@pytest.mark.parametrize("pad", [0, EOT])
def test_bigg_matches_open_clip(pad: int) -> None:
    """Reference: open_clip.transformer.TextTransformer (tiny_g config, nn.GELU, argmax pooling, [in, out]
    text_projection), our open_clip-named state dict loaded strictly. Compares the input of the last resblock
    (captured with a forward pre-hook) with hidden_states[-2], and the projected pooled output."""
    model = _randomize(OpenCLIPTextModel(PRESETS["tiny_g"]))
    ref = _open_clip_text_transformer(model.cfg)
    ref.load_state_dict(model.state_dict(), strict=True)
    captured = {}
    ref.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    ids = _input_ids(pad=pad)
    with torch.no_grad():
        ref_pooled = ref(ids)
        hidden, pooled = model(ids)
    torch.testing.assert_close(hidden, captured["x"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pooled, ref_pooled, rtol=RTOL, atol=ATOL)


def test_bigg_through_diffusers_single_file_conversion() -> None:
    """Reference: diffusers.loaders.single_file_utils.convert_open_clip_checkpoint (splits in_proj, transposes
    text_projection) into transformers CLIPTextModelWithProjection; compares hidden_states[-2] and text_embeds.
    Also checks our CLIPTextModel on the converted (HF-named) weights gives the same result."""
    transformers = pytest.importorskip("transformers")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    model = _randomize(OpenCLIPTextModel(PRESETS["tiny_g"]))
    prefix = "conditioner.embedders.1.model."
    checkpoint = {prefix + k: v for k, v in model.state_dict().items()}
    checkpoint[prefix + "logit_scale"] = torch.tensor(4.6)  # extra present in the real files
    hf = transformers.CLIPTextModelWithProjection(_hf_config(model.cfg)).eval()
    converted = sfu.convert_open_clip_checkpoint(hf, checkpoint, prefix=prefix)
    _load_into_hf(hf, converted)
    ours_hf = CLIPTextModel(PRESETS["tiny_g"]).eval()
    ours_hf.load_state_dict(converted, strict=True)
    ids = _input_ids(pad=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        for m in (model, ours_hf):
            hidden, pooled = m(ids)
            torch.testing.assert_close(hidden, ref.hidden_states[-2], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(pooled, ref.text_embeds, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,preset", [(CLIPTextModel, "tiny_l"), (OpenCLIPTextModel, "tiny_g")])
def test_half_precision_close_to_fp32(dtype, cls, preset) -> None:
    """Reference: the same model in fp32 (loose tolerance: the check is that half precision runs and agrees)."""
    model = _randomize(cls(PRESETS[preset]))
    ids = _input_ids()
    with torch.no_grad():
        h32, p32 = model(ids)
        h16, p16 = model.to(dtype)(ids)
    assert h16.dtype == dtype and p16.dtype == dtype
    torch.testing.assert_close(h16.float(), h32, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(p16.float(), p32, rtol=5e-2, atol=5e-2)


def test_no_position_ids_buffer_and_ignorables() -> None:
    """Analytic: position_ids is not in our state dict (files carry it as an ignorable extra)."""
    model = CLIPTextModel(PRESETS["tiny_l"])
    assert not any(k.endswith("position_ids") for k in model.state_dict())
    assert "text_model.embeddings.position_ids" in IGNORABLE_KEYS["hf"]
    assert "logit_scale" in IGNORABLE_KEYS["open_clip"]


def test_bad_inputs_give_clear_errors() -> None:
    """Analytic: wrong layer, too many tokens, wrong rank / dtype, prefixed keys, unknown naming or act."""
    model = CLIPTextModel(PRESETS["tiny_l"])
    ids = _input_ids()
    with pytest.raises(ValueError, match=r"allowed -3\.\.2"):
        model(ids, layer=3)
    with pytest.raises(ValueError, match="at most 77"):
        model(torch.zeros(1, 154, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 77))
    shapes = _load_keys("sdxl_base.json")
    with pytest.raises(ValueError, match="prefix"):
        config_from_shapes(shapes, "hf")
    with pytest.raises(ValueError, match="allowed"):
        config_from_shapes({}, "diffusers")
    with pytest.raises(ValueError, match="quick_gelu"):
        dataclasses.replace(PRESETS["tiny_l"], act="relu")
    # Explicit act / heads override the width-based defaults.
    l_shapes = _strip(shapes, "conditioner.embedders.0.transformer.", "hf")
    cfg = config_from_shapes(l_shapes, "hf", act="gelu", num_heads=6)
    assert (cfg.act, cfg.num_heads) == ("gelu", 6)
