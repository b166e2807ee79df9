import json

import lightning.pytorch as pl
import pytest
import torch

from dvpo_lightning.models import (
    LoraSpec,
    ModelSpec,
    TokenizerMismatchError,
    build_policy,
    build_value_model,
    export_model,
    freeze,
    is_lora,
    response_logits,
    response_values,
    value_head,
)
from tests.helpers.tiny import make_word_tokenizer


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_inline_arch_takes_vocab_and_special_ids_from_tokenizer(word_tokenizer, tiny_arch):
    model = build_policy(ModelSpec(arch=tiny_arch), word_tokenizer)
    assert model.config.vocab_size == len(word_tokenizer)
    assert model.config.pad_token_id == word_tokenizer.pad_token_id != word_tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == word_tokenizer.eos_token_id


def test_same_init_seed_gives_same_weights(word_tokenizer, tiny_arch):
    first = build_policy(ModelSpec(arch=tiny_arch, init_seed=3), word_tokenizer)
    second = build_policy(ModelSpec(arch=tiny_arch, init_seed=3), word_tokenizer)
    third = build_policy(ModelSpec(arch=tiny_arch, init_seed=4), word_tokenizer)
    weight = "model.embed_tokens.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], third.state_dict()[weight])


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


@pytest.mark.parametrize("build", [build_policy, build_value_model], ids=["policy", "value_model"])
def test_lora_from_a_pretrained_model_follows_the_run_seed_unless_init_seed_pins_it(
    build, tmp_path, word_tokenizer, tiny_arch
):
    pretrained = export_model(
        build_policy(ModelSpec(arch=tiny_arch), word_tokenizer), word_tokenizer, str(tmp_path)
    )

    def adapters(run_seed: int, init_seed: int | None = None) -> dict[str, torch.Tensor]:
        pl.seed_everything(run_seed)  # what --seed_everything does
        spec = ModelSpec(name_or_path=pretrained, lora=LoraSpec(r=4), init_seed=init_seed)
        return lora_weights(build(spec, word_tokenizer))

    first, second = adapters(0), adapters(1)
    assert first.keys() == second.keys() and first
    assert any(not torch.equal(first[name], second[name]) for name in first)
    assert all(torch.equal(first[name], adapters(0)[name]) for name in first)
    pinned = adapters(0, init_seed=5), adapters(1, init_seed=5)
    assert all(torch.equal(pinned[0][name], pinned[1][name]) for name in first)


def test_policy_round_trips_through_save_pretrained(tmp_path, word_tokenizer, tiny_arch):
    model = build_policy(ModelSpec(arch=tiny_arch), word_tokenizer).eval()
    export_model(model, word_tokenizer, str(tmp_path / "policy"), info={"stage": "test"})
    loaded = build_policy(ModelSpec(name_or_path=str(tmp_path / "policy")), word_tokenizer).eval()
    ids = _ids(word_tokenizer, "the cat runs under the tree .")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "policy" / "dvpo_export.json").exists()
    assert (tmp_path / "policy" / "tokenizer.json").exists()


