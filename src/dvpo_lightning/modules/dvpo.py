"""DVPO: PPO for the actor only, with a frozen Global Value Model as critic and no reward model."""

from __future__ import annotations

import torch

from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.models import ModelSpec, build_value_model, read_export_info
from dvpo_lightning.modules.generation import Responses
from dvpo_lightning.modules.onpolicy import OnPolicyModule, Scores
from dvpo_lightning.modules.scoring import final_values, state_values

TERMINALS = ("gvm", "zero")


class DVPOModule(OnPolicyModule):
    """Decoupled Value Policy Optimization (the algorithms doc, section 2).

    Three models: the trained actor, the frozen reference, the frozen GVM. No critic is trained and no reward
    model is run: the per-token reward is the KL penalty alone and the GVM's values give the advantages
    (the `gvm` estimator). `rollout/reward` is the GVM's value of each complete response.

    Args:
        value_model: the pretrained GVM (the GVM stage's export); it must share the policy's tokenizer.
        terminal: "gvm" (default): the GVM's value of the complete response is the value of the state after the
            last token, so the last token's TD error is r_T + gamma * V_gvm(x, y) - V(s_T), as the GVM was trained
            (with `ppo.gamma` equal to the GVM's `gamma`); "zero": the reference code's bootstrap with 0, so the last
            TD error is -V(s_T).
        **kwargs: `sampling`, `ppo`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    advantage_estimator = "gvm"
    frozen_models = ("reference", "value_model")

    def __init__(
        self,
        value_model: ModelSpec,
        terminal: str = "gvm",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if terminal not in TERMINALS:
            raise ValueError(f"terminal must be one of {TERMINALS}; got {terminal!r}")
        self.value_model_spec = value_model
        self.terminal = terminal
        self.save_hyperparameters(ignore=["tokenizer"])

    def check_model_sources(self) -> None:
        """Also refuse a GVM trained in a way this run would misread (from its export record; a GVM exported
        elsewhere has none and is trusted)."""
        super().check_model_sources()
        path = self.value_model_spec.name_or_path
        training = read_export_info(path).get("value_training", {}) if path is not None else {}
        if self.terminal == "gvm" and training.get("train_final_value") is False:
            raise ValueError(
                f"DVPOModule option `terminal`='gvm' reads the GVM's value of the complete response, but the GVM at "
                f"{path!r} was trained with train_final_value=false, so that value was never fitted: set "
                "terminal: zero, or retrain the GVM with train_final_value: true"
            )
        if "gamma" in training and training["gamma"] != self.ppo.gamma:
            rank_zero_warn(
                f"DVPOModule option `ppo.gamma`={self.ppo.gamma} differs from the gamma={training['gamma']} the GVM "
                f"at {path!r} was trained with: its values are returns discounted with another gamma"
            )

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
            sequence_scores=self.penalize_unfinished(None, responses.finished),
            estimator_kwargs={"final_values": final, "terminal": self.terminal},
        )
