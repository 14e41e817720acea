"""LoRA / LoCon (networks/lora.py): our kohya-format files against diffusers' kohya loader (SDXL UNet and both
text encoders), SD3 names against ComfyUI's key rule, merging, third-party (diffusers-named) files.

References: diffusers' `StableDiffusionXLLoraLoaderMixin.load_lora_weights` (its kohya converter
`_convert_non_diffusers_lora_to_diffusers` + peft) on the diffusers / transformers equivalents of our tiny parts,
built with diffusers' own single-file conversions; ComfyUI's `model_lora_keys_unet` rule, encoded below.
"""
from __future__ import annotations

import re

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


# ---------------------------------------------------------------- SD3: ComfyUI's key rule

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def _comfy_key_map(comp) -> dict[str, str]:
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip), over the file's keys:
    lora_unet_ + diffusion-model key without `.weight`, "." -> "_"; CLIP layers (HF naming) lora_te1_ (clip_l) /
    lora_te2_ (clip_g) + text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}."""
    sd = comp.export_state_dict()
    out = {}
    for k in sd:
        if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
            out["lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for te, prefix in (("clip_l", "lora_te1"), ("clip_g", "lora_te2")):
        for b in range(32):
            for c, short in LORA_CLIP_MAP.items():
                k = f"text_encoders.{te}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k in sd:
                    out[f"{prefix}_text_model_encoder_layers_{b}_{short}"] = k
    return out


def test_sd3_names_follow_comfyui_rule_and_merge_equals_applied():
    comp = models.build("sd3", "tiny", seed=0, parts=["mmdit", "clip_l", "clip_g"])
    net = lora.create_network(comp, _cfg(network_dim=2, network_alpha=4.0).network, unet=True, text=True)
    _randomize_adapters(net, seed=1)
    rule = _comfy_key_map(comp)
    sd = comp.export_state_dict()
    depth = comp.mmdit.cfg.depth
    for name, a in net.adapters.items():
        assert name in rule, name
        assert tuple(sd[rule[name]].shape) == tuple(a.weight_delta().shape), name
    expected = {f"lora_unet_joint_blocks_0_{s}_{m}" for s in ("context_block", "x_block")
                for m in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")}
    assert expected <= set(net.adapters)
    last = f"lora_unet_joint_blocks_{depth - 1}_context_block_"  # pre_only: qkv and its modulation only
    assert {n[len(last):] for n in net.adapters if n.startswith(last)} == {"attn_qkv", "adaLN_modulation_1"}
    # kohya's SD3 default (networks/lora_sd3.py: every Linear inside a SingleDiTBlock, i.e. a joint block's
    # context_block / x_block, adaLN_modulation included; the embedders and final layer only with emb_dims)
    kohya = {"lora_unet_" + p.replace(".", "_") for p, m in comp.mmdit.named_modules()
             if isinstance(m, nn.Linear) and re.match(r"joint_blocks\.\d+\.(context_block|x_block)\.", p)}
    assert {n for n in net.adapters if n.startswith("lora_unet_")} == kohya
    assert not any("embedder" in n or "final_layer" in n for n in net.adapters)
    assert any(n.startswith("lora_te1_") for n in net.adapters) and any(n.startswith("lora_te2_") for n in net.adapters)

    # merging the file into the weights gives the model with the LoRA applied
    g = torch.Generator().manual_seed(0)
    c = comp.mmdit.cfg
    x = torch.randn(1, c.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 8, c.context_in_dim, generator=g)
    y = torch.randn(1, c.adm_in_channels, generator=g)
    t = torch.tensor([0.6])
    comp.mmdit.eval()
    with torch.no_grad():
        base = comp.mmdit(x, t, context=ctx, y=y)
        net.apply_to()
        applied = comp.mmdit(x, t, context=ctx, y=y)
        net.remove()
        groups = {}
        for k, v in net.kohya_state_dict().items():
            name, _, leaf = k.partition(".")
            groups.setdefault(name, {})[leaf] = v
        assert lora.merge_into(comp, groups, 1.0) == len(groups)
        merged = comp.mmdit(x, t, context=ctx, y=y)
    assert _rel(applied, base) > 1e-3
    assert _rel(merged, applied) <= 1e-5


def test_sd3_kohya_keys_are_not_read_by_diffusers_sd3_loader(tmp_path):
    """diffusers has no kohya reader for SD3, so there is no diffusers oracle for our SD3 files (ComfyUI's rule above
    is the check). Where (diffusers 0.42, src/diffusers/loaders/): `SD3LoraLoaderMixin.lora_state_dict`
    (lora_pipeline.py) only fetches the file and drops `dora_scale` keys, where the SDXL mixin's sends files with
    `lora_unet_` / `lora_te*_` keys through `_convert_non_diffusers_lora_to_diffusers`; `load_lora_into_transformer`
    then calls `SD3Transformer2DModel.load_lora_adapter(prefix="transformer")` (peft.py), which keeps only keys
    starting with `transformer.` and warns "No LoRA keys associated to SD3Transformer2DModel found"; and
    lora_conversion_utils.py maps kohya `lora_unet_` names for the SD / SDXL UNet and Flux (`double_blocks`) only,
    nothing for `joint_blocks`. This test runs that path on our file and fails the day diffusers starts reading
    kohya SD3 keys (then compare outputs, as the SDXL test does)."""
    pytest.importorskip("peft")
    from diffusers.loaders import SD3LoraLoaderMixin
    from test_mmdit import _diffusers_model
    comp = models.build("sd3", "tiny", seed=0, parts=["mmdit"])
    net = lora.create_network(comp, _cfg(network_dim=2, network_alpha=4.0).network, unet=True, text=False)
    _randomize_adapters(net, seed=1)
    path = tmp_path / "sd3.safetensors"
    lora.save_lora(str(path), net.kohya_state_dict(), {"ss_network_module": "networks.lora"}, precision="fp32")
    sd = SD3LoraLoaderMixin.lora_state_dict(str(path))
    assert set(sd) == set(net.kohya_state_dict())  # read as is: no conversion of kohya names
    ref = _diffusers_model(comp.mmdit.cfg, comp.mmdit.state_dict())
    SD3LoraLoaderMixin.load_lora_into_transformer(sd, ref)
    assert not getattr(ref, "peft_config", None)  # no adapter was added: every key was filtered out


# ---------------------------------------------------------------- diffusers-named third-party files


def test_diffusers_named_sdxl_keys_map_back_to_sgm():
    """Every adaptable sgm layer (LoCon covers convs, embeddings too) -> diffusers' own kohya key conversion
    (_maybe_map_sgm_blocks_to_diffusers + _convert_unet_lora_key) -> a module of the diffusers UNet; our inverse
    maps that diffusers name back to the sgm name."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import lora_conversion_utils as lcu
    from test_unet_sdxl import _diffusers_config
    comp = models.build("sdxl", "tiny", parts=["unet"])
    cfg = comp.unet.cfg
    names = [n for n in lora.lora_targets(comp) if n.startswith("lora_unet_")]
    dcfg = _diffusers_config(cfg)
    dmodules = dict(UNet2DConditionModel(**dcfg).named_modules())

    class C:
        layers_per_block = cfg.num_res_blocks
    mapped = lcu._maybe_map_sgm_blocks_to_diffusers({f"{n}.lora_down.weight": n for n in names}, C())
    assert len(mapped) == len(names)
    for key, original in mapped.items():
        path = lcu._convert_unet_lora_key(key)[:-len(".lora_down.weight")].replace(".processor", "")
        if isinstance(dmodules.get(path), nn.ModuleList):  # old attn-processor naming `to_out_lora`: the Linear is .0
            path += ".0"
        assert isinstance(dmodules.get(path), (nn.Linear, nn.Conv2d)), (original, path)
        diffusers_name = "lora_unet_" + path.replace(".", "_")
        assert lora.sdxl_diffusers_to_sgm(diffusers_name, cfg.num_res_blocks, cfg.transformer_depth) == original


