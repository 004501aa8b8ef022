"""``python -m mugstan_chat.server``: the same as ``mugstan-chat serve``."""

from .cli import main

raise SystemExit(main())
