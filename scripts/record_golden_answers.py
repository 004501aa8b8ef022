"""Records what every front end answers today: ``tests/fixtures/golden_answers.json``.

``tests/test_golden_answers.py`` asks the same questions again and requires the same answers, so a
refactor (moving modules, one engine under every front end) can show "same answers as before on every
front end". The front ends are asked only through interfaces that survive a module move (subprocesses
and HTTP; the logic is ``tests/golden.py``, shared with the test):

* ``python -m mugstan_chat ask VIDEO QUESTION`` and ``chat VIDEO`` (two questions on stdin);
* ``python -m mugstan_chat.entrypoints.openai`` through the ``openai`` client, a two-turn conversation, whole and streamed;
* ``python app.py`` through ``gradio_client`` (``/load_video``, then ``/ask`` twice);
* ``python -m mugstan_chat eval`` over ``tests/fixtures/golden_questions.jsonl`` (likelihood scoring).

All use the demo model (``--demo``: tiny, random weights, offline), greedy decoding and the same explicit
settings (``golden.SETTINGS``), on one synthetic video the generator writes byte-identically every run.

Robustness across CPUs. A random-weight model's greedy answer flips on another CPU if some step's best
and second-best logits are closer than the floating-point noise between CPUs (other SIMD widths and
thread counts sum in other orders). That noise is of the order of fp32's epsilon (1.2e-7) times the
logits' size, grown by the depth of the network to ~1e-5 of it at most for this tiny model. So this
script (which alone may import ``mugstan_chat``: it runs only at record time) also replays every
conversation in-process with a logits hook, records for each answer the smallest
(top-1 - top-2) / max |logit| over its greedy steps, and refuses to write unless every one exceeds
``MIN_RELATIVE_MARGIN`` = 1e-3 (a hundred times that noise); eval's choices get the same check on their
option scores (best - second best, relative to the best's size). The in-process replay must also give
the front ends' answers, else the margins would be of another computation; it refuses then too.

Re-record only when an answer is *meant* to change (a new prompt template, another demo model, a fixed
decoding bug), and say in the commit why it changed::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/record_golden_answers.py --overwrite

A refactor that changes an answer is a bug to find, not a fixture to re-record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/golden.py and live_process.py

import golden  # noqa: E402

MIN_RELATIVE_MARGIN = 1e-3  # see the module docstring: ~100x the fp32 noise between CPUs


class MarginRecorder:
    """A logits processor that keeps each greedy step's (top-1 - top-2) and max |logit|; changes nothing."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores):
        top = scores[0].topk(2).values
        self.steps.append((float(top[0] - top[1]), float(scores[0].abs().max())))
        return scores

    def take(self) -> dict:
        steps, self.steps = self.steps, []
        relative = [margin / scale for margin, scale in steps]
        worst = min(range(len(steps)), key=relative.__getitem__)
        return {"steps": len(steps), "min_margin": steps[worst][0], "logit_scale": steps[worst][1],
                "min_relative_margin": relative[worst]}


def replay_margins(video: Path) -> tuple[list[str], list[dict]]:
    """The two-turn conversation in-process with the same settings: its answers and each answer's margins."""
    from transformers import LogitsProcessorList

    from mugstan_chat.chat import ChatSession, GenerationSettings
    from mugstan_chat.loader import load_chat_model
    from mugstan_chat.session_options import SessionOptions

    s = golden.SETTINGS
    chat_model = load_chat_model(demo=True, device=s["device"], dtype=s["dtype"], frames=s["frames"],
                                 clips=s["clips"], temporal=s["temporal"])
    recorder = MarginRecorder()
    generate = chat_model.model.generate

    def recording_generate(**kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), recorder])
        return generate(**kwargs)

    chat_model.model.generate = recording_generate
    options = SessionOptions(frames=s["frames"], clips=s["clips"], clip_times=s["clip_times"]).validate()
    session = ChatSession(chat_model, video, **options.session_kwargs(), temporal=s["temporal"],
                          generation=GenerationSettings(
                              max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                              repetition_penalty=s["repetition_penalty"]))
    answers, margins = [], []
    for question in golden.QUESTIONS:
        answers.append(session.ask(question))
        margins.append(recorder.take())
    return answers, margins


def add_margins(recorded: dict, video: Path) -> list[str]:
    """Puts each answer's margins into ``recorded``; returns the problems (empty: fit to record)."""
    problems = []
    answers, margins = replay_margins(video)
    recorded["margins"] = {"bound": MIN_RELATIVE_MARGIN, "replayed_answers": answers, "answers": {}}
    for front_end, asked in recorded["answers"].items():
        for number, (question, answer) in enumerate(asked.items()):
            recorded["margins"]["answers"].setdefault(front_end, {})[question] = margins[number]
            if not answer:
                problems.append(f"{front_end}: empty answer to {question!r}")
            if answer != answers[number]:
                problems.append(f"{front_end}: {question!r} answered {answer!r}, "
                                f"the in-process replay {answers[number]!r}")
            if margins[number]["min_relative_margin"] <= MIN_RELATIVE_MARGIN:
                problems.append(f"{front_end}: {question!r} has a greedy step with relative margin "
                                f"{margins[number]['min_relative_margin']:.2e}")
    for mode, results in recorded["eval"].items():
        for qid, result in results["questions"].items():
            margin = golden.score_margin(result["option_scores"])
            recorded["margins"].setdefault("eval", {}).setdefault(mode, {})[qid] = margin
            if margin <= MIN_RELATIVE_MARGIN:
                problems.append(f"eval {mode} {qid}: the best two options are {margin:.2e} apart (relative)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=golden.GOLDEN, help="(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists: pass --overwrite to replace it (and say why in the commit)")
    with tempfile.TemporaryDirectory(prefix="golden_") as work:
        recorded = golden.record_all(Path(work))
        problems = add_margins(recorded, Path(work) / "videos" / golden.VIDEO_NAME)
    if problems:
        print("record_golden_answers.py: not written:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(recorded, indent=2, ensure_ascii=False) + "\n")
    os.replace(partial, args.out)
    worst = min(m["min_relative_margin"] for asked in recorded["margins"]["answers"].values() for m in asked.values())
    worst_eval = min(m for mode in recorded["margins"]["eval"].values() for m in mode.values())
    print(f"wrote {args.out}: smallest relative margin {worst:.3g} (answers), {worst_eval:.3g} (eval choices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
