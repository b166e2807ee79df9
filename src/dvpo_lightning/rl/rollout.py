"""Rollout: sampling responses to prompts into the split layout, behind one small interface.

A rollout backend is a function `(policy, prompt_input_ids [B, P], prompt_attention_mask [B, P], sampling,
tokenizer, **options) -> Responses` registered under a name in `ROLLOUT_BACKENDS`; `SamplingConfig.backend` chooses
it and `SamplingConfig.backend_options` holds its keyword options. The default, `generate`, is HF `generate` with
its KV cache; `compiled` (`rl.compiled_rollout`) decodes with a static KV cache and a `torch.compile`d step. A
faster backend is one more registered function: no algorithm changes.

A backend that spends time on set-up (compiling, warming up) records it with `record_warmup`, so that a run logs it
on its own (`warmup_seconds`) instead of inside its generation time.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import Registry
from dvpo_lightning.rl.sequences import Responses, Sequences

ROLLOUT_BACKENDS = Registry("rollout backend")
register_rollout_backend = ROLLOUT_BACKENDS.register
#: the arguments every backend takes; its keyword-only parameters are its options.
UNIFORM_ARGUMENTS = ("policy", "prompt_input_ids", "prompt_attention_mask", "sampling", "tokenizer")


@dataclass
class SamplingConfig:
    """How responses are sampled.

    Args:
        max_new_tokens: response budget; a response that reaches it without EOS is "unfinished".
        min_new_tokens: EOS is forbidden before this many tokens.
        temperature: softmax temperature (log-probs for training are taken at the same temperature).
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        do_sample: False for greedy decoding (evaluation).
        backend: the registered rollout backend that samples (`ROLLOUT_BACKENDS`): "generate" (HF `generate`,
            the default) or "compiled" (static KV cache and a `torch.compile`d decoding step: faster once compiled,
            which takes a while; see `rl.compiled_rollout`).
        backend_options: the backend's own keyword options, e.g. `{compile_mode: max-autotune}` for "compiled".
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    backend: str = "generate"
    backend_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = backend_option_names(self.backend)  # an unknown backend fails here, listing the known ones
        unknown = sorted(set(self.backend_options) - set(known))
        if unknown:
            raise ValueError(
                f"sampling.backend_options {unknown} are not options of the {self.backend!r} rollout backend; its "
                f"options: {', '.join(known) or 'none'}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0; got {self.temperature} (use do_sample: false for greedy)"
            )


def generate_responses(
    policy: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> Responses:
    """Sample one response per prompt `[B, P]` with the backend `sampling.backend` names."""
    return ROLLOUT_BACKENDS.get(sampling.backend)(
        policy, prompt_input_ids, prompt_attention_mask, sampling, tokenizer, **sampling.backend_options
    )


def backend_option_names(backend: str) -> list[str]:
    """The keyword options of the registered rollout backend `backend`."""
    parameters = inspect.signature(ROLLOUT_BACKENDS.get(backend)).parameters
    return [name for name in parameters if name not in UNIFORM_ARGUMENTS]


_WARMUP_SECONDS: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def record_warmup(policy: nn.Module, seconds: float) -> None:
    """Count `seconds` a backend spent compiling or warming up for `policy`."""
    _WARMUP_SECONDS[policy] = _WARMUP_SECONDS.get(policy, 0.0) + seconds


def warmup_seconds(policy: nn.Module) -> float:
    """Seconds the rollout backends have spent compiling or warming up for `policy` so far (0 for `generate`)."""
    return _WARMUP_SECONDS.get(policy, 0.0)


@register_rollout_backend("generate")
@torch.no_grad()
def hf_generate(
    policy: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> Responses:
    """Sample one response per prompt with HF `generate` and the policy's KV cache.

    The pad token is never sampled (it would be indistinguishable from padding), and everything after the
    first EOS is padding.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    sampling_kwargs = (
        {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
        }
        if sampling.do_sample
        else {"do_sample": False}
    )
    with eval_mode(policy):
        sequences = policy.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask.long(),
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            suppress_tokens=[pad_id],
            use_cache=True,
            **sampling_kwargs,
        )
    response = sequences[:, prompt_input_ids.shape[1] :]  # [B, R]
    return split_responses(prompt_input_ids, prompt_attention_mask, response, tokenizer)


def split_responses(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    response: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
) -> Responses:
    """Sampled tokens `response [B, R]` after their prompts, as `Responses`: everything after the first EOS is
    padding, and a response is finished when it has an EOS."""
    is_eos = response == tokenizer.eos_token_id
    after_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = ~after_first_eos
    return Responses(
        prompt_input_ids=prompt_input_ids,
        prompt_attention_mask=prompt_attention_mask.bool(),
        response_input_ids=response.masked_fill(after_first_eos, tokenizer.pad_token_id),
        response_mask=response_mask,
        finished=is_eos.any(-1),
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, responses: Sequences) -> tuple[list[str], list[str]]:
    """Prompt and response texts, without padding or special tokens."""
    prompts = tokenizer.batch_decode(
        [ids[mask] for ids, mask in zip(responses.prompt_input_ids, responses.prompt_attention_mask)],
        skip_special_tokens=True,
    )
    texts = tokenizer.batch_decode(
        [ids[mask] for ids, mask in zip(responses.response_input_ids, responses.response_mask)],
        skip_special_tokens=True,
    )
    return prompts, texts


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
