"""The `qwenserve` command line: flags, their mapping to EngineConfig, bench dispatch, and
the fast failure paths of `serve` (busy port, a model that cannot load)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from server_utils import REPO, ServerProcess

from qwenserve import cli


def parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_defaults_are_loopback_and_demo() -> None:
    args = parse()
    assert args.host == "127.0.0.1" and args.port == 8000
    assert args.model is None and args.model_tag is None
    config = cli.engine_config(args)
    assert config.model is None and config.load_format == "auto"


def test_vllm_flag_names_map_to_engine_config() -> None:
    args = parse(
        "--model", "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "--served-model-name", "qwen3-coder-30b", "coder",
        "--max-model-len", "32k",
        "--kv-cache-memory", "2GiB",
        "--max-num-seqs", "8",
        "--max-num-batched-tokens", "4096",
        "--max-queued-requests", "16",
        "--load-format", "dummy",
        "--dtype", "bfloat16",
        "--no-enable-prefix-caching",
        "--api-key", "k",
        "--log-requests",
    )  # fmt: skip
    assert (
        args.served_model_name == ["qwen3-coder-30b", "coder"] and args.api_key == "k" and args.log_requests
    )
    config = cli.engine_config(args)
    assert config.model == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert config.max_model_len == 32768 and config.kv_cache_memory == 2 << 30
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.max_queued_requests) == (8, 4096, 16)
    assert config.load_format == "dummy" and config.dtype == "bfloat16" and not config.enable_prefix_caching
    assert cli.engine_config(parse("--gpu-memory-utilization", "0.5")).gpu_memory_utilization == 0.5
    assert config.async_scheduling and not cli.engine_config(parse("--no-async-scheduling")).async_scheduling


def test_a_vllm_command_line_runs_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    """`vllm serve MODEL --enable-auto-tool-choice --tool-call-parser qwen3_coder ...` parses, and its
    tool flags change nothing; an unknown parser name is refused with the choices."""
    vllm = ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder",
            "--trust-remote-code", "--disable-log-requests", "--enable-chunked-prefill", "--kv-cache-dtype", "auto",
            "--max-model-len", "65536")  # fmt: skip
    config = cli.engine_config(parse(*vllm))
    plain = cli.engine_config(parse("Qwen/Qwen3-Coder-30B-A3B-Instruct", "--max-model-len", "65536"))
    assert config == plain
    with pytest.raises(SystemExit):
        parse("--tool-call-parser", "mistral")
    assert "qwen3_coder" in capsys.readouterr().err
    # A flag this server lacks is refused with the serve usage, which lists the flags it has.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--reasoning-parser", "qwen3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: qwenserve serve" in err and "--max-model-len" in err, err
    assert "unrecognized arguments: --reasoning-parser" in err


def test_memory_flags_are_exclusive_and_validated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--gpu-memory-utilization", "0.5", "--kv-cache-memory", "1GiB")
    with pytest.raises(SystemExit):
        parse("--kv-cache-memory", "lots")
    with pytest.raises(SystemExit):
        parse("--load-format", "pickle")
    assert "kv-cache-memory" in capsys.readouterr().err


def test_help_lists_serve_and_bench() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qwenserve", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "serve" in out.stdout and "bench" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "qwenserve", "serve", "--help"], capture_output=True, text=True
    )
    for flag in ("--served-model-name", "--max-model-len", "--api-key", "--gpu-memory-utilization",
                 "--kv-cache-memory", "--max-num-seqs", "--log-requests", "--load-format", "--dtype"):  # fmt: skip
        assert flag in out.stdout, flag


def test_bench_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("qwenserve.bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qwenserve.bench", fake)
    assert cli.main(["bench", "--foo", "1"]) == 0
    assert seen == [["--foo", "1"]]


def test_busy_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "qwenserve", "serve", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 1
    assert "cannot listen" in out.stderr and str(port) in out.stderr


@pytest.mark.slow
def test_unloadable_model_exits_with_its_reason(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "qwenserve", "serve", "--model", str(empty), "--port", "0"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "failed to load the model" in out.stderr


def test_a_local_model_that_cannot_load_is_refused_before_the_server_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path's config is read at once: its error comes in a moment, not after binding the port and loading."""
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    for model in (str(tmp_path), str(tmp_path / "missing"), "./relative-missing"):
        assert cli.main(["serve", "--model", model, "--port", "0"]) == 1, model
    assert caplog.text.count("failed to load the model") == 3 and "unsupported architecture 'LlamaForCausalLM'" in caplog.text


