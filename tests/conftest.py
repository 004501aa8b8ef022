"""Test setup: no test ever touches the network; tests needing an outside program skip or fail by one rule."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from app_import import import_app  # noqa: E402
from outside_programs import pytest_configure, pytest_runtest_setup  # noqa: E402,F401  (hooks: requires(...) marks)


@pytest.fixture(scope="session")
def app_module():
    """``app.py`` (it lives at the repository root, outside the package)."""
    return import_app()


def pytest_terminal_summary(terminalreporter, config):
    """Prints the random order's seed even under ``-q`` (pytest-randomly's header line is hidden there)."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"random test order: seed {seed} (repeat it with -p randomly --randomly-seed={seed})")
