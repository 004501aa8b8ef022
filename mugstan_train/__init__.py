"""The Mug-STAN post-pretraining trainer (docs/design.md section 3). Imports ``mugstan_chat``; never imported by it.

Commands: ``mugstan-train``, ``mugstan-evaluate``, ``mugstan-make-shards`` (docs/training.md); the trainer's
benchmarks are :mod:`mugstan_train.benchmarks`; the temporal probe is :mod:`mugstan_train.temporal_probe`.
"""
