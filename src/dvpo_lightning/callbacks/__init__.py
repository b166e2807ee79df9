"""Callbacks on by default in every `dvpo` run: peak memory, throughput and sample tables.

They work with any LightningModule; on-policy modules add RL stage hooks (`on_rl_stage_start` /
`on_rl_stage_end`), `num_samples` / `num_tokens` in their training_step output and `last_samples`.
"""

from dvpo_lightning.callbacks.peak_memory import PeakMemoryMonitor
from dvpo_lightning.callbacks.samples import SampleLogger
from dvpo_lightning.callbacks.throughput import ThroughputMonitor

__all__ = ["PeakMemoryMonitor", "SampleLogger", "ThroughputMonitor"]
