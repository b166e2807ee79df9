"""Offline preference losses — DPO and its family, SimPO, ORPO, the RPO NLL term — registered by TRL's names.

Each is a pure function of per-pair tensors `[B]` that returns per-pair losses `[B]`; a batch's loss is their
mean. A loss reads, by these parameter names, only what it needs:

- `chosen_logratios`, `rejected_logratios`: `log pi(y|x) - log pi_ref(y|x)` of the chosen (`y_w`) and rejected
  (`y_l`) response, sequence log-probs summed over response tokens; below, `c` and `r`, and `h = c - r`;
- `policy_chosen_logps`, `policy_rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps`: the sequence
  log-probs themselves (`ref_*` never receive a gradient);
- `chosen_lengths`, `rejected_lengths`: the number of response tokens, `|y_w|` and `|y_l|`;

then, keyword-only, `beta` (all but `nll`) and the loss's own options. A loss that reads no reference quantity (SimPO, ORPO,
NLL) is reference-free. `PreferenceObjective` (algos/preference_objective.py) hands each chosen loss its inputs
and options by these names, combines several with weights, and checks the options once at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dvpo_lightning.algos.registry import Registry

PREFERENCE_LOSSES = Registry("preference loss")
register_preference_loss = PREFERENCE_LOSSES.register
get_preference_loss = PREFERENCE_LOSSES.get

IPO_NORMALIZATIONS = ("sum", "token_mean")
#: option values that change no loss, so that a loss not reading the option need not refuse them: no label flips
#: (the value every DPO checkpoint stored before options became per-loss)
NEUTRAL_OPTION_VALUES = {"label_smoothing": 0.0}


def _check_flip_rate(label_smoothing: float, loss: str) -> None:
    """A label-flip probability must lie in [0, 0.5): at 0.5 the labels carry no information."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for the {loss} loss, got {label_smoothing}")


def _smoothed_logistic(margin: Tensor, label_smoothing: float) -> Tensor:
    """`-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)`: the logistic loss of a label flipped with probability eps."""
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def _per_token_margin(
    chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """`chosen / |y_w| - rejected / |y_l|`: a margin of sums made one of per-token averages."""
    return chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)


@register_preference_loss("sigmoid")
def sigmoid_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): `-log sigmoid(beta h)`.

    `label_smoothing = eps` > 0 is conservative DPO (cDPO, Mitchell 2023): each label assumed flipped with
    probability eps, `-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`.
    """
    _check_flip_rate(label_smoothing, "sigmoid")
    return _smoothed_logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)


@register_preference_loss("sigmoid_norm")
def sigmoid_norm_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> Tensor:
    """Length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv 2411.15124): `-log sigmoid(beta (c/|y_w| - r/|y_l|))`."""
    return -F.logsigmoid(
        beta * _per_token_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    )


@register_preference_loss("hinge")
def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SLiC's hinge (Zhao et al. 2023, arXiv 2305.10425) on the log-ratio margin: `max(0, 1 - beta h)`."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


@register_preference_loss("ipo")
def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float,
    ipo_normalization: str = "sum",
) -> Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; `beta` is the paper's tau): `(h - 1 / (2 beta))^2`.

    `ipo_normalization`: "sum" uses the log-ratios summed over the response, as the paper writes them and
    OpenRLHF computes them; "token_mean" divides each by its response length, `h = c/|y_w| - r/|y_l|` (TRL's
    `ipo`, which its authors report is what the paper's experiments used). The squared loss scales with the
    square of the response length under "sum", so the two need very different `beta`.
    """
    if ipo_normalization == "sum":
        margin = chosen_logratios - rejected_logratios
    elif ipo_normalization == "token_mean":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_normalization='token_mean' needs chosen_lengths and rejected_lengths")
        margin = _per_token_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    else:
        raise ValueError(f"ipo_normalization must be one of {IPO_NORMALIZATIONS}, got {ipo_normalization!r}")
    return (margin - 1 / (2 * beta)) ** 2


