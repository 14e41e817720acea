"""LoHa, LoKr and DoRA (networks/lycoris.py) against the LyCORIS package (`lycoris-lora`, the implementation kohya and
SimpleTuner call), which is the oracle here: its own modules (`lycoris.modules.{loha,lokr,locon}`) built on the same
base layers, their forward compared with ours; its `LycorisNetwork.save_weights` files read, merged and continued by
us; our files read back by its `create_lycoris_from_weights` with every tensor used.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from networks import lora
from networks import lycoris as ly

lyc = pytest.importorskip("lycoris")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_factorization_matches_lycoris():
    from lycoris.functional.general import factorization
    for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
        for dim in range(1, 1300):
            assert ly.factorization(dim, factor) == factorization(dim, factor), (dim, factor)


# (algorithm, base layer, package kwargs): the package's options as kohya passes them (network_args)
CASES = {
    "loha-linear": ("loha", "linear", {}),
    "loha-conv3x3": ("loha", "conv", {}),
    "loha-conv-tucker(file)": ("loha", "conv", {"use_tucker": True}),
    "loha-dora": ("loha", "linear", {"weight_decompose": True}),
    "lokr-linear": ("lokr", "linear", {}),
    "lokr-factor4": ("lokr", "linear", {"factor": 4}),
    "lokr-decompose-both": ("lokr", "linear", {"decompose_both": True, "factor": 8}),
    "lokr-full-matrix": ("lokr", "linear", {"full_matrix": True}),
    "lokr-conv3x3": ("lokr", "conv", {"factor": 4}),
    "lokr-conv-tucker(file)": ("lokr", "conv", {"factor": 4, "use_tucker": True}),
    "lokr-dora": ("lokr", "linear", {"weight_decompose": True}),
    "lora-dora": ("lora", "linear", {"weight_decompose": True}),
    "locon-dora-conv": ("lora", "conv", {"weight_decompose": True}),
}


def _package_module(algo, kind, kw, seed):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.locon import LoConModule
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(64, 96) if kind == "linear" else nn.Conv2d(32, 48, 3, padding=1)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    cls = {"loha": LohaModule, "lokr": LokrModule, "lora": LoConModule}[algo]
    m = cls("lycoris_x", base, 1.0, 4, 2.0, **kw)
    with torch.no_grad():  # every tensor off its init (lokr_w2 / hada_w2_a / lora_up start at zero)
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "dora_scale" else 0.0))
    x = torch.randn(2, 7, 64, generator=g) if kind == "linear" else torch.randn(2, 32, 9, 9, generator=g)
    return base, m, x


def _file_group(m) -> dict[str, torch.Tensor]:
    """The tensors the package writes for one layer (LycorisNetwork.save_weights: the module's state_dict)."""
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k in ly.ALL_KEYS}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_equals_the_package_forward(case, seed):
    """The layer output with the file's change merged (`group_delta`, what merging and generate.py use) equals the
    package module's forward within fp32 rounding; our trainable module of the same configuration has the package's
    tensor names and shapes and, loaded with its tensors, gives the same forward."""
    algo, kind, kw = CASES[case]
    base, m, x = _package_module(algo, kind, kw, seed)
    w = base.weight.detach().clone()
    g = _file_group(m)
    m.apply_to()
    with torch.no_grad():
        expected = base(x)  # the package's forward (base layer patched by apply_to)
        op = F.linear if kind == "linear" else (lambda x, w, b: F.conv2d(x, w, b, padding=1))
        merged = op(x, w + ly.group_delta(g, w), base.bias)
        assert _rel(merged, expected) < 1e-5, _rel(merged, expected)
    if "file" in case:
        return  # Tucker layouts are read, not trained here
    shape = tuple(w.shape)
    conv = ((3, 3), 1, 1) if kind == "conv" else None
    dora = ly.dora_magnitude(w) if kw.get("weight_decompose") else None
    if algo == "loha":
        ours = ly.LoHaModule(shape, 4, 2.0, conv, dora=dora)
    elif algo == "lokr":
        ours = ly.LoKrModule(shape, 4, 2.0, conv, dora=dora, factor=kw.get("factor", -1),
                             decompose_both=kw.get("decompose_both", False), full_matrix=kw.get("full_matrix", False))
    else:
        ours = lora.LoRAModule(shape[0], shape[1], 4, 2.0, conv, dora=dora)
    mine = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in g.items()}
    ours.load_state_dict(g)
    if isinstance(ours, lora.LoRAModule):
        ours.scale = float(ours.alpha) / ours.dim
    with torch.no_grad():
        out = op(x, w, base.bias) + ours(x, w)
    assert _rel(out, expected) < 1e-5, _rel(out, expected)


