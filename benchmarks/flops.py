"""How far each phase is from the machine's limit: a matmul probe for the peak, and the matmul FLOPs of a phase.

The peak is measured, not looked up: the best FLOP/s of square matmuls in the benchmark's dtype with the process's
own threads (on a GPU, after a synchronize), on this machine as it is loaded now. A phase's FLOPs are counted from
the models' linear layers, the work of a transformer that grows with its tokens (attention scores and elementwise
work are left out: a few per cent at these lengths):

    forward   2 x (linear parameters of the body) per token + 2 x (LM-head parameters) per token whose logits are used
    backward  twice the forward

Tokens are real tokens (padding is overhead, not work), so a phase's fraction of the peak says how much of the
machine it turns into the model's work: the room there is to gain, and which phase to work on next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import synchronize

PROBE_SIZES = {"cpu": 1024, "cuda": 8192}
QUICK_PROBE_SIZE = 256
# The probe keeps timing matmuls until it has run this many and for this long: a machine shared with other work
# slows some of them, and the fastest of many spread over a while is the machine's rate (a best of three taken
# in one busy millisecond once put a quick run's model at 129% of its "peak").
PROBE_REPEATS = 10
PROBE_SECONDS = {"quick": 0.2, "full": 1.0}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, quick: bool = False) -> float:
    """FLOP/s of the fastest of many `n x n` matmuls (`n` = 1024 on a CPU, 8192 on a GPU; 256 when quick) in
    `dtype`, after an untimed first one (which pays for the library's set-up)."""
    size = QUICK_PROBE_SIZE if quick else PROBE_SIZES.get(device.type, 1024)
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    torch.mm(left, right)
    deadline = time.perf_counter() + PROBE_SECONDS["quick" if quick else "full"]
    best, repeats = float("inf"), 0
    while repeats < PROBE_REPEATS or time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        torch.mm(left, right)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return 2 * size**3 / best


@dataclass(frozen=True)
class LinearWork:
    """A model's parameters in linear layers: its body's and its LM head's (0 for a value model's scalar head)."""

    body: int
    head: int

    @classmethod
    def of(cls, model: nn.Module) -> LinearWork:
        total = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = output.weight.numel() if isinstance(output, nn.Linear) and output.out_features > 1 else 0
        return cls(total - head, head)

    def forward(self, tokens: float, logit_tokens: float | None = None) -> float:
        """Forward FLOPs over `tokens` tokens, the LM head over `logit_tokens` of them (default: all)."""
        return 2 * self.body * tokens + 2 * self.head * (tokens if logit_tokens is None else logit_tokens)

    def training(self, tokens: float, logit_tokens: float | None = None) -> float:
        """Forward and backward FLOPs."""
        return 3 * self.forward(tokens, logit_tokens)


def fraction_of_peak(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak


def percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if fraction >= 0.1 else f"{100 * fraction:.1f}%"


def describe_peak(peak: float, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    threads = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else str(device)
    return (
        f"Measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({str(dtype).removeprefix('torch.')}, {threads}; the best "
        "of square matmuls run by the benchmark itself). FLOP/s count the linear layers' matmuls over real tokens "
        "(forward 2 x parameters per token, backward twice that; attention scores left out)."
    )