@register_preference_loss("robust")
def robust_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.1
) -> Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409), unbiased under labels flipped with probability eps:
    `((1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))) / (1 - 2 eps)`.

    `label_smoothing = eps` defaults to 0.1 here (the paper's typical rate; TRL defaults to 0, which is DPO).
    """
    _check_flip_rate(label_smoothing, "robust")
    margin = beta * (chosen_logratios - rejected_logratios)
    clean, flipped = -F.logsigmoid(margin), -F.logsigmoid(-margin)
    return ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)


@register_preference_loss("exo_pair")
def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 1e-3
) -> Tensor:
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16 with K = 2): the reverse KL from the policy's preference
    `q = softmax(beta (c, r))` to the smoothed label `p = (1 - eps, eps)`:
    `q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)`, `q_w = sigmoid(beta h)`, `q_l = sigmoid(-beta h)`.

    `label_smoothing = eps` must lie in (0, 1) (the KL is infinite at 0); default 1e-3, the paper's value.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in (0, 1) for the exo_pair loss, got {label_smoothing}")
    margin = beta * (chosen_logratios - rejected_logratios)
    eps = torch.tensor(label_smoothing, dtype=margin.dtype, device=margin.device)
    chosen_term = torch.sigmoid(margin) * (F.logsigmoid(margin) - torch.log1p(-eps))
    rejected_term = torch.sigmoid(-margin) * (F.logsigmoid(-margin) - torch.log(eps))
    return chosen_term + rejected_term


@register_preference_loss("nca_pair")
def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369), pairwise: `-log sigmoid(beta c) - 1/2 log sigmoid(-beta c)
    - 1/2 log sigmoid(-beta r)`: absolute rewards, so the chosen response's likelihood cannot fall with the rejected's."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register_preference_loss("bco_pair")
def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """BCO (Jung et al. 2024, arXiv 2404.04656) on pairs, as TRL computes it (no reward shift):
    `-log sigmoid(beta c) - log sigmoid(-beta r)`, a binary classifier of chosen against rejected responses."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


@register_preference_loss("sppo_hard")
def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SPPO (Wu et al. 2024, arXiv 2405.00675, eq. 4.7) with hard win probabilities (1 for y_w, 0 for y_l):
    `(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2`."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def _sorted_logistic(
    policy_margins: Tensor, reference_margins: Tensor, beta: float, label_smoothing: float, loss: str
) -> Tensor:
    """AOT's loss: the logistic loss of the two sorted samples' difference, quantile by quantile."""
    _check_flip_rate(label_smoothing, loss)
    delta = torch.sort(policy_margins).values - torch.sort(reference_margins).values
    return _smoothed_logistic(beta * delta, label_smoothing)


@register_preference_loss("aot")
def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT (Melnyk et al. 2024, arXiv 2406.05882), paired: the batch's policy margins `log pi(y_w) - log pi(y_l)`
    and reference margins, each sorted, must dominate quantile by quantile:
    `-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)`, `delta` = sorted policy - sorted reference.

    Sorting couples the pairs of a batch, so the loss depends on how a batch is split across micro-batches
    and processes (as in TRL).
    """
    return _sorted_logistic(
        policy_chosen_logps - policy_rejected_logps,
        ref_chosen_logps.detach() - ref_rejected_logps.detach(),
        beta,
        label_smoothing,
        "aot",
    )


@register_preference_loss("aot_unpaired")
def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT, unpaired: the batch's chosen log-ratios, sorted, must dominate its rejected log-ratios, sorted
    (`delta` = sorted c - sorted r in `aot`'s loss)."""
    return _sorted_logistic(chosen_logratios, rejected_logratios, beta, label_smoothing, "aot_unpaired")


@register_preference_loss("apo_zero")
def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7), for chosen responses better than the policy's:
    `1 - sigmoid(beta c) + sigmoid(beta r)` raises the chosen likelihood and lowers the rejected one."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


