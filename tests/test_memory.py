import torch

from zo_trainer.memory import peak_memory_mb, reset_peak_memory


def test_peak_memory_sees_a_phase_and_resets():
    reset_peak_memory()
    before = peak_memory_mb()
    block = torch.ones(50_000_000)  # 191 MiB, touched
    del block
    during = peak_memory_mb()
    assert during - before > 150
    reset_peak_memory()
    assert peak_memory_mb() < during - 150  # the freed block no longer counts
