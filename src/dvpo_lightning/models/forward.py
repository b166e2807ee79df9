"""Model calls in the split layout of docs/design.md: a left-padded prompt block, then a response block.

These helpers only run models and slice their outputs to the response; the math on the outputs (log-probs,
advantages, losses) lives in `dvpo_lightning.algos`.

A policy's per-token outputs come in two forms: the logits of the response (`response_logits`: `[B, R, V]`), or,
cheaper, whatever `per_token` computes from the final hidden states of the response (`response_token_outputs`),
which projects nothing onto the vocabulary itself: `per_token` runs inside the policy's forward (so a sharded
policy's head is gathered then) and applies the LM head (`output_head`) a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dvpo_lightning.data.collate import position_ids_from_mask

#: Config fields of models whose logits are not the plain head projection of the decoder's output (Gemma 2/3's
#: soft-capping, Cohere's and Granite's scales): their log-probs are taken from the model's own logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")

#: `per_token(hidden [N, r, H], columns)`: outputs `[N, r]` (a tuple; None entries allowed) of the response tokens
#: `columns` from the hidden states that predict them.
PerToken = Callable[[torch.Tensor, slice], tuple]


def response_logits(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """Logits that predict each response token: `[B, R, V]` for `input_ids` `[B, P + R]`.

    The logits for response token `t` come from sequence column `P - 1 + t`; only the last `R + 1` columns
    are projected onto the vocabulary (`logits_to_keep`), so prompt positions cost no LM-head work.
    """
    output = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return output.logits[:, :-1]


def shared_prompt_response_logits(
    policy: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_of_row: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """`response_logits` of rows that share prompts, each distinct prompt run once: `[N, R, V]`.

    Row `i` answers the prompt of row `prompt_of_row[i]` (`prompt_ids`, `prompt_mask` `[N, P]` left-padded;
    `response_ids`, `response_mask` `[N, R]`). The distinct prompts run once, with a KV cache; the cache is copied to
    the rows that answer each (`Cache.batch_select_indices`) and the responses run on it. The numbers are those of
    the whole rows (gradients flow through the cache into the prompt pass); a pair's chosen and rejected responses
    thus cost one prompt instead of two.
    """
    distinct, row_prompt = torch.unique(prompt_of_row, return_inverse=True)  # [U], [N]
    prompt_ids, prompt_mask = prompt_ids[distinct], prompt_mask[distinct]  # [U, P]
    prompt_output = policy(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        logits_to_keep=1,
        use_cache=True,
    )
    first = prompt_output.logits[row_prompt]  # [N, 1, V]: the logits of response token 0
    length = response_ids.shape[1]
    if length == 1:
        return first
    rest = policy(
        **_response_pass(prompt_output.cache, row_prompt, prompt_mask, response_ids, response_mask),
        logits_to_keep=torch.arange(length - 1, device=response_ids.device),
    ).logits  # [N, R - 1, V]: column t predicts response token t + 1
    return torch.cat([first, rest], dim=1)


def output_head(policy: nn.Module) -> nn.Module | None:
    """The LM head module when the policy's logits are exactly `head(decoder output)`, else None (see
    `LOGIT_TRANSFORMS`). Calling the module (not its weight) keeps LoRA on it, and FSDP2's gathering, right."""
    base = _base(policy)
    configs = (base.config, getattr(base.config, "text_config", None))
    if any(
        getattr(config, name, None) not in (None, 1, 1.0) for config in configs for name in LOGIT_TRANSFORMS
    ):
        return None
    return base.get_output_embeddings()