def test_lokr_shapes_and_scale_follow_lycoris_on_real_sizes():
    """LoKr's split and which halves are factorised, on SDXL's real layer sizes (meta-free: shapes only)."""
    from lycoris.modules.lokr import LokrModule
    for out_dim, in_dim in ((640, 640), (1280, 2048), (5120, 1280), (320, 768), (10240, 1280)):
        for dim, kw in ((8, {}), (16, {"factor": 8}), (4, {"decompose_both": True, "factor": 16}),
                        (8, {"full_matrix": True})):
            ref = LokrModule("x", nn.Linear(in_dim, out_dim, bias=False), 1.0, dim, 4.0, **kw)
            ours = ly.LoKrModule((out_dim, in_dim), dim, 4.0, factor=kw.get("factor", -1),
                                 decompose_both=kw.get("decompose_both", False), full_matrix=kw.get("full_matrix", False))
            got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
            want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k in ly.ALL_KEYS}
            assert got == want, (out_dim, in_dim, dim, kw)
            assert ours.scale == pytest.approx(ref.scale) and float(ours.alpha) == float(ref.alpha)


def _cfg(**kw):
    from core.config import config_from_dict
    return config_from_dict({"model": {"model_preset": "tiny"}, "network": {"network_dim": 4, "network_alpha": 2.0,
                                                                            **kw}})


NETWORKS = {"loha": {"network_module": "loha"}, "lokr": {"network_module": "lokr", "factor": 4},
            "dora": {"network_module": "locon", "dora_wd": True}}


@pytest.fixture
def lycoris_prefix():
    """LycorisNetwork keeps its naming as class state (presets): set per part, restored after."""
    from lycoris.wrapper import LycorisNetwork
    saved = {k: getattr(LycorisNetwork, k) for k in ("LORA_PREFIX", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME",
                                                      "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH",
                                                      "TARGET_EXCLUDE_NAME", "ENABLE_CONV")}
    yield LycorisNetwork
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


@torch.no_grad()
def _same_output(m, delta):
    """The package module's forward (its base layer patched) equals the base layer run with W + delta."""
    base = m.org_module[0]
    g = torch.Generator().manual_seed(5)
    w = base.weight.detach()
    if isinstance(base, nn.Conv2d):
        x = torch.randn(2, base.in_channels, 8, 8, generator=g)
        ours = F.conv2d(x, w + delta.reshape(w.shape), base.bias, base.stride, base.padding)
    else:
        x = torch.randn(2, 3, base.in_features, generator=g)
        ours = F.linear(x, w + delta.reshape(w.shape), base.bias)
    assert _rel(ours, m(x)) < 1e-5, (m.lora_name, _rel(ours, m(x)))


def _comp():
    comp = models.build("sdxl", "tiny", seed=0, parts=["unet", "te1"])
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return comp


