"""Locating checkpoints: local directories, hub ids, and the errors a user can act on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint

from qwenserve.model.loader import (
    ModelNotFoundError,
    build_model,
    dequantize_fp8,
    load_model_config,
    resolve_model_path,
)


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


def test_hf_hub_offline_reads_as_huggingface_hub_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=0 / no / false is online: the miss is then a failed download, not 'offline'."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")  # the download it then tries fails fast without network
    for value in ("no",):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(ModelNotFoundError) as err:
            resolve_model_path("qwenserve-test/no-such-model")
        assert "HF_HUB_OFFLINE is set" not in str(err.value), value


def test_a_checkpoint_without_a_chat_template_gets_the_built_in_one(tmp_path: Path, tiny_moe_dir: Path) -> None:
    from qwenserve.engine.startup import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_moe_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(bare)
    assert "<function=" in tokenizer.chat_template  # Qwen3-Coder's, so its XML calls are parsed
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_streamed_load_equals_safetensors_reader(
    tmp_path: Path, tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """The streamed reader (long runs through two small buffers, tensors larger than a buffer in pieces,
    bf16 storage converted to float32 and float32 to bf16) fills every parameter exactly as safetensors'
    own reader does."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from qwenserve.model import loader

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_moe_dir, bf16)
    for file in bf16.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    monkeypatch.setattr(loader, "BUFFER_BYTES", 4096)  # most runs hold a few tensors; large ones go in pieces
    for path in (tiny_moe_dir, bf16):
        cfg = load_model_config(path)
        for dtype in (torch.float32, torch.bfloat16):
            loaded = {}
            for streamed in (True, False):
                monkeypatch.setattr(loader, "STREAMED_LOAD", streamed)
                loaded[streamed] = build_model(cfg, path, torch.device(device), dtype).state_dict()
            a, b = loaded[True], loaded[False]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (path.name, dtype)


