"""``python -m mugstan_chat.entrypoints.openai``: the same as ``mugstan-chat serve``."""

from .cli import main

raise SystemExit(main())