def test_bad_port_queue_and_device_are_refused_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    for port in ("70000", "-5", "http"):
        with pytest.raises(SystemExit):
            parse("--port", port)
    assert "0..65535" in capsys.readouterr().err
    for flags in (("--max-queued-requests", "0"), ("--device", "tpu")):
        assert cli.main(["serve", *flags]) == 2, flags
    if not torch.cuda.is_available():
        assert cli.main(["serve", "--device", "cuda"]) == 2


def test_broken_config_json_names_the_file(tmp_path: Path) -> None:
    from qwenserve.config import ModelConfig

    (tmp_path / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"],')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    arch = {"architectures": ["Qwen3MoeForCausalLM"]}
    with pytest.raises(ValueError, match="config.json has no 'hidden_size'"):
        ModelConfig.from_dict({**arch, "vocab_size": 64})
    with pytest.raises(ValueError, match="'num_hidden_layers' must be a positive integer, got '2'"):
        ModelConfig.from_dict({**arch, **sizes, "num_hidden_layers": "2"})
    with pytest.raises(ValueError, match="quantized with bitsandbytes"):
        ModelConfig.from_dict({**arch, **sizes, "quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})


def test_commands_run_without_docstrings() -> None:
    """`python -OO` strips docstrings (some deployments set PYTHONOPTIMIZE=2): the help of both commands
    still prints (bench's description used to be `__doc__.split(...)`, an AttributeError on None)."""
    for command in ("serve", "bench"):
        proc = subprocess.run(
            [sys.executable, "-OO", "-m", "qwenserve", command, "--help"],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0 and "usage: qwenserve " + command in proc.stdout, proc.stderr[-2000:]


def test_ctrl_c_exits_quietly_when_idle_and_while_loading() -> None:
    """SIGINT (what a terminal's Ctrl-C sends): exit 130 at once, without a traceback, also mid-load,
    and when an impatient user presses it twice (uvicorn then skipped the app's shutdown, and the
    cancelled lifespan task logged a traceback)."""
    for extra, presses in (([], 1), (["--load-format", "dummy"], 1), ([], 2)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwenserve", "serve", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
        assert proc.stdout is not None
        wanted = "qwenserve is ready" if not extra else "listening on"
        for line in proc.stdout:
            if wanted in line:
                break
        for press in range(presses):
            time.sleep(0.05 * press)  # apart, or the handler runs once for both
            proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]


def test_empty_api_key_and_impossible_kv_memory_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--api-key "$KEY"` with KEY unset must not serve without a key; a KV size of 0, one under two
    blocks, or more than the machine has is refused before anything is allocated."""
    from qwenserve.config import EngineConfig
    from qwenserve.engine.startup import check_kv_memory_fits

    assert cli.main(["serve", "--api-key", ""]) == 2
    assert cli.main(["serve", "--api-key", "  ", "--port", "0"]) == 2
    with pytest.raises(SystemExit):
        parse("--kv-cache-memory", "0.5")  # less than one byte
    monkeypatch.setenv("QWENSERVE_API_KEY", "")
    assert cli.main(["serve"]) == 2
    monkeypatch.delenv("QWENSERVE_API_KEY")
    with pytest.raises(ValueError, match=r"kv_cache_memory \(--kv-cache-memory\) must be more than 0"):
        EngineConfig(kv_cache_memory=0)
    for block_size in (0, 24, 512, 65536):  # a 64k-token block left one block for every sequence
        with pytest.raises(ValueError, match=r"block_size \(--block-size\) must be a power of two from 1 to 256"):
            EngineConfig(block_size=block_size)
    assert EngineConfig(block_size=256).block_size == 256
    with pytest.raises(ValueError, match="fewer than 2 KV blocks"):
        check_kv_memory_fits(1024, 65536, torch.device("cpu"))
    with pytest.raises(ValueError, match="more than the .* GiB available on this machine"):
        check_kv_memory_fits(1 << 60, 65536, torch.device("cpu"))
    check_kv_memory_fits(64 << 20, 65536, torch.device("cpu"))


def test_token_counts_take_k_and_m() -> None:
    assert parse("--max-model-len", "32k").max_model_len == 32768
    assert parse("--max-model-len", "1.5K").max_model_len == 1536
    assert parse("--max-model-len", "1m").max_model_len == parse("--max-model-len", "1M").max_model_len == 1 << 20
    assert parse("--max-model-len", "40960").max_model_len == 40960
    for bad in ("lots", "infk"):
        with pytest.raises(SystemExit):
            parse("--max-model-len", bad)
    for seed in ("-1", str(1 << 63), "1e3"):
        with pytest.raises(SystemExit):
            parse("--seed", seed)


def test_a_model_swallowed_by_served_model_name_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--served-model-name takes every word after it: a model given after it would silently become a
    name, and the demo model would be served instead."""
    for model in ("Qwen/Qwen3-Coder-30B-A3B-Instruct", str(tmp_path)):
        assert cli.main(["serve", "--served-model-name", "coder", model]) == 2
        assert "put the model first" in caplog.text and model in caplog.text
        caplog.clear()


def test_bad_environment_settings_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenserve.config import env_number

    monkeypatch.setenv("QWENSERVE_MAX_BODY_BYTES", "16MiB")
    with pytest.raises(ValueError, match="QWENSERVE_MAX_BODY_BYTES='16MiB' is not a whole number"):
        env_number("QWENSERVE_MAX_BODY_BYTES", 1)
    for raw in ("0", "-2", "nan", "inf"):
        monkeypatch.setenv("QWENSERVE_HEARTBEAT_SECONDS", raw)
        with pytest.raises(ValueError, match="QWENSERVE_HEARTBEAT_SECONDS"):
            env_number("QWENSERVE_HEARTBEAT_SECONDS", 10.0, whole=False)
    monkeypatch.setenv("QWENSERVE_HEARTBEAT_SECONDS", " 2.5 ")
    assert env_number("QWENSERVE_HEARTBEAT_SECONDS", 10.0, whole=False) == 2.5
    monkeypatch.delenv("QWENSERVE_HEARTBEAT_SECONDS")
    assert env_number("QWENSERVE_HEARTBEAT_SECONDS", 10.0, whole=False) == 10.0
    # Each is refused before the port is bound, with the same exit code: QWENSERVE_CPU_THREADS was read only once
    # a CPU model had begun loading (exit 1, after the server had started; never on a GPU).
    monkeypatch.delenv("QWENSERVE_MAX_BODY_BYTES")
    for name in ("QWENSERVE_MAX_BODY_BYTES", "QWENSERVE_CPU_THREADS"):
        out = subprocess.run(
            [sys.executable, "-m", "qwenserve", "serve", "--port", "0"], capture_output=True, text=True, timeout=120,
            env={**os.environ, name: "lots"},
        )  # fmt: skip
        assert out.returncode == 2 and f"{name}='lots'" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "listening on" not in out.stderr, out.stderr


def test_allowed_origins_take_vllms_json_list_or_commas(capsys: pytest.CaptureFixture[str]) -> None:
    from qwenserve.api.server import LOCAL_ORIGINS, cors_options, origin_allowed

    assert origin_allowed("http://localhost:5173", None) and not origin_allowed("http://localhost.evil.example", None)
    assert origin_allowed("https://a.example", ["*"]) and not origin_allowed("https://b.example", ["https://a.example"])

    assert parse().allowed_origins is None and cors_options(None)["allow_origin_regex"] == LOCAL_ORIGINS
    assert parse("--allowed-origins", '["*"]').allowed_origins == ["*"]
    assert cors_options(["https://a.example", "*"])["allow_origins"] == ["*"]
    both = parse("--allowed-origins", "https://a.example, http://b.example:8080/").allowed_origins
    assert both == ["https://a.example", "http://b.example:8080"] and cors_options(both)["allow_origins"] == both
    for bad in ('["*"', "[1]", "a.example"):
        with pytest.raises(SystemExit):
            parse("--allowed-origins", bad)
        assert "origin" in capsys.readouterr().err


@pytest.mark.parametrize("installed", [False, True])
def test_setup_installs_into_an_active_virtualenv_that_lacks_this_checkouts_qwenserve(
    tmp_path: Path, installed: bool
) -> None:
    """serve.sh / test.sh with a virtualenv active: scripts/setup.sh skips the install only when every
    dependency is there and `qwenserve` is this checkout's. It used to look qwenserve up from inside the
    checkout, where its own qwenserve/ folder is always found: a virtualenv holding the dependencies but
    not qwenserve (a vLLM one), once the stamp existed, ended in `exec: qwenserve: not found`."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    (checkout / "qwenserve").mkdir()
    (checkout / "qwenserve" / "__init__.py").write_text("")
    (checkout / ".venv-installed").touch()  # set up once before, so only the module check decides
    os.utime(checkout / "pyproject.toml", (1, 1))
    # This interpreter has every dependency; pip is not run, only recorded.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip_log = tmp_path / "pip.log"
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {pip_log}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "VIRTUAL_ENV": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    if installed:  # this checkout's qwenserve is the one the environment imports
        env["PYTHONPATH"] = str(checkout)
    proc = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pips = pip_log.read_text() if pip_log.exists() else ""
    if installed:
        assert pips == "" and "installing" not in proc.stderr
    else:
        assert "install -q -e ." in pips, (proc.stderr[-2000:], pips)


def test_a_low_open_file_limit_is_raised_so_many_connections_still_get_served(tmp_path: Path) -> None:
    """Started with the soft limit at 128 open files (the hard limit as it was), the server raises it
    itself: 300 idle connections, then a request, which is answered."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"this machine's hard limit on open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))  # room for the test's sockets

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))

    server = ServerProcess(tmp_path, preexec_fn=low_limit)
    server.wait_ready()
    idle: list[socket.socket] = []
    try:
        limits = Path(f"/proc/{server.proc.pid}/limits")
        if limits.exists():
            line = next(row for row in limits.read_text().splitlines() if row.startswith("Max open files"))
            assert int(line.split()[3]) > 128, line
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(0.5)  # let the server accept them all before the real request queues behind them
        reply = server.post(
            "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert reply.status_code == 200, reply.text
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_setup_stops_at_once_without_python_3_11(tmp_path: Path) -> None:
    """Ubuntu 22.04's python3 is 3.10: scripts/setup.sh looks for a newer interpreter beside it and, with
    none, stops at once naming the fix (pip would refuse qwenserve only after minutes of downloading torch);
    an active virtualenv on an old Python is refused the same way."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    bin_dir = tmp_path / "bin"  # every interpreter name the script may try is an old one
    bin_dir.mkdir()
    for name in ("python", "python3", "python3.11", "python3.12", "python3.13"):
        (bin_dir / name).write_text('#!/bin/sh\ncase "$*" in *version_info\\[:2\\]*) echo 3.10;; esac\nexit 1\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    script = str(checkout / "scripts" / "setup.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "needs Python 3.11 or newer" in proc.stderr and "python3 is 3.10" in proc.stderr, proc.stderr
    assert not (checkout / ".venv").exists()
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env={**env, "VIRTUAL_ENV": str(tmp_path)},
                          timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "runs Python 3.10" in proc.stderr, proc.stderr
