"""training/fp8.py: e4m3 codes with per-channel power-of-two scales, upcast at use; what a converted layer computes,
and that LoRA adapters see the upcast weight whether they attach before or after the conversion."""
import pytest
import torch
from torch import nn

import models
from core.config import NetworkConfig
from networks import lora
from training import fp8


def test_codes_scales_and_exact_upcast():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-4, 2, 64)[:, None]  # rows of very different magnitude
    codes, scale = fp8.quantize(w)
    assert codes.dtype == torch.uint8 and scale.shape == (64,)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two
    assert (w.abs().amax(1) / scale).max() <= fp8.FP8_MAX  # in range: nothing saturates
    assert ((w.abs().amax(1) / scale) > fp8.FP8_MAX / 2).all()  # and the range is used (the smallest such scale)
    # the codes are torch's own round-to-nearest e4m3 of w / scale
    assert torch.equal(codes, (w / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8))
    back = fp8.dequantize(codes, scale, torch.float32)
    normal = w.abs() >= scale[:, None] * 2.0 ** -6  # e4m3's normal range (below: subnormals, absolute error)
    rel = ((back - w).abs() / w.abs())[normal]
    assert rel.max() <= 2.0 ** -4  # 3 mantissa bits: half a unit in the last place
    assert ((back - w).abs()[~normal] <= scale[:, None].expand_as(w)[~normal] * 2.0 ** -10).all()
    # the power-of-two scale makes the bf16 upcast exact: equal to the fp32 upcast rounded (which is exact too)
    assert torch.equal(fp8.dequantize(codes, scale, torch.bfloat16), back.to(torch.bfloat16))
    assert torch.equal(back.to(torch.bfloat16).float(), back)


def test_converted_layers_compute_with_the_upcast_weight():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Conv2d(4, 8, 3, padding=1)).requires_grad_(False)
    ref = [m[0].weight.clone(), m[1].weight.clone()]
    rep = fp8.convert(m)
    assert rep.tensors == 2 and rep.after < rep.before / 3
    assert isinstance(m[0], nn.Linear) and isinstance(m[1], nn.Conv2d)  # subclasses: LoRA's targets still match
    assert sorted(dict(m.named_parameters())) == ["0.bias", "0.weight_fp8", "0.weight_scale", "1.bias",
                                                  "1.weight_fp8", "1.weight_scale"]
    assert m[0].weight.dtype == torch.float32 and m[0].weight.shape == ref[0].shape
    x = torch.randn(3, 16)
    assert torch.equal(m[0](x), nn.functional.linear(x, m[0].weight, m[0].bias))
    q, s = fp8.quantize(ref[0])
    assert torch.equal(m[0].weight, fp8.dequantize(q, s, torch.float32))
    img = torch.randn(2, 4, 8, 8)
    assert torch.equal(m[1](img), nn.functional.conv2d(img, m[1].weight, m[1].bias, padding=1))
    with pytest.raises(ValueError, match="frozen"):
        fp8.convert(nn.Linear(4, 4))


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_lora_sees_the_upcast_weight_attached_before_or_after(family):
    part = models.family(family).network
    ncfg = NetworkConfig(network_module="lora", network_dim=4, network_alpha=2.0)
    outs = []
    for before in (True, False):
        torch.manual_seed(0)
        comp = models.build(family, "tiny", parts=[part], seed=0)
        comp.network.requires_grad_(False).eval()
        if before:
            fp8.apply(comp, (part,), lambda _m: None)
        net = lora.create_network(comp, ncfg, unet=True, text=False).apply_to()
        if not before:
            fp8.apply(comp, (part,), lambda _m: None)
        with torch.no_grad():
            for a in net.adapters.values():
                a.lora_up.weight.fill_(0.01)
        c = comp.network.cfg
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, c.in_channels, 16, 16, generator=g)
        if family == "sd3":
            args = (x, torch.tensor([500.0]), torch.randn(1, c.adm_in_channels, generator=g),
                    torch.randn(1, 5, c.context_in_dim, generator=g))
        else:
            args = (x, torch.tensor([500.0]), torch.randn(1, 5, c.context_dim, generator=g),
                    torch.randn(1, c.adm_in_channels, generator=g))
        with torch.no_grad():
            outs.append(comp.network(*args))
    assert torch.equal(outs[0], outs[1])