# ---------------------------------------------------------------- merging (tools.merge_lora)


def test_merge_lora_tool_adds_scaled_products_and_reloads(tmp_path):
    """merged == base + weight * alpha / dim * up @ down on every adapted layer (bigG q / k / v into their rows of
    in_proj_weight, LoCon 3x3 convs), every other tensor unchanged; the file reloads in ours and converts strictly
    in diffusers (UNet), whose output equals ours with the LoRA applied."""
    from safetensors.torch import load_file
    from tools import merge_lora
    comp = _sdxl()
    comp_full = models.build("sdxl", "tiny", seed=0)
    comp_full.unet, comp_full.te1, comp_full.te2 = comp.unet, comp.te1, comp.te2
    base_path, lora_path, out = tmp_path / "base.safetensors", tmp_path / "l.safetensors", tmp_path / "m.safetensors"
    models.save(comp_full, str(base_path), "fp32")
    net = lora.create_network(comp, _cfg(network_module="locon", network_dim=3, network_alpha=1.5, conv_dim=2,
                                         conv_alpha=2.0).network, unet=True, text=True)
    _randomize_adapters(net, seed=2)
    lora.save_lora(str(lora_path), net.kohya_state_dict(), {}, precision="fp32")
    assert merge_lora.main([str(base_path), f"{lora_path}:0.5", "--out", str(out), "--precision", "fp32"]) == 0

    base, merged = load_file(str(base_path)), load_file(str(out))
    assert base.keys() == merged.keys()
    targets = lora.lora_targets(comp)
    changed = set()
    for name, a in net.adapters.items():
        t = targets[name]
        prefix = models.sdxl.PREFIX[t.part]
        path = next(p for p, m in getattr(comp, t.part).named_modules() if m is t.module)
        key = f"{prefix}{path}.{'in_proj_weight' if t.slot is not None else 'weight'}"
        up, down = a.lora_up.weight.flatten(1), a.lora_down.weight
        delta = 0.5 * (a.alpha / a.dim) * (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        rows = slice(None) if t.slot is None else slice(t.slot * up.shape[0], (t.slot + 1) * up.shape[0])
        torch.testing.assert_close(merged[key][rows], base[key][rows] + delta.reshape(base[key][rows].shape),
                                   rtol=1e-5, atol=1e-6)
        changed.add(key)
    assert any("in_layers" in k for k in changed) and any("in_proj_weight" in k for k in changed)
    for k in base.keys() - changed:
        assert torch.equal(base[k], merged[k]), k

    again = models.load(str(out))  # ours: strict load of every part
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_unet_sdxl import _diffusers_config, _inputs, _sgm_y
    dcfg = _diffusers_config(comp.unet.cfg)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(merged, dcfg), strict=True)
    x, t, context, pooled, time_ids = _inputs(comp.unet.cfg)
    net.set_multiplier(0.5)
    net.apply_to()
    with torch.no_grad():
        applied = comp.unet(x, t, context, _sgm_y(pooled, time_ids))
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        reloaded = again.unet.eval()(x, t, context, _sgm_y(pooled, time_ids))
    assert _rel(expected, applied) <= 1e-5 and _rel(reloaded, applied) <= 1e-5
    # a LoRA for another model is one clear error
    with pytest.raises(SystemExit, match="merge_lora: .*none of its"):
        other = models.build("sd3", "tiny", parts=["mmdit"])
        net3 = lora.create_network(other, _cfg().network, unet=True, text=False)
        lora.save_lora(str(tmp_path / "sd3.safetensors"), net3.kohya_state_dict(), {}, "fp32")
        merge_lora.main([str(base_path), str(tmp_path / "sd3.safetensors"), "--out", str(tmp_path / "x.safetensors")])


