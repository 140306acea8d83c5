"""Tiny random Qwen3 / Qwen3-MoE checkpoints written with Transformers, for parity and engine tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 512


def make_tiny_checkpoint(
    path: Path,
    moe: bool = True,
    yarn: bool = False,
    tie: bool = False,
    seed: int = 0,
    layers: int = 2,
    head_dim: int = 16,
) -> Path:
    """Save a randomly initialised Hugging Face model (float32) in `path` and return it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        eos_token_id=[TINY_VOCAB - 1],
    )
    if yarn:
        common["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    else:
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    torch.manual_seed(seed)
    if moe:
        cfg = Qwen3MoeConfig(
            **common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
        )
        model = Qwen3MoeForCausalLM(cfg)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    # Transformers zero-initialises some weights (the router); a trained model's are not zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def save_tiny_tokenizer(path: Path) -> None:
    """A byte-level tokenizer over TINY_VOCAB ids: 256 bytes, filler words, then two special tokens.

    Byte-level ids split multi-byte characters, which exercises the detokenizer's
    partial-UTF-8 handling; id TINY_VOCAB - 1 is <|im_end|>, the tiny models' EOS.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(f" w{i}", special=False) for i in range(256, TINY_VOCAB - 2)])
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)