@pytest.mark.parametrize("name", list(NETWORKS))
def test_package_files_load_merge_and_continue_here(name, tmp_path, lycoris_prefix):
    """A file the package writes (LycorisNetwork on our UNet and CLIP-L, kohya's prefixes, the layers our defaults
    adapt, `save_weights`) is read with every tensor used, merges to the package's merged weights, and continues
    training here (`network_weights` with the same settings)."""
    from lycoris.wrapper import create_lycoris
    from safetensors.torch import load_file, save_file
    comp = _comp()
    ncfg = _cfg(**NETWORKS[name]).network
    ours = lora.create_network(comp, ncfg, unet=True, text=True)
    targets = lora.lora_targets(comp)
    algo = {"dora": "locon"}.get(name, name)
    kw = {"factor": 4} if name == "lokr" else {}
    sd = {}
    for part, prefix in (("unet", "lora_unet"), ("te1", "lora_te1")):
        model = getattr(comp, part)
        paths = {n: p for p, _ in model.named_modules() for n in [f"{prefix}_{p.replace('.', '_')}"] if n in ours.adapters}
        lycoris_prefix.apply_preset({"target_module": [], "target_name": ["^" + re.escape(p) + "$" for p in paths.values()],
                                     "lora_prefix": prefix})
        net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, algo=algo,
                             dora_wd=name == "dora", warn_on_unmatched=False, **kw)
        net.apply_to()  # registers the modules (and patches the layers' forwards, unused here)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pn, p in net.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if "dora_scale" in pn else 0))
        path = tmp_path / f"{part}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        part_sd = load_file(str(path))
        sd.update(part_sd)
        if part == "unet":
            modules = {m.lora_name: m for m in net.loras}
    save_file(sd, str(tmp_path / "package.safetensors"))
    groups = lora.read_lora(str(tmp_path / "package.safetensors"), comp)
    assert set(groups) == set(ours.adapters)  # every layer of the file, and only those, is one of ours
    for n, m in modules.items():  # the package module's forward = the layer with our merged change
        _same_output(m, ly.group_delta(groups[n], targets[n].weight.detach()))
    # continue: the same settings take every tensor of the file
    ours.load_kohya(groups, "package.safetensors")
    mine = ours.kohya_state_dict()
    assert set(mine) == set(sd) and all(torch.equal(mine[k].float(), sd[k].float()) for k in sd)
    before = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    base_path = tmp_path / "base.safetensors"
    models.save(comp, str(base_path), "fp32")
    assert lora.merge_into(comp, groups) == len(groups)
    assert any(not torch.equal(before[k], v) for k, v in comp.unet.state_dict().items())
    # the merge tool (and generate.py, through the same merge_files) on the package's file: the same weights
    from tools import merge_lora
    merge_lora.main([str(base_path), str(tmp_path / "package.safetensors"), "--out", str(tmp_path / "m.safetensors"),
                     "--precision", "fp32"])
    merged = models.load(str(tmp_path / "m.safetensors"))
    assert all(torch.allclose(v, merged.unet.state_dict()[k], atol=1e-6) for k, v in comp.unet.state_dict().items())


@pytest.mark.parametrize("name", list(NETWORKS))
def test_our_files_load_in_the_package_with_every_key_used(name, tmp_path, lycoris_prefix):
    """Our exported file, read by the package's `create_lycoris_from_weights` per part (kohya's prefixes): one
    package module per layer, every tensor loaded (strict), the same merged weights."""
    from lycoris.wrapper import create_lycoris_from_weights
    from safetensors.torch import load_file
    comp = _comp()
    ours = lora.create_network(comp, _cfg(**NETWORKS[name]).network, unet=True, text=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pn, p in ours.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if "dora_scale" in pn else 0))
    path = tmp_path / "ours.safetensors"
    lora.save_lora(str(path), ours.kohya_state_dict(), {}, "fp32")
    sd = load_file(str(path))
    targets = lora.lora_targets(comp)
    used = 0
    for part, prefix in (("unet", "lora_unet"), ("te1", "lora_te1")):
        lycoris_prefix.LORA_PREFIX = prefix
        part_sd = {k: v for k, v in sd.items() if k.startswith(prefix + "_")}
        net, _ = create_lycoris_from_weights(1.0, "", getattr(comp, part), weights_sd=part_sd)
        assert {m.lora_name for m in net.loras} == {k.split(".")[0] for k in part_sd}
        for m in net.loras:
            keys = {k.split(".", 1)[1]: v for k, v in part_sd.items() if k.split(".")[0] == m.lora_name}
            m.load_state_dict(keys, strict=False)
            state = {k for k in m.state_dict() if k in ly.ALL_KEYS}
            assert state == set(keys), m.lora_name  # every tensor of the layer has its place in the package module
            used += len(keys)
            m.apply_to()
            _same_output(m, ours.adapters[m.lora_name].weight_delta(targets[m.lora_name].weight))
    assert used == len(sd)


