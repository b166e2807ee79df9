"""An offline preference objective: one or several registered preference losses, weighted, as TRL's `loss_type`
list and `loss_weights`.

    PreferenceObjective("sigmoid", beta=0.1)                         # DPO
    PreferenceObjective(["sigmoid", "nll"], [1.0, 1.0], beta=0.1)    # RPO
    PreferenceObjective("simpo", beta=2.0, simpo_gamma=1.0)          # SimPO: no reference model needed
    PreferenceObjective(["sigmoid", "bco_pair", "nll"], [0.8, 0.2, 1.0])   # MPO's mixture

`beta` goes to every loss that takes it, each other option (`label_smoothing`, `ipo_normalization`,
`discopop_tau`, `simpo_gamma`) to the chosen losses that declare it; an option that none of them reads is an
error unless its value changes no loss (`NEUTRAL_OPTION_VALUES`: `label_smoothing` 0), and an option left None
takes each loss's own default. The options' values are checked once, when the
objective is built, by the losses themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dvpo_lightning.algos.losses import register_loss
from dvpo_lightning.algos.preference_losses import (
    NEUTRAL_OPTION_VALUES,
    PREFERENCE_LOSSES,
    get_preference_loss,
)

# Inputs only a reference model provides: a loss reading none of them is reference-free.
REFERENCE_INPUTS = frozenset(
    {"chosen_logratios", "rejected_logratios", "ref_chosen_logps", "ref_rejected_logps"}
)


@dataclass(frozen=True)
class PreferenceLosses:
    """What an objective gives for a batch of pairs."""

    losses: Tensor  # [B] the weighted sum of the losses per pair; the batch's loss is its mean
    chosen_rewards: Tensor  # [B] implicit rewards, detached (see `PreferenceObjective`)
    rejected_rewards: Tensor  # [B]
    terms: dict[str, Tensor]  # each loss's batch mean before weighting, detached


@dataclass(frozen=True)
class _Term:
    name: str
    weight: float
    function: Callable[..., Tensor]
    inputs: tuple[str, ...]  # the tensors it reads
    required: frozenset[str]  # those it cannot do without
    keywords: dict[str, Any]  # beta and the options handed to it


def _signature(function: Callable) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """(tensor inputs, the required ones, keyword-only options) of a registered preference loss."""
    parameters = inspect.signature(function).parameters.values()
    tensors = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    inputs = tuple(p.name for p in tensors)
    required = frozenset(p.name for p in tensors if p.default is p.empty)
    return inputs, required, tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


def _losses_with_option(option: str) -> list[str]:
    return [name for name in PREFERENCE_LOSSES if option in _signature(get_preference_loss(name))[2]]


class PreferenceObjective:
    """The weighted sum of the preference losses named in `loss_type` (one name or a list, TRL's names:
    `PREFERENCE_LOSSES`), with `loss_weights` (default 1 each).

    Implicit rewards (logged as `rewards/*`): `beta * (log pi(y) - log pi_ref(y))` when a loss reads the reference
    (TRL's DPO trainer), else `beta * log pi(y) / |y|` (TRL's CPO and ORPO trainers).
    `needs_reference` is false when no chosen loss reads a reference quantity: then no reference model is needed.
    """

    def __init__(
        self,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        *,
        beta: float = 0.1,
        **options: Any,
    ) -> None:
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if not names:
            raise ValueError("loss_type is empty: name one preference loss or a list of them")
        if len(set(names)) != len(names):
            raise ValueError(f"loss_type names a loss twice: {names}")
        weights = [1.0] * len(names) if loss_weights is None else [float(weight) for weight in loss_weights]
        if len(weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(weights)} weights for the {len(names)} losses of loss_type {names}"
            )
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        functions = {}
        for name in names:
            try:
                functions[name] = get_preference_loss(name)
            except ValueError as error:
                raise ValueError(f"loss_type: {error}") from None
        given = {option: value for option, value in options.items() if value is not None}
        self.terms = tuple(
            self._term(name, weight, functions[name], beta, given) for name, weight in zip(names, weights)
        )
        for option, value in given.items():
            neutral = option in NEUTRAL_OPTION_VALUES and value == NEUTRAL_OPTION_VALUES[option]
            if not neutral and not any(option in term.keywords for term in self.terms):
                readers = _losses_with_option(option)
                if not readers:
                    raise ValueError(f"unknown preference-loss option {option!r}")
                raise ValueError(
                    f"{option}={value!r} is read by none of loss_type {names}; it is an option of "
                    f"{', '.join(readers)}: remove it, or choose one of those losses"
                )
        self.beta = beta
        self.names = tuple(names)
        self.needs_reference = any(REFERENCE_INPUTS & set(term.inputs) for term in self.terms)
        self._check_options()

    @staticmethod
    def _term(name: str, weight: float, function: Callable, beta: float, given: dict[str, Any]) -> _Term:
        inputs, required, keyword_names = _signature(function)
        keywords = {option: value for option, value in given.items() if option in keyword_names}
        if "beta" in keyword_names:
            keywords["beta"] = beta
        return _Term(name, weight, function, inputs, required, keywords)

    def _check_options(self) -> None:
        """Evaluate every loss once on one made-up pair, so that an option out of range fails now, at start-up,
        with the loss's own message, rather than at the first training step."""
        logps, lengths = torch.full((1,), -1.0), torch.ones(1)
        reference = dict(ref_chosen_logps=logps, ref_rejected_logps=logps) if self.needs_reference else {}
        with torch.no_grad():
            self(logps, logps, chosen_lengths=lengths, rejected_lengths=lengths, **reference)

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        *,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
    ) -> PreferenceLosses:
        """The losses of a batch of pairs from sequence log-probs `[B]` summed over response tokens, and the
        response lengths `[B]` in tokens (needed by the length-normalised losses). Reference log-probs are
        detached here."""
        available = {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "chosen_lengths": chosen_lengths,
            "rejected_lengths": rejected_lengths,
        }
        if ref_chosen_logps is not None and ref_rejected_logps is not None:
            ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
            available.update(
                ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps,
                chosen_logratios=policy_chosen_logps - ref_chosen_logps,
                rejected_logratios=policy_rejected_logps - ref_rejected_logps,
            )
        available = {key: value for key, value in available.items() if value is not None}
        shapes = {key: tuple(value.shape) for key, value in available.items()}
        if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
            raise ValueError(f"preference losses take one value per pair, [B] each; got shapes {shapes}")
        losses, terms = torch.zeros_like(policy_chosen_logps), {}
        for term in self.terms:
            missing = sorted(term.required - available.keys())
            if missing:
                raise ValueError(f"the {term.name} loss needs {', '.join(missing)}")
            inputs = {key: available[key] for key in term.inputs if key in available}
            values = term.function(**inputs, **term.keywords)  # [B]
            terms[term.name] = values.detach().mean()
            losses = losses + term.weight * values
        if self.needs_reference:
            chosen, rejected = available["chosen_logratios"], available["rejected_logratios"]
        else:
            chosen = policy_chosen_logps / available["chosen_lengths"].clamp(min=1)
            rejected = policy_rejected_logps / available["rejected_lengths"].clamp(min=1)
        return PreferenceLosses(losses, self.beta * chosen.detach(), self.beta * rejected.detach(), terms)


@register_loss("dpo")
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float | None = None,
    *,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO, or any `PreferenceObjective`, in one call on sequence log-probs `[B]` (summed over response tokens).

    The default is the paper's loss, `-log sigmoid(beta h)`, `h = (log pi(y_w) - log pi_ref(y_w)) -
    (log pi(y_l) - log pi_ref(y_l))`. Returns `(losses, chosen_rewards, rejected_rewards)`, each `[B]`.
    """
    result = PreferenceObjective(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing, **options
    )(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return result.losses, result.chosen_rewards, result.rejected_rewards
