"""Exponential moving average (EMA) of a model's trainable parameters, for sampling and export.

Under FSDP2 each rank keeps the EMA of its own parameter shards only (the parameters are DTensors: the
update runs on the local shards); `state_dict()` hands the shards out as DTensors again, so the sharded
resume state (torch.distributed.checkpoint) and the streamed export treat them like the model's weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# Warmup curve 1 - (1 + step / 10) ** -0.75 (diffusers EMAModel use_ema_warmup with inv_gamma=10, power=3/4):
# the EMA follows the model closely early on instead of remembering the random/pretrained start for ~1/(1-decay) steps.
WARMUP_INV_GAMMA = 10.0
WARMUP_POWER = 0.75
# Elements per fused update (128 Mi fp32 = 512 MiB of temporary copies at most).
UPDATE_CHUNK_NUMEL = 1 << 27


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter; shares its storage); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of a model's parameters, kept on `device` ("cuda"/"cpu"), fp32 shadow.

    Decay: plain constant `decay` by default; with `warmup=True` it is min(decay, 1 - (1 + step / 10) ** -0.75),
    which is 0 at step 0 (the EMA copies the model) and approaches `decay` later. Only parameters with
    requires_grad at construction are tracked (frozen ones never change). Pass the unwrapped module (no DDP /
    torch.compile wrapper) so names match the checkpoint keys. `update_every` > 1 updates only on steps divisible by
    it, with the same per-update decay.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        device: str | torch.device | None = None,
        update_every: int = 1,
        warmup: bool = False,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        params = self._tracked(model)
        if not params:
            raise ValueError("EMA: the model has no trainable floating-point parameters")
        first = _local(next(iter(params.values())))
        self.device = torch.device(device) if device is not None else first.device
        # sharded parameters: (mesh, placements, global shape, global stride) to hand the shards out as DTensors
        self._layout = {n: (p.device_mesh, p.placements, tuple(p.shape), p.stride())
                        for n, p in params.items() if hasattr(p, "device_mesh")}
        self.shadow: dict[str, Tensor] = {  # local shards under FSDP2, full tensors otherwise
            n: _local(p.detach()).to(device=self.device, dtype=torch.float32, copy=True) for n, p in params.items()
        }

    @staticmethod
    def _tracked(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}

    def _params_of(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters with the shadow's names; a clear error if the model does not match."""
        named = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in named]
        if missing:
            raise KeyError(
                f"EMA: model lacks {len(missing)} tracked parameter(s), e.g. {missing[:3]} "
                "(pass the unwrapped module, not a DDP/compiled wrapper)"
            )
        return {n: named[n] for n in self.shadow}

    def decay_at(self, step: int) -> float:
        """Decay used by update(model, step)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step / WARMUP_INV_GAMMA) ** -WARMUP_POWER)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * param (skipped unless step % update_every == 0)."""
        if step % self.update_every != 0:
            return
        weight = 1.0 - self.decay_at(step)
        params = self._params_of(model)
        # chunks bound the temporary fp32 / cross-device copies of the parameters (a whole SDXL UNet is ~10 GB fp32)
        chunk: list[str] = []
        numel = 0
        for n in self.shadow:
            chunk.append(n)
            numel += self.shadow[n].numel()
            if numel >= UPDATE_CHUNK_NUMEL:
                self._lerp(chunk, params, weight)
                chunk, numel = [], 0
        if chunk:
            self._lerp(chunk, params, weight)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """shadow <- the model's parameters (each rank its shards): an EMA that starts over from these weights."""
        for n, p in self._params_of(model).items():
            self.shadow[n].copy_(_local(p.detach()))

    def _lerp(self, names: list[str], params: dict[str, nn.Parameter], weight: float) -> None:
        shadows = [self.shadow[n] for n in names]
        sources = [_local(params[n].detach()).to(device=self.device, dtype=torch.float32) for n in names]
        torch._foreach_lerp_(shadows, sources, weight)

    def state_dict(self) -> dict[str, Tensor]:
        """Shadow weights by parameter name (fp32); sharded ones as DTensors (on the mesh's device)."""
        if not self._layout:
            return dict(self.shadow)
        from torch.distributed.tensor import DTensor

        out = {}
        for n, t in self.shadow.items():
            if n in self._layout:
                mesh, placements, shape, stride = self._layout[n]
                t = DTensor.from_local(t.to(mesh.device_type), mesh, placements, shape=shape, stride=stride,
                                       run_check=False)
            out[n] = t
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load shadow weights; names and (global) shapes must match exactly. Full tensors are cut to this rank's
        shard when the EMA is sharded."""
        missing, unexpected = set(self.shadow) - set(sd), set(sd) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(
                f"EMA state mismatch: missing {sorted(missing)[:5]} ({len(missing)}), "
                f"unexpected {sorted(unexpected)[:5]} ({len(unexpected)})"
            )
        for n, v in sd.items():
            want = self._layout[n][2] if n in self._layout else tuple(self.shadow[n].shape)
            if tuple(v.shape) != want:
                raise ValueError(f"EMA state: {n} has shape {tuple(v.shape)}, expected {want}")
        for n, v in sd.items():
            if n in self._layout and not hasattr(v, "to_local"):  # a full tensor (unsharded state): this rank's part
                from torch.distributed.tensor import distribute_tensor
                mesh, placements, _, _ = self._layout[n]
                v = distribute_tensor(v.to(mesh.device_type), mesh, placements, src_data_rank=None)
            self.shadow[n].copy_(_local(v))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put EMA weights into the model (for sampling or export); restore the trained ones after."""
        params = self._params_of(model)
        # backup on the CPU: a second GPU copy of a multi-GB model may not fit
        backup = {n: _local(p.detach()).to("cpu", copy=True) for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    _local(p).copy_(self.shadow[n])
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    _local(p).copy_(backup[n])
