"""Our model's logits equal Transformers' on the same random weights (float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from qwenserve.engine.model_runner import ModelRunner
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.engine.sequence import Sequence
from qwenserve.model.loader import build_model, load_model_config

ATOL = 2e-5


def _ours_and_hf(path: Path):
    from transformers import AutoModelForCausalLM

    cfg = load_model_config(path)
    model = build_model(cfg, path, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, cfg, num_blocks=64, block_size=16, device=torch.device("cpu"), dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, runner, hf


def _run(model, runner: ModelRunner, seq: Sequence, num_new: int) -> torch.Tensor:
    batch = ScheduledBatch()
    batch.add(seq, num_new)
    _, ids, pos, meta = runner.prepare(batch)
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos, meta))
    seq.num_computed_tokens += num_new
    return logits


@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_prefill_and_decode_logits_match_transformers(tmp_path: Path, moe: bool, yarn: bool) -> None:
    path = make_tiny_checkpoint(tmp_path, moe=moe, yarn=yarn, tie=not moe)
    model, runner, hf = _ours_and_hf(path)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 500, (37,), generator=gen).tolist()
    extra = torch.randint(0, 500, (6,), generator=gen).tolist()
    full = prompt + extra
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0]

    seq = Sequence("r", 0, prompt, SamplingParams(), seed=0)
    seq.block_table = [5, 2, 9, 1]  # scattered blocks: the gather must follow the table
    ours = _run(model, runner, seq, len(prompt))
    torch.testing.assert_close(ours, ref[: len(prompt)], atol=ATOL, rtol=1e-4)

    for i, token in enumerate(extra):  # step-by-step decode through the paged cache
        seq.token_ids.append(token)
        step = _run(model, runner, seq, 1)
        torch.testing.assert_close(step[0], ref[len(prompt) + i], atol=ATOL, rtol=1e-4)


def test_chunked_prefill_logits_match(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, moe=True)
    model, runner, hf = _ours_and_hf(path)
    prompt = torch.randint(0, 500, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    seq = Sequence("r", 0, prompt, SamplingParams(), seed=0)
    seq.block_table = [3, 4, 7, 8]
    chunks = [_run(model, runner, seq, n) for n in (17, 20, 13)]
    torch.testing.assert_close(torch.cat(chunks), ref, atol=ATOL, rtol=1e-4)


def test_hub_config_key_names_are_read() -> None:
    """The real Qwen3-Coder config.json uses hub names (num_experts, rope_theta) that Transformers 5 renames."""
    fixture = Path(__file__).parent / "fixtures" / "qwen3-coder-30b-a3b-instruct" / "config.json"
    cfg = load_model_config(fixture.parent)
    assert cfg.is_moe and cfg.num_experts == 128 and cfg.num_experts_per_tok == 8
    assert cfg.rope.theta == 10_000_000 and cfg.rope.rope_type == "default"
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 4
    assert cfg.eos_token_ids == [151645, 151643]  # from generation_config.json


def test_reference_attention_splits_long_queries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference bounds its score matrix by splitting query rows; results must not change."""
    from qwenserve.model import ops

    monkeypatch.setattr(ops, "_SCORE_BUDGET", 4 * 64 * 3)  # ~3 query rows per slice
    path = make_tiny_checkpoint(tmp_path, moe=False)
    model, runner, hf = _ours_and_hf(path)
    prompt = torch.randint(0, 500, (41,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    seq = Sequence("r", 0, prompt, SamplingParams(), seed=0)
    seq.block_table = [6, 1, 3]
    torch.testing.assert_close(_run(model, runner, seq, len(prompt)), ref, atol=ATOL, rtol=1e-4)


def test_reference_attention_groups_mixed_batches() -> None:
    """A long prefill beside decodes and a short prompt: the reference runs the groups apart (padding
    them together would cost 4x the work) and gives what one padded batch gives."""
    from qwenserve.model import ops

    gen = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    k_cache = torch.randn(64, block_size, kv_heads, dim, generator=gen)
    v_cache = torch.randn(64, block_size, kv_heads, dim, generator=gen)
    query_lens, context_lens = [1, 90, 1, 3], [30, 120, 7, 3]  # decode, prefill after a cached prefix, ...
    tables = [[1, 2, 3, 4, 5, 6, 7, 8], list(range(9, 39)), [39, 40], [41]]
    width = max(map(len, tables))
    meta = ops.AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 91, 92, 95], dtype=torch.int32),
        max_query_len=90, max_context_len=120, is_decode_only=False,
    )  # fmt: skip
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    grouped = ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
    torch.testing.assert_close(grouped, ops._padded_attention(q, k_cache, v_cache, meta, dim**-0.5))


