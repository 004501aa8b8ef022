"""The evaluation loop: every question in every mode, video features computed once per video and mode.

Questions are grouped by video (and time window). Each video's C x T frames are decoded once
(every mode reads the same frames); for each mode one :class:`mugstan_chat.engine.conversation.ChatSession`
encodes them once, and all the group's questions are scored on its cached features. Each
result is appended to ``predictions.jsonl`` as soon as it exists (one JSON object per line,
flushed), so a killed run loses at most the question in flight; ``resume`` skips the (question, mode) pairs already there. ``run.json`` holds
the settings a resumed run must share.

Output folder::

    run.json            settings of the run (checked on --resume)
    predictions.jsonl   one line per (question, mode): id, mode, task, answer, chosen, correct,
                        option scores, tokens, timings (decode: the video's frames, once for
                        all modes, on the first mode's first question of the video; encode: tower +
                        projector, on each mode's first question of the video; score: prompt +
                        scoring; total = encode + score, the part that differs between modes)
    summary.json        accuracy per mode and task with 95% bootstrap intervals (:mod:`.summary`)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..entrypoints.progress import progress_bar
from ..session_options import DEFAULTS, SessionOptions
from .modes import MODES, selecting, session_shape
from .readers import Question
from .scoring import ANSWER_FORMATS, SCORINGS, score_question
from .summary import summarize

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"
# settings a resumed run must share with the run it continues (modes and --limit may change)
RESUME_KEYS = ("model", "stan", "frames", "clips", "scoring", "answer_format", "max_new_tokens", "select",
               "candidates", "selection", "shortlist")


class OutputError(ValueError):
    """The output folder cannot be used as asked (exists without --resume, or other settings)."""


@dataclass
class EvalSettings:
    """What one evaluation run compares and how it scores."""

    modes: list[str] = field(default_factory=lambda: list(MODES))
    frames: int = DEFAULTS.frames  # T: frames per clip (concat: T images)
    clips: int = 1  # C: clips per video
    scoring: str = "likelihood"  # "likelihood" or "generate"
    answer_format: str = "letter"  # "letter" or "text" (what is scored / asked for)
    max_new_tokens: int = 16  # generate only
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals
    seed: int = 0  # bootstrap seed
    model: str = ""  # recorded for --resume checks
    stan: str | None = None
    select: int | None = None  # K: the "+select" modes choose K of ``candidates`` clips per question (clips = K)
    candidates: int | None = None  # M
    selection: str | None = None  # how the K are picked: "topk" or "coverage" (None: options.DEFAULT_SELECTION)
    shortlist: int | None = None  # S: a one-frame pass first, S candidates embedded in full (None: all M)

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in MODES and not (selecting(m) and self.select)]
        if not self.modes or unknown or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct values of {', '.join(MODES)} (got {self.modes})")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        if min(self.frames, self.clips, self.max_new_tokens, self.bootstrap) < 1:
            raise ValueError("frames, clips, max_new_tokens and bootstrap must be positive")


# ------------------------------------------------------------------------------------------ output
def prepare_output(out_dir: str | os.PathLike, settings: EvalSettings, resume: bool) -> list[dict]:
    """Checks the output folder before any model loads; returns the records already written.

    Without ``resume`` an existing, non-empty predictions file is an error (nothing is
    overwritten). With it, ``run.json`` must match the settings in :data:`RESUME_KEYS`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    predictions, run = out / PREDICTIONS, out / RUN
    has_records = predictions.is_file() and predictions.stat().st_size > 0
    if has_records and not resume:
        raise OutputError(f"{predictions} already holds results: pass --resume to continue that run, "
                          "or choose another --out")
    current = asdict(settings)
    if resume and run.is_file():
        try:
            saved = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise OutputError(f"{run}: cannot read ({error})") from error
        changed = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise OutputError(f"--resume with other settings than {run} ({details}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    run.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
    return read_predictions(predictions) if resume else []


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The records of a predictions file; a truncated last line (a kill mid-write) is cut off."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines):
        end = good_end + len(line) + 1
        if not line.strip():
            good_end = min(end, len(data))
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) - 1 or all(not rest.strip() for rest in lines[number + 1:]):
                logger.warning("%s: dropping an incomplete last line (the run was interrupted)", path)
                with open(path, "r+b") as handle:
                    handle.truncate(good_end)
                break
            raise OutputError(f"{path}:{number + 1}: not a JSON record") from None
        good_end = min(end, len(data))
    return records


