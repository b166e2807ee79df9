"""The benchmarks of `make bench` (`python -m benchmarks.run`), one module each:

- `table`: SFT, DPO, PPO, DVPO and RTO on the built-in task, several seeds, equal budgets.
- `cost`: DVPO against PPO, peak memory and time per RL iteration, at two model sizes.
- `rollout`: tokens/s of the engine's rollout against a bare `generate` call.
- `peer`: our DPO against TRL's `DPOTrainer`, speed and first-step loss.

`report` writes the markdown and JSON results; `timing` holds the clocks and device helpers they share.
"""
