"""bench/sync_count.py's counter: what it counts as a host sync in the project's code (reads of device values,
device copies of host tensors that CUDA performs synchronously) and what it does not (host reads, pinned
non-blocking copies, reads inside torch)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import sync_count  # noqa: E402


def test_counter_counts_what_would_wait_for_a_gpu():
    host = torch.arange(4.0)
    pinned = torch.arange(4.0)
    sync_count._set_tag(host, sync_count.HOST)
    sync_count._set_tag(pinned, sync_count.PINNED)
    counter = sync_count.SyncCounter()
    counter.on, counter.step = True, 1
    with counter, sync_count.read_patches(counter):
        dev = host.to("cpu")                        # blocking copy of a pageable host tensor: 1
        host.to(torch.float64)                      # a dtype cast on the host: 0
        (host * 2).sum().item()                     # a host value read: 0 (derived from a host tensor)
        pinned.to("cpu", non_blocking=True)         # pinned, non-blocking: 0
        host.to("cpu", non_blocking=True)           # pageable non-blocking: still synchronous on CUDA: 1
        float(dev.sum())                            # a device value read: 1
        bool(dev.max() > 0)                         # 1
        dev.tolist()                                # 1
        torch.zeros(4).copy_(host)                  # host -> device copy_: 1
        torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).step()  # inside torch: not counted
        w = torch.nn.Parameter(torch.ones(3))
        w.register_post_accumulate_grad_hook(lambda p: [bool(p.grad.sum() > 0)] and None)  # in an autograd hook: 1
        (w * 2).sum().backward()
    sites = counter.sites[1]
    assert sum(sites.values()) == 7, sites
    kinds = {k.split(" tests/")[0] for k in sites}
    assert kinds == {"copy .to (blocking)", "copy .to (pageable)", "read .__float__", "read .__bool__",
                     "read .tolist", "copy .copy_"}, kinds
    assert all("tests/test_gpu_sync.py:" in k for k in sites)


def test_at_most_one_host_sync_per_optimizer_step():
    """The real training step (train.main in process, tiny presets, 2 micro-batches per step; 1 for the fused pass):
    SDXL, SD3, SDXL LoRA and the fused backward pass read the device at most once per optimizer step outside the log
    interval (the skip decision / the fused pass's norm + finiteness), and copy no host tensor to the device in a way
    that stalls it. Was 15 / 15 / 15 / 1004 (bench/sync_count.py)."""
    for case in sync_count.CASES:
        sites = sync_count.count(case)
        per_step = [sum(sites.get(s, {}).values()) for s in range(1, sync_count.STEPS + 1)]
        assert max(per_step[:-1]) <= 1, (case, per_step, sites)
        assert per_step[-1] <= 2, (case, per_step)  # the last step also logs: one more read
