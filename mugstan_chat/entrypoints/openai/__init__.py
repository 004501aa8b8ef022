"""``mugstan-chat serve``: an OpenAI-compatible video chat API (docs/serve.md).

Modules, one job each: :mod:`mugstan_chat.entrypoints.openai.protocol` (the wire format), :mod:`mugstan_chat.entrypoints.openai.media` (where videos
may come from), :mod:`mugstan_chat.entrypoints.openai.planning` (what a request means: request to plan), :mod:`mugstan_chat.entrypoints.openai.jobs`
(admission control and the job a request runs as), :mod:`mugstan_chat.entrypoints.openai.worker` (the work: features,
generation, stop sequences), :mod:`mugstan_chat.entrypoints.openai.app` (routes), :mod:`mugstan_chat.entrypoints.openai.cli` (the command line).
Importing the package does no work.
"""
