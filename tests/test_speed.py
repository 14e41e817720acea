"""Fast-path switches (training/speed.py) keep the numbers: channels_last against the default layout on the tiny
SDXL UNet and VAE, the SDPA choice off CUDA, the regional-compile bookkeeping, and the [train] defaults."""

from __future__ import annotations

import copy
import types

import torch

from training import speed


def test_channels_last_same_numbers():
    import models

    comp = models.build("sdxl", "tiny", parts=["unet", "vae"], seed=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ctx, y = torch.randn(2, 77, comp.unet.cfg.context_dim), torch.randn(2, comp.unet.cfg.adm_in_channels)
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_unet, ref_vae = comp.unet(x, t, ctx, y), comp.vae.encode(img)[0]
    cl = copy.deepcopy(comp)
    cfg = types.SimpleNamespace(channels_last=True, compile=False, sdpa_backend="auto")
    logs: list[str] = []
    speed.apply(cfg, types.SimpleNamespace(network=cl.unet, vae=cl.vae), [], torch.device("cpu"), None, logs.append)
    conv = cl.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = cl.unet(x, t, ctx, y)
    torch.testing.assert_close(out.detach(), ref_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl.vae.encode(img)[0], ref_vae, rtol=1e-4, atol=1e-5)
    assert any("channels_last" in m for m in logs) and any("attention:" in m for m in logs)
    out.square().mean().backward()  # gradients in the same layout as their weights
    assert conv.grad.is_contiguous(memory_format=torch.channels_last)


def test_switch_defaults_and_sdpa_off_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.resolve(None, cuda) and not speed.resolve(None, cpu) and speed.resolve(True, cpu)
    assert speed.choose_sdpa_backend("flash", cpu, torch.bfloat16, 64, lambda m: None) == "default"
    from core.config import TrainConfig
    t = TrainConfig()
    assert t.compile is None and t.channels_last is None and t.sdpa_backend == "auto"


def test_compile_blocks_bookkeeping(monkeypatch):
    """Every block compiled in place, the recompile limit raised to cover them, the first forward's time logged."""
    from torch import _dynamo, nn

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(_dynamo.config, "recompile_limit", 8)
    blocks = [nn.Linear(4, 4) for _ in range(10)]
    net = nn.Sequential(*blocks)
    logs: list[str] = []
    speed.compile_blocks(net, blocks, logs.append)
    assert compiled == blocks and _dynamo.config.recompile_limit >= 2 * len(blocks)
    net(torch.randn(1, 4))
    net(torch.randn(1, 4))
    assert sum("first forward" in m for m in logs) == 1


def test_sdpa_choice_on_cuda_enables_one_backend(monkeypatch):
    """The CUDA selection logic without a GPU (probes stubbed): auto takes the first backend of AUTO_ORDER that
    runs, enables only it and logs it; a named backend that does not run is a clear error."""
    import pytest

    runs = {"efficient", "math"}
    monkeypatch.setattr(speed, "_probe", lambda b, device, dtype, head_dim: b in runs)
    enabled: dict[str, bool] = {}
    for b, fn in speed._ENABLE.items():
        monkeypatch.setattr(torch.backends.cuda, fn, lambda on, b=b: enabled.__setitem__(b, on))
    logs: list[str] = []
    cuda = torch.device("cuda")
    assert speed.choose_sdpa_backend("auto", cuda, torch.bfloat16, 64, logs.append) == "efficient"
    assert enabled == {"flash": False, "cudnn": False, "efficient": True, "math": False}
    assert logs == ["attention: SDPA backend efficient (torch.bfloat16, head_dim 64; the only one enabled)"]
    assert speed.choose_sdpa_backend("math", cuda, torch.float32, 64, logs.append) == "math" and enabled["math"]
    with pytest.raises(ValueError, match="'flash' does not run"):
        speed.choose_sdpa_backend("flash", cuda, torch.float32, 64, logs.append)
