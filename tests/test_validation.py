"""training/validation.py in process: the split, the fixed stratified timesteps, the sharding over ranks and the
untouched training RNG. The launches (1 vs 2 processes, resume, the signal) are in tests/test_validation_train.py."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from core.config import LossConfig
from diffusion.objectives import DDPMObjective, FlowObjective
from training import validation as V


class _Keys(list):
    def tolist_at(self, rows):
        return [self[int(r)] for r in rows]


class _Index:
    def __init__(self, n: int, buckets=((64, 64), (64, 96))):
        self.keys = _Keys(f"img/{i:05d}" for i in range(n))
        self.buckets = np.array([buckets[i % len(buckets)] for i in range(n)], np.int32)


def test_split_is_seeded_by_key_not_by_order():
    ix = _Index(200)
    rows = np.arange(200)
    train, val = V.split_rows(ix, rows, 0.1, seed=7)
    assert len(val) == 20 and len(train) == 180 and not set(train) & set(val)
    perm = np.random.default_rng(0).permutation(200)
    t2, v2 = V.split_rows(ix, rows[perm], 0.1, seed=7)
    assert set(v2) == set(val) and set(t2) == set(train)  # row order does not matter
    _, v3 = V.split_rows(ix, rows, 0.1, seed=8)
    assert set(v3) != set(val)  # the seed does
    # a grown dataset keeps most of its held-out images (a ranking of per-key hashes)
    big = _Index(220)
    _, v4 = V.split_rows(big, np.arange(220), 0.1, seed=7)
    assert len(set(v4) & set(val)) >= 18
    assert len(V.split_rows(ix, rows[:3], 0.9, seed=1)[0]) == 1  # never every image
    assert len(V.split_rows(ix, rows[:3], 0.0, seed=1)[1]) == 0


SAMPLERS = [
    ("ddpm", dict(timestep_sampler_type="uniform")),
    ("ddpm", dict(timestep_sampler_type="logit_normal", logit_mean=0.3, logit_std=0.8, min_timestep=100)),
    ("flow", dict(timestep_sampler_type="uniform", discrete_flow_shift=3.0)),
    ("flow", dict(timestep_sampler_type="logit_normal", discrete_flow_shift=1.0)),
    ("flow", dict(timestep_sampler_type="mode", discrete_flow_shift=3.0)),
    ("flow", dict(timestep_sampler_type="cosmap", discrete_flow_shift=1.0, max_timestep=900)),
]


@pytest.mark.parametrize("kind,opts", SAMPLERS)
def test_timesteps_at_are_the_training_samplers_quantiles(kind, opts):
    """timesteps_at(u) against the empirical quantiles of 200k training draws (the sampler itself)."""
    cfg = dataclasses.replace(LossConfig(), **opts)
    obj = DDPMObjective(cfg) if kind == "ddpm" else FlowObjective(cfg)
    like = torch.zeros(1)
    g = torch.Generator().manual_seed(0)
    draws = (obj.sample_timesteps(200_000, like, g) if kind == "ddpm" else obj.sample_sigmas(200_000, like, g))
    u = torch.tensor([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95], dtype=torch.float64)
    ours = obj.timesteps_at(u).double().numpy()
    emp = np.quantile(draws.double().numpy(), u.numpy())
    tol = 3.0 if kind == "ddpm" else 0.006
    np.testing.assert_allclose(ours, emp, atol=tol)


def test_bands_cover_the_range_in_order():
    obj = DDPMObjective(LossConfig())
    edges = V.band_edges(obj, 4)
    assert edges[0] == 0 and edges[-1] == 999 and edges == sorted(edges)
    assert V.band_names(edges) == ["loss_t000-250", "loss_t250-500", "loss_t500-750", "loss_t750-999"]
    g = torch.Generator().manual_seed(1)
    u = V.band_quantiles(4, g)
    assert all(j / 4 <= float(u[j]) < (j + 1) / 4 for j in range(4))


def test_rank_shares_cover_every_batch_once():
    ix = _Index(37)
    batches = V.plan_batches(ix, np.arange(37), seed=3, batch_size=4)
    assert sum(len(b) for b in batches) == 37 and all(len({it.bucket for it in b}) == 1 for b in batches)
    assert V.plan_batches(ix, np.arange(37)[::-1], seed=3, batch_size=4) == batches  # order-free
    assert len(V.plan_batches(ix, np.arange(37), seed=3, batch_size=4, max_batches=2)) == 2
    for world in (1, 2, 3, 16):
        shares = [V.rank_share(len(batches), r, world) for r in range(world)]
        assert sorted(i for mine, _ in shares for i in mine) == list(range(len(batches)))
        assert len({f for _, f in shares}) == 1


class _Reader:
    """Latents from the key (as a store would give them), no text."""

    def read(self, batch):
        lat = []
        for it in batch:
            g = torch.Generator().manual_seed(int(it.key[4:]))
            lat.append(torch.randn(4, it.bucket[1] // 8, it.bucket[0] // 8, generator=g))
        n = len(batch)
        return {"latents": torch.stack(lat), "captions": [""] * n, "text": None, "mask": None,
                "sizes": tuple(torch.zeros(n, 2, dtype=torch.long) for _ in range(3))}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x_t, t, text, captions, sizes):
        return self.drop(self.conv(x_t)) * (1.0 + t.view(-1, 1, 1, 1) / 1000.0)


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_sharded_sums_equal_one_process(family, monkeypatch):
    """The ranks' sums of a 1-, 2- and 3-rank pass add up to the 1-rank pass (float64 tolerance)."""
    obj = DDPMObjective(LossConfig()) if family == "ddpm" else FlowObjective(LossConfig())
    ix = _Index(11)
    batches = V.plan_batches(ix, np.arange(11), seed=0, batch_size=2)
    net = _Net().eval()

    def sums(rank, world):
        monkeypatch.setattr(V.dist, "rank", lambda: rank)
        monkeypatch.setattr(V.dist, "world_size", lambda: world)
        return V.validation_sums(net, obj, _Reader(), batches, 4, torch.device("cpu"), contextlib.nullcontext)

    one = sums(0, 1)
    assert one[1].tolist() == [11.0] * 4 and (one[0] > 0).all()
    for world in (2, 3):
        total = sum(sums(r, world) for r in range(world))
        torch.testing.assert_close(total, one, rtol=1e-12, atol=0)
    again = sums(0, 1)
    assert torch.equal(again, one)  # fixed noise and timesteps: the same weights give the same number


def test_training_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with V.training_rng_untouched(torch.device("cpu")):
        torch.randn(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_eval_mode_restores_each_module():
    net = _Net()
    net.drop.train(False)
    with V.eval_mode(net):
        assert not net.training and not net.conv.training
    assert net.training and net.conv.training and not net.drop.training
