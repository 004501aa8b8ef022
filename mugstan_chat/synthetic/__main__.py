"""``python -m mugstan_chat.synthetic``: see :mod:`.cli`."""

from .cli import main

raise SystemExit(main())
