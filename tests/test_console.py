"""Our stderr is ours, and the network is only ours (console.py, network.py).

The CLI runs in a subprocess (tests/chatter_driver.py) whose dependencies are made to talk: each of
transformers, peft, bitsandbytes, kernels and huggingface_hub logs, warns, prints to stderr and draws
a progress bar during the merge, bitsandbytes is made to believe the CPU has AVX512-BF16 (so its
import asks `kernels` for a Hub kernel, as on Intel Xeons), and kernels is asked for a kernel
directly. huggingface_hub points at a fake Hub on 127.0.0.1 that logs every request it receives;
every other host goes to a dead proxy.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT
from fakehub import FakeHub
from test_hub import hub_env

DRIVER = REPO_ROOT / "tests" / "chatter_driver.py"
pytest.importorskip("kernels")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def hub(llama_case):
    hub = FakeHub().start()
    hub.add_folder("org/base", llama_case.base_path)
    hub.add_folder("org/lora", llama_case.adapter_path)
    yield hub
    hub.stop()


def drive(hub, tmp_path, *args, flags=("--avx512bf16", "--chatter")) -> subprocess.CompletedProcess:
    env = hub_env(hub, tmp_path / "hf-home")
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS")  # let huggingface_hub draw its bars
    env.pop("TRANSFORMERS_VERBOSITY", None)  # and transformers log at its default level
    return subprocess.run([sys.executable, str(DRIVER), *flags, "--", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT))


def assert_no_request_of_a_dependency(hub) -> None:
    strays = [r["path"] for r in hub.log if not r["path"].startswith(("/api/models/org/", "/org/"))]
    assert strays == [], strays


def test_a_successful_merge_shows_only_our_lines(llama_case, hub, tmp_path):
    hub.log.clear()
    out = tmp_path / "out"
    proc = drive(hub, tmp_path, "merge", llama_case.base_path, llama_case.adapter_path, "--out", out,
                 "--method", "merged_4bit")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("merged "), proc.stdout
    assert hub.log == []  # a local merge asks the Hub nothing, and neither does kernels nor bitsandbytes
    assert (out / "model.safetensors").exists()


def test_an_error_is_one_line_whatever_peft_and_bitsandbytes_log(llama_case, hub, tmp_path):
    """An adapter config only PEFT may read: importing PEFT imports bitsandbytes, which asks kernels
    for a Hub kernel; PEFT refuses the config. The terminal shows our one line only."""
    import shutil

    lora = tmp_path / "lora"
    shutil.copytree(llama_case.adapter_path, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps(config | {"layers_pattern": "layers"}))
    hub.log.clear()
    proc = drive(hub, tmp_path, "merge", llama_case.base_path, lora, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "PEFT cannot read this LoRA config" in lines[0], proc.stderr
    assert hub.log == []


def test_debug_shows_what_dependencies_said(llama_case, hub, tmp_path):
    """Routed, not lost: with --debug the chatter and the refused network requests are shown."""
    proc = drive(hub, tmp_path, "plan", llama_case.base_path, llama_case.adapter_path, "--method", "merged_4bit",
                 "--debug")
    assert proc.returncode == 0, proc.stderr
    for lib in ("transformers", "peft", "bitsandbytes", "kernels", "huggingface_hub"):
        for what in ("logger warning", "warning", "print"):
            assert f"CHATTER {lib} {what}" in proc.stderr, (lib, what, proc.stderr[-3000:])
    assert "CHATTER transformers own handler" in proc.stderr and "CHATTER hub bar" in proc.stderr
    assert "blocked a network request of kernels" in proc.stderr
    assert "CHATTER" not in proc.stdout


def test_a_hub_merge_makes_only_our_requests(llama_case, hub, tmp_path):
    hub.log.clear()
    out = tmp_path / "out"
    proc = drive(hub, tmp_path, "merge", "org/base", "org/lora", "--out", out, "--method", "merged_4bit")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert any("/resolve/" in r["path"] for r in hub.log)  # ours went through
    assert_no_request_of_a_dependency(hub)  # kernels' trust check and kernel download did not


def test_demo_prints_only_its_own_lines():
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_HUB_DISABLE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "streammerge", "demo"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    ours = ("built ", "merged ", "check ", "  ", "demo passed")
    assert all(line.startswith(ours) for line in proc.stdout.splitlines()), proc.stdout


# ------------------------------------------------------------------------------- the guard, in process


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    threading.Thread(target=lambda: [server.accept() for _ in range(8)], daemon=True).start()
    return server


def _connect_as(module: str, address) -> None:
    exec(compile("import socket\nsocket.create_connection(address, timeout=5).close()", f"<{module}>", "exec"),
         {"__name__": module, "address": address})


def test_guard_refuses_other_requesters_and_serves_ours():
    from streammerge import network

    server = _listener()
    address = server.getsockname()
    try:
        _connect_as("kernels.fetch", address)  # no guard: anyone may connect
        with network.guarded():
            _connect_as("streammerge.hub.client", address)
            with pytest.raises(network.NetworkBlocked):
                _connect_as("kernels.fetch", address)
            with pytest.raises(network.NetworkBlocked):
                _connect_as("transformers.utils.hub", address)
            # a helper thread of the HTTP stack (no requester on its stack): served only during our call
            result: list[bool] = []
            scope = {"__name__": "huggingface_hub.pool", "socket": socket, "address": address, "result": result}
            exec(compile("def work():\n    try:\n        socket.create_connection(address, timeout=5).close()\n"
                         "        result.append(True)\n    except ConnectionRefusedError:\n        result.append(False)\n",
                         "<huggingface_hub.pool>", "exec"), scope)
            for mark in (contextlib.nullcontext(), network.ours()):
                with mark:
                    t = threading.Thread(target=scope["work"])
                    t.start()
                    t.join()
            assert result == [False, True]
        _connect_as("kernels.fetch", address)
    finally:
        server.close()

