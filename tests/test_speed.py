"""Fast-path switches (training/speed.py) keep the numbers: channels_last against the default layout on the tiny
SDXL UNet and VAE, the per-call attention orders (models/attention.py), the tail-batch padding, the regional-compile
bookkeeping, and the [train] defaults. The compile itself: tests/test_compile.py."""

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


def test_switch_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.resolve(None, cuda) and not speed.resolve(None, cpu) and speed.resolve(True, cpu)
    from core.config import TrainConfig
    t = TrainConfig()
    assert t.compile is None and t.channels_last is None and t.sdpa_backend == "auto"
    assert t.allow_tf32 and t.cudnn_benchmark
    # channels_last stays off when unset, on CUDA too, until bench/gpu_suite.py's on/off rows say otherwise; TF32 and
    # cudnn.benchmark follow [train] (benchmark off under deterministic)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        for tf32, bench, det in ((True, True, False), (False, True, True)):
            net = torch.nn.Conv2d(4, 4, 3)
            cfg = TrainConfig(compile=False, allow_tf32=tf32, cudnn_benchmark=bench, deterministic=det)
            logs: list[str] = []
            speed.apply(cfg, types.SimpleNamespace(network=net, vae=None), None, cuda, None, logs.append)
            assert net.weight.is_contiguous()
            assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == tf32
            assert torch.backends.cudnn.benchmark == (bench and not det)
            assert logs[0] == f"cuda: TF32 {'on' if tf32 else 'off'}, cudnn.benchmark {'off' if det else 'on'}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_attention_orders_per_kind_of_call():
    """Each kind of call has all four kernels in its order (no call without a kernel); fp32 and masked calls put
    first kernels that take them; a named preference goes first everywhere and "auto" restores the defaults."""
    from models import attention as A

    try:
        assert A.kind_of(torch.zeros(1, dtype=torch.bfloat16), None) == "half"
        assert A.kind_of(torch.zeros(1, dtype=torch.float16), None) == "half"
        assert A.kind_of(torch.zeros(1), None) == "float"
        assert A.kind_of(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)) == "masked"
        for order in A.DEFAULT_ORDERS.values():
            assert sorted(order, key=str) == sorted(A.BACKENDS.values(), key=str)
        assert A.ORDERS["float"][0] == A.ORDERS["masked"][0] == A.EFFICIENT  # flash / cuDNN take neither
        logs: list[str] = []
        orders = speed.choose_attention("cudnn", torch.device("cuda"), logs.append)
        assert all(o[0] == A.CUDNN and len(o) == 4 for o in orders.values()) and A.ORDERS == orders
        assert logs and logs[0].startswith("attention: kernel chosen per call") and "half: cudnn, flash" in logs[0]
        speed.choose_attention("auto", torch.device("cpu"), logs.append)
        assert A.ORDERS == A.DEFAULT_ORDERS and "on cpu" in logs[-1]
        import pytest
        with pytest.raises(ValueError, match="unknown SDPA backend"):
            A.set_preference("fastest")
    finally:
        A.set_preference(None)


def test_attention_with_priority_equals_sdpa_and_compiles_without_a_break(monkeypatch):
    """The priority path (what CUDA runs) on the CPU: the same numbers as plain SDPA for each kind of call, and
    inside torch.compile no graph break (the orders are read as constants)."""
    import torch.nn.functional as F
    from torch import _dynamo

    from models import attention as A

    monkeypatch.setattr(A, "KERNEL_DEVICES", ("cuda", "cpu"))
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    mask = torch.randn(1, 3, 10, 10)
    for args, kw in (((q, k, v), {}), ((q, k, v), {"mask": mask, "scale": 1.0}), ((q, k, v), {"is_causal": True}),
                     ((q.bfloat16(), k.bfloat16(), v.bfloat16()), {})):
        ref = F.scaled_dot_product_attention(*args, attn_mask=kw.get("mask"), is_causal=kw.get("is_causal", False),
                                             scale=kw.get("scale"))
        torch.testing.assert_close(A.attention(*args, **kw), ref)
    _dynamo.reset()
    explained = _dynamo.explain(lambda a, b, c, m: A.attention(a, b, c) + A.attention(a, b, c, mask=m))(q, k, v, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    _dynamo.reset()


def test_tail_batch_padding_is_exact():
    """StaticBatch: a batch smaller than the largest one seen in training runs padded to it (the last sample
    repeated) and its output is cut back; the outputs and gradients equal the unpadded call's. Eval calls and full
    batches pass untouched."""
    import models

    net = models.build("sdxl", "micro", parts=["unet"], seed=0).network.train()
    cfg = net.cfg
    args = lambda b: (torch.randn(b, 4, 8, 8), torch.rand(b) * 999, torch.randn(b, 77, cfg.context_dim),  # noqa: E731
                      torch.randn(b, cfg.adm_in_channels))
    tail = args(1)
    ref = net(*tail)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    seen: list[int] = []
    net.input_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    pad = speed.StaticBatch(net)
    net(*args(3))  # the largest batch so far
    net.zero_grad(set_to_none=True)
    out = net(*tail)
    assert out.shape[0] == 1 and seen[-1] == 3 and pad.padded == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    for p, g in zip(net.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)  # batch-3 vs batch-1 summation order
    net.eval()
    with torch.no_grad():
        assert net(*tail).shape[0] == 1 and seen[-1] == 1  # previews: not padded
    pad.remove()


def test_compile_network_bookkeeping(monkeypatch):
    """Every region (the middle block included) compiled in place with static shapes, the recompile limits raised
    to cover regions x buckets, the first forward's time logged once, the tail padding installed."""
    from torch import _dynamo, nn

    import models

    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: calls.append((self, k)))
    net = models.build("sdxl", "micro", parts=["unet"], seed=0).network
    logs: list[str] = []
    # dynamo's own patcher (monkeypatch's undo deletes the option on torch 2.11's config module)
    with _dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        pad = speed.compile_network(net, logs.append)
        assert _dynamo.config.recompile_limit >= speed.RECOMPILE_LIMIT
        assert _dynamo.config.accumulated_recompile_limit >= speed.RECOMPILE_LIMIT
    regions = speed.compile_regions(net)
    assert [m for m, _ in calls] == regions and all(k == {"backend": "inductor", "dynamic": False} for _, k in calls)
    x = (torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 77, net.cfg.context_dim),
         torch.randn(1, net.cfg.adm_in_channels))
    with torch.no_grad():
        net(*x)
        net(*x)
    assert sum("first forward" in m for m in logs) == 1 and isinstance(pad, speed.StaticBatch)
    pad.remove()


def test_eager_runs_compiled_regions_without_compiling():
    """speed.eager(): a compiled region called inside compiles nothing (previews, validation), the same numbers."""
    from torch import _dynamo, nn
    from torch._dynamo.utils import counters

    _dynamo.reset()
    counters.clear()
    block = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    ref = block(x)
    block.compile(backend="eager", dynamic=False)
    with speed.eager():
        torch.testing.assert_close(block(x), ref)
    assert counters["stats"]["unique_graphs"] == 0
    block(x)
    assert counters["stats"]["unique_graphs"] == 1  # outside it compiles as before
    _dynamo.reset()
