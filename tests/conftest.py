"""Test setup: no test ever touches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from app_import import import_app  # noqa: E402


@pytest.fixture(scope="session")
def app_module():
    """``app.py`` (it lives at the repository root, outside the package)."""
    return import_app()
