"""The `compiled` rollout backend: a static KV cache and one `torch.compile`d decoding step.

    prefill (eager)   the prompts [B, P] fill a `transformers.StaticCache` of `L` positions, and the first token
    decode (compiled) one graph per step: the policy's forward on one token per row, the sampling settings, the
    sample; the same graph for every step, every rollout and every batch of the same bucket

Shapes are bucketed so that a run compiles a few graphs, not one per batch: the cache holds `L` = the next power of
two >= P + max_new_tokens positions (prompts of any width up to it share the graph: the unused positions are never
attended to), and rows are padded to the next power of two up to 8, then to a multiple of 8, with rows that are
discarded. On a GPU the default mode is "reduce-overhead" (CUDA graphs), elsewhere inductor's default.

What the `generate` backend guarantees holds here too: the pad token is never sampled, EOS is forbidden before
`min_new_tokens`, temperature, top-k and top-p are HF's own logits warpers, decoding stops when every row has
emitted EOS, and responses are cut after their first EOS (`split_responses`). Greedy decoding gives `generate`'s
tokens. Sampled tokens are drawn with the exponential-race form of multinomial sampling (the `argmax` of
`probs / Exp(1)` noise; no host sync in the graph), so a seed gives other samples than `generate` would, from the
same distribution.

The first rollout of each bucket compiles (tens of seconds on a CPU, more for large models); that time and the
first steps after it are recorded with `record_warmup`, so a run logs them as `time/compile`, apart from its
generation time.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import (
    PreTrainedTokenizerBase,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dvpo_lightning.data.collate import position_ids_from_mask
from dvpo_lightning.rl.rollout import (
    SamplingConfig,
    eval_mode,
    record_warmup,
    register_rollout_backend,
    split_responses,
)
from dvpo_lightning.rl.sequences import Responses

log = logging.getLogger(__name__)

#: decoding steps of a new graph counted as its warm-up (compiling, then CUDA graph warm-up and recording)
WARMUP_STEPS = 3
#: graphs of the decoding step a process may compile, over its policies, sampling settings and buckets: dynamo keeps
#: them on the step's code object, shared by all, and its default limit (8) would fall back to eager decoding
RECOMPILE_LIMIT = 64
#: static caches kept between rollouts (each holds a bucket's keys and values for every layer)
KEPT_CACHES = 2


@register_rollout_backend("compiled")
@torch.no_grad()
def compiled_generate(
    policy: nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    compile_backend: str | Callable = "inductor",
    compile_mode: str | None = None,
) -> Responses:
    """Sample one response per prompt `[B, P]` with a static KV cache and a compiled decoding step.

    Options (`sampling.backend_options`):
        compile_backend: `torch.compile`'s backend ("inductor"; "eager" or "aot_eager" trace without generating
            code, to check a model compiles).
        compile_mode: inductor's mode: "default", "reduce-overhead" (CUDA graphs) or "max-autotune"; None is
            "reduce-overhead" on a GPU and "default" elsewhere.
    """
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(
            f"sampling.backend=compiled needs transformers >= 5 (its StaticCache API); found "
            f"{transformers.__version__}: upgrade it, or use sampling.backend=generate"
        )
    if any(isinstance(module, FSDPModule) for module in policy.modules()):
        raise ValueError(
            "sampling.backend=compiled cannot compile a policy sharded with FSDP (its hooks gather the weights inside "
            "the forward): use sampling.backend=generate"
        )
    decoder = _decoder(policy, compile_backend, compile_mode)
    with eval_mode(policy):
        response = decoder.decode(policy, prompt_input_ids, prompt_attention_mask.bool(), sampling, tokenizer)
    return split_responses(prompt_input_ids, prompt_attention_mask, response, tokenizer)


def bucket_rows(rows: int) -> int:
    """Rows a batch of `rows` is padded to: the next power of two up to 8, then the next multiple of 8."""
    return 1 << max(rows - 1, 0).bit_length() if rows <= 8 else -(-rows // 8) * 8


def bucket_length(length: int) -> int:
    """Cache positions for a prompt and response of `length` tokens together: the next power of two (at least 16)."""
    return max(16, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class Sampler:
    """The sampling settings a decoding step applies to the logits `[B, V]` of its last position."""

    pad_id: int
    eos_id: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    #: the warpers `generate` applies, in its order; those at their defaults (identities) left out
    warpers: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        warpers = []
        if self.do_sample and self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.do_sample and self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.do_sample and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        object.__setattr__(self, "warpers", tuple(warpers))

    @classmethod
    def of(cls, sampling: SamplingConfig, tokenizer: PreTrainedTokenizerBase) -> Sampler:
        return cls(
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            sampling.min_new_tokens,
            sampling.do_sample,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
        )

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The next token `[B]` after `generated` (a 0-d tensor) response tokens, from float32 `logits [B, V]`."""
        logits[:, self.pad_id] = -torch.inf
        if self.min_new_tokens > 0:
            eos = logits[:, self.eos_id]
            logits[:, self.eos_id] = torch.where(generated < self.min_new_tokens, -torch.inf, eos)
        if not self.do_sample:
            return logits.argmax(-1)
        for warper in self.warpers:
            logits = warper(None, logits)
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


