"""``python -m mugstan_chat``: the same as the ``mugstan-chat`` command."""

from .cli import main

raise SystemExit(main())