def response_token_outputs(
    policy: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    per_token: PerToken,
) -> tuple:
    """`per_token` of the hidden states `[B, R, H]` that predict each response token (column `P - 1 + t` predicts
    response token `t`), for `input_ids` `[B, P + R]`: `response_logits` without the logits."""

    def response_states(hidden: torch.Tensor) -> tuple:  # [B, P + R, H]
        return per_token(hidden[:, -(response_length + 1) : -1], slice(None))

    outputs, _ = _with_final_states(
        policy,
        response_states,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return outputs


def shared_prompt_response_token_outputs(
    policy: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_of_row: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    per_token: PerToken,
) -> tuple:
    """`response_token_outputs` of rows that share prompts, each distinct prompt run once, as in
    `shared_prompt_response_logits`: `per_token` sees response token 0 in the prompt pass, the rest after."""
    distinct, row_prompt = torch.unique(prompt_of_row, return_inverse=True)  # [U], [N]
    prompt_ids, prompt_mask = prompt_ids[distinct], prompt_mask[distinct]  # [U, P]
    first, prompt_output = _with_final_states(
        policy,
        lambda hidden: per_token(
            hidden[row_prompt, -1:], slice(0, 1)
        ),  # [N, 1, H]: predicts response token 0
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
    )
    length = response_ids.shape[1]
    if length == 1:
        return first
    rest, _ = _with_final_states(
        policy,
        lambda hidden: per_token(hidden[:, :-1], slice(1, None)),  # column t predicts response token t + 1
        **_response_pass(prompt_output.cache, row_prompt, prompt_mask, response_ids, response_mask),
    )
    return tuple(None if a is None else torch.cat([a, b], dim=1) for a, b in zip(first, rest))


def _response_pass(
    cache,
    row_prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict:
    """The policy's inputs for the responses of rows sharing prompts: the distinct prompts' KV cache copied to the
    rows that answer each (`row_prompt` `[N]`), the rows' mask over prompt and response, the responses' positions."""
    cache.batch_select_indices(row_prompt)
    prompt_mask = prompt_mask[row_prompt]  # [N, P]
    length = response_ids.shape[1]
    return {
        "input_ids": response_ids,
        "attention_mask": torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=-1),
        "position_ids": prompt_mask.long().sum(-1, keepdim=True)
        + torch.arange(length, device=response_ids.device),
        "cache": cache,
        "use_cache": True,
    }


def _with_final_states(policy: nn.Module, on_states: Callable[[torch.Tensor], tuple], **inputs) -> tuple:
    """Run `policy(**inputs)` projecting no position onto the vocabulary, and `on_states` on its decoder's final
    hidden states `[B, T, H]` inside the forward; returns what `on_states` returned and the model's output."""
    results = []
    handle = (
        _base(policy)
        .get_decoder()
        .register_forward_hook(lambda module, args, output: results.append(on_states(output[0])))
    )
    try:
        output = policy(
            **inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        )
    finally:
        handle.remove()
    return results[0], output


def _base(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def recomputes_activations(model: nn.Module) -> bool:
    """Whether `model` checkpoints activations (HF then turns its KV cache off in training)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


#: how a value model's outputs are read as state values (`value_form`)
VALUE_FORMS = ("return", "earned")


def value_form(value_model: nn.Module) -> str:
    """How `value_model`'s per-position outputs are read, from its config's `dvpo_value_form` (saved with it):
    "return" (the default: each output is the value V(s_t) itself) or "earned" (each output is the reward of the
    token just read, and V(s_t) is their running sum: the reward the prefix has earned)."""
    return getattr(getattr(value_model, "config", None), "dvpo_value_form", "return")


def response_values(
    value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """Per-state values `[B, R + 1]` for `input_ids` `[B, P + R]`, in float32.

    Index `t < R` is V(s_t), the value of the state before response token `t` (column `P - 1 + t`); index
    `T_i` (row `i`'s response length) is the value of the complete response (the last real token's column).
    A value model of `value_form` "earned" outputs the prompt's value at column `P - 1` and each response token's
    reward at its own column: V(s_t) is their sum up to column `P - 1 + t`. Responses are right-padded, so no
    real state's sum reaches a padding column.
    """
    output = value_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    outputs = output.logits[:, -(response_length + 1) :, 0].float()  # [B, R + 1]
    if value_form(value_model) == "earned":
        return outputs.cumsum(dim=-1)
    return outputs
