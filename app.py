"""The web chat (``python app.py --demo``): a thin launcher of :func:`mugstan_chat.entrypoints.web.main`.

The page, its callbacks and its flags live in :mod:`mugstan_chat.entrypoints.web` (docs/app.md).
"""

from mugstan_chat.entrypoints.web import main

if __name__ == "__main__":
    raise SystemExit(main())