def test_config_without_norm_topk_prob_reads_as_transformers_does(tmp_path: Path) -> None:
    """A config.json that leaves norm_topk_prob out means False to Transformers (Qwen3MoeConfig's default,
    and older Transformers' save_pretrained drops keys equal to their default); we must not renormalise."""
    path = make_tiny_checkpoint(tmp_path, moe=True)  # 8 experts, top-2: renormalising changes the logits
    _drop_config_key(path, "norm_topk_prob")
    hf = _assert_prompt_logits_match_hf(path, num_tokens=29, seed=4, block_table=[2, 1])
    assert hf.config.norm_topk_prob is False


def _drop_config_key(path: Path, key: str) -> None:
    """Rewrite the checkpoint's config.json without `key`, as a config that leaves it out."""
    import json

    raw = json.loads((path / "config.json").read_text())
    del raw[key]
    (path / "config.json").write_text(json.dumps(raw))


def _assert_prompt_logits_match_hf(path: Path, num_tokens: int, seed: int, block_table: list[int]) -> Any:
    """Our prefill logits of a random prompt equal Transformers' on the checkpoint at `path`; returns HF's model."""
    model, runner, hf = _ours_and_hf(path)
    prompt = torch.randint(0, 500, (num_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    seq = Sequence("r", 0, prompt, SamplingParams(), seed=0)
    seq.block_table = block_table
    torch.testing.assert_close(_run(model, runner, seq, len(prompt)), ref, atol=ATOL, rtol=1e-4)
    return hf


@pytest.mark.parametrize(
    "moe, dropped", [(True, "num_experts_per_tok"), (False, "head_dim")], ids=["moe-top-k", "dense-head-dim"]
)
def test_config_keys_left_out_read_as_transformers_does(tmp_path: Path, moe: bool, dropped: str) -> None:
    """A key config.json leaves out takes Transformers' default for the architecture: a MoE config without
    num_experts_per_tok routes to 8 experts (it was read as 0: every request failed with a 500), a dense
    one without head_dim has 128-wide heads (it was read as hidden_size // heads: the load was refused)."""
    path = make_tiny_checkpoint(tmp_path, moe=moe, head_dim=16 if moe else 128)
    _drop_config_key(path, dropped)
    hf = _assert_prompt_logits_match_hf(path, num_tokens=21, seed=5, block_table=[3, 0])
    assert getattr(hf.config, dropped) == (8 if moe else 128)


@pytest.mark.parametrize("top_k", [0, 9])
def test_moe_top_k_outside_the_experts_is_refused(top_k: int) -> None:
    """num_experts_per_tok 0 (or more than num_experts) cannot route: refused at start, naming the key,
    rather than a 500 on every request."""
    from qwenserve.config import ModelConfig

    sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    raw = {"architectures": ["Qwen3MoeForCausalLM"], **sizes, "num_experts": 8}
    with pytest.raises(ValueError, match="num_experts_per_tok must be from 1 to num_experts"):
        ModelConfig.from_dict({**raw, "num_experts_per_tok": top_k})


@pytest.mark.parametrize(
    "extra, refused",
    [({"attention_bias": True}, "attention_bias"), ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window")],
    ids=["attention_bias", "sliding_window"],
)
def test_config_features_we_would_skip_are_refused(tmp_path: Path, extra: dict, refused: str) -> None:
    """Transformers' Qwen3-MoE adds q/k/v/o biases (attention_bias) and masks attention to a window
    (use_sliding_window); our model has neither, so such a checkpoint must be refused, not served
    with different logits (the biases were skipped by the loader without a word)."""
    import json

    from qwenserve.config import ModelConfig

    path = make_tiny_checkpoint(tmp_path, moe=True)
    raw = {**json.loads((path / "config.json").read_text()), **extra}
    with pytest.raises(ValueError, match=refused):
        ModelConfig.from_dict(raw)
    off = {**raw, **{k: False for k in extra if k in ("attention_bias", "use_sliding_window")}}
    ModelConfig.from_dict(off)  # the same config with the feature off loads
