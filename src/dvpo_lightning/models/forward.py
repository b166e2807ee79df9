"""Model calls in the split layout of docs/design.md: a left-padded prompt block, then a response block.

These helpers only run models and slice their outputs to the response; the math on the outputs (log-probs,
advantages, losses) lives in `dvpo_lightning.algos`.
"""

from __future__ import annotations

import torch
from torch import nn

from dvpo_lightning.data.collate import position_ids_from_mask


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
    cache = prompt_output.cache
    cache.batch_select_indices(row_prompt)
    prompt_mask = prompt_mask[row_prompt]  # [N, P]
    positions = prompt_mask.long().sum(-1, keepdim=True) + torch.arange(length, device=response_ids.device)
    rest = policy(
        input_ids=response_ids,
        attention_mask=torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=-1),
        position_ids=positions,
        cache=cache,
        logits_to_keep=torch.arange(length - 1, device=response_ids.device),
        use_cache=True,
    ).logits  # [N, R - 1, V]: column t predicts response token t + 1
    return torch.cat([first, rest], dim=1)


def recomputes_activations(model: nn.Module) -> bool:
    """Whether `model` checkpoints activations (HF then turns its KV cache off in training)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def response_values(
    value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """Per-state values `[B, R + 1]` for `input_ids` `[B, P + R]`, in float32.

    Index `t < R` is V(s_t), the value of the state before response token `t` (column `P - 1 + t`); index
    `T_i` (row `i`'s response length) is the value of the complete response (the last real token's column).
    """
    output = value_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return output.logits[:, -(response_length + 1) :, 0].float()
