"""Peak memory of a phase of a run: GPU allocator peak on CUDA, resident set (VmHWM) on CPU.

On Linux, writing 5 to /proc/self/clear_refs resets VmHWM, so a CPU peak can be measured for training
alone, without the tokenizer training or data loading that came before it.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        try:
            clear_refs.write_text("5")
        except OSError:  # not permitted in some sandboxes: the peak then covers the whole process
            pass


def peak_memory_mb() -> float:
    """Peak since the last :func:`reset_peak_memory` (CUDA allocator, else resident set), in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
