"""Built-in offline tasks: small synthetic worlds with a tokenizer, data and a gold reward.

They need no download, are generated in well under a second and are deterministic from a seed, so
the demo, configs, tests and benchmarks can train tiny transformers end to end on a CPU.
`get_task("topics")` is the default (see `topics`), `get_task("topics-long")` its variant with longer answers;
`base.BuiltinTask` is what a task provides.
"""

from __future__ import annotations

from .base import BuiltinTask
from .topics import LongTopicsTask, TopicsTask

TASKS: dict[str, type[BuiltinTask]] = {task.name: task for task in (TopicsTask, LongTopicsTask)}


def get_task(name: str, seed: int = 0) -> BuiltinTask:
    """The built-in task `name` (as in `builtin:<name>`) with datasets drawn from `seed`."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](seed=seed)


__all__ = ["TASKS", "BuiltinTask", "LongTopicsTask", "TopicsTask", "get_task"]