def test_dropout_masks_follow_the_run_and_are_replayed_by_gradient_checkpointing():
    """train.py's LoRA runs draw dropout masks inside `_own_dropout_rng`'s forked, seeded generators: the same
    gradients with and without gradient checkpointing (the recomputed forward draws the same masks), another
    position in the run gives other masks, and module dropout skips the same adapters for the same position."""
    from types import SimpleNamespace
    from torch.utils.checkpoint import checkpoint
    lin = nn.Linear(8, 8)
    adapters = {f"a{i}": lora.LoRAModule(8, 8, 4, 4.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
                for i in range(8)}
    with torch.no_grad():
        for a in adapters.values():
            a.lora_up.weight.normal_()
    net = lora.LoRANetwork({"a0": adapters["a0"]}, {"a0": lora.Target("unet", lin)}).apply_to().train()
    net.adapters["a0"].module_dropout = 0.0  # the adapter under test always runs

    class Trainee(nn.Module):
        ckpt = False

        def forward(self, x):
            return checkpoint(lin, x, use_reentrant=False) if self.ckpt else lin(x)
    trainee = Trainee()
    run = SimpleNamespace(cfg=SimpleNamespace(seed=0), forwards=0, network=net)
    lora._own_dropout_rng(trainee, run, 0, torch.device("cpu"))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def grad(at: int, ckpt: bool) -> torch.Tensor:
        trainee.ckpt, run.forwards = ckpt, at
        trainee(x).square().sum().backward()
        g = net.adapters["a0"].lora_up.weight.grad.clone()
        net.zero_grad()
        return g
    assert torch.equal(grad(0, False), grad(0, True))
    assert not torch.equal(grad(0, False), grad(1, False))  # the masks are on and move with the run
    state = torch.get_rng_state()
    grad(3, False)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left as it was
    many = lora.LoRANetwork(adapters, {n: lora.Target("unet", lin) for n in adapters})
    picks = []
    for _ in range(2):
        many.drop_modules(torch.Generator().manual_seed(7))
        picks.append([a.skipped for a in adapters.values()])
    assert picks[0] == picks[1] and 0 < sum(picks[0]) < len(adapters)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_adapters_whose_output_never_reaches_the_loss_are_frozen(family):
    """Issue #23 item 3. SDXL conditions on CLIP-L's penultimate layer and bigG's penultimate layer + pooled output
    (sgm `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)` / `FrozenOpenCLIPEmbedder2(layer="penultimate")`, whose
    pooled output comes from the last layer): the adapters of CLIP-L's last layer get no gradient. SD3 uses both CLIPs'
    pooled outputs (sd3.5 `sd3_impls.SD3Inferencer.get_cond`), so nothing is dead. One real training forward of
    train.py's Trainee: the parameters without a gradient are exactly the frozen ones (so DDP, which reduces only
    parameters that require a gradient, waits for none), and the optimizer groups leave them out."""
    from training import trainable
    from core.config import config_from_dict
    cfg = config_from_dict({"model": {"model_family": family, "model_preset": "tiny"},
                            "network": {"network_module": "lora", "network_dim": 2}})
    comp = models.build(family, "tiny", seed=0, parts=[models.family(family).network, *models.family(family).text_encoders])
    run = trainable.make_trainable(cfg, comp, torch.device("cpu"), print)
    net = run.network
    if family == "sdxl":
        last = comp.te1.cfg.num_layers - 1
        assert run.frozen == sorted(n for n in net.adapters if n.startswith(f"lora_te1_text_model_encoder_layers_{last}_"))
        assert len(run.frozen) == 6 and not run.find_unused
    else:
        assert run.frozen == []
    frozen = {id(p) for n in run.frozen for p in net.adapters[n].parameters()}
    assert all(p.requires_grad == (id(p) not in frozen) for p in net.parameters())
    grouped = {id(p) for g in run.param_groups(cfg.optimizer) for p in g["params"]}
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}

    with torch.no_grad():  # lora_up off zero so every path carries a gradient to lora_down too
        for a in net.adapters.values():
            a.lora_up.weight.normal_(std=0.1)
    c = comp.network.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, 32, 32, generator=g)
    t = torch.tensor([500.0, 20.0]) if family == "sdxl" else torch.tensor([0.3, 0.9])
    sizes = tuple(torch.tensor([[32.0, 32.0]] * 2) for _ in range(3))
    run.trainee(x, t, None, ["a red circle", "a blue square, simple background"], sizes).square().mean().backward()
    no_grad = {id(p) for p in net.parameters() if p.grad is None}
    assert no_grad == frozen


