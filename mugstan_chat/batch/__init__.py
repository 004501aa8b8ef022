"""``mugstan-chat batch``: caption or question many videos, one JSONL row each, resumable and shardable.

* :mod:`.inputs`: what a run reads (a folder of videos, a CSV/JSONL list, or tar shards) as
  :class:`.inputs.BatchItem` s, and which of them this machine takes (``--shard i/n``, torchrun's
  or SLURM's rank);
* :mod:`.results`: the output file (rows appended whole, a torn last line dropped on resume, the
  run's settings beside it) and the trainer's caption file;
* :mod:`.run`: the loop: videos decoded ahead in a thread pool while the model answers, one row
  per video (an ``error`` for a video that cannot be read, and the run goes on);
* :mod:`mugstan_chat.entrypoints.batch`: the command line (docs/batch.md).
"""
