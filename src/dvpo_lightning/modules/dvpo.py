"""DVPO: PPO for the actor only, with a frozen Global Value Model as critic and no reward model."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.models import ModelSpec, build_value_model, read_export_info, value_form
from dvpo_lightning.modules.onpolicy import OnPolicyModule
from dvpo_lightning.rl import GoldValues, Scorers, StateValues


class DVPOModule(OnPolicyModule):
    """Decoupled Value Policy Optimization (docs/algorithms.md §5).

    Three models: the trained actor, the frozen reference, the frozen GVM. No critic is trained and no reward
    model is run: the per-token reward is the KL penalty alone and the GVM's values give the advantages (the `gvm`
    estimator; its option `bootstrap`, the value after the last token, is "final_value", the GVM's value of the
    complete response one discounted step after
    the last token, or "zero", the reference code's bootstrap with 0). `rollout/reward` is the GVM's value of each
    complete response.

    `gold_values` replaces the GVM by the oracle of the built-in task (`rl.GoldValues`): V(s_t) is the gold reward
    the prefix has earned, so DVPO's advantages are the gold return-to-go of each token (a diagnostic: the upper
    bound of a frozen critic; the gold reward is known only on the built-in task).

    Args:
        value_model: the pretrained GVM (the GVM stage's export); it must share the policy's tokenizer.
        gold_values: use the built-in task's gold values instead of a GVM (give no `value_model` then).
        **kwargs: `sampling`, `ppo`, `advantage`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    default_estimator = "gvm"
    frozen_models = ("reference", "value_model")

    def __init__(self, value_model: ModelSpec | None = None, gold_values: bool = False, **kwargs):
        super().__init__(**kwargs)
        if (value_model is None) != gold_values:
            raise ValueError(
                "DVPOModule takes its values from exactly one of `value_model` (a GVM export) or "
                f"gold_values=true (the built-in task's oracle); got value_model={value_model}, "
                f"gold_values={gold_values}"
            )
        if gold_values and self.ppo.gamma != 1.0:
            raise ValueError(
                f"DVPOModule option gold_values=true needs `ppo.gamma`=1 (the gold values are undiscounted rewards "
                f"earned so far); got {self.ppo.gamma}"
            )
        self.value_model_spec = value_model
        self.gold_values = gold_values
        self.save_hyperparameters(ignore=["tokenizer"])

    def check_model_sources(self) -> None:
        """Also refuse a GVM trained in a way this run would misread (from its export record; a GVM exported
        elsewhere has none and is trusted)."""
        super().check_model_sources()
        path = self.value_model_spec.name_or_path if self.value_model_spec is not None else None
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
        if training.get("value_form") == "earned":
            self.check_earned_values(path)
        elif "gamma" in training and training["gamma"] != self.ppo.gamma:
            rank_zero_warn(
                f"DVPOModule option `ppo.gamma`={self.ppo.gamma} differs from the gamma={training['gamma']} the GVM "
                f"at {path!r} was trained with: its values are returns discounted with another gamma"
            )

    def check_earned_values(self, path: str) -> None:
        """A GVM of value_form "earned" holds the reward each prefix has earned, undiscounted; its TD errors are its
        token rewards only if the complete response keeps its value after the last token and gamma is 1."""
        if self.advantage.estimator != "gvm" or self.advantage.option("bootstrap") != "final_value":
            raise ValueError(
                f"the GVM at {path!r} was trained with value_form='earned' (a state's value is the reward earned so "
                "far), so the complete response's value must follow the last token: DVPOModule needs "
                "`advantage.estimator`='gvm' with `advantage.options.bootstrap`='final_value'"
            )
        if self.ppo.gamma != 1.0:
            raise ValueError(
                f"the GVM at {path!r} was trained with value_form='earned' (undiscounted rewards earned so far): "
                f"DVPOModule option `ppo.gamma` must be 1; got {self.ppo.gamma}"
            )

    def build_models(self) -> None:
        self.build_policy_and_reference()
        if not self.gold_values:
            self.value_model = build_value_model(
                self.value_model_spec, self.tokenizer, role="global value model"
            )
            # Its config says how to read it, with or without an export record.
            if value_form(self.value_model) == "earned":
                self.check_earned_values(self.value_model_spec.name_or_path)

    def scorers(self) -> Scorers:
        if self.gold_values:
            if self.gold_task is None:
                raise ValueError(
                    "DVPOModule option gold_values=true needs the gold reward of a built-in task: train on "
                    "--data.init_args.dataset builtin:<task>"
                )
            return Scorers(values=GoldValues(self.gold_task, self.tokenizer))
        return Scorers(values=StateValues(self.value_model))
