"""All distributed code in one place: init from torchrun's environment, rank-0 gating, barriers,
reductions for logging, `no_sync` for gradient accumulation, DDP / FSDP2 wrapping.

Works under `torchrun` (any --nproc_per_node, multi-node) and as a plain single process.
NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from core.fsio import describe_os_error

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


_INFO: DistInfo | None = None


def init(device: str | None = None, timeout_minutes: int = 60) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); idempotent."""
    global _INFO
    if _INFO is not None:
        return _INFO
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    # torchrun: a process group even of one process (one GPU runs NCCL and DDP as eight do)
    if (world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not tdist.is_initialized():
        _init_group(dev, timeout_minutes)
    _INFO = DistInfo(rank, world_size, local_rank, dev)
    return _INFO


def _init_group(dev: torch.device, timeout_minutes: int = 60, store: Any = None) -> None:
    """NCCL on GPUs, gloo on CPU; from torchrun's environment, or a one-process group on `store`."""
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    if store is not None:
        kwargs.update(store=store, rank=0, world_size=1)
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), None without one."""
    return str(tdist.get_backend()) if is_dist() else None


def info() -> DistInfo:
    return _INFO if _INFO is not None else init()


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def is_main() -> bool:
    """True on the process that does file I/O (rank 0)."""
    return info().rank == 0


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (run seed, rank, ...: per-rank streams that are the same on resume)."""
    h = 0
    for p in parts:
        h = (h * 0x9E3779B97F4A7C15 + int(p) + 1) % (1 << 63)
    return h


def barrier() -> None:
    if is_dist():
        if info().device.type == "cuda":
            tdist.barrier(device_ids=[info().local_rank])
        else:
            tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op alone); returns t."""
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(x: float) -> float:
    """Mean of a Python float over ranks (for logging)."""
    if not is_dist():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=info().device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return float(t.item()) / world_size()


def all_reduce_mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks, left on the device (no host read; as all_reduce_mean for the value)."""
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t / world_size()


def any_true(flag: bool) -> bool:
    """True on every rank if it is true on any rank (for stop decisions taken together)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=info().device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (picklable objects only: our own, never user files)."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


class MainRankError(RuntimeError):
    """Raised on every rank when work done by rank 0 alone failed (its message is rank 0's)."""


def main_first(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only, then sync. If it raised, every rank raises MainRankError with its message,
    so no rank is left waiting at a barrier for a rank that died. Returns fn's result on rank 0, None elsewhere."""
    out: T | None = None
    err: str | None = None
    if is_main():
        try:
            out = fn()
        except Exception as e:  # shared with the other ranks, then re-raised everywhere
            err = (describe_os_error(e) if isinstance(e, OSError) else None) or str(e) or type(e).__name__
            if not is_dist():
                raise MainRankError(err) from e
    err = broadcast_object(err)
    if err is not None:
        raise MainRankError(err)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def cores_per_rank() -> int:
    """CPU cores this process may use, shared by the ranks of this node (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers(requested: int, cap: int | None = None) -> int:
    """Worker processes per rank: `requested` when >= 0, else cores per rank minus one (the main process), capped."""
    if requested >= 0:
        return requested
    n = cores_per_rank() - 1
    return max(0, min(n, cap) if cap is not None else n)


DDP_BUCKET_MB = 100


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False, static_graph: bool = False) -> nn.Module:
    """DDP around the trained module when there are several ranks; the bare module otherwise."""
    if not is_dist():
        return model
    dev = info().device
    # 100 MB buckets (torchtitan; DDP's 25 MB default means ~4x the all-reduce calls for a 2.6 B-parameter UNet);
    # static_graph only when asked (every step the same parameters and no no_sync micro-steps: with gradient
    # accumulation DDP's static-graph reducer fails an internal assert, torch 2.14, gloo)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True,
        find_unused_parameters=find_unused_parameters, bucket_cap_mb=DDP_BUCKET_MB,
        static_graph=static_graph and not find_unused_parameters)


def wrap_fsdp(model: nn.Module, blocks: list[nn.Module], mixed_precision: torch.dtype | None = None) -> nn.Module:
    """FSDP2 (fully_shard) applied from outside the model file: each block (e.g. every MMDiT joint
    block) is sharded on its own, then the root. Parameters become DTensors; see full_state_dict."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_dist():  # a plain single process (no torchrun): fully_shard needs a group, give it one of one
        _init_group(info().device, store=tdist.HashStore())
    mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm over all gradients, then each scaled by min(1, max_norm / (norm +
    1e-6))); `max_norm` None: the norm only, nothing scaled. Also for FSDP2's sharded gradients: the norm is
    summed over ranks from each rank's local shards and the local shards are scaled. (torch's own version runs
    every DTensor op through sharding propagation: seconds per step for a UNet's hundreds of tensors.)"""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not all(_is_shard_dtensor(g) for g in grads):
        if max_norm is None:
            return torch.nn.utils.get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [g.to_local() for g in grads]
    norms = torch._foreach_norm(local, 2.0)
    squares = torch.stack([n.float() for n in norms]).square().sum()
    norm = all_reduce_sum(squares).sqrt()  # every placement is Shard: the squares of the shards add up
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in local:
            g.mul_(coef.to(g.dtype))
    return norm


def _is_shard_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and all(p.is_shard() for p in t.placements)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor on every rank (collective); plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (save from this, never from a wrapper)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on non-final accumulation micro-steps."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


def shutdown() -> None:
    global _INFO
    if is_dist():
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
    _INFO = None
