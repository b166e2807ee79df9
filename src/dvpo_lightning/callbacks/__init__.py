"""Callbacks on by default in every `dvpo` run: progress with true totals, peak memory, throughput, sample tables,
the random state in checkpoints and the non-finite guard.

They work with any LightningModule; on-policy modules add hooks around the phases of an RL iteration (`on_rl_phase_start` /
`on_rl_phase_end`), `num_samples` / `num_tokens` in their training_step output and `last_samples`.
"""

from dvpo_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from dvpo_lightning.callbacks.peak_memory import PeakMemoryMonitor
from dvpo_lightning.callbacks.progress import ProgressLines, RunLength, TotalsRichProgressBar
from dvpo_lightning.callbacks.random_state import RandomState
from dvpo_lightning.callbacks.samples import SampleLogger
from dvpo_lightning.callbacks.throughput import ThroughputMonitor

__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "PeakMemoryMonitor",
    "ProgressLines",
    "RandomState",
    "RunLength",
    "SampleLogger",
    "ThroughputMonitor",
    "TotalsRichProgressBar",
]
