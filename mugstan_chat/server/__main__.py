"""``python -m mugstan_chat.server``: the same as ``mugstan-chat serve``."""

from .app import main

raise SystemExit(main())
