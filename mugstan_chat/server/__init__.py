"""``mugstan-chat serve``: an OpenAI-compatible video chat API (docs/serve.md).

Modules, one job each: :mod:`.protocol` (the wire format), :mod:`.media` (where videos
may come from), :mod:`.planning` (what a request means: request to plan), :mod:`.jobs`
(admission control and the job a request runs as), :mod:`.worker` (the work: features,
generation, stop sequences), :mod:`.app` (routes), :mod:`.cli` (the command line).
Importing the package does no work.
"""
