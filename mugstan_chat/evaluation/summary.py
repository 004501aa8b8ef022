"""Accuracy per mode and per task with 95% bootstrap intervals, from the per-question records.

The summary is a pure function of the records and the question list: a run resumed after a kill
gives the same numbers as an uninterrupted one (wall-clock timings aside, kept under ``timing``).
Intervals are percentile bootstrap intervals over questions (resampled with replacement,
``resamples`` times, NumPy ``default_rng`` seeded by ``seed`` and the group's name). The
differences between two modes (``comparisons``) are a paired bootstrap: each resample draws one
set of questions for both modes, i.e. it resamples the per-question differences.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np

from .readers import Question


def bootstrap_interval(correct: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of a 0/1 vector (or of a paired difference vector)."""
    if correct.size == 0:
        return (float("nan"), float("nan"))
    picks = rng.integers(0, correct.size, size=(resamples, correct.size))  # (B, N)
    means = correct[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator per (seed, group name): each group's interval is reproducible on its own."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def summarize(records: list[dict], questions: list[Question], modes: list[str], resamples: int = 1000,
              seed: int = 0, settings: dict | None = None) -> dict:
    """The summary of the records of ``questions`` in ``modes`` (other records are ignored)."""
    order = {q.id: i for i, q in enumerate(questions)}
    by_mode: dict[str, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        if rec["id"] in order and rec["mode"] in modes:
            by_mode[rec["mode"]][rec["id"]] = rec
    tasks = sorted({q.task for q in questions})
    result = {"questions": len(questions), "chance": float(np.mean([1 / len(q.options) for q in questions]))
              if questions else float("nan"), "bootstrap_resamples": resamples, "bootstrap_seed": seed,
              "settings": settings or {}, "modes": {}, "comparisons": {}}
    vectors = {}
    for mode in modes:
        recs = sorted(by_mode.get(mode, {}).values(), key=lambda r: order[r["id"]])
        correct = np.array([1.0 if r["correct"] else 0.0 for r in recs])
        vectors[mode] = {r["id"]: c for r, c in zip(recs, correct)}
        entry = _accuracy(correct, resamples, _rng(seed, mode))
        entry["unanswered"] = sum(1 for r in recs if r["chosen"] is None)
        entry["visual_tokens_per_question"] = float(np.mean([r["visual_tokens"] for r in recs])) if recs else 0.0
        entry["tasks"] = {}
        for task in tasks:
            sub = np.array([c for r, c in zip(recs, correct) if r["task"] == task])
            if sub.size:
                entry["tasks"][task] = _accuracy(sub, resamples, _rng(seed, f"{mode}/{task}"))
        entry["durations"] = {}  # Video-MME's short / medium / long (the record's extra.duration)
        for duration in sorted({_duration(r) for r in recs} - {None}):
            sub = np.array([c for r, c in zip(recs, correct) if _duration(r) == duration])
            entry["durations"][duration] = _accuracy(sub, resamples, _rng(seed, f"{mode}/duration/{duration}"))
        entry["timing"] = _timing(recs)
        result["modes"][mode] = entry
    for i, first in enumerate(modes):
        for second in modes[i + 1:]:
            shared = [qid for qid in vectors[first] if qid in vectors[second]]
            shared.sort(key=order.__getitem__)
            if shared:
                diff = np.array([vectors[first][q] - vectors[second][q] for q in shared])
                low, high = bootstrap_interval(diff, resamples, _rng(seed, f"{first}-{second}"))
                result["comparisons"][f"{first} - {second}"] = {"n": len(shared), "delta": float(diff.mean()),
                                                                 "ci95": [low, high]}
    return result


def _duration(record: dict) -> str | None:
    duration = (record.get("extra") or {}).get("duration")
    return None if duration is None else str(duration)


def _accuracy(correct: np.ndarray, resamples: int, rng: np.random.Generator) -> dict:
    low, high = bootstrap_interval(correct, resamples, rng)
    return {"n": int(correct.size), "correct": int(correct.sum()),
            "accuracy": float(correct.mean()) if correct.size else float("nan"), "ci95": [low, high]}


def _timing(recs: list[dict]) -> dict:
    """Wall-clock costs (not reproducible between runs, hence kept apart from the accuracies)."""
    if not recs:
        return {}
    totals = np.array([r["timings_ms"]["total"] for r in recs])
    encodes = [r["timings_ms"]["encode"] for r in recs if r["timings_ms"]["encode"] > 0]
    decodes = [r["timings_ms"]["decode"] for r in recs if r["timings_ms"]["decode"] > 0]
    return {"ms_per_question": float(totals.mean()),  # encode (amortised over the video's questions) + score
            "score_ms_per_question": float(np.mean([r["timings_ms"]["score"] for r in recs])),
            "encode_ms_per_video": float(np.mean(encodes)) if encodes else 0.0, "videos_encoded": len(encodes),
            "decode_ms_per_video": float(np.mean(decodes)) if decodes else 0.0, "videos_decoded_here": len(decodes)}


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}"


def markdown_tables(summary: dict) -> str:
    """The summary as markdown: one row per mode, then accuracy per task and the paired differences."""
    lines = ["| mode | questions | accuracy % | 95% CI | visual tokens / question | ms / question |",
             "|---|---|---|---|---|---|"]
    for mode, entry in summary["modes"].items():
        low, high = entry["ci95"]
        lines.append(f"| {mode} | {entry['n']} | {_pct(entry['accuracy'])} | {_pct(low)}-{_pct(high)} | "
                     f"{entry['visual_tokens_per_question']:.0f} | "
                     f"{entry['timing'].get('ms_per_question', float('nan')):.1f} |")
    lines.append(f"\nchance: {_pct(summary['chance'])}%")
    modes = list(summary["modes"])
    tasks = sorted({t for entry in summary["modes"].values() for t in entry["tasks"]})
    if len(tasks) > 1:
        lines += ["", "| task | " + " | ".join(f"{m} % (95% CI)" for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for task in tasks:
            cells = []
            for m in modes:
                t = summary["modes"][m]["tasks"].get(task)
                cells.append("-" if t is None else f"{_pct(t['accuracy'])} ({_pct(t['ci95'][0])}-{_pct(t['ci95'][1])})"
                             f" n={t['n']}")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    durations = [d for d in ("short", "medium", "long") if any(d in e.get("durations", {})
                                                             for e in summary["modes"].values())]
    durations += sorted({d for e in summary["modes"].values() for d in e.get("durations", {})} - set(durations))
    if durations:  # uniform and selected clips side by side, per video length
        lines += ["", "| duration | " + " | ".join(f"{m} % (95% CI)" for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for duration in durations:
            cells = []
            for m in modes:
                d = summary["modes"][m].get("durations", {}).get(duration)
                cells.append("-" if d is None else f"{_pct(d['accuracy'])} ({_pct(d['ci95'][0])}-{_pct(d['ci95'][1])})"
                             f" n={d['n']}")
            lines.append(f"| {duration} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "| paired difference | questions | points | 95% CI |", "|---|---|---|---|"]
        for name, c in summary["comparisons"].items():
            lines.append(f"| {name} | {c['n']} | {100 * c['delta']:+.1f} | "
                         f"{100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f} |")
    return "\n".join(lines)
