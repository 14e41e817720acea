"""Block swap (kohya's `blocks_to_swap`, OneTrainer's layer offloading), applied from outside the model files.

`train.blocks_to_swap = N` keeps N of the network's blocks (MMDiT `joint_blocks`; UNet `input_blocks`,
`middle_block`, `output_blocks`: the N largest, later ones first on ties) in pinned CPU memory and streams each to
the GPU just before it runs, on a side CUDA stream, so the copy overlaps the compute before it:

    forward   block k starts: wait for its copy; start copying the next swapped block.   block k ends: drop it
              (the last swapped block stays: the backward pass starts with it)
    backward  gradients reach block k's outputs: wait for block k (+ its optimizer state when trained); start
              copying the previous swapped block.   gradients reach block k's inputs: block k is done -- a trained
              block's updated weights and optimizer state are copied back to the CPU, then it is dropped

At most two swapped blocks are on the GPU at once (the one running and the one arriving), so the GPU holds the
other blocks, two swapped blocks and their copies in flight. Bytes moved per step: every swapped block's weights
twice host-to-device (forward, backward), plus for a full fine-tune its weights and optimizer state back.

Requirements, checked by the config (core/config.py): gradient checkpointing (without it autograd keeps every block's
weights -- or their autocast copies -- for the backward pass and nothing is saved); a full fine-tune also needs
`train.fused_backward_pass` (each parameter is stepped during the backward pass while its block is on the GPU;
kohya's rule for its block-swapping full fine-tunes); not FSDP (which shards instead). With DDP (LoRA) the
frozen swapped blocks never take part in a collective after start-up, so nothing changes there.

How the steps are found without touching the model: forward pre / post hooks on each swapped block register
gradient hooks on its output and input tensors. An output's hook runs when that gradient is complete, just before
the block's backward starts; an input's hook runs when its gradient is complete, which is after every node of the
block has run (the engine runs ready nodes latest-created first, and AccumulateGrad nodes -- hence the fused
optimizer steps -- before any other). Hooks observe only: no node is added to the graph, so gradients are summed in
the same order as without swapping (an identity autograd function at the boundary would group the sums of inputs
shared with other blocks, such as MMDiT's `c`, differently and change the last bits). A block whose inputs need no
gradient (the first block of a LoRA run) is finished by the end-of-backward callback. Under gradient checkpointing
the block's recomputation runs its forward hooks again inside the backward pass; they only make sure it is there.

Parameters keep their identity (`p.data` is swapped), so the optimizer, the EMA, exports and resume states see the
same tensors as without swapping: at rest every swapped parameter's data is its CPU copy.

On the CPU (tests) the "device" copy is a second CPU tensor: the same code path, hooks, copies and write-backs run,
only without streams, so a run with swapping must equal one without bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

STATE_MIN_NUMEL = 4096  # optimizer state tensors smaller than this stay on the GPU (step counters, shared tables)
ALIGN = 256  # bytes: where each parameter starts in a block's buffer (vectorised kernels, cuBLAS alignment)


def swappable_blocks(net: nn.Module) -> list[nn.Module]:
    """The network's blocks in forward order: MMDiT joint blocks, or the UNet's input, middle and output blocks."""
    if hasattr(net, "joint_blocks"):
        return list(net.joint_blocks)
    if hasattr(net, "input_blocks"):
        return [*net.input_blocks, net.middle_block, *net.output_blocks]
    raise ValueError(f"train.blocks_to_swap: no swappable blocks in {type(net).__name__}")


def block_bytes(block: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())


def choose(blocks: list[nn.Module], n: int) -> list[int]:
    """Indices (forward order) of the n blocks to swap: the largest, later ones first on ties (as kohya swaps the
    last blocks of a uniform stack)."""
    if not 0 <= n <= len(blocks):
        raise ValueError(f"train.blocks_to_swap = {n}, but the network has {len(blocks)} swappable blocks")
    ranked = sorted(range(len(blocks)), key=lambda i: (-block_bytes(blocks[i]), -i))
    return sorted(ranked[:n])


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class _Copier:
    """Host <-> device copies: on a side stream with events on CUDA, inline on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def host_like(self, t: Tensor) -> Tensor:
        """An empty CPU tensor like t (pinned when copies go to a GPU: asynchronous and faster)."""
        return torch.empty_like(t, device="cpu", pin_memory=self.cuda)

    def host_buffer(self, nbytes: int) -> Tensor:
        """A CPU byte buffer, page-locked in place on CUDA (cudaHostRegister: torch's pinned allocator would round
        the size up to a power of two, up to twice the memory); plain pinned memory if registering fails."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.cuda and nbytes:
            if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
                buf = buf.pin_memory()
        return buf

    def to_device(self, hosts: list[Tensor]) -> tuple[list[Tensor], Any]:
        """Device copies of `hosts` (allocated on the compute stream, so the caching allocator reuses their memory
        only after the compute queued before them) and the event that marks them complete."""
        devs = [torch.empty_like(h, device=self.device) for h in hosts]
        if not self.cuda:
            for d, h in zip(devs, hosts):
                d.copy_(h)
            return devs, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # memory freed by earlier compute
        with torch.cuda.stream(self.stream):
            for d, h in zip(devs, hosts):
                d.copy_(h, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return devs, event

    def to_host(self, devs: list[Tensor], hosts: list[Tensor]) -> None:
        """Copy device tensors into their host tensors after the compute queued so far (the optimizer steps)."""
        if not self.cuda:
            for d, h in zip(devs, hosts):
                h.copy_(d)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for d, h in zip(devs, hosts):
                h.copy_(d, non_blocking=True)
                d.record_stream(self.stream)  # not reused by the compute stream before the copy has read it

    def wait(self, event: Any) -> None:
        """The compute stream waits for a copy."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def sync(self) -> None:
        """The host waits for every copy (host tensors are read by the CPU next: exports, EMA on the CPU)."""
        if self.cuda:
            self.stream.synchronize()


