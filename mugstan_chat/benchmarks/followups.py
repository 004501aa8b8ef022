"""Follow-up cost over a long conversation, with and without conversation KV reuse (for the chat benchmark).

One video is encoded once; two sessions (KV reuse on / off) get the same features and
answer the same ``turns`` questions with answers of a fixed length. For the reported turns
it gives the median time to first token of each, and next to it a text-only turn with no
history whose prompt has as many tokens as the reused turn prefilled (its new tokens): the
cost a follow-up should have if it pays only for what is new.
"""

from __future__ import annotations

import statistics

REPORTED_TURNS = (2, 5, 10)


def question(turn: int) -> str:
    """Questions of equal length, different at every turn."""
    return f"what happens in part {turn} of the video ?"


def followup_turns(chat_model, video, frames: int, new_tokens: int, turns: int, runs: int, warmup: int,
                   session_for, stream, text_only_ttft) -> list[dict]:
    """Median TTFT per reported turn, reuse on and off, and the text-only reference.

    ``session_for``, ``stream`` and ``text_only_ttft`` are the chat benchmark's harness (passed in
    so this module does not import that one).
    """
    encoded = session_for(chat_model, video, "stan", frames, new_tokens)
    encoded.prepare()  # the video is encoded once; both sessions reuse its features
    reported = [t for t in REPORTED_TURNS if t <= turns]
    samples = {(reuse, t): [] for reuse in (True, False) for t in reported}
    text = {t: [] for t in reported}
    prefill = {}
    for round_ in range(warmup + runs):
        for reuse in (True, False):
            session = session_for(chat_model, video, "stan", frames, new_tokens, reuse_cache=reuse)
            session.attach_features(encoded.video_features)
            for turn in range(1, turns + 1):
                stats = stream(session, question(turn))
                if turn in reported and round_ >= warmup:
                    samples[(reuse, turn)].append(stats.first_token_ms)
                    if reuse:
                        prefill[turn] = (stats.prefill_tokens, stats.prompt_tokens)
            session.drop_prefix_cache()
        if round_ >= warmup:
            for turn in reported:
                text[turn].append(text_only_ttft(chat_model, prefill[turn][0]))
    rows = []
    for turn in reported:
        reuse_ms = statistics.median(samples[(True, turn)])
        full_ms = statistics.median(samples[(False, turn)])
        text_ms = statistics.median(text[turn])
        rows.append({"turn": turn, "prompt_tokens": prefill[turn][1], "new_tokens_prefilled": prefill[turn][0],
                     "ttft_reuse_ms": reuse_ms, "ttft_no_reuse_ms": full_ms, "text_only_ttft_ms": text_ms,
                     "reuse_vs_text": reuse_ms / text_ms, "no_reuse_vs_text": full_ms / text_ms})
    return rows


def followup_targets(rows: list[dict]) -> list[dict]:
    """The issue's follow-up targets on these rows (turn 10 vs turn 2, turn 10 vs a text-only turn)."""
    by = {r["turn"]: r for r in rows}
    out = []
    if 2 in by and 10 in by:
        value = by[10]["ttft_reuse_ms"] / by[2]["ttft_reuse_ms"]
        out.append({"target": "follow-up TTFT turn 10 <= 1.1 x turn 2 (reuse)", "value": value, "limit": "<= 1.1",
                    "met": value <= 1.1, "note": f"without reuse: "
                    f"{by[10]['ttft_no_reuse_ms'] / by[2]['ttft_no_reuse_ms']:.3g}", "value_best_of_runs": None})
    if 10 in by:
        value = by[10]["reuse_vs_text"]
        out.append({"target": "follow-up TTFT turn 10 <= 1.2 x text-only turn of the same new tokens (reuse)",
                    "value": value, "limit": "<= 1.2", "met": value <= 1.2,
                    "note": f"without reuse: {by[10]['no_reuse_vs_text']:.3g}", "value_best_of_runs": None})
    return out


FOLLOWUP_COLUMNS = ["turn", "prompt_tokens", "new_tokens_prefilled", "ttft_reuse_ms", "ttft_no_reuse_ms",
                    "text_only_ttft_ms", "reuse_vs_text", "no_reuse_vs_text"]
