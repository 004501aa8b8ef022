"""Multiple-choice video QA: benchmark readers, option scoring, the stan / mean / concat comparison.

``mugstan-chat eval`` (:mod:`mugstan_chat.entrypoints.evaluation`) runs it; the pieces are:

* :mod:`.readers`: MVBench, Video-MME, NExT-QA (MC), EgoSchema, Perception Test (MC) and the
  plain layout, all read into the same :class:`.readers.Question` record;
* :mod:`.modes`: the three ways of feeding a video to LLaVA (STAN tower, temporal mean,
  frame concatenation), shared with the chat benchmark (:mod:`mugstan_chat.benchmarks.chat`);
* :mod:`.prompt`: the one prompt template, the same for every mode;
* :mod:`.scoring`: the likelihood / generate scorers;
* :mod:`.runner`: the loop (features once per video and mode), the per-question JSONL, resume;
* :mod:`.summary`: accuracy with bootstrap intervals, the markdown tables.

A small direction/order question set on synthetic videos, for running all of it offline, is
:mod:`mugstan_chat.synthetic.questions`.
"""
