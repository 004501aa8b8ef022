"""Refresh docs/img/app.png: runs the real-browser test with its screenshot pointed at the docs.

Usage::

    python scripts/refresh_app_screenshot.py            # needs Debian's Chromium, like the test

The test suite itself writes its screenshot to a temporary folder, so running the
tests never modifies a tracked file; this script is the one way the documentation
picture changes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "app.png"), help="where to save (%(default)s)")
    args = parser.parse_args(argv)
    # MUGSTAN_REQUIRE: without Chromium the test fails (a skip would leave the old picture and exit 0)
    env = {**os.environ, "MUGSTAN_APP_SCREENSHOT": str(Path(args.out).resolve()), "MUGSTAN_REQUIRE": "chromium"}
    test = "tests/entrypoints/test_web_browser.py::test_timeline_marks_the_selected_clips"
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