@pytest.mark.gpu
def test_streamed_load_returns_its_pinned_buffers(tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load's page-locked buffers go back to the OS once the weights are in: PyTorch's host cache would
    otherwise hold them (1 GB for a real checkpoint) for the server's lifetime."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from qwenserve.model import loader

    monkeypatch.setattr(loader, "STREAMED_LOAD", True)
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    build_model(load_model_config(tiny_moe_dir), tiny_moe_dir, torch.device("cuda"), torch.bfloat16)
    after = torch.cuda.host_memory_stats()
    assert after["allocated_bytes.peak"] > before, "the load used no pinned buffer: the test checks nothing"
    assert after["allocated_bytes.current"] <= before


def test_a_truncated_shard_says_so(tmp_path: Path, tiny_moe_dir: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(tiny_moe_dir, cut)
    (shard,) = cut.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        build_model(load_model_config(cut), cut, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n", "Git LFS pointer"),
        (b"", "not a safetensors file"),
        (b"\0" * 64, "not a safetensors file"),
        ((20).to_bytes(8, "little") + b"\xff" * 20, "its header is not JSON"),
    ],
    ids=["lfs-pointer", "empty", "zeros", "garbage-header"],
)
def test_a_shard_that_is_not_safetensors_is_named(tmp_path: Path, tiny_moe_dir: Path, content: bytes, message: str) -> None:
    """What a clone without git-lfs or a broken download leaves: the file and what to do, not a bare
    MemoryError or JSONDecodeError."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_moe_dir, bad)
    (shard,) = bad.glob("*.safetensors")
    shard.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        build_model(load_model_config(bad), bad, torch.device("cpu"), torch.float32)
    assert shard.name in str(err.value)


def test_an_index_naming_a_missing_shard_is_an_incomplete_download(tmp_path: Path, tiny_moe_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).save_pretrained(sharded, max_shard_size="200KB")
    lost = sorted(sharded.glob("*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(ModelNotFoundError, match=f"incomplete download.*{lost.name}"):
        build_model(load_model_config(sharded), sharded, torch.device("cpu"), torch.float32)


def test_a_tensor_the_model_never_reads_may_have_any_dtype(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """As with safetensors' reader, an unused tensor in a dtype the streamed reader cannot convert is
    skipped; only a tensor the model needs in such a dtype is an error."""
    extra = tmp_path / "extra"
    shutil.copytree(tiny_moe_dir, extra)
    (shard,) = extra.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.unused_buffer"] = torch.zeros(4, dtype=torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg = load_model_config(extra)
    build_model(cfg, extra, torch.device("cpu"), torch.float32)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight is stored in a dtype"):
        build_model(cfg, extra, torch.device("cpu"), torch.float32)


def test_dummy_weights_are_normal_not_zero(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path)
    cfg = load_model_config(path)
    model = build_model(cfg, None, torch.device("cpu"), torch.float32, load_format="dummy")
    w13 = model.layers[0].mlp.w13
    assert w13.abs().sum() > 0 and abs(w13.std().item() - cfg.initializer_range) < 0.2 * cfg.initializer_range


def _write_fp8_checkpoint(src: Path, dst: Path, block: int = 16) -> dict[str, torch.Tensor]:
    """`src` as Qwen publishes its FP8 checkpoints (quant_method fp8, block scales): every projection in
    float8_e4m3fn with a weight_scale_inv per [block x block] tile; embeddings, norms and the router as they
    were. Returns the projections' dequantized values."""
    shutil.copytree(src, dst)
    out, want = {}, {}
    for name, tensor in load_file(dst / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            out[name] = tensor
            continue
        rows, cols = tensor.shape
        tiles = tensor.reshape(rows // block, block, cols // block, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0  # float8_e4m3fn's largest value
        values = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = values, scale
        full_scale = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        want[name] = values.float() * full_scale
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return want


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_fp8_checkpoint_loads_dequantized(tmp_path: Path, tiny_moe_dir: Path, device: str) -> None:
    """An FP8 checkpoint (e.g. Qwen3-Coder-30B-A3B-Instruct-FP8) loads with each weight times its block's
    scale, not as the raw FP8 values, and lands close to the unquantized weights."""
    want = _write_fp8_checkpoint(tiny_moe_dir, tmp_path / "fp8")
    cfg = load_model_config(tmp_path / "fp8")
    assert cfg.fp8_weight_block == (16, 16)
    model = build_model(cfg, tmp_path / "fp8", torch.device(device), torch.float32).cpu()
    original = build_model(load_model_config(tiny_moe_dir), tiny_moe_dir, torch.device("cpu"), torch.float32)
    layer, inter = model.layers[1], cfg.moe_intermediate_size
    assert torch.equal(layer.mlp.w13[3, :inter], want["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(layer.mlp.w13[3, inter:], want["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert torch.equal(layer.mlp.w2[5], want["model.layers.1.mlp.experts.5.down_proj.weight"])
    assert torch.equal(layer.self_attn.o_proj.weight, want["model.layers.1.self_attn.o_proj.weight"])
    q_size = layer.self_attn.q_size
    assert torch.equal(layer.self_attn.qkv_proj.weight[:q_size], want["model.layers.1.self_attn.q_proj.weight"])
    for (name, got), ref in zip(model.state_dict().items(), original.state_dict().values(), strict=True):
        # float8_e4m3fn keeps 3 mantissa bits: within 1/16 of each value's tile maximum
        assert (got - ref).abs().max() <= ref.abs().max() / 16, name


def test_fp8_dequantize_partial_tiles_and_one_scale() -> None:
    values = torch.randn(40, 24).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 16 x 16 tiles; the last row and column partial
    got = dequantize_fp8(values, scale, (16, 16))
    assert torch.equal(got[17, 23], values[17, 23].float() * 4.0) and torch.equal(got[39, 0], values[39, 0].float() * 5)
    assert torch.equal(dequantize_fp8(values, torch.tensor([0.5]), None), values.float() * 0.5)
    rows = torch.arange(1.0, 41.0)
    assert torch.equal(dequantize_fp8(values, rows[:, None], None), values.float() * rows[:, None])
    assert torch.equal(dequantize_fp8(values, rows.bfloat16(), None), values.float() * rows[:, None])
    with pytest.raises(ValueError, match="needs scales of shape"):
        dequantize_fp8(values, torch.ones(2, 2), (16, 16))
    with pytest.raises(ValueError, match="need quantization_config.weight_block_size"):
        dequantize_fp8(values, scale, None)


def test_fp8_checkpoint_with_one_scale_per_tensor(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """vLLM's per-tensor FP8 checkpoints: `weight_scale` (and `input_scale`, unused here), no block size."""
    shutil.copytree(tiny_moe_dir, tmp_path / "fp8")
    out, want = {}, {}
    for name, tensor in load_file(tmp_path / "fp8" / "model.safetensors").items():
        if name.endswith("proj.weight"):
            scale = tensor.abs().max() / 448.0
            out[name], out[name + "_scale"] = (tensor / scale).to(torch.float8_e4m3fn), scale.reshape(1)
            out[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
            want[name] = out[name].float() * scale
        else:
            out[name] = tensor
    save_file(out, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    cfg = load_model_config(tmp_path / "fp8")
    assert cfg.fp8 and cfg.fp8_weight_block is None
    model = build_model(cfg, tmp_path / "fp8", torch.device("cpu"), torch.float32)
    assert torch.equal(model.layers[0].mlp.w2[2], want["model.layers.0.mlp.experts.2.down_proj.weight"])
    assert torch.equal(model.layers[0].self_attn.o_proj.weight, want["model.layers.0.self_attn.o_proj.weight"])


def test_unsupported_quantization_and_missing_fp8_scales_say_so(tmp_path: Path, tiny_moe_dir: Path) -> None:
    _write_fp8_checkpoint(tiny_moe_dir, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "awq").mkdir()
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'awq'.*unquantized checkpoint"):
        load_model_config(tmp_path / "awq")
    for bad in ("fp8", {"quant_method": "fp8", "weight_block_size": 128}):
        config["quantization_config"] = bad
        (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="quantization_config"):
            load_model_config(tmp_path / "awq")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj.weight is stored in torch.float8_e4m3fn but .* no .*_scale_inv or"):
        build_model(load_model_config(tmp_path / "fp8"), tmp_path / "fp8", torch.device("cpu"), torch.float32)


def test_building_the_model_needs_no_writable_cache_or_temp_dir(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """A read-only filesystem (a container's readOnlyRootFilesystem, no writable /tmp) or an unwritable
    TORCHINDUCTOR_CACHE_DIR must not fail the load: building the model on the meta device used to run
    nn.Embedding's normal_ init there, which imports torch._dynamo, which creates its cache directory."""
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory under a regular file cannot be created, even by root
    script = (
        "import sys, torch\n"
        "from qwenserve.model.loader import build_model, load_model_config\n"
        "from pathlib import Path\npath = Path(sys.argv[1])\n"
        "model = build_model(load_model_config(path), path, torch.device('cpu'), torch.float32)\n"
        "assert model.embed_tokens.weight.abs().sum() > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker / "inductor"), "TMPDIR": str(blocker / "tmp")}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_moe_dir)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False", "building the model imported torch._dynamo"