# ------------------------------------------------------------------------------------------ loop
def group_by_video(questions: list[Question], videos: dict[str, Path]) -> "OrderedDict[tuple, list[Question]]":
    """(video path, start, end) -> its questions, in first-seen order."""
    groups: OrderedDict[tuple, list[Question]] = OrderedDict()
    for q in questions:
        groups.setdefault((str(videos[q.id]), q.start, q.end), []).append(q)
    return groups


class EvalRun:
    """One evaluation: questions x modes on one loaded chat model.

    Args:
        chat_model: from :func:`mugstan_chat.llava.loader.load_chat_model` (with a branch for "stan").
        questions: from :func:`.readers.read_questions`.
        videos: question id -> video file (:func:`.readers.resolve_videos`).
        settings: :class:`EvalSettings`.
        out_dir: output folder (prepared with :func:`prepare_output`).
        done: records already written (resume).
        limits: :class:`mugstan_chat.video.VideoLimits` for decoding.
        progress: show a tqdm progress bar on stderr (when it is a terminal: :func:`mugstan_chat.entrypoints.progress.progress_bar`).
    """

    def __init__(self, chat_model, questions: list[Question], videos: dict[str, Path], settings: EvalSettings,
                 out_dir: str | os.PathLike, done: list[dict] | None = None, limits=None, progress: bool = True):
        settings.validate()
        missing = [m for m in settings.modes if session_shape(m, 1).temporal not in chat_model.tower.available_modes]
        if missing:
            raise ValueError(f"mode(s) {', '.join(missing)} need a STAN branch, and this model has none")
        self._check_context(chat_model, settings)
        self.chat_model = chat_model
        self.questions = questions
        self.videos = videos
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.records = list(done or [])
        self.limits = limits
        self.progress = progress
        self.decodes = 0  # videos decoded (once each, shared by the modes)
        self.encodes = {mode: 0 for mode in settings.modes}  # videos encoded, per mode

    @staticmethod
    def _check_context(chat_model, settings: EvalSettings) -> None:
        """Refuses, before any video is read, a mode whose visual tokens alone fill the context
        (concat on LLaVA-1.5: 576 per frame against 4096, so T <= 6 frames)."""
        config = chat_model.model.config
        per_image = chat_model.tower.tokens_per_clip - (config.vision_feature_select_strategy == "default")
        for mode in settings.modes:
            shape = session_shape(mode, settings.frames, settings.clips)
            images = shape.clips * shape.frames if shape.frames_as_images else shape.clips
            if images * per_image >= chat_model.context_length:
                raise ValueError(f"mode {mode!r} at --frames {settings.frames} --clips {settings.clips} needs "
                                 f"{images * per_image} visual tokens, more than the model's context of "
                                 f"{chat_model.context_length}; use fewer frames or leave {mode!r} out")

    def _session(self, video: str, start, end, mode: str):
        from ..engine.conversation import ChatSession, GenerationSettings

        shape = session_shape(mode, self.settings.frames, self.settings.clips)
        if selecting(mode):
            options = SessionOptions(frames=shape.frames, clips=None, select=self.settings.select,
                                     candidates=self.settings.candidates, selection=self.settings.selection,
                                     shortlist=self.settings.shortlist)
        else:
            options = SessionOptions(frames=shape.frames, clips=shape.clips)
        return ChatSession(self.chat_model, video, **options.validate().session_kwargs(), temporal=shape.temporal,
                           frames_as_images=shape.frames_as_images,
                           generation=GenerationSettings(max_new_tokens=self.settings.max_new_tokens),
                           start=start, end=end, limits=self.limits, prepare=False)

    def run(self) -> dict:
        """Scores every (question, mode) not yet done, writes the summary; returns it."""
        done = {(r["id"], r["mode"]) for r in self.records}
        groups = group_by_video(self.questions, self.videos)
        todo = sum(1 for q in self.questions for m in self.settings.modes if (q.id, m) not in done)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = progress_bar(self.progress, total=todo, unit="q", desc="eval")
        try:
            with open(self.out_dir / PREDICTIONS, "a", encoding="utf-8") as sink:
                for (video, start, end), group in groups.items():
                    pending = {m: [q for q in group if (q.id, m) not in done] for m in self.settings.modes}
                    if not any(pending.values()):
                        continue
                    decoded, decode_ms = self._decode(video, start, end)  # once for every mode
                    for mode in self.settings.modes:
                        if pending[mode]:
                            self._score_group(video, start, end, mode, pending[mode], decoded, decode_ms, sink, bar)
                            decode_ms = 0.0  # charged once, to the first mode that ran
        finally:
            bar.close()
        summary = self.summary()
        (self.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary

    def _decode(self, video: str, start, end):
        """The video's C x T frames, decoded once and shared by every mode (they read the same frames)."""
        from ..video import load_video_clips

        started = time.perf_counter()
        decoded = load_video_clips(video, frames_per_clip=self.settings.frames, num_clips=self.settings.clips,
                                   mode="eval", start=start, end=end, limits=self.limits,
                                   image_processor=self.chat_model.processor.image_processor)
        self.decodes += 1
        return decoded, (time.perf_counter() - started) * 1000

    def _score_group(self, video: str, start, end, mode: str, pending: list[Question], decoded, decode_ms: float,
                     sink, bar) -> None:
        session = self._session(video, start, end, mode)
        started = time.perf_counter()
        # encode once; every question below reuses the features (selecting: the candidates' embeddings)
        session.prepare(None if session.select is not None else decoded)
        encode_ms = (time.perf_counter() - started) * 1000
        self.encodes[mode] += 1
        for i, q in enumerate(pending):
            session.select_clips(q.question)  # selecting modes: ranked by the question alone, not its options
            score = score_question(session, q, self.settings.scoring, self.settings.answer_format)
            decode, encode = (decode_ms, encode_ms) if i == 0 else (0.0, 0.0)  # with the video's first question
            record = {
                "id": q.id, "mode": mode, "task": q.task, "layout": q.layout, "video": video,
                "start": q.start, "end": q.end, "num_options": len(q.options), "answer": q.answer,
                "chosen": score.chosen, "correct": score.chosen == q.answer,
                "option_scores": score.option_scores, "option_tokens": score.option_tokens,
                "answer_text": score.answer_text, "prompt_tokens": score.prompt_tokens,
                "visual_tokens": session.visual_tokens, **({"extra": q.extra} if q.extra else {}),
                "clip_spans": [[round(s.start, 3), round(s.end, 3)] for s in session.clip_spans],
                **({"selection": {k: session.selection.to_dict()[k] for k in ("candidates", "chosen", "rank_ms")}}
                   if session.selection is not None else {}),
                "timings_ms": {"decode": round(decode, 3), "encode": round(encode, 3),
                               "score": round(score.score_ms, 3), "total": round(encode + score.score_ms, 3)},
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            self.records.append(record)
            bar.update(1)

    def summary(self) -> dict:
        s = self.settings
        settings = {k: v for k, v in asdict(s).items() if k not in ("bootstrap", "seed")}
        return summarize(self.records, self.questions, s.modes, resamples=s.bootstrap, seed=s.seed, settings=settings)
