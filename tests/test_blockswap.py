"""training/blockswap.py in process on the tiny presets: 3 training steps with and without swapping give bit-identical
weights (full fine-tune with a fused backward pass and offloaded optimizer state; LoRA on a frozen base), with
gradient checkpointing; at most two swapped blocks are on the device at once; at rest every swapped parameter is
its CPU copy. On the CPU the "device" copy is a second CPU tensor: the hooks, copies and write-backs all run."""
import pytest
import torch

import models
from core.config import NetworkConfig
from networks import lora
from training import blockswap
from training.optim import Adafactor
from training.steppers import FusedBackward

LATENT = 16  # 128 px


def _inputs(family, net, g, batch=2):
    c = net.cfg
    x = torch.randn(batch, c.in_channels, LATENT, LATENT, generator=g)
    if family == "sd3":
        return (x, torch.rand(batch, generator=g) * 1000, torch.randn(batch, c.adm_in_channels, generator=g),
                torch.randn(batch, 7, c.context_in_dim, generator=g))
    return (x, torch.randint(0, 1000, (batch,), generator=g).float(), torch.randn(batch, 7, c.context_dim, generator=g),
            torch.randn(batch, c.adm_in_channels, generator=g))


def _train(family, n, kind, steps=3):
    """`steps` steps of a tiny network with n blocks swapped; the trained tensors, the swap and the most swapped
    blocks seen on the device at once."""
    torch.manual_seed(0)  # the adapters' init draws from the global generator
    comp = models.build(family, "tiny", parts=[models.family(family).network], seed=0)
    net = comp.network
    net.gradient_checkpointing = True
    net.train()
    if kind == "lora":
        net.requires_grad_(False)
        network = lora.create_network(comp, NetworkConfig(network_module="lora", network_dim=4, network_alpha=2.0),
                                      unet=True, text=False).apply_to()
        with torch.no_grad():  # kohya's init leaves up = 0: make the adapters act from the first step
            for a in network.adapters.values():
                a.lora_up.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
        trained = network
        opt = torch.optim.AdamW(network.parameters(), lr=1e-3)
        fused = None
    else:
        trained = net
        params = list(net.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3) if kind == "adamw" else Adafactor(params, lr=1e-3)
        fused = FusedBackward(opt, max_grad_norm=1.0, stochastic_rounding=False, seed=0)
    swap = blockswap.BlockSwap(net, n).start(torch.device("cpu"), opt)
    most = [0]

    def count(*_):
        most[0] = max(most[0], sum(s.resident for s in swap.slots))
    for b in swap.blocks:
        b.register_forward_pre_hook(count)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(*_inputs(family, net, g))
        (out.float() - 0.5).pow(2).mean().backward()
        if fused is not None:
            fused.finish()
        else:
            opt.step()
            opt.zero_grad()
    return {k: v.clone() for k, v in trained.state_dict().items()}, swap, most[0]


@pytest.mark.parametrize("family,kind,n", [("sd3", "adamw", "all"), ("sdxl", "adafactor", 1), ("sd3", "lora", 1),
                                           ("sdxl", "lora", "all")])
def test_swapping_changes_no_bit(family, kind, n):
    ref, _, _ = _train(family, 0, kind)
    if n == "all":
        n = len(blockswap.swappable_blocks(models.build(family, "tiny", parts=[models.family(family).network],
                                                        device="meta").network))
    got, swap, most = _train(family, n, kind)
    assert len(swap.chosen) == n and swap.moved > 0
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not bad, (n, bad[:5])
    assert most <= 2  # the block running and the one arriving
    for s in swap.slots:  # at rest: every swapped parameter is its CPU copy, nothing left on the "device"
        assert not s.resident and all(p.data.data_ptr() == h.data_ptr() for p, h in zip(s.params, s.hosts))
    if kind != "lora":  # the swapped blocks were stepped: their optimizer state exists (it travels with them)
        states = [v for s in swap.slots for p in s.params for v in swap.optimizer.state[p].values()
                  if torch.is_tensor(v) and v.numel() >= blockswap.STATE_MIN_NUMEL]
        assert states


def test_choice_and_bounds():
    net = models.build("sdxl", "tiny", parts=["unet"], device="meta").network
    blocks = blockswap.swappable_blocks(net)
    assert blocks[len(net.input_blocks)] is net.middle_block  # forward order
    sizes = [blockswap.block_bytes(b) for b in blocks]
    chosen = blockswap.choose(blocks, 3)
    assert sorted(sizes[i] for i in chosen) == sorted(sizes, reverse=True)[:3][::-1]
    with pytest.raises(ValueError, match="swappable blocks"):
        blockswap.choose(blocks, len(blocks) + 1)
    sd3 = models.build("sd3", "tiny", parts=["mmdit"], device="meta").network
    assert blockswap.choose(blockswap.swappable_blocks(sd3), 1) == [0]  # the last block (pre_only) is smaller
