"""The trainer's benchmarks (they import the trainer, which the library never does; the library's own are
:mod:`mugstan_chat.benchmarks`). Each has its own ``main(argv)``::

    python -m mugstan_train.benchmarks.train ...   # one training step: plain CLIP vs STAN vs STAN+Mug
    python -m mugstan_train.benchmarks.data ...    # data loading: clips/s from a CSV and from shards

Measured figures and the commands that produced them: docs/performance.md.
"""