def test_any_kohya_or_lycoris_file_continues(tmp_path):
    """Issue #25 item 13: `network_weights` takes the file's own layers, algorithms, ranks, alphas, LoKr split and
    DoRA magnitude, whatever [network] says (kohya's / LyCORIS's create_network_from_weights build the network from
    the file the same way): a file with a subset of layers, mixed ranks (kohya's type_dims), a LoKr layer with another
    factor, a LoHa layer and a DoRA layer continues with every tensor used, and exporting at once gives the file back."""
    from training import trainable
    from core.config import config_from_dict
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    comp = models.build("sdxl", "tiny", seed=0, parts=["unet", "te1", "te2"])
    targets = lora.lora_targets(comp)
    g = torch.Generator().manual_seed(4)
    names = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("lora", 4),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2": ("lora", 2),
             "lora_unet_output_blocks_2_0_in_layers_2": ("lora", 3),  # a 3x3 LoCon conv
             "lora_unet_middle_block_1_proj_in": ("lokr", 4),
             "lora_unet_middle_block_1_proj_out": ("loha", 2),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1": ("dora", 2),
             "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": ("lora", 2)}
    sd = {}
    for name, (algo, dim) in names.items():
        t = targets[name]
        w = t.weight if t.slot is None else t.weight[t.slot * t.shape[1]:(t.slot + 1) * t.shape[1]]
        if algo == "lokr":
            m = LokrModule(name, torch.nn.Linear(t.shape[1], t.shape[0]), 1.0, dim, 3.0, factor=2)
            layer = {k: v for k, v in m.state_dict().items() if k in ly.ALL_KEYS}
        elif algo == "loha":
            m = LohaModule(name, torch.nn.Linear(t.shape[1], t.shape[0]), 1.0, dim, 3.0)
            layer = {k: v for k, v in m.state_dict().items() if k in ly.ALL_KEYS}
        else:
            conv = t.conv
            down_shape = (dim, t.shape[1], *(t.module.kernel_size if conv else ()))
            up_shape = (t.shape[0], dim, *((1, 1) if conv else ()))
            layer = {"lora_down.weight": torch.randn(down_shape, generator=g), "lora_up.weight": torch.randn(up_shape, generator=g),
                     "alpha": torch.tensor(float(dim) / 2)}
            if algo == "dora":
                layer["dora_scale"] = ly.dora_magnitude(w) * 1.1
        for k, v in layer.items():
            sd[f"{name}.{k}"] = (v + 0.01 * torch.randn(v.shape, generator=g)) if v.dim() else v
    path = tmp_path / "kohya.safetensors"
    lora.save_lora(str(path), sd, {}, "fp32")
    cfg = config_from_dict({"model": {"model_preset": "tiny"},
                            "network": {"network_module": "lora", "network_dim": 16, "network_weights": str(path)}})
    warnings = []
    run = trainable.make_trainable(cfg, comp, torch.device("cpu"), warnings.append)
    assert set(run.network.adapters) == set(names)
    assert {n: a.algo for n, a in run.network.adapters.items()} == {n: {"dora": "lora"}.get(a, a) for n, (a, _) in names.items()}
    out = run.network.kohya_state_dict()
    assert out.keys() == sd.keys() and all(torch.equal(out[k].float(), sd[k].float()) for k in sd)
    with torch.no_grad():  # and the continued network applies exactly what merging the file does
        for name, a in run.network.adapters.items():
            t = targets[name]
            w = t.weight if t.slot is None else t.weight[t.slot * t.shape[1]:(t.slot + 1) * t.shape[1]]
            layer = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == name}
            assert torch.allclose(a.weight_delta(w), ly.group_delta(layer, w), atol=1e-6), name


@pytest.mark.parametrize("name", ["lokr", "loha", "dora"])
def test_sd3_adapters_apply_as_they_merge_and_train(name):
    """SD3 (MMDiT + CLIP-L / CLIP-G): the network applied in the forward equals the base with the exported file
    merged, and one training step reaches every adapter while the base stays bit-identical."""
    from training import trainable
    from core.config import config_from_dict
    cfg = config_from_dict({"model": {"model_family": "sd3", "model_preset": "tiny"},
                            "network": {"network_dim": 4, "network_alpha": 2.0, **NETWORKS[name]}})
    comp = models.build("sd3", "tiny", seed=0, parts=["mmdit", "clip_l", "clip_g", "t5"])
    base = {k: v.clone() for k, v in comp.prefixed_state_dict().items()}
    run = trainable.make_trainable(cfg, comp, torch.device("cpu"), print)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    c = comp.mmdit.cfg
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    sizes = (None, None, None)
    caps = ["a red circle", "a blue square"]
    out = run.trainee(x, t, None, caps, sizes)
    out.square().mean().backward()
    assert all(p.grad is not None for p in run.network.parameters())
    assert all(torch.equal(base[k], v) for k, v in comp.prefixed_state_dict().items())
    run.network.eval()
    with torch.no_grad():
        applied = run.trainee(x, t, None, caps, sizes)
        sd = run.network.kohya_state_dict()
        run.network.remove()
        groups = {}
        for k, v in sd.items():
            n, _, leaf = k.partition(".")
            groups.setdefault(n, {})[leaf] = v.detach()
        assert lora.merge_into(comp, groups) == len(groups)
        merged = run.trainee(x, t, None, caps, sizes)
    assert _rel(merged, applied) < 1e-4, _rel(merged, applied)