def test_value_model_from_causal_lm_starts_at_zero_and_keeps_backbone(tmp_path, word_tokenizer, tiny_arch):
    policy = build_policy(ModelSpec(arch=tiny_arch), word_tokenizer)
    export_model(policy, word_tokenizer, str(tmp_path / "sft"))
    value_model = build_value_model(ModelSpec(name_or_path=str(tmp_path / "sft")), word_tokenizer)
    assert torch.equal(value_model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    values = value_model(_ids(word_tokenizer, "the cat runs")).logits
    assert values.shape == (1, 3, 1)
    assert torch.count_nonzero(values) == 0


def test_value_model_round_trip_keeps_trained_head(tmp_path, word_tokenizer, tiny_arch):
    value_model = build_value_model(ModelSpec(arch=tiny_arch), word_tokenizer).eval()
    with torch.no_grad():
        value_head(value_model).weight.normal_()
        value_head(value_model).bias.fill_(0.5)
    export_model(value_model, word_tokenizer, str(tmp_path / "gvm"))
    loaded = build_value_model(ModelSpec(name_or_path=str(tmp_path / "gvm")), word_tokenizer).eval()
    ids = _ids(word_tokenizer, "a dog eats an apple")
    expected = value_model(ids).logits
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_model_with_another_tokenizer_is_refused_with_a_clear_message(tmp_path, word_tokenizer, tiny_arch):
    value_model = build_value_model(ModelSpec(arch=tiny_arch), word_tokenizer)
    export_model(value_model, word_tokenizer, str(tmp_path / "gvm"))
    other = make_word_tokenizer(tmp_path / "other", words=["x", "y", "z", "the", "cat"])
    with pytest.raises(TokenizerMismatchError, match=r"value model at .*gvm.* different tokenizer"):
        build_value_model(ModelSpec(name_or_path=str(tmp_path / "gvm")), other, role="value model")


def test_added_pad_token_is_compatible_and_grows_embeddings(tmp_path, tiny_arch):
    no_pad = make_word_tokenizer(tmp_path / "no_pad", pad=False)
    no_pad.pad_token = no_pad.eos_token  # a model trained before a pad token existed
    model = build_policy(ModelSpec(arch=tiny_arch), no_pad)
    export_model(model, no_pad, str(tmp_path / "base"))
    with_pad = make_word_tokenizer(tmp_path / "no_pad_again", pad=False)
    with_pad.add_special_tokens({"pad_token": "<pad>"})
    grown = build_policy(ModelSpec(name_or_path=str(tmp_path / "base")), with_pad)
    assert grown.get_input_embeddings().num_embeddings == len(with_pad) == len(no_pad) + 1


def test_lora_trains_adapters_only_and_exports_a_plain_merged_model(tmp_path, word_tokenizer, tiny_arch):
    spec = ModelSpec(arch=tiny_arch, lora=LoraSpec(r=4, alpha=8))
    model = build_policy(spec, word_tokenizer)
    assert is_lora(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.eval()
    export_model(model, word_tokenizer, str(tmp_path / "merged"))
    loaded = build_policy(ModelSpec(name_or_path=str(tmp_path / "merged")), word_tokenizer).eval()
    assert not is_lora(loaded)
    ids = _ids(word_tokenizer, "the red sun")
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_value_model_trains_its_head_and_exports_it(tmp_path, word_tokenizer, tiny_arch):
    model = build_value_model(ModelSpec(arch=tiny_arch, lora=LoraSpec(r=4)), word_tokenizer)
    head_parameters = list(value_head(model).parameters())
    assert head_parameters and all(p.requires_grad for p in head_parameters)
    with torch.no_grad():
        value_head(model).weight.normal_()
    model.eval()
    export_model(model, word_tokenizer, str(tmp_path / "gvm"))
    loaded = build_value_model(ModelSpec(name_or_path=str(tmp_path / "gvm")), word_tokenizer).eval()
    ids = _ids(word_tokenizer, "the blue moon")
    expected = model(input_ids=ids).logits
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(word_tokenizer, tiny_arch):
    ids = _ids(word_tokenizer, "the cat runs under the tree .")
    gradients = []
    for checkpointing in (False, True):
        model = build_policy(ModelSpec(arch=tiny_arch, gradient_checkpointing=checkpointing), word_tokenizer)
        model.train()
        model(ids, labels=ids).loss.backward()
        gradients.append(model.model.embed_tokens.weight.grad)
    torch.testing.assert_close(gradients[0], gradients[1])


def test_freeze_stops_gradients_and_dropout(word_tokenizer, tiny_arch):
    model = freeze(build_value_model(ModelSpec(arch=tiny_arch), word_tokenizer))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def _split_batch(tokenizer, prompts, responses, extra_left=0, extra_right=0):
    """Left-padded prompts and right-padded responses, with optional extra padding columns."""
    pad = tokenizer.pad_token_id
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    response_ids = [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    width_p = max(map(len, prompt_ids)) + extra_left
    width_r = max(map(len, response_ids)) + extra_right
    ids, mask = [], []
    for p, r in zip(prompt_ids, response_ids):
        left, right = width_p - len(p), width_r - len(r)
        ids.append([pad] * left + p + r + [pad] * right)
        mask.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), width_r


def test_response_outputs_do_not_depend_on_padding(word_tokenizer, tiny_arch):
    policy = build_policy(ModelSpec(arch=tiny_arch), word_tokenizer).eval()
    value_model = build_value_model(ModelSpec(arch=tiny_arch), word_tokenizer).eval()
    with torch.no_grad():
        value_head(value_model).weight.normal_()
    prompts, responses = ["the cat", "a dog runs under the"], ["runs .", "tree"]
    ids, mask, width = _split_batch(word_tokenizer, prompts, responses)
    padded_ids, padded_mask, padded_width = _split_batch(word_tokenizer, prompts, responses, 3, 2)
    with torch.no_grad():
        logits = response_logits(policy, ids, mask, width)
        padded_logits = response_logits(policy, padded_ids, padded_mask, padded_width)
        values = response_values(value_model, ids, mask, width)
        padded_values = response_values(value_model, padded_ids, padded_mask, padded_width)
    assert logits.shape == (2, width, len(word_tokenizer))
    assert values.shape == (2, width + 1)
    torch.testing.assert_close(padded_logits[:, :width], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_values[:, : width + 1], values, atol=1e-5, rtol=1e-5)


def test_response_logits_predict_the_response_tokens(word_tokenizer, tiny_arch):
    """Column t of the response logits is the full forward's prediction at position P - 1 + t."""
    policy = build_policy(ModelSpec(arch=tiny_arch), word_tokenizer).eval()
    ids, mask, width = _split_batch(word_tokenizer, ["the cat"], ["runs ."])
    with torch.no_grad():
        full = policy(ids, attention_mask=mask).logits
        sliced = response_logits(policy, ids, mask, width)
    prompt_length = ids.shape[1] - width
    torch.testing.assert_close(sliced, full[:, prompt_length - 1 : -1], atol=1e-5, rtol=1e-5)


def test_a_gpt2_arch_with_a_tokenizer_without_bos_exports_no_bos_outside_its_vocabulary(
    word_tokenizer, tmp_path
):
    # GPT-2's config defaults to bos_token_id=50256, far outside a small trained tokenizer's vocabulary.
    assert word_tokenizer.bos_token_id is None
    model = build_policy(
        ModelSpec(arch={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}), word_tokenizer
    )
    export_model(model, word_tokenizer, str(tmp_path / "export"))
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((tmp_path / "export" / name).read_text())
        assert saved.get("bos_token_id") is None, name
