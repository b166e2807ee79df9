"""The RL engine without Lightning: a rollout, an `ExperienceMaker` and a `PPOUpdate` driven by a plain torch
optimiser train the policy, leave the frozen models alone, and score exactly as the LightningModule does."""

from __future__ import annotations

import copy

import torch

from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, freeze
from dvpo_lightning.modules import DVPOModule
from dvpo_lightning.rl import (
    AdvantageConfig,
    ExperienceMaker,
    PPOConfig,
    PPOUpdate,
    SamplingConfig,
    Scorers,
    StateValues,
    clip_grad_norms,
    generate_responses,
)
from tests.helpers.onpolicy import export_frozen_models, perturb
from tests.helpers.stages import first_batch, tiny, topics_data


def test_a_plain_torch_loop_trains_the_policy_with_the_engine(tmp_path):
    data = topics_data(tmp_path / "cache", mode="prompts")
    tokenizer = data.tokenizer
    policy = build_policy(tiny(), tokenizer)
    reference = freeze(copy.deepcopy(policy))
    gvm = freeze(build_value_model(tiny(init_seed=5), tokenizer))
    with torch.no_grad():
        gvm.score.weight.normal_(std=0.5)  # values that vary, so the advantages do
    ppo = PPOConfig(ppo_epochs=2, mini_batch_size=4, kl_coef=0.1)
    maker = ExperienceMaker(
        policy, reference, Scorers(values=StateValues(gvm)), ppo, AdvantageConfig("gvm"), lambda: ppo.kl_coef
    )
    batch = first_batch(data)
    torch.manual_seed(0)
    responses = generate_responses(
        policy,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        SamplingConfig(max_new_tokens=6),
        tokenizer,
    )
    experience = maker.make(responses)
    assert experience.advantages.shape == responses.response_mask.shape
    assert experience.nonfinite_quantities() == []

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    steps = []

    def step() -> dict[str, float]:
        norms = clip_grad_norms({"policy/grad_norm": policy}, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps.append(norms)
        return norms

    before = {name: parameter.detach().clone() for name, parameter in policy.named_parameters()}
    frozen = {name: parameter.detach().clone() for name, parameter in reference.named_parameters()}
    stats = PPOUpdate(policy, None, ppo, lambda: ppo.kl_coef).run(
        experience, lambda loss: loss.backward(), step
    )
    rows = len(experience)
    assert len(steps) == ppo.ppo_epochs * -(-rows // 4)  # epochs x mini-batches
    assert {"policy/loss", "policy/clip_fraction", "policy/grad_norm"} <= set(stats)
    moved = [
        name for name, parameter in policy.named_parameters() if not torch.equal(parameter, before[name])
    ]
    assert moved == list(before)  # every trained parameter changed
    assert all(torch.equal(parameter, frozen[name]) for name, parameter in reference.named_parameters())


def test_the_engine_scores_exactly_as_the_lightning_module_does(tmp_path, tokenizer):
    exports = export_frozen_models(tmp_path, tokenizer)
    module = DVPOModule(
        policy=tiny(),
        value_model=ModelSpec(name_or_path=exports.gvm),
        tokenizer=tokenizer,
        ppo=PPOConfig(kl_coef=0.1),
    )
    module.configure_model()
    perturb(module.policy)
    data = topics_data(tmp_path / "cache", mode="prompts")
    batch = first_batch(data)
    torch.manual_seed(0)
    responses = generate_responses(
        module.policy,
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        SamplingConfig(max_new_tokens=6),
        tokenizer,
    )
    gvm = freeze(build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer))
    standalone = ExperienceMaker(
        module.policy,
        module.reference,
        Scorers(values=StateValues(gvm)),
        PPOConfig(kl_coef=0.1),
        AdvantageConfig("gvm"),
        lambda: 0.1,
    ).make(responses)
    inside = module.experience_maker().make(responses)
    for name in ("old_logprobs", "ref_logprobs", "token_rewards", "values", "advantages", "returns"):
        assert torch.equal(getattr(standalone, name), getattr(inside, name)), name