class Decoder:
    """One policy's compiled decoding steps (one per sampling setting), static caches (one per bucket) and the
    buckets already compiled."""

    def __init__(self, compile_backend: str | Callable, compile_mode: str | None):
        self.compile_backend, self.compile_mode = compile_backend, compile_mode
        self.steps: dict[Sampler, Callable] = {}
        self.caches: dict[tuple[int, int], StaticCache] = {}
        self.compiled: set[tuple[Sampler, int, int]] = set()  # (sampler, rows, cache positions) seen

    def step(self, sampler: Sampler, device: torch.device) -> Callable:
        if sampler not in self.steps:

            def decode_step(policy, tokens, positions, attention_mask, generated, cache):
                output = policy(
                    input_ids=tokens,  # [N, 1]
                    attention_mask=attention_mask,  # [N, L]
                    position_ids=positions,  # [N, 1]
                    cache=cache,
                    use_cache=True,
                )
                return sampler(output.logits[:, -1].float(), generated)

            options = {}
            if self.compile_backend == "inductor":
                options["mode"] = self.compile_mode or (
                    "reduce-overhead" if device.type == "cuda" else "default"
                )
            self.steps[sampler] = torch.compile(
                decode_step, backend=self.compile_backend, fullgraph=True, dynamic=False, **options
            )
        return self.steps[sampler]

    def cache(self, policy: nn.Module, rows: int, length: int) -> StaticCache:
        """The static cache of a bucket, emptied: the same tensors every time, so CUDA graphs can replay. The
        `KEPT_CACHES` buckets used last keep theirs (training and evaluation rollouts); older ones are freed."""
        key = (rows, length)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=policy.config, max_cache_len=length)
        self.caches[key] = cache  # the most recently used last
        while len(self.caches) > KEPT_CACHES:
            del self.caches[next(iter(self.caches))]
        cache.reset()
        return cache

    def decode(
        self,
        policy: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> torch.Tensor:
        """The sampled tokens `[B, T]` of every row, `T <= max_new_tokens` (decoding stops once all rows ended)."""
        size, width = prompt_ids.shape
        rows, length = bucket_rows(size), bucket_length(width + sampling.max_new_tokens)
        prompt_ids, prompt_mask = _pad_rows(prompt_ids, prompt_mask, rows, tokenizer.pad_token_id)
        sampler = Sampler.of(sampling, tokenizer)
        cache = self.cache(policy, rows, length)
        # The prompt's mask, then every response position: a row attends to what the cache holds up to itself.
        attention_mask = torch.ones(rows, length, dtype=torch.long, device=prompt_ids.device)
        attention_mask[:, :width] = prompt_mask
        logits = policy(
            input_ids=prompt_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(prompt_mask),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        generated = torch.zeros((), dtype=torch.long, device=prompt_ids.device)
        token = sampler(logits.float(), generated)  # [N]
        response = torch.full(
            (rows, sampling.max_new_tokens), tokenizer.pad_token_id, device=prompt_ids.device
        )
        positions = prompt_mask.long().sum(-1, keepdim=True)  # [N, 1] the first response token's position
        finished = torch.zeros(size, dtype=torch.bool, device=prompt_ids.device)
        step, bucket = self.step(sampler, prompt_ids.device), (sampler, rows, length)
        warming_up, start = bucket not in self.compiled, time.perf_counter()
        steps = sampling.max_new_tokens
        with torch._dynamo.config.patch(
            recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        ):
            for index in range(sampling.max_new_tokens):
                response[:, index] = token
                finished |= token[:size] == tokenizer.eos_token_id
                if index + 1 == sampling.max_new_tokens or bool(finished.all()):
                    steps = index + 1
                    break
                if warming_up and index == WARMUP_STEPS:
                    warming_up = self.end_warmup(policy, bucket, start)
                generated += 1
                if prompt_ids.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                token = step(
                    policy, token[:, None], positions + index, attention_mask, generated, cache
                ).clone()
        if warming_up and steps > 1:  # the step ran (and compiled) at least once
            self.end_warmup(policy, bucket, start)
        return response[:size, :steps]

    def end_warmup(self, policy: nn.Module, bucket: tuple, start: float) -> bool:
        """Record the warm-up of `bucket` since `start`; False (no longer warming up)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.compiled.add(bucket)
        record_warmup(policy, seconds)
        _, rows, length = bucket
        log.info(
            "sampling.backend=compiled: compiled the decoding step for %d rows x %d cache positions in %.1f s",
            rows,
            length,
            seconds,
        )
        return False


_DECODERS: weakref.WeakKeyDictionary[nn.Module, Decoder] = weakref.WeakKeyDictionary()


def _decoder(policy: nn.Module, compile_backend: str | Callable, compile_mode: str | None) -> Decoder:
    """The policy's decoder; a new one (compiling again) when the compile options changed."""
    decoder = _DECODERS.get(policy)
    if decoder is None or (decoder.compile_backend, decoder.compile_mode) != (compile_backend, compile_mode):
        decoder = _DECODERS[policy] = Decoder(compile_backend, compile_mode)
    return decoder


def _pad_rows(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append discarded rows up to `rows`: one pad token each, attended to, so that no attention row is empty."""
    extra = rows - prompt_ids.shape[0]
    if extra == 0:
        return prompt_ids, prompt_mask
    filler_ids = torch.full(
        (extra, prompt_ids.shape[1]), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device
    )
    filler_mask = torch.zeros((extra, prompt_ids.shape[1]), dtype=torch.bool, device=prompt_ids.device)
    filler_mask[:, -1] = True
    return torch.cat([prompt_ids, filler_ids]), torch.cat([prompt_mask, filler_mask])
