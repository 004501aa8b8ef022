"""Test setup: no test ever touches the network; tests needing an outside program skip or fail by one rule.

Shared fixtures: the demo chat model by frames per clip (``demo_chat_model``, ``chat_model``) and synthetic
videos by their arguments (``synthetic_videos``), each built once per session. They are shared across files,
so a test only reads them: one that changes a model (its weights, settings, tower or attached heads) or writes
into a video folder builds its own.
"""

import os
from pathlib import Path
from typing import NamedTuple

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from outside_programs import pytest_configure, pytest_runtest_setup  # noqa: E402,F401  (hooks: requires(...) marks)


class SyntheticVideos(NamedTuple):
    """A folder made by :func:`mugstan_chat.synthetic.make_synthetic_videos` and its (path, caption) list."""

    folder: Path
    videos: list[tuple[Path, str]]


@pytest.fixture(scope="session")
def demo_chat_model():
    """``demo_chat_model(frames)``: the demo chat model on the CPU with T = ``frames``, one per frame count."""
    from mugstan_chat.llava.loader import load_chat_model  # here, not at the top: most tests never load a model

    models = {}

    def build(frames: int):
        if frames not in models:
            models[frames] = load_chat_model(demo=True, device="cpu", frames=frames)
        return models[frames]

    return build


@pytest.fixture(scope="session")
def chat_model(demo_chat_model):
    """The demo chat model with 4 frames per clip (most tests' T); a file wanting another T overrides this."""
    return demo_chat_model(4)


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory):
    """``synthetic_videos(num, seed, size=64, frames=24)``: a :class:`SyntheticVideos`, one per argument list."""
    from mugstan_chat.synthetic import make_synthetic_videos

    made = {}

    def make(num: int, seed: int, size: int = 64, frames: int = 24) -> SyntheticVideos:
        key = (num, seed, size, frames)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"synthetic_{num}_seed{seed}_{size}px_{frames}f")
            made[key] = SyntheticVideos(folder, make_synthetic_videos(folder, num=num, seed=seed, size=size,
                                                                      frames=frames))
        return made[key]

    return make


@pytest.fixture(scope="session")
def app_module():
    """The web app's module (:mod:`mugstan_chat.entrypoints.web`; ``app.py`` launches it)."""
    from mugstan_chat.entrypoints import web

    return web


def pytest_terminal_summary(terminalreporter, config):
    """Prints the random order's seed even under ``-q`` (pytest-randomly's header line is hidden there)."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"random test order: seed {seed} (repeat it with -p randomly --randomly-seed={seed})")
