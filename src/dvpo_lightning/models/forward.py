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
