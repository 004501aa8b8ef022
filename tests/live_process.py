"""Live servers in subprocesses for the end-to-end tests: a free loopback port, waiting until up, stopping."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest


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
