"""``mugstan-chat serve``: an OpenAI-compatible video chat API (docs/serve.md).

Modules: :mod:`.protocol` (the wire format), :mod:`.media` (where videos may come
from), :mod:`.service` (what a request means, and the work), :mod:`.app` (routes
and the command line). Importing the package does no work.
"""
