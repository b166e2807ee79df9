"""DVPO: PPO for the actor only, with a frozen Global Value Model as critic and no reward model."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.generation import Responses, SamplingConfig
from dvpo_lightning.modules.onpolicy import OnPolicyModule, PPOConfig, Scores
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.scoring import final_values, state_values
from dvpo_lightning.modules.sharding import FSDPConfig

TERMINALS = ("gvm", "zero")


class DVPOModule(OnPolicyModule):
    """Decoupled Value Policy Optimization (the algorithms doc, section 2).

    Three models: the trained actor, the frozen reference, the frozen GVM. No critic is trained and no reward
    model is run: the per-token reward is the KL penalty alone and the GVM's values give the advantages
    (the `gvm` estimator). `rollout/reward` is the GVM's value of each complete response.

    Args:
        policy: the actor, usually the SFT export.
        value_model: the pretrained GVM (the GVM stage's export); it must share the policy's tokenizer.
        terminal: "gvm" (default): the GVM's value of the complete response is the terminal reward, so the last
            token's TD error is V_gvm(x, y) - V(s_T); "zero": the reference code's bootstrap with 0, so the last
            TD error is -V(s_T).
        reference: the frozen reference; default: the policy's starting weights (a frozen copy, or the LoRA
            policy with its adapter disabled).
        reference_as_disabled_adapter: see `PolicyModule`.
        sampling: how rollouts are sampled.
        ppo: the update settings (`PPOConfig`); `value_clip` is unused (no critic).
        optim: the actor's optimiser and schedule.
        eval_sampling: how validation prompts are answered; None skips generation metrics.
        tokenizer: set by the CLI from the data module.
        export_dir: where the policy is exported; default `<default_root_dir>/model`.
        fsdp: sharding settings under `ModelParallelStrategy` (FSDP2); ignored otherwise.
    """

    advantage_estimator = "gvm"
    frozen_models = ("reference", "value_model")

    def __init__(
        self,
        policy: ModelSpec,
        value_model: ModelSpec,
        terminal: str = "gvm",
        reference: ModelSpec | None = None,
        reference_as_disabled_adapter: bool | None = None,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        export_dir: str | None = None,
        fsdp: FSDPConfig | None = None,
    ):
        super().__init__(
            policy=policy,
            reference=reference,
            reference_as_disabled_adapter=reference_as_disabled_adapter,
            sampling=sampling,
            ppo=ppo,
            optim=optim,
            eval_sampling=eval_sampling,
            tokenizer=tokenizer,
            export_dir=export_dir,
            fsdp=fsdp,
        )
        if terminal not in TERMINALS:
            raise ValueError(f"terminal must be one of {TERMINALS}; got {terminal!r}")
        self.value_model_spec = value_model
        self.terminal = terminal
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()
        self.value_model = build_value_model(self.value_model_spec, self.tokenizer, role="global value model")

    def score(self, responses: Responses, ref_logprobs: torch.Tensor) -> Scores:
        rows = self.scoring_rows(len(responses.finished))
        values = torch.cat([state_values(self.value_model, responses.select(r)) for r in rows])  # [B, R + 1]
        final = final_values(values, responses.response_mask)
        return Scores(
            reward=final,
            values=values[:, :-1],
            estimator_kwargs={"final_values": final, "terminal": self.terminal},
        )
