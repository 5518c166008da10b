"""Snapshots of the global RNG that dropout draws from: the CPU's and, on a GPU, that device's."""

from __future__ import annotations

import torch


class RngState:
    """Snapshot of the global RNG of the CPU and of ``device``: restored before each probe forward, so every probe
    sees the same dropout masks; after the gradient probe, so a run's trajectory does not depend on it; and after a
    call that prefix reuse serves, so what runs after it draws the numbers it would have drawn."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def __eq__(self, other) -> bool:
        return torch.equal(self.cpu, other.cpu) and (self.accel is None or torch.equal(self.accel, other.accel))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.cuda.set_rng_state(self.accel, self.device)
