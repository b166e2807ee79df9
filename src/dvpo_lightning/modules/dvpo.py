"""DVPO: PPO for the actor only, with a frozen Global Value Model as critic and no reward model."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.models import ModelSpec, build_value_model, read_export_info
from dvpo_lightning.modules.onpolicy import OnPolicyModule
from dvpo_lightning.rl import Scorers, StateValues


class DVPOModule(OnPolicyModule):
    """Decoupled Value Policy Optimization (docs/algorithms.md §5).

    Three models: the trained actor, the frozen reference, the frozen GVM. No critic is trained and no reward
    model is run: the per-token reward is the KL penalty alone and the GVM's values give the advantages (the `gvm`
    estimator; its option `bootstrap`, the value after the last token, is "final_value", the GVM's value of the
    complete response one discounted step after
    the last token, or "zero", the reference code's bootstrap with 0). `rollout/reward` is the GVM's value of each
    complete response.

    Args:
        value_model: the pretrained GVM (the GVM stage's export); it must share the policy's tokenizer.
        **kwargs: `sampling`, `ppo`, `advantage`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    default_estimator = "gvm"
    frozen_models = ("reference", "value_model")

    def __init__(self, value_model: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        self.value_model_spec = value_model
        self.save_hyperparameters(ignore=["tokenizer"])

    def check_model_sources(self) -> None:
        """Also refuse a GVM trained in a way this run would misread (from its export record; a GVM exported
        elsewhere has none and is trusted)."""
        super().check_model_sources()
        path = self.value_model_spec.name_or_path
        training = read_export_info(path).get("value_training", {}) if path is not None else {}
        reads_final_value = (
            self.advantage.estimator == "gvm" and self.advantage.option("bootstrap") == "final_value"
        )
        if reads_final_value and training.get("train_final_value") is False:
            raise ValueError(
                f"DVPOModule option `advantage.options.bootstrap`='final_value' reads the GVM's value of the complete "
                f"response, but the GVM at {path!r} was trained with train_final_value=false, so that value was never "
                "fitted: set bootstrap: zero, or retrain the GVM with train_final_value: true"
            )
        if "gamma" in training and training["gamma"] != self.ppo.gamma:
            rank_zero_warn(
                f"DVPOModule option `ppo.gamma`={self.ppo.gamma} differs from the gamma={training['gamma']} the GVM "
                f"at {path!r} was trained with: its values are returns discounted with another gamma"
            )

    def build_models(self) -> None:
        self.build_policy_and_reference()
        self.value_model = build_value_model(self.value_model_spec, self.tokenizer, role="global value model")

    def scorers(self) -> Scorers:
        return Scorers(values=StateValues(self.value_model))
