"""The benchmarks of `make bench` (`python -m benchmarks.run`), one module each:

- `table`: SFT, DPO, PPO, DVPO and RTO on the built-in task, several seeds, equal budgets.
- `cost`: DVPO against PPO, peak memory and time per RL iteration, at two model sizes.
- `rollout`: tokens/s of the engine's rollout against a bare `generate` call.
- `peer`: our DPO against TRL's `DPOTrainer`, speed and first-step loss.

`report` writes the markdown and JSON results; `timing` holds the clocks and device helpers they share.

Apart from `make bench`: `gpu_check` (`make gpu-check`) runs every stage at Llama-3.2-1B's shape on a GPU (or at
toy size on a CPU, as the tests do); `gpu_plan` says what it runs and `gpu_report` what it reports.
"""
