"""Progress bars of long commands, by one rule: tqdm on stderr, shown only on a terminal, never with ``--no-progress``.

Used by ``mugstan-chat eval``, ``python -m mugstan_chat.synthetic`` and ``mugstan-evaluate``
(the trainer's evaluation), so a log file or a pipe never fills with bar redraws.
"""

from __future__ import annotations

import argparse


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--no-progress`` flag, the same for every command that shows a bar."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it shows on stderr only when stderr is a terminal)")


def progress_bar(enabled: bool = True, **tqdm_kwargs):
    """A tqdm bar on stderr; off when ``enabled`` is False or stderr is not a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(disable=None if enabled else True, dynamic_ncols=True, **tqdm_kwargs)
