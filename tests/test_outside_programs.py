"""The skip-or-fail rule for outside programs (tests/outside_programs.py), run as pytest itself runs it.

Each case writes a one-test file marked ``requires(NAME)`` and runs pytest on it in a subprocess with the
program hidden (PATH is an empty folder; $CHROMIUM and $MUGSTAN_VLLM_VENV unset): without the switch the
test is skipped and the summary gives the install line; with ``MUGSTAN_REQUIRE`` naming it, it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SMALL_TEST = '''import pytest
from outside_programs import require


@pytest.mark.requires({name!r})
def test_needs_it():
    assert require({name!r})
'''


def _run(tmp_path: Path, name: str, *, switch: str | None = None, path_dirs: tuple[Path, ...] = (),
         extra_env: dict | None = None) -> subprocess.CompletedProcess:
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    (case / "test_small.py").write_text(SMALL_TEST.format(name=name), encoding="utf-8")
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MUGSTAN_REQUIRE", "CHROMIUM", "MUGSTAN_VLLM_VENV")}
    env.update(PATH=os.pathsep.join(str(d) for d in (*path_dirs, empty)),
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if switch is not None:
        env["MUGSTAN_REQUIRE"] = switch
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "outside_programs",
                           "-p", "no:cacheprovider", "--rootdir", str(case), str(case / "test_small.py")],
                          cwd=case, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, install", [("ffmpeg", "apt-get install -y ffmpeg"),
                                           ("chromium", "apt-get install -y chromium"),
                                           ("vllm", "scripts/setup_vllm_cpu.sh")])
def test_hidden_program_skips_with_its_install_line_and_fails_under_the_switch(tmp_path, name, install):
    skipped = _run(tmp_path, name)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout and "SKIPPED" in skipped.stdout  # -ra: the reason in the summary
    assert install in skipped.stdout

    for switch in (name, f"ffmpeg,{name},vllm", "all"):
        failed = _run(tmp_path, name, switch=switch)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "1 error" in failed.stdout or "1 failed" in failed.stdout
        assert install in failed.stdout and f"MUGSTAN_REQUIRE requires {name}" in failed.stdout

    other = _run(tmp_path, name, switch="video2dataset" if name != "video2dataset" else "ffmpeg")
    assert other.returncode == 0 and "1 skipped" in other.stdout  # the switch names another program


def test_present_program_runs_under_the_switch(tmp_path):
    """Fake ffmpeg/ffprobe on PATH (the finder only looks them up), and a venv folder with bin/python."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for tool in ("ffmpeg", "ffprobe"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    done = _run(tmp_path, "ffmpeg", switch="ffmpeg", path_dirs=(bin_dir,))
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr

    (bin_dir / "ffprobe").unlink()  # ffmpeg without ffprobe is not enough
    assert _run(tmp_path, "ffmpeg", switch="ffmpeg", path_dirs=(bin_dir,)).returncode == 1

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    done = _run(tmp_path, "vllm", switch="vllm", extra_env={"MUGSTAN_VLLM_VENV": str(venv)})
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


def test_unknown_name_in_the_switch_is_a_usage_error(tmp_path):
    done = _run(tmp_path, "ffmpeg", switch="ffmpeg,chromum")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "MUGSTAN_REQUIRE: unknown chromum (known: chromium, ffmpeg, video2dataset, vllm, or all)" in done.stderr