class _Layout:
    """A block's parameters laid out in one byte buffer (each at an ALIGN-byte offset, with its own dtype, shape
    and strides), so a block crosses to the device in one copy into one allocation."""

    def __init__(self, params: list[nn.Parameter]):
        self.spans: list[tuple[int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = []
        offset = 0
        for p in params:
            dense = p.data.is_contiguous() or p.data.is_contiguous(memory_format=torch.channels_last)
            stride = p.stride() if dense else torch.empty(p.shape, device="meta").stride()
            n = p.numel() * p.element_size()
            self.spans.append((offset, n, p.dtype, tuple(p.shape), tuple(stride)))
            offset += -(-n // ALIGN) * ALIGN
        self.nbytes = offset

    def views(self, buf: Tensor) -> list[Tensor]:
        """The parameters' tensors inside `buf` (a byte buffer of nbytes, on any device)."""
        return [buf[o:o + n].view(dtype).as_strided(shape, stride) for o, n, dtype, shape, stride in self.spans]


@dataclass
class _Slot:
    """One swapped block: its parameters, their CPU copies (views of one buffer), and where it stands."""
    index: int  # position among the network's swappable blocks
    module: nn.Module
    params: list[nn.Parameter]
    hosts: list[Tensor]
    host_buffer: Tensor
    layout: _Layout
    trained: bool
    resident: bool = False
    state_in: bool = False  # its optimizer state is on the device
    dirty: bool = False  # stepped while on the device: write back before dropping
    entered: bool = False  # its backward has started (this forward's)
    left: bool = True  # its backward is over
    events: list[Any] = field(default_factory=list)
    state: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (state tensor, its CPU copy) while in


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in a block's (args, kwargs) or output (tensors, tuples / lists / dicts of them, None)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


class BlockSwap:
    """N blocks of a network kept in CPU memory and streamed to `device` around their forward and backward.

    Use: `BlockSwap(net, n)`, then `start(device, optimizer)` once the model is wrapped and the optimizer exists
    (train.py: `start()` below; `resident()` says which blocks regional compile may compile).
    """

    def __init__(self, net: nn.Module, n: int):
        self.net = net
        self.blocks = swappable_blocks(net)
        self.chosen = choose(self.blocks, n)
        self.slots: list[_Slot] = []
        self.copier: _Copier | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.handles: list[Any] = []
        self._callback_queued = False
        self._unsynced = False  # device-to-host copies issued since the host last waited for them
        self.moved = 0  # bytes copied either way since start (bench: bytes per step)

    def swapped_bytes(self) -> int:
        return sum(block_bytes(self.blocks[i]) for i in self.chosen)

    def describe(self) -> str:
        gib = self.swapped_bytes() / 2**30
        return (f"block swap: {len(self.chosen)} of {len(self.blocks)} blocks ({gib:.2f} GiB of weights) kept in "
                f"{'pinned ' if self.copier is not None and self.copier.cuda else ''}CPU memory, streamed to "
                f"{self.copier.device if self.copier is not None else 'the device'} around their forward and backward")

    # ---- set-up

    @torch.no_grad()
    def start(self, device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> "BlockSwap":
        """Move the swapped blocks' parameters to CPU copies and install the hooks."""
        if not self.chosen:
            return self
        self.copier = _Copier(torch.device(device))
        self.optimizer = optimizer
        for j, i in enumerate(self.chosen):
            block = self.blocks[i]
            params = list(block.parameters())
            layout = _Layout(params)
            buf = self.copier.host_buffer(layout.nbytes)
            hosts = layout.views(buf)
            for p, h in zip(params, hosts):
                h.copy_(p.data)
                p.data = h
            trained = any(p.requires_grad for p in params)
            self.slots.append(_Slot(i, block, params, hosts, buf, layout, trained))
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(j), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_hook(j)))
        self.handles.append(self.net.register_forward_pre_hook(lambda _m, _a: self._forward_begins()))
        return self

    def remove(self) -> None:
        """Everything back on the device, hooks removed."""
        self._release_all()
        for s in self.slots:
            self._fetch(s, with_state=True)
            self._wait(s)
            s.resident = False  # stays on the device for good
        for h in self.handles:
            h.remove()
        self.handles, self.slots = [], []

    # ---- hooks

    def _pre_hook(self, j: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            slot = self.slots[j]
            self._ensure(slot, with_state=False)
            if in_backward():  # recomputation under gradient checkpointing: the block only has to be there
                return None
            if j + 1 < len(self.slots):
                self._prefetch(self.slots[j + 1], with_state=False)
            if torch.is_grad_enabled():  # its backward is over once the gradient of an input is complete
                slot.left = False
                for t in _tensors((args, kwargs)):
                    if t.requires_grad:
                        t.register_hook(lambda _g: self._backward_leave(j))
            return None
        return hook

    def _post_hook(self, j: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
            if in_backward():
                return None
            outs = [t for t in _tensors(out) if t.requires_grad] if torch.is_grad_enabled() else []
            slot = self.slots[j]
            slot.entered = False
            for t in outs:  # its backward starts once the gradient of an output is complete
                t.register_hook(lambda _g: self._backward_enter(j))
            if not (outs and j == len(self.slots) - 1):  # the last one is the first the backward needs
                self._release(slot)
            return None
        return hook

    def _forward_begins(self) -> None:
        if in_backward():
            return
        self._release_all()  # e.g. a forward without backward (previews) left its last block
        self._prefetch(self.slots[0], with_state=False)

    def _backward_enter(self, j: int) -> None:
        slot = self.slots[j]
        if slot.entered:
            return
        slot.entered = True
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_over)
        self._ensure(slot, with_state=slot.trained)
        slot.dirty = slot.trained
        if j > 0:
            prev = self.slots[j - 1]
            self._prefetch(prev, with_state=prev.trained)

    def _backward_leave(self, j: int) -> None:
        slot = self.slots[j]
        if slot.left or not slot.entered:  # a shared input (MMDiT's c) completes after every block
            return
        slot.left = True
        self._release(slot)

    def _backward_over(self) -> None:
        self._callback_queued = False
        self._release_all()

    # ---- moves

    def _prefetch(self, slot: _Slot, with_state: bool) -> None:
        if not slot.resident:
            self._fetch(slot, with_state)
        elif with_state and not slot.state_in:
            self._fetch_state(slot)

    def _ensure(self, slot: _Slot, with_state: bool) -> None:
        self._prefetch(slot, with_state)
        self._wait(slot)

    def _wait(self, slot: _Slot) -> None:
        assert self.copier is not None
        for e in slot.events:
            self.copier.wait(e)
        slot.events.clear()

    def _fetch(self, slot: _Slot, with_state: bool) -> None:
        assert self.copier is not None
        (buf,), event = self.copier.to_device([slot.host_buffer])  # one copy into one allocation
        for p, d in zip(slot.params, slot.layout.views(buf)):
            p.data = d
        slot.events.append(event)
        slot.resident = True
        self.moved += slot.layout.nbytes
        if with_state:
            self._fetch_state(slot)

    def _state_tensors(self, slot: _Slot) -> list[Tensor]:
        """The block's optimizer state tensors worth moving (large ones; one entry per tensor)."""
        if self.optimizer is None or not slot.trained:
            return []
        out, seen = [], set()
        for p in slot.params:
            for v in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.numel() >= STATE_MIN_NUMEL and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def _fetch_state(self, slot: _Slot) -> None:
        """The block's optimizer state to the device (state created on the device by a first step is there)."""
        assert self.copier is not None
        away = [t for t in self._state_tensors(slot) if t.device.type == "cpu" and self.copier.device.type != "cpu"
                or (self.copier.device.type == "cpu" and not slot.state_in)]
        hosts = [t.data for t in away]
        devs, event = self.copier.to_device(hosts)
        for t, d in zip(away, devs):
            t.data = d
        slot.state = list(zip(away, hosts))
        slot.events.append(event)
        slot.state_in = True
        self.moved += sum(h.numel() * h.element_size() for h in hosts)

    def _release(self, slot: _Slot) -> None:
        """Drop the block's device copies; a block stepped on the device is written back first."""
        if not slot.resident:
            return
        assert self.copier is not None
        self._wait(slot)  # a prefetched block never used: its copies finish before their memory is reused
        if slot.dirty:
            known = {id(t): h for t, h in slot.state}
            state = [(t, known.get(id(t)) if id(t) in known else self.copier.host_like(t))
                     for t in self._state_tensors(slot) if id(t) in known or t.device != torch.device("cpu")
                     or self.copier.device.type == "cpu"]
            pairs = list(zip(slot.params, slot.hosts)) + state
            self.copier.to_host([t.data for t, _ in pairs], [h for _, h in pairs])
            self._unsynced = True
            self.moved += sum(h.numel() * h.element_size() for _, h in pairs)
            for t, h in state:
                t.data = h
        elif slot.state_in:
            for t, h in slot.state:  # unchanged: the CPU copy is current
                t.data = h
        for p, h in zip(slot.params, slot.hosts):
            p.data = h
        slot.state, slot.state_in, slot.dirty, slot.resident = [], False, False, False

    def _release_all(self) -> None:
        for s in self.slots:
            self._release(s)
        if self._unsynced and self.copier is not None:
            self.copier.sync()
            self._unsynced = False


def resident(net: nn.Module, n: int, blocks: list[nn.Module]) -> list[nn.Module]:
    """Of `blocks`, those train.blocks_to_swap = n leaves on the device (the ones regional compile may compile)."""
    if not n:
        return blocks
    all_blocks = swappable_blocks(net)
    swapped = {id(all_blocks[i]) for i in choose(all_blocks, n)}
    return [b for b in blocks if id(b) not in swapped]


def start(t: Any, net: nn.Module, device: torch.device, optimizer: torch.optim.Optimizer | None,
          log: Callable[[str], None]) -> BlockSwap | None:
    """train.blocks_to_swap's swapping, started once the model is wrapped and the optimizer built (their set-up
    sees every parameter on the device); None when not asked for."""
    if not t.blocks_to_swap:
        return None
    swap = BlockSwap(net, t.blocks_to_swap).start(device, optimizer)
    log(swap.describe())
    return swap
