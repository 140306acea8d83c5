"""Locating checkpoints: local directories, hub ids, and the errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from qwenserve.model.loader import ModelNotFoundError, build_model, load_model_config, resolve_model_path


def test_local_directory_is_used_as_is(tiny_moe_dir: Path) -> None:
    assert resolve_model_path(str(tiny_moe_dir)) == tiny_moe_dir


def test_directory_without_config_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_offline_hub_miss_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="hf download qwenserve-test/no-such-model"):
        resolve_model_path("qwenserve-test/no-such-model")


def test_not_a_path_nor_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor"):
        resolve_model_path(str(tmp_path / "missing" / "dir"))


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """A checkpoint saved in several shards (with model.safetensors.index.json) loads shard by shard."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    cfg = load_model_config(sharded)
    a = build_model(cfg, sharded, torch.device("cpu"), torch.float32).state_dict()
    b = build_model(load_model_config(tiny_moe_dir), tiny_moe_dir, torch.device("cpu"), torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dummy_weights_are_normal_not_zero(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path)
    cfg = load_model_config(path)
    model = build_model(cfg, None, torch.device("cpu"), torch.float32, load_format="dummy")
    w13 = model.layers[0].mlp.w13
    assert w13.abs().sum() > 0 and abs(w13.std().item() - cfg.initializer_range) < 0.2 * cfg.initializer_range
