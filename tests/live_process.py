"""Live servers in subprocesses for the end-to-end tests: a free loopback port, waiting until up, stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90  # a cold start loads torch, transformers and the demo model on a busy CPU


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout_s: float, poll_s: float = 0.2) -> None:
    """Returns once ``url`` answers 200; fails the test (with the log's tail) if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url}: the process exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not up within {timeout_s} s:\n{log.read_text()[-5000:]}")
        time.sleep(poll_s)


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Terminates ``process``, killing it if it has not ended within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_demo(log_path: Path, *flags: str, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """``python -m mugstan_chat.entrypoints.openai --demo --device cpu FLAGS`` on a free port, for a fixture to ``yield from``.

    Yields the base URL once ``/health`` answers; afterwards stops the server and fails if its log shows a
    traceback (nothing may crash inside). No API key comes from the environment: ``FLAGS`` give any.
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MUGSTAN_API_KEY", None)
    command = [sys.executable, "-m", "mugstan_chat.entrypoints.openai", "--demo", "--device", "cpu", "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, f"{base}/health", log_path, timeout_s)
        yield base
    finally:
        stop(process)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def serve_app(log_path: Path, *flags: str, launcher: tuple[str, ...] = ("app.py",), env: dict | None = None,
              timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """``python app.py FLAGS`` (or ``python LAUNCHER FLAGS``) on a free port from the repository root, for a fixture
    to ``yield from``: its URL once the page answers. It runs in its own process group, stopped as a whole."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "GRADIO_TEMP_DIR": str(log_path.parent / "gradio"), **(env or {})}
    with open(log_path, "w") as handle:
        process = subprocess.Popen([sys.executable, *launcher, *flags, "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url + "/", log_path, timeout_s)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own process group: the app and nothing else
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