# ModelSpec 1.0.0 (Stability-AI/ModelSpec README): MUST keys, and the SHOULD keys a trainer fills
MODELSPEC_MUST = ("sai_model_spec", "architecture", "implementation", "title")
MODELSPEC_SHOULD = ("description", "author", "date", "hash_sha256", "resolution")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_files_carry_full_modelspec(family, tmp_path):
    """Issue #25 items 11-12: kohya's build_metadata(lora=True) (library/sai_model_spec.py) writes every ModelSpec
    key of the base model with "/lora" appended to the architecture; [save] metadata_* fill the descriptive keys;
    hash_sha256 covers the tensors as written (kohya's precalculate_safetensors_hashes); SD3 LoRAs name the base's
    own architecture (SD3.5 too) and kohya's ss_base_model_version (the MMDiT's model_type)."""
    import datetime
    import hashlib
    from types import SimpleNamespace

    from core.config import config_from_dict
    from safetensors import safe_open
    cfg = config_from_dict({"model": {"model_preset": "tiny"}, "data": {"resolution": [96, 64]},
                            "network": {"network_module": "lora", "network_dim": 2},
                            "save": {"metadata_title": "My LoRA", "metadata_author": "someone",
                                     "metadata_description": "a test", "metadata_license": "CC-BY-4.0",
                                     "metadata_tags": "a,b"}})
    parts = ["unet"] if family == "sdxl" else ["mmdit"]
    comp = models.build(family, "tiny", seed=0, parts=parts)
    net = lora.create_network(comp, cfg.network, unet=True, text=False)
    path = tmp_path / "x.safetensors"
    written = lora.as_written(net.kohya_state_dict(), "fp16")
    lora.save_lora(str(path), net.kohya_state_dict(), lora.ss_metadata(cfg, comp, net, {}, written, str(path)), "fp16")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        h = hashlib.sha256()
        for k in written:  # kohya: sha256 over each tensor's bytes in state-dict order
            h.update(f.get_tensor(k).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for k in MODELSPEC_MUST + MODELSPEC_SHOULD:
        assert meta.get(f"modelspec.{k}"), k
    spec = comp.modelspec()
    assert meta["modelspec.architecture"] == spec["architecture"] + "/lora"
    assert meta["modelspec.implementation"] == spec["implementation"]
    assert meta["modelspec.prediction_type"] == spec["prediction_type"]
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.license"], meta["modelspec.tags"]) == \
        ("My LoRA", "someone", "CC-BY-4.0", "a,b")
    assert meta["modelspec.resolution"] == "96x64" and meta["modelspec.hash_sha256"] == "0x" + h.hexdigest()
    datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert meta["ss_base_model_version"] == {"sdxl": "sdxl_base_v1-0", "sd3": "medium"}[family]
    # SD3.5: the base's architecture (as our full exports name it) and kohya's model_type
    for arch, version in (("stable-diffusion-v3.5-large", "5-large"), ("stable-diffusion-v3.5-medium", "5-medium")):
        other = SimpleNamespace(family="sd3", modelspec=lambda arch=arch: {**spec, "architecture": arch})
        m = lora.ss_metadata(cfg, other, net, {})
        assert (m["modelspec.architecture"], m["ss_base_model_version"]) == (arch + "/lora", version)


def test_clip_skip_picks_the_hidden_layer_and_which_adapters_train(tmp_path):
    """Issue #25 item 16 with #23 item 3: `model.clip_skip = N` conditions on hidden_states[-N] of both CLIPs (no final
    LN), as ComfyUI's CLIPSetLastLayer(-N) does for SDXL (`comfy/sd1_clip.py` SDClipModel.clip_layer: layer "hidden",
    layer_idx -N; SDXL's CLIPs keep layer_norm_hidden_state off), checked against transformers' hidden_states; kohya
    ignores clip_skip for SDXL / SD3 (library/sdxl_train_util.py: a warning). With clip_skip = 1 every CLIP adapter
    reaches the loss, so none is frozen; the LoRA file records ss_clip_skip and modelspec.encoder_layer as kohya
    writes them. A clip_skip beyond the encoders' depth is one clear error."""
    transformers = pytest.importorskip("transformers")
    from training import trainable
    from core.config import config_from_dict
    from test_text_encoders import _hf_config, _load_into_hf
    cfg = config_from_dict({"model": {"model_preset": "tiny", "clip_skip": 1},
                            "network": {"network_module": "lora", "network_dim": 2}})
    comp = models.from_config(cfg.model, parts=["unet", "te1", "te2"])
    assert comp.clip_skip == 1
    ids = _ids()
    hf = transformers.CLIPTextModel(_hf_config(comp.te1.cfg)).eval()
    _load_into_hf(hf, comp.te1.state_dict())
    with torch.no_grad():
        ctx = comp.encode_tokens(ids, ids)["context"]
        ref = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert _rel(ctx[..., :ref.shape[-1]], ref) < 1e-5
    run = trainable.make_trainable(cfg, comp, torch.device("cpu"), print)
    assert run.frozen == [] and any(n.startswith("lora_te1_text_model_encoder_layers_1_") for n in run.network.adapters)
    meta = lora.ss_metadata(cfg, comp, run.network, {})
    assert (meta["ss_clip_skip"], meta["modelspec.encoder_layer"]) == ("1", "1")
    default = config_from_dict({"model": {"model_preset": "tiny"}, "network": {"network_module": "lora"}})
    assert models.from_config(default.model, parts=["te1", "te2"]).clip_skip == 2
    assert lora.ss_metadata(default, comp, run.network, {})["ss_clip_skip"] == "None"
    # the cache of text-encoder outputs depends on it (the default keeps existing caches' identity)
    ident = {n: models.load_text_encoders(config_from_dict({"model": {"model_preset": "tiny", **k}}).model).identity
             for n, k in (("unset", {}), ("2", {"clip_skip": 2}), ("1", {"clip_skip": 1}))}
    assert ident["unset"] == ident["2"] != ident["1"]
    with pytest.raises(models.CheckpointError, match="clip_skip = 3: the text encoders have 2 layers"):
        models.from_config(config_from_dict({"model": {"model_preset": "tiny", "clip_skip": 3}}).model, parts=["te1"])
