"""``python -m mugstan_chat``: the same as the ``mugstan-chat`` command."""

from .entrypoints.cli import main

raise SystemExit(main())