@register_preference_loss("apo_down")
def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-down (same paper, eq. 8), for chosen responses worse than the policy's:
    `sigmoid(beta c) + 1 - sigmoid(beta h)` lowers both likelihoods, the rejected one more."""
    return (
        torch.sigmoid(beta * chosen_logratios)
        + 1
        - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    )


@register_preference_loss("discopop")
def discopop_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, discopop_tau: float = 0.05
) -> Tensor:
    """DiscoPOP's log-ratio modulated loss (Lu et al. 2024, arXiv 2406.08414, eq. 5), `rho = beta h`:
    `(1 - sigmoid(rho / tau)) (-log sigmoid(rho)) + sigmoid(rho / tau) exp(-rho)`, a logistic loss blending into
    an exponential one as the margin grows; `discopop_tau` defaults to the paper's 0.05."""
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    rho = beta * (chosen_logratios - rejected_logratios)
    # sigmoid(rho / tau) exp(-rho) in one exp: below rho = -88.7 exp(-rho) alone overflows (0 * inf = NaN).
    exponential = torch.exp(F.logsigmoid(rho / discopop_tau) - rho)
    return torch.sigmoid(-rho / discopop_tau) * -F.logsigmoid(rho) + exponential


@register_preference_loss("nll")
def nll_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen responses, per token over the batch: `-sum log pi(y_w) / sum |y_w|`.

    RPO (Pang et al. 2024, arXiv 2404.19733) adds it to DPO with a weight (`loss_type: [sigmoid, nll]`,
    `loss_weights: [1.0, alpha]`); TRL's `sft` loss type and CPO's `cpo_alpha` term. Returned as each pair's share
    `-log pi(y_w) * B / sum |y_w|`, whose batch mean is the token mean.
    """
    return -policy_chosen_logps * policy_chosen_logps.shape[0] / chosen_lengths.sum().clamp(min=1)


@register_preference_loss("simpo")
def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6), reference-free:
    `-log sigmoid(beta log pi(y_w) / |y_w| - beta log pi(y_l) / |y_l| - gamma)`, length-normalised log-probs and
    a target margin `gamma = simpo_gamma` (the paper uses beta 2 to 10 and gamma 0.3 to 1.6, about gamma/beta = 0.5).
    `label_smoothing` as in `sigmoid` (TRL's CPO trainer offers it).
    """
    _check_flip_rate(label_smoothing, "simpo")
    margin = _per_token_margin(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    return _smoothed_logistic(beta * margin - simpo_gamma, label_smoothing)


LOG_2 = 0.6931471805599453


def _log1mexp(x: Tensor) -> Tensor:
    """`log(1 - exp(x))` for x < 0, without cancellation (branching at -log 2).

    Each branch gets an input inside its own range: `torch.where` back-propagates through the branch it did not
    pick too, and `log1p(-exp(x))` near 0 (its gradient infinite) would make that 0 * inf = NaN.
    """
    far, near = x.clamp(max=-LOG_2), x.clamp(min=-LOG_2)
    return torch.where(x < -LOG_2, torch.log1p(-torch.exp(far)), torch.log(-torch.expm1(near)))


def _odds_ratio_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """`-log sigmoid(log odds(c) - log odds(r))` of mean log-probs `c`, `r` `[B]`, finite with its gradient up to
    c = 0 (a chosen response of probability 1, whose log-odds are infinite).

    For c >= -log 2 it is written `log(p_c + odds(r) (1 - p_c)) - c` (`p_c = exp(c)`), which never forms odds(c):
    its gradient in c at 0 is the limit `-odds(r)`. Below, the log-odds form, each branch given safe inputs.
    """
    log_odds_rejected = rejected - _log1mexp(rejected)
    near, far = chosen.clamp(min=-LOG_2), chosen.clamp(max=-LOG_2)
    near_loss = torch.log(torch.exp(near) - torch.exp(log_odds_rejected) * torch.expm1(near)) - near
    far_loss = F.softplus(log_odds_rejected - (far - _log1mexp(far)))
    return torch.where(chosen < -LOG_2, far_loss, near_loss)


@register_preference_loss("orpo")
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> Tensor:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 2-7), reference-free: the NLL of the chosen responses
    (`nll`) plus `beta` (the paper's lambda) times the odds-ratio term `-log sigmoid(log odds(y_w) - log odds(y_l))`,
    `odds(y) = p / (1 - p)` with `p` the per-token mean probability `exp(log pi(y) / |y|)`.

    The NLL covers the response tokens, as in the paper; TRL's ORPO trainer also counts the prompt's.
    """
    chosen = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = policy_rejected_logps / rejected_lengths.clamp(min=1)
    return nll_loss(policy_chosen_logps, chosen_lengths) + beta * _odds_ratio_loss(chosen, rejected)
