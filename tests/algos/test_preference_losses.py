"""The offline preference losses: every formula against a hand-computed case, their combination with weights, which
inputs get gradients, which losses need a reference, and the option checks."""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import PREFERENCE_LOSSES, PreferenceObjective, dpo_loss


def sp(x: float) -> float:
    """softplus, `log(1 + e^x) = -log sigmoid(-x)`."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(1 - math.exp(mean_logp))


# Two pairs, beta = 0.5.
# pair 0: policy log pi(y_w) = -1, log pi(y_l) = -3, reference -2 and -2: log-ratios c = 1, r = -1, h = 2;
#         |y_w| = 2, |y_l| = 4.
# pair 1: policy -2 and -1, reference -1 and -1: c = -1, r = 0, h = -1; |y_w| = 4, |y_l| = 2.
# So beta h = (1, -0.5), beta c = (0.5, -0.5), beta r = (-0.5, 0); per-token log-ratio margins
# c/|y_w| - r/|y_l| = (0.75, -0.25); per-token policy margins (-1/2 + 3/4, -2/4 + 1/2) = (0.25, 0).
BETA = 0.5
PAIRS = dict(
    policy_chosen_logps=torch.tensor([-1.0, -2.0]),
    policy_rejected_logps=torch.tensor([-3.0, -1.0]),
    ref_chosen_logps=torch.tensor([-2.0, -1.0]),
    ref_rejected_logps=torch.tensor([-2.0, -1.0]),
    chosen_lengths=torch.tensor([2, 4]),
    rejected_lengths=torch.tensor([4, 2]),
)
NLL_SHARES = [1 / 3, 2 / 3]  # token mean -(-1 - 2) / (2 + 4) = 0.5; pair shares -log pi(y_w) * 2 / 6

# name -> (options, expected per-pair losses), each the paper's formula with the numbers above put in.
CASES = {
    # DPO with cDPO's eps = 0.1: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    "sigmoid": ({"label_smoothing": 0.1}, [0.9 * sp(-1.0) + 0.1 * sp(1.0), 0.9 * sp(0.5) + 0.1 * sp(-0.5)]),
    "sigmoid_norm": ({}, [sp(-0.375), sp(0.125)]),  # -log sigmoid(0.5 * (0.75, -0.25))
    "hinge": ({}, [0.0, 1.5]),  # max(0, 1 - beta h)
    "ipo": ({}, [(2 - 1) ** 2, (-1 - 1) ** 2]),  # (h - 1 / (2 beta))^2, summed log-ratios
    "robust": (
        {"label_smoothing": 0.2},
        [(0.8 * sp(-1.0) - 0.2 * sp(1.0)) / 0.6, (0.8 * sp(0.5) - 0.2 * sp(-0.5)) / 0.6],
    ),
    "exo_pair": (
        {"label_smoothing": 0.01},
        [
            sig(x) * (math.log(sig(x)) - math.log(0.99)) + sig(-x) * (math.log(sig(-x)) - math.log(0.01))
            for x in (1.0, -0.5)
        ],
    ),
    "nca_pair": ({}, [sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-0.5), sp(0.5) + 0.5 * sp(-0.5) + 0.5 * sp(0.0)]),
    "bco_pair": ({}, [sp(-0.5) + sp(-0.5), sp(0.5) + sp(0.0)]),
    "sppo_hard": ({}, [(1 - 1) ** 2 + (-1 + 1) ** 2, (-1 - 1) ** 2 + (0 + 1) ** 2]),
    # policy margins (2, -1) and reference margins (0, 0), sorted: delta = (-1, 2), quantile by quantile
    "aot": ({}, [sp(0.5), sp(-1.0)]),
    # chosen log-ratios sorted (-1, 1), rejected sorted (-1, 0): delta = (0, 1)
    "aot_unpaired": ({}, [math.log(2), sp(-0.5)]),
    "apo_zero": ({}, [1 - sig(0.5) + sig(-0.5), 1 - sig(-0.5) + sig(0.0)]),
    "apo_down": ({}, [sig(0.5) + 1 - sig(1.0), sig(-0.5) + 1 - sig(-0.5)]),
    # rho = beta h = (1, -0.5), tau = 1: (1 - sigmoid(rho)) softplus(-rho) + sigmoid(rho) exp(-rho)
    "discopop": (
        {"discopop_tau": 1.0},
        [(1 - sig(x)) * sp(-x) + sig(x) * math.exp(-x) for x in (1.0, -0.5)],
    ),
    "nll": ({}, NLL_SHARES),
    # beta * (0.25, 0) - gamma, gamma = 0.5
    "simpo": ({"simpo_gamma": 0.5}, [sp(0.375), sp(0.5)]),
    # mean log-probs: chosen (-0.5, -0.5), rejected (-0.75, -0.5)
    "orpo": (
        {},
        [NLL_SHARES[0] + 0.5 * sp(-(log_odds(-0.5) - log_odds(-0.75))), NLL_SHARES[1] + 0.5 * sp(0.0)],
    ),
}


def test_every_registered_loss_has_a_hand_computed_case():
    assert set(CASES) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_formula_by_hand(name):
    options, expected = CASES[name]
    losses = PreferenceObjective(name, beta=BETA, **options)(**PAIRS).losses
    assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_ipo_token_mean_divides_each_log_ratio_by_its_length_as_trl_does():
    # (c/|y_w| - r/|y_l| - 1 / (2 beta))^2 = (0.75 - 1)^2, (-0.25 - 1)^2; the summed default gives (1, 4)
    losses = PreferenceObjective("ipo", beta=BETA, ipo_normalization="token_mean")(**PAIRS).losses
    assert losses.tolist() == pytest.approx([0.0625, 1.5625])


def test_weighted_losses_add_per_pair_and_report_each_term():
    # RPO: DPO plus alpha = 0.5 times the NLL of the chosen responses
    result = PreferenceObjective(["sigmoid", "nll"], [1.0, 0.5], beta=BETA)(**PAIRS)
    expected = [sp(-1.0) + 0.5 * NLL_SHARES[0], sp(0.5) + 0.5 * NLL_SHARES[1]]
    assert result.losses.tolist() == pytest.approx(expected)
    assert result.losses.mean().item() == pytest.approx((sp(-1.0) + sp(0.5)) / 2 + 0.5 * 0.5)
    assert result.terms["nll"].item() == pytest.approx(0.5)  # unweighted: the token-mean NLL
    assert result.terms["sigmoid"].item() == pytest.approx((sp(-1.0) + sp(0.5)) / 2)


def test_implicit_rewards_are_log_ratios_with_a_reference_and_mean_log_probs_without():
    with_reference = PreferenceObjective("sigmoid", beta=BETA)(**PAIRS)
    assert with_reference.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert with_reference.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    reference_free = PreferenceObjective("simpo", beta=BETA)(**PAIRS)
    assert reference_free.chosen_rewards.tolist() == pytest.approx([-0.25, -0.25])
    assert reference_free.rejected_rewards.tolist() == pytest.approx([-0.375, -0.25])


def test_only_simpo_orpo_and_nll_are_reference_free():
    free = {name for name in PREFERENCE_LOSSES if not PreferenceObjective(name).needs_reference}
    assert free == {"simpo", "orpo", "nll"}
    assert PreferenceObjective(["simpo", "nll"]).needs_reference is False
    assert PreferenceObjective(["orpo", "sigmoid"]).needs_reference is True


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_the_policy_log_probs_only(name):
    options, _ = CASES[name]
    inputs = {
        key: value.clone().float().requires_grad_(True) if "logps" in key else value
        for key, value in PAIRS.items()
    }
    PreferenceObjective(name, beta=BETA, **options)(**inputs).losses.sum().backward()
    assert inputs["policy_chosen_logps"].grad.abs().sum() > 0
    if name != "nll":  # the NLL of the chosen responses only
        assert inputs["policy_rejected_logps"].grad.abs().sum() > 0
    assert inputs["ref_chosen_logps"].grad is None and inputs["ref_rejected_logps"].grad is None


def test_dpo_loss_is_the_objective_in_one_call():
    losses, chosen_rewards, _ = dpo_loss(
        PAIRS["policy_chosen_logps"],
        PAIRS["policy_rejected_logps"],
        PAIRS["ref_chosen_logps"],
        PAIRS["ref_rejected_logps"],
        BETA,
        "robust",
        0.2,
    )
    assert losses.tolist() == pytest.approx(CASES["robust"][1])
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.5])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            dict(loss_type="hnge"),
            r"loss_type: unknown preference loss 'hnge'; known: aot, aot_unpaired, apo_down",
        ),
        (dict(loss_type=[]), "loss_type is empty"),
        (dict(loss_type=["sigmoid", "sigmoid"]), "loss_type names a loss twice"),
        (
            dict(loss_type=["sigmoid", "nll"], loss_weights=[1.0]),
            "loss_weights has 1 weights for the 2 losses",
        ),
        (dict(beta=0.0), "beta must be > 0"),
        (
            dict(loss_type="ipo", label_smoothing=0.1),
            r"label_smoothing=0.1 is read by none of loss_type \['ipo'\]; it is an option of aot, aot_unpaired, "
            r"exo_pair, robust, sigmoid, simpo",
        ),
        (dict(loss_type="sigmoid", simpo_gamma=1.0), "simpo_gamma=1.0 is read by none of loss_type"),
        (dict(ipo_flavour="sum"), "unknown preference-loss option 'ipo_flavour'"),
        # option values, checked by the losses themselves when the objective is built
        (
            dict(loss_type="ipo", ipo_normalization="mean"),
            r"ipo_normalization must be one of \('sum', 'token_mean'\)",
        ),
        (
            dict(loss_type="exo_pair", label_smoothing=0.0),
            r"label_smoothing must lie in \(0, 1\) for the exo_pair",
        ),
        (
            dict(loss_type="robust", label_smoothing=0.5),
            r"label_smoothing must lie in \[0, 0.5\) for the robust",
        ),
        (
            dict(loss_type="sigmoid", label_smoothing=-0.1),
            r"label_smoothing must lie in \[0, 0.5\) for the sigmoid",
        ),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
    ],
)
def test_bad_objectives_fail_when_built_naming_the_option(arguments, message):
    with pytest.raises(ValueError, match=message):
        PreferenceObjective(**arguments)


def test_an_option_at_its_neutral_value_is_accepted_by_losses_that_do_not_read_it():
    # label_smoothing 0 flips no label: it changes no loss, so IPO (which has no such option) accepts it
    objective = PreferenceObjective("ipo", beta=BETA, label_smoothing=0.0)
    assert objective(**PAIRS).losses.tolist() == pytest.approx([1.0, 4.0])
    with pytest.raises(ValueError, match="label_smoothing=0.05 is read by none of loss_type"):
        PreferenceObjective("ipo", beta=BETA, label_smoothing=0.05)


def test_missing_inputs_are_named():
    objective = PreferenceObjective("simpo")
    with pytest.raises(ValueError, match="the simpo loss needs chosen_lengths, rejected_lengths"):
        objective(PAIRS["policy_chosen_logps"], PAIRS["policy_rejected_logps"])
    with pytest.raises(ValueError, match=r"one value per pair, \[B\] each"):
        objective(
            torch.zeros(2), torch.zeros(3), chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2)
        )


def orpo_gradient_by_hand(chosen: float, rejected: float, beta: float) -> tuple[float, float]:
    """d/dc and d/dr of ORPO on one pair of one-token responses (c, r the log-probs): the NLL's -1, plus beta
    times the odds-ratio term's `-odds(r) / (p_c + odds(r) (1 - p_c))` and `odds(r) (1 - p_c) / ((p_c + odds(r)
    (1 - p_c)) (1 - p_r))`, which are finite at c = 0, where log odds(c) is infinite."""
    p_c, p_r = math.exp(chosen), math.exp(rejected)
    odds_r = p_r / (1 - p_r)
    denominator = p_c + odds_r * (1 - p_c)
    return -1 - beta * odds_r / denominator, beta * odds_r * (1 - p_c) / (denominator * (1 - p_r))


@pytest.mark.parametrize("chosen", [0.0, -1e-9, -1e-8, -1e-6, -0.3, -0.69, -0.7, -2.0, -60.0])
def test_orpo_is_finite_with_its_exact_gradient_up_to_a_chosen_probability_of_one(chosen):
    beta, rejected = 0.5, -0.4
    chosen_logps = torch.tensor([chosen], requires_grad=True)
    rejected_logps = torch.tensor([rejected], requires_grad=True)
    ones = torch.ones(1)
    loss = PreferenceObjective("orpo", beta=beta)(
        chosen_logps, rejected_logps, chosen_lengths=ones, rejected_lengths=ones
    ).losses.sum()
    loss.backward()
    odds_ratio_term = sp(-(log_odds(chosen) - log_odds(rejected))) if chosen < 0 else 0.0
    assert loss.item() == pytest.approx(-chosen + beta * odds_ratio_term, rel=1e-5, abs=1e-6)
    expected = orpo_gradient_by_hand(chosen, rejected, beta)
    assert [chosen_logps.grad.item(), rejected_logps.grad.item()] == pytest.approx(
        expected, rel=1e-4, abs=1e-6
    )


@pytest.mark.parametrize("rho", [-100.0, -89.0, -20.0, 0.5, 100.0])
def test_discopop_is_finite_with_its_exact_gradient_at_extreme_margins(rho):
    tau = 0.05
    chosen = torch.tensor([rho], requires_grad=True)  # beta = 1, rejected log-ratio 0: rho = c
    loss = PreferenceObjective("discopop", beta=1.0, discopop_tau=tau)(
        chosen, torch.zeros(1), ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1)
    ).losses.sum()
    loss.backward()
    x = torch.tensor(rho, dtype=torch.float64, requires_grad=True)  # the paper's form, exact in float64 here
    blend = torch.sigmoid(x / tau)
    exact = (1 - blend) * torch.nn.functional.softplus(-x) + blend * torch.exp(-x)
    exact.backward()
    assert math.isfinite(loss.item()) and math.isfinite(chosen.grad.item())
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    assert chosen.grad.item() == pytest.approx(x.grad.item(), rel=1e-4, abs=1e-6)
