"""A tiny random Llama written to a GGUF file with the `gguf` package's writer, as llama.cpp's converter would:
the weights under llama.cpp's tensor names (query and key rows permuted the llama.cpp way), a byte-level BPE
tokenizer with ChatML special tokens and a chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Byte pairs merged by the tokenizer, so that words become a few tokens as in a real vocabulary.
MERGES = ["t h", "th e", "Ġ the", "i n", "a n", "e r", "o n"]


def tiny_llama(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama over the vocabulary of `tokens()`."""
    config = LlamaConfig(
        vocab_size=len(tokens()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so that a weight read into the wrong place shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def tokens() -> list[str]:
    return SPECIAL_TOKENS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """`model` and the tokenizer of `tokens()` written to `path` as a GGUF file of float32 tensors."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    vocabulary = tokens()
    writer.add_token_list(vocabulary)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if token in SPECIAL_TOKENS else normal for token in vocabulary])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(vocabulary.index("<|im_start|>"))
    writer.add_eos_token_id(vocabulary.index("<|im_end|>"))
    writer.add_unk_token_id(vocabulary.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """`model`'s weights under llama.cpp's names (as its `convert_hf_to_gguf.py` writes them)."""
    config = model.config
    state = {name: tensor.detach().float().contiguous() for name, tensor in model.state_dict().items()}
    found = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        found["output.weight"] = state["lm_head.weight"]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            tensor = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = _permute(tensor, config.num_attention_heads)
            elif gguf_name == "attn_k":
                tensor = _permute(tensor, config.num_key_value_heads)
            found[f"blk.{layer}.{gguf_name}.weight"] = tensor.contiguous()
    return found


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of query/key rows (transformers undoes it when reading GGUF)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
