"""Checkpoints that are complete or skipped, and resumes that are exact (mixed into `ZOTrainer`)."""

from __future__ import annotations


class CheckpointSafety:
    """`Trainer` methods that guard what a run writes to and reads back from ``output_dir``."""
