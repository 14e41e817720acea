"""Per-step loss and gradient norm kept on the device until the log interval: no host sync in the training step.

Reading a CUDA tensor on the host (`float()`, `.item()`) waits for every queued kernel, so the host stops running
ahead of the GPU. train.py keeps each step's loss (mean over micro-batches and ranks) and gradient norm as 0-d
tensors here and reads them all in one transfer when it logs or saves, feeding the LossRecorder in step order.
"""

from __future__ import annotations

import math

import torch

from training.optim import LossRecorder


def mean_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the micro-batch losses as a float64 0-d tensor on their device, summed in the order (and with the
    rounding) of the Python loop `m += float(l) / n` it replaces."""
    total = torch.zeros((), dtype=torch.float64, device=losses[0].device)
    for loss in losses:
        total = total + loss.detach().double() / len(losses)
    return total


class StepLog:
    """Pending (loss, grad_norm) of the optimizer steps since the last read, and the recorder they go to."""

    def __init__(self, recorder: LossRecorder) -> None:
        self.recorder = recorder
        self._pending: list[tuple[torch.Tensor | float, torch.Tensor | float]] = []
        self.last = (math.nan, math.nan)  # (loss, grad_norm) of the latest step read

    def add(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float) -> None:
        """One applied optimizer step (nothing is read from the device)."""
        self._pending.append((loss, grad_norm))

    def flush(self) -> tuple[float, float]:
        """Read every pending value in one device -> host transfer into the recorder -> (loss, grad_norm) of the
        latest step."""
        if self._pending:
            dev = next((v.device for row in self._pending for v in row if torch.is_tensor(v)), torch.device("cpu"))
            flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev).reshape(())
                                for row in self._pending for v in row])
            values = flat.tolist()  # the one host read of the interval
            self._pending.clear()
            for loss in values[0::2]:
                self.recorder.add(loss)
            self.last = (values[-2], values[-1])
        return self.last

    def state_dict(self) -> dict:
        """The recorder's state with every pending step in it (for the resume state)."""
        self.flush()
        return self.recorder.state_dict()
