"""The library's benchmarks: one module each, each with its own ``main(argv)`` and arguments.

Run as ``mugstan-chat bench NAME [ARGS...]`` (:mod:`mugstan_chat.entrypoints.bench`; ``mugstan-chat bench
--help`` lists them) or ``python -m mugstan_chat.benchmarks.NAME [ARGS...]``. Measured figures and the
commands that produced them: docs/performance.md. Helpers shared by several: :mod:`.common` (timing, peak
memory, tables, JSON) and :mod:`.followups` (the chat benchmark's follow-up table). The trainer's own
benchmarks import the trainer, so they live with it (:mod:`mugstan_train.benchmarks`).
"""
