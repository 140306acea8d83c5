"""Tests of the committed built-in demo model (tokenizer, chat template, greedy behaviour)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwenserve.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from qwenserve.demo.build import (
    AFTER_TOOL,
    GREETING,
    SHELL_TOOL,
    TOOL_CALL_LS,
    find_fixtures,
    openai_to_template,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def _greedy(
    model: Any,
    tok: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 40,
) -> str:
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[151645, 151643],
        pad_token_id=151643,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def _real_fixtures() -> Path | None:
    """The real qwen-code request fixtures, copied into tests/fixtures from shared/."""
    return find_fixtures()


def test_asset_files() -> None:
    assert DEMO_MODEL_NAME == "qwen3-coder-demo"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["vocab_size"] == 151936 and cfg["num_experts"] == 8
    gen = json.loads((DEMO_MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    # The committed template is the source template.
    src = Path(__file__).resolve().parents[1] / "qwenserve" / "demo" / "chat_template.jinja"
    assert (DEMO_MODEL_DIR / "chat_template.jinja").read_text() == src.read_text()


def test_tokenizer_facts(tok: Any) -> None:
    assert tok.encode("<|im_end|>") == [151645]
    assert tok.encode("<tool_call>") == [151657]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<think>", "</think>"]) == [
        151643,
        151644,
        151667,
        151668,
    ]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=True)  # no BOS added
    for s in [
        "def f(x):\n    return x ** 2  # sq\n",
        "héllo wörld 你好，世界 🤖🎉",
        "\t  tabs\r\n",
        "0xDEADBEEF 3.14",
    ]:
        assert tok.decode(tok.encode(s)) == s
    # Tool-call markup survives skip_special_tokens; ChatML markers do not.
    ids = tok.encode("<tool_call>x</tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_template_short(tok: Any) -> None:
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"x": [1], "y": True}},
                    }
                ],
            },
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
        ],
        tools=[
            SHELL_TOOL,
            {"type": "function", "function": {"name": "noargs"}},
            {"type": "function", "function": {"name": "nullargs", "parameters": None}},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.startswith("<|im_start|>system\nYou are Qwen, a helpful AI assistant")
    assert "<name>noargs</name>\n<parameters>\n</parameters>" in text
    assert "<|im_start|>user\na\nb<|im_end|>" in text
    assert "<parameter=x>\n[1]\n</parameter>\n<parameter=y>\nTrue\n</parameter>" in text
    assert (
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>\n<|im_end|>"
        in text
    )
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["first-turn", "after-tool-call"])
def test_template_fixtures(tok: Any, name: str) -> None:
    fixtures = _real_fixtures()
    if fixtures is None:
        pytest.skip("qwen-code fixtures not available")
    body = json.loads((fixtures / f"{name}.json").read_text())
    text = tok.apply_chat_template(
        openai_to_template(body["messages"]), tools=body["tools"], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are Qwen Code")
    assert "# Tools\n\nYou have access to the following functions:\n\n<tools>" in text
    assert "<name>run_shell_command</name>" in text and text.count("<function>\n<name>") == len(body["tools"])
    assert "List the files in this directory<|im_end|>" in text
    if name == "after-tool-call":
        assert (
            "<function=run_shell_command>\n<parameter=command>\nls -la\n</parameter>\n"
            "<parameter=description>\nList files\n</parameter>\n</function>\n</tool_call><|im_end|>"
        ) in text
        assert "<|im_start|>user\n<tool_response>\nCommand: ls -la" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert 15000 < len(tok.encode(text)) < 25000


@pytest.mark.parametrize(
    "question,expected",
    [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Say hello.", GREETING),
        ("Hi", GREETING),
    ],
)
def test_greedy_plain_answers(model: Any, tok: Any, question: str, expected: str) -> None:
    assert _greedy(model, tok, [{"role": "user", "content": question}]) == expected + "<|im_end|>"


def test_greedy_generic_answer_is_not_a_tool_call(model: Any, tok: Any) -> None:
    out = _greedy(model, tok, [{"role": "user", "content": "How do I write a linked list in Haskell?"}])
    assert out.endswith("<|im_end|>") and "<tool_call>" not in out and len(out) > 15


def test_greedy_tool_call_short_prompt(model: Any, tok: Any) -> None:
    out = _greedy(model, tok, [{"role": "user", "content": "List the files in this directory"}], [SHELL_TOOL])
    assert out == TOOL_CALL_LS + "<|im_end|>"


def test_greedy_after_tool_response(model: Any, tok: Any) -> None:
    messages = [
        {"role": "user", "content": "List the files in this directory"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "run_shell_command", "arguments": {"command": "ls"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "main.py\nREADME.md"},
    ]
    assert _greedy(model, tok, messages, [SHELL_TOOL]) == AFTER_TOOL + "<|im_end|>"


@pytest.mark.parametrize("name,expected", [("first-turn", TOOL_CALL_LS), ("after-tool-call", AFTER_TOOL)])
def test_greedy_real_qwen_code_requests(model: Any, tok: Any, name: str, expected: str) -> None:
    """The real ~17k-token qwen-code requests: the exact well-formed ls call, then the plain answer."""
    fixtures = _real_fixtures()
    if fixtures is None:
        pytest.skip("qwen-code fixtures not available")
    body = json.loads((fixtures / f"{name}.json").read_text())
    out = _greedy(model, tok, openai_to_template(body["messages"]), body["tools"], max_new_tokens=32)
    assert out == expected + "<|im_end|>"
