"""The registered policy losses (PPO, GSPO, GSPO-token, CISPO): hand numbers, gradients, padding, and their choice
by name in `PPOConfig` with options checked when the config is made."""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import POLICY_LOSSES, get_policy_loss
from dvpo_lightning.rl import PPOConfig
from tests.algos.test_layouts import layout_mask, spread

NAN = float("nan")
LN = math.log


def _two_rows():
    """Row 0: token ratios 1.5 and 0.5 (sequence ratio sqrt(0.75)), advantage 1, then a NaN pad; row 1: three
    tokens of ratio 2 (sequence ratio 2), advantage 1."""
    logprobs = torch.tensor([[LN(1.5), LN(0.5), NAN], [LN(2.0)] * 3])
    old_logprobs = torch.tensor([[0.0, 0.0, NAN], [0.0] * 3])
    advantages = torch.tensor([[1.0, 1.0, NAN], [1.0] * 3])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return logprobs.requires_grad_(True), old_logprobs, advantages, mask


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_clips_one_geometric_mean_ratio_per_sequence(name):
    logprobs, old_logprobs, advantages, mask = _two_rows()
    call = dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    s0 = math.sqrt(0.75)  # inside [0.8, 1.2]: unclipped; row 1's 2.0 is clipped to 1.2
    loss, stats = get_policy_loss(name)(**call, clip_eps_low=0.2, clip_eps_high=0.2)
    assert loss.item() == pytest.approx((2 * -s0 + 3 * -1.2) / 5)  # token-mean
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * 2.0) / 5)
    assert stats["ratio_max"].item() == pytest.approx(2.0)
    loss.backward()
    # gspo: each of row 0's two token losses -s0 moves with s0 / 2 per log-prob, so -s0 / 5 in all;
    # gspo_token: token t's loss -s0 moves with s0 through its own log-prob alone: again -s0 / 5
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s0 / 5, -s0 / 5, 0.0], [0.0, 0.0, 0.0]]))
    by_sequence, _ = get_policy_loss(name)(**call, clip_eps_low=0.2, clip_eps_high=0.2, mode="grpo")
    assert by_sequence.item() == pytest.approx((-s0 - 1.2) / 2)


def test_gspo_token_gives_a_token_its_own_advantage_and_gspo_the_sequence_mean():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    call = dict(old_logprobs=torch.zeros(1, 2), advantages=torch.tensor([[1.0, -1.0]]), mask=torch.ones(1, 2))
    get_policy_loss("gspo_token")(logprobs=logprobs, **call)[0].backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.5]]))  # -A_t / 2
    logprobs.grad = None
    get_policy_loss("gspo")(logprobs=logprobs, **call)[0].backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0]]))  # sum_t A_t / 2 = 0 on each


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    logprobs = torch.tensor([[LN(1.5), LN(0.5), NAN]], requires_grad=True)
    call = dict(
        old_logprobs=torch.tensor([[0.0, 0.0, NAN]]),
        advantages=torch.tensor([[1.0, -1.0, NAN]]),
        mask=torch.tensor([[True, True, False]]),
    )
    loss, stats = get_policy_loss("cispo")(logprobs=logprobs, **call, max_weight=1.2)
    # weights sg[clip(1.5)] = 1.2 and 0.5: L = -w * A * log pi
    assert loss.item() == pytest.approx((-1.2 * LN(1.5) + 0.5 * LN(0.5)) / 2)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.2 / 2, 0.5 / 2, 0.0]]))  # the clipped one too
    floored, _ = get_policy_loss("cispo")(logprobs=logprobs, **call, max_weight=1.2, min_weight=0.8)
    assert floored.item() == pytest.approx((-1.2 * LN(1.5) + 0.8 * LN(0.5)) / 2)
    with pytest.raises(ValueError, match="min_weight < max_weight"):
        get_policy_loss("cispo")(logprobs=logprobs, **call, max_weight=1.0, min_weight=2.0)


def _random_call(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(3, 4, generator=generator)  # noqa: E731
    return dict(
        logprobs=rand() - 2,
        old_logprobs=rand() - 2,
        advantages=rand(),
        mask=layout_mask([4, 2, 3], 4, "right"),
    )


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss_trains_only_the_log_probs_whatever_the_padding(name):
    call = _random_call()
    lengths = call["mask"].sum(dim=1).tolist()
    results = {}
    for layout in ("right", "left", "interior"):
        mask = layout_mask(lengths, 5, layout, seed=3)
        spread_call = {key: spread(value, mask) for key, value in call.items() if key != "mask"}
        for key in ("logprobs", "old_logprobs", "advantages"):
            spread_call[key].requires_grad_(True)
        loss, stats = get_policy_loss(name)(**spread_call, mask=mask, mode="token-mean", normalizers=None)
        loss.backward()
        grad = spread_call["logprobs"].grad
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all() and grad.abs().sum() > 0
        assert spread_call["old_logprobs"].grad is None and spread_call["advantages"].grad is None
        assert {"approx_kl", "clip_fraction", "ratio_mean", "ratio_max"} <= set(stats)
        results[layout] = (loss, stats)
    for layout in ("left", "interior"):
        torch.testing.assert_close(results[layout][0], results["right"][0])
        for key, value in results["right"][1].items():
            torch.testing.assert_close(results[layout][1][key], value)


def test_ppo_is_the_registered_default_and_its_clip_settings_reach_it():
    ppo = PPOConfig(clip_eps=0.1, clip_eps_high=0.28, dual_clip=3.0)
    assert ppo.policy_loss == "ppo"
    assert ppo.policy_loss_arguments() == {"clip_eps_low": 0.1, "clip_eps_high": 0.28, "dual_clip": 3.0}
    gspo = PPOConfig(policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4)
    assert gspo.policy_loss_arguments() == {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4}
    cispo = PPOConfig(policy_loss="cispo", policy_loss_options={"max_weight": 2.0})
    assert cispo.policy_loss_arguments() == {"max_weight": 2.0}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"policy_loss": "trpo"}, "unknown policy loss 'trpo'; known: cispo, gspo, gspo_token, ppo"),
        (
            {"policy_loss": "cispo", "clip_eps": 0.1},
            r"ppo.clip_eps not used by this loss; its options: max_weight",
        ),
        ({"policy_loss": "gspo", "dual_clip": 3.0}, "ppo.dual_clip not used"),
        (
            {"policy_loss": "cispo", "policy_loss_options": {"eps": 1.0}},
            r"\['eps'\] are not options of the 'cispo'",
        ),
        ({"policy_loss_options": {"clip_eps_low": 0.1}}, "clip settings are ppo.clip_eps"),
        ({"policy_loss": "cispo", "policy_loss_options": {"max_weight": -1.0}}, "min_weight < max_weight"),
        ({"dual_clip": 0.5}, "dual_clip must be > 1"),
    ],
    ids=[
        "unknown",
        "unused_clip",
        "unused_dual_clip",
        "unknown_option",
        "clip_as_option",
        "bad_value",
        "bad_dual",
    ],
)
def test_policy_loss_settings_fail_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=r"ppo.policy_loss: .*" + message):
        PPOConfig(**options)
