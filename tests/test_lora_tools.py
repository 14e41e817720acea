"""tools/lora.py: resize equals the best rank-r approximation of each layer's product (Eckart-Young, checked against
torch.linalg.svd of the delta), kohya's dynamic rank rules (networks/resize_lora.py index_sv_*, encoded below from
its code) with the kept fractions; extract recovers a planted low-rank difference; info and merge through the CLI."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import models
from networks import lora
from networks.lycoris import group_delta
from tools import lora as tools


def _net(comp, dim=8, **kw):
    from core.config import config_from_dict
    cfg = config_from_dict({"model": {"model_preset": "tiny"}, "network": {"network_module": "locon", "network_dim": dim,
                                                                           "network_alpha": 4.0, **kw}})
    net = lora.create_network(comp, cfg.network, unet=True, text=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _groups(sd):
    out = {}
    for k, v in sd.items():
        name, _, leaf = k.partition(".")
        out.setdefault(name, {})[leaf] = v
    return out


@pytest.mark.parametrize("r", [1, 3])
def test_resize_is_the_best_rank_r_approximation(r):
    comp = models.build("sdxl", "tiny", seed=0, parts=["unet", "te1", "te2"])
    groups = _groups(_net(comp).kohya_state_dict())
    sd, kept = tools.resize(groups, r)
    new = _groups(sd)
    assert new.keys() == groups.keys()
    for name, g in groups.items():
        shape = (g["lora_up.weight"].shape[0], *g["lora_down.weight"].shape[1:])
        before = group_delta(g, torch.zeros(shape)).flatten(1)
        U, S, Vh = torch.linalg.svd(before.double(), full_matrices=False)  # float64: the reference's own error
        best = ((U[:, :r] * S[:r]) @ Vh[:r]).float()
        after = group_delta(new[name], torch.zeros(shape)).flatten(1)
        assert new[name]["lora_down.weight"].shape[0] == min(r, *before.shape)
        assert torch.allclose(after, best, atol=1e-5 * best.abs().max()), name
        # alpha / dim kept: the scale of the layer does not change
        assert float(new[name]["alpha"]) / new[name]["lora_down.weight"].shape[0] == pytest.approx(float(g["alpha"]) / 8)
    assert 0 < kept["fro"] < 1 and kept["sum"] <= kept["fro"] + 1e-6  # sum(S) falls faster than the Frobenius norm


def _kohya_index(S, method, target):
    """kohya networks/resize_lora.py index_sv_ratio / index_sv_cumulative / index_sv_fro, then rank_resize's + 1."""
    if method == "sv_ratio":
        index = int(torch.sum(S > S[0] / target).item())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(S, dim=0) / float(torch.sum(S)), target)) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(S.pow(2), dim=0) / float(torch.sum(S.pow(2))), target ** 2)) + 1
    return max(1, min(index, len(S) - 1)) + 1


@pytest.mark.parametrize("method,param", [("sv_ratio", 2.0), ("sv_ratio", 8.0), ("sv_cumulative", 0.5),
                                          ("sv_cumulative", 0.9), ("sv_fro", 0.7), ("sv_fro", 0.95)])
def test_dynamic_ranks_follow_kohyas_rules(method, param):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        S = torch.sort(torch.rand(12, generator=g) ** 3, descending=True).values
        assert tools.kohya_rank(S, 10, method, param) == min(_kohya_index(S, method, param), 10)
    assert tools.kohya_rank(torch.zeros(6), 4, method, param) == 1  # a zero layer keeps rank 1


def test_extract_recovers_a_planted_low_rank_difference(tmp_path):
    base = models.build("sdxl", "tiny", seed=0)
    tuned = models.build("sdxl", "tiny", seed=0)
    targets = lora.lora_targets(tuned)
    g = torch.Generator().manual_seed(3)
    planted = {}
    with torch.no_grad():
        for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_output_blocks_2_0_in_layers_2",  # a 3x3 conv (LoCon)
                     "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",  # bigG's fused k rows
                     "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
            t = targets[name]
            out, cols = t.shape[0], t.weight[0].numel() if t.slot is None else t.shape[1]
            d = (torch.randn(out, 2, generator=g) @ torch.randn(2, cols, generator=g)) * 0.1
            w = t.weight if t.slot is None else t.weight[t.slot * out:(t.slot + 1) * out]
            w += d.reshape(w.shape)
            planted[name] = d
    models.save(base, str(tmp_path / "base.safetensors"), "fp32")
    models.save(tuned, str(tmp_path / "tuned.safetensors"), "fp32")
    out = tmp_path / "x.safetensors"
    tools.main(["extract", "--model_org", str(tmp_path / "base.safetensors"), "--model_tuned",
                str(tmp_path / "tuned.safetensors"), "--dim", "4", "--conv_dim", "4", "--clamp_quantile", "1",
                "--save_to", str(out), "--save_precision", "fp32"])
    groups = lora.read_lora(str(out))
    assert set(groups) == set(planted)  # unchanged layers left out (min_diff)
    for name, d in planted.items():
        got = group_delta(groups[name], torch.zeros(d.shape[0], *groups[name]["lora_down.weight"].shape[1:]))
        assert torch.allclose(got.flatten(1), d, atol=1e-5), (name, (got.flatten(1) - d).abs().max())
    # merged into the base it gives the tuned weights back
    comp = models.load(str(tmp_path / "base.safetensors"))
    lora.merge_files(comp, [str(out)])
    tw = tuned.prefixed_state_dict()
    assert all(torch.allclose(v.float(), tw[k].float(), atol=1e-5) for k, v in comp.prefixed_state_dict().items())


def test_info_and_resize_cli(tmp_path, capsys):
    comp = models.build("sdxl", "tiny", seed=0, parts=["unet", "te1", "te2"])
    path = tmp_path / "l.safetensors"
    lora.save_lora(str(path), _net(comp).kohya_state_dict(), {"ss_network_dim": "8"}, "fp32")
    assert tools.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "lora_unet:" in text and "locon" not in text and "rank 8, alpha 4.0" in text and "ss_network_dim = 8" in text
    out = tmp_path / "r.safetensors"
    tools.main(["resize", str(path), "--new_rank", "4", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9",
                "--save_to", str(out)])
    assert "kept on average" in capsys.readouterr().out
    sd = load_file(str(out))
    assert max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")) <= 4
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"
    with pytest.raises(SystemExit, match="tools.lora resize: .*out of range"):
        tools.main(["resize", str(path), "--new_rank", "4", "--dynamic_method", "sv_ratio", "--dynamic_param", "0.5",
                    "--save_to", str(out)])
