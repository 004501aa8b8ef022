"""Question files of the multiple-choice video QA benchmarks, read into one record.

Every reader yields :class:`Question` (id, video path candidates, question, options, index of the
right option, task, optional time window). The layout is detected from the fields of the first
record, so a file is passed as the benchmark publishes it (``.json``, ``.jsonl``, ``.csv`` or
``.parquet``, whose rows are read with pyarrow; the layouts below apply to each):

============== ============================================================================
layout         fields (one record)
============== ============================================================================
mvbench        ``{"video", "question", "candidates", "answer"}`` per task file
               (``json/action_sequence.json`` ...); answer = the right candidate's text;
               ``start``/``end`` seconds for the tasks that have them
videomme       ``{"video_id", "duration", "domain", "sub_category", "videoID", "question_id",
               "task_type", "question", "options": ["A. ...", ...], "answer": "C"}``
               (lmms-lab/Video-MME ``videomme/test-00000-of-00001.parquet``, read as it is,
               or its rows exported to JSON/JSONL)
nextqa         CSV ``video,frame_count,width,height,question,answer,qid,type,a0..a4``,
               answer = index (NExT-QA ``val.csv`` / ``test.csv``)
egoschema      ``questions.json`` list of ``{"q_uid", "question", "option 0".."option 4"}``,
               answers from ``subset_answers.json`` beside it (``{q_uid: index}``)
perceptiontest ``{video_id: {"metadata": {...}, "mc_question": [{"id", "question",
               "options", "answer_id", "area", ...}]}}`` (``mc_question_valid.json``), or
               lmms-lab/PerceptionTest_Val rows ``{"video_name", "question_id", "question",
               "options", "answer_id", "area", ...}`` exported to JSON/JSONL
plain          ``{"id", "video", "question", "options": [...], "answer"}``, answer a letter,
               a 0-based index or the right option's text; optional ``task``, ``start``, ``end``
============== ============================================================================

Videos are found under ``--video-root`` by the candidate relative paths each reader gives
(see :func:`resolve_video`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..options import SUPPORTED_EXTENSIONS

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
QUESTION_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# files that sit beside question files but hold no questions (skipped when a folder is given)
AUXILIARY_FILES = {"subset_answers.json", "map_vid_vidorID.json", "uid_to_url.json", "uid_to_ego4d.json"}

# MVBench: task file -> (task name, video folders under the MVBench video root, has start/end).
# The first folder is the one the authors' evaluation notebook uses (Ask-Anything
# video_chat2/mvbench.ipynb); the others are the names lmms-eval's copy of the videos uses.
MVBENCH_TASKS = {
    "action_sequence": ("Action Sequence", ("star/Charades_v1_480",), True),
    "action_prediction": ("Action Prediction", ("star/Charades_v1_480",), True),
    "action_antonym": ("Action Antonym", ("ssv2_video", "ssv2_video_mp4"), False),
    "fine_grained_action": ("Fine-grained Action", ("Moments_in_Time_Raw/videos",), False),
    "unexpected_action": ("Unexpected Action", ("FunQA_test/test",), False),
    "object_existence": ("Object Existence", ("clevrer/video_validation",), False),
    "object_interaction": ("Object Interaction", ("star/Charades_v1_480",), True),
    "object_shuffle": ("Object Shuffle", ("perception/videos",), False),
    "moving_direction": ("Moving Direction", ("clevrer/video_validation",), False),
    "action_localization": ("Action Localization", ("sta/sta_video",), True),
    "scene_transition": ("Scene Transition", ("scene_qa/video",), False),
    "action_count": ("Action Count", ("perception/videos",), False),
    "moving_count": ("Moving Count", ("clevrer/video_validation",), False),
    "moving_attribute": ("Moving Attribute", ("clevrer/video_validation",), False),
    "state_change": ("State Change", ("perception/videos",), False),
    "fine_grained_pose": ("Fine-grained Pose", ("nturgbd", "nturgbd_convert"), False),
    "character_order": ("Character Order", ("perception/videos",), False),
    "egocentric_navigation": ("Egocentric Navigation", ("vlnqa",), False),
    "episodic_reasoning": ("Episodic Reasoning", ("tvqa/frames_fps3_hq",), True),  # frame folders
    "counterfactual_inference": ("Counterfactual Inference", ("clevrer/video_validation",), False),
}


class QuestionFileError(ValueError):
    """A question file that cannot be read or does not match a known layout (names the file)."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question about one video."""

    id: str  # unique within the run (the benchmark's own id where it has one)
    videos: tuple[str, ...]  # candidate paths of the video, relative to the video root (or absolute)
    question: str
    options: tuple[str, ...]  # option texts, without letters
    answer: int  # index of the right option
    task: str  # task / category the summary groups by
    layout: str  # which reader produced it
    start: float | None = None  # time window in seconds (None: whole video)
    end: float | None = None
    extra: dict = field(default_factory=dict, compare=False)  # benchmark fields kept for the JSONL

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


# ------------------------------------------------------------------------------------------ files
def question_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expands folders into their question files (sorted); every path must exist."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix in QUESTION_SUFFIXES and p.name not in AUXILIARY_FILES)
            if not found:
                raise QuestionFileError(f"{path}: no question files ({', '.join(QUESTION_SUFFIXES)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise QuestionFileError(f"{path}: no such question file or folder")
    return files


def _load_records(path: Path):
    """JSON (list or dict), JSONL, CSV or parquet -> Python data; one clear error naming the file."""
    if path.suffix not in QUESTION_SUFFIXES:
        raise QuestionFileError(f"{path}: not a question file type; reads {', '.join(QUESTION_SUFFIXES)}")
    if path.suffix == ".parquet":
        return _load_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QuestionFileError(f"{path}: cannot read ({error})") from error
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise QuestionFileError(f"{path}:{number}: not JSON ({error.msg})") from error
        return records
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise QuestionFileError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from error


def _load_parquet(path: Path) -> list[dict]:
    """The rows of a parquet file (Video-MME's and lmms-lab's benchmark copies) as dicts, lists as lists."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise QuestionFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        return parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError; ArrowIOError an OSError
        raise QuestionFileError(f"{path}: cannot read as parquet ({error})") from error


def detect_layout(data) -> str:
    """The layout of loaded question data, from its fields (see the module docstring)."""
    if isinstance(data, dict):
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "mc_question" in first:
            return "perceptiontest"
        raise QuestionFileError("a JSON object that is not a Perception Test annotation file")
    if not isinstance(data, list) or not data:
        raise QuestionFileError("no question records (expected a non-empty list)")
    first = data[0]
    if not isinstance(first, dict):
        raise QuestionFileError("records must be objects")
    keys = set(first)
    if {"q_uid", "option 0"} <= keys:
        return "egoschema"
    if {"videoID", "question_id", "options", "answer"} <= keys:
        return "videomme"
    if {"video_name", "question_id", "options", "answer_id"} <= keys:
        return "perceptiontest_flat"
    if {"a0", "a1", "qid", "video", "answer"} <= keys:
        return "nextqa"
    if {"candidates", "answer", "video", "question"} <= keys:
        return "mvbench"
    if {"video", "question", "options", "answer"} <= keys:
        return "plain"
    raise QuestionFileError(f"unknown layout (fields: {', '.join(sorted(keys))})")


def read_questions(paths: Iterable[str | os.PathLike]) -> list[Question]:
    """All questions of the given files/folders, in file order; ids must be unique."""
    questions: list[Question] = []
    for path in question_files(paths):
        data = _load_records(path)
        try:
            layout = detect_layout(data)
            read = READERS[layout]
            found = list(read(path, data))
        except QuestionFileError as error:
            raise QuestionFileError(f"{path}: {error}") from None
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise QuestionFileError(f"{path}: malformed record ({type(error).__name__}: {error})") from None
        logger.info("%s: %d questions (%s layout)", path, len(found), layout)
        questions.extend(found)
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise QuestionFileError(f"question id {q.id!r} appears twice; ids must be unique across files")
        seen.add(q.id)
    return questions


# ------------------------------------------------------------------------------------------ readers
def _answer_index(answer, options: tuple[str, ...], where: str) -> int:
    """A letter ("B"), a 0-based index (2 or "2") or the right option's text -> index."""
    if isinstance(answer, bool):
        raise QuestionFileError(f"{where}: answer {answer!r} is not a letter, index or option")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip() in options:
        index = options.index(answer.strip())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise QuestionFileError(f"{where}: answer {answer!r} is not a letter, index or option")
    if not 0 <= index < len(options):
        raise QuestionFileError(f"{where}: answer {answer!r} is outside the {len(options)} options")
    return index


def _strip_letter(option: str, index: int) -> str:
    """'A. Apples.' -> 'Apples.' (Video-MME options carry their letters)."""
    prefix = f"{LETTERS[index]}."
    text = option.strip()
    return text[len(prefix):].strip() if text.startswith(prefix) else text


def _seconds(value) -> float | None:
    return None if value in (None, "") else float(value)


def read_mvbench(path: Path, data: list) -> Iterable[Question]:
    task_key = path.stem
    name, folders, bounded = MVBENCH_TASKS.get(task_key, (task_key, ("",), False))
    for i, rec in enumerate(data):
        options = tuple(str(c) for c in rec["candidates"])
        video = str(rec["video"])
        yield Question(
            id=f"{task_key}/{i}", videos=tuple(f"{folder}/{video}".lstrip("/") for folder in folders) + (video,),
            question=str(rec["question"]), options=options,
            answer=_answer_index(str(rec["answer"]), options, f"record {i}"), task=name, layout="mvbench",
            start=_seconds(rec.get("start")) if bounded else None, end=_seconds(rec.get("end")) if bounded else None)


def read_videomme(path: Path, data: list) -> Iterable[Question]:
    for rec in data:
        options = tuple(_strip_letter(str(o), i) for i, o in enumerate(rec["options"]))
        vid = str(rec["videoID"])
        yield Question(
            id=str(rec["question_id"]), videos=(f"data/{vid}.mp4", f"videos/{vid}.mp4", f"{vid}.mp4"),
            question=str(rec["question"]), options=options,
            answer=_answer_index(str(rec["answer"]), tuple(LETTERS[: len(options)]), str(rec["question_id"])),
            task=str(rec.get("task_type") or "videomme"), layout="videomme",
            extra={k: rec[k] for k in ("duration", "domain", "sub_category") if k in rec})


def read_nextqa(path: Path, data: list) -> Iterable[Question]:
    mapping = _nextqa_video_map(path)
    for rec in data:
        options = tuple(str(rec[f"a{i}"]).strip() for i in range(5) if f"a{i}" in rec)
        video = str(rec["video"])
        videos = ((f"{mapping[video]}.mp4",) if video in mapping else ()) + (f"{video}.mp4",)
        qid = f"{video}_{rec['qid']}"
        yield Question(
            id=qid, videos=videos, question=str(rec["question"]).strip(), options=options,
            answer=_answer_index(int(rec["answer"]), options, qid), task=str(rec.get("type") or "nextqa"),
            layout="nextqa")


def _nextqa_video_map(path: Path) -> dict[str, str]:
    """NExT-QA's map_vid_vidorID.json (video id -> 'folder/id') when it sits beside the CSV."""
    candidate = path.parent / "map_vid_vidorID.json"
    if not candidate.is_file():
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(candidate.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError) as error:
        raise QuestionFileError(f"{candidate}: cannot read ({error})") from error


def read_egoschema(path: Path, data: list) -> Iterable[Question]:
    answers_path = path.parent / "subset_answers.json"
    if not answers_path.is_file():
        raise QuestionFileError(f"EgoSchema answers not found: expected {answers_path} (only the 500-question "
                                "subset has public answers)")
    answers = _load_records(answers_path)
    if not isinstance(answers, dict):
        raise QuestionFileError(f"{answers_path}: expected an object {{q_uid: answer index}}")
    skipped = 0
    for rec in data:
        uid = str(rec["q_uid"])
        if uid not in answers:
            skipped += 1
            continue
        options = tuple(str(rec[f"option {i}"]) for i in range(5) if f"option {i}" in rec)
        yield Question(
            id=uid, videos=(f"{uid}.mp4", f"videos/{uid}.mp4"), question=str(rec["question"]), options=options,
            answer=_answer_index(int(answers[uid]), options, uid), task="egoschema", layout="egoschema")
    if skipped:
        logger.info("%s: %d questions without a public answer skipped", path, skipped)


def read_perceptiontest(path: Path, data: dict) -> Iterable[Question]:
    for key, video in data.items():
        video_id = str(video.get("metadata", {}).get("video_id") or key)
        for rec in video.get("mc_question") or []:
            yield _perceptiontest_question(video_id, rec["id"], rec)


def read_perceptiontest_flat(path: Path, data: list) -> Iterable[Question]:
    """lmms-lab/PerceptionTest_Val's rows (answer_id stored as a string), exported to JSON/JSONL."""
    for rec in data:
        yield _perceptiontest_question(str(rec["video_name"]), rec["question_id"], rec)


def _perceptiontest_question(video_id: str, question_id, rec: dict) -> Question:
    """One Perception Test multiple-choice record (both layouts share the question fields)."""
    options = tuple(str(o) for o in rec["options"])
    qid = f"{video_id}/{question_id}"
    return Question(
        id=qid, videos=(f"{video_id}.mp4", f"videos/{video_id}.mp4"), question=str(rec["question"]),
        options=options, answer=_answer_index(int(rec["answer_id"]), options, qid),
        task=str(rec.get("area") or "perceptiontest"), layout="perceptiontest",
        extra={k: rec[k] for k in ("reasoning", "tag") if k in rec})


def read_plain(path: Path, data: list) -> Iterable[Question]:
    for i, rec in enumerate(data):
        options = tuple(str(o) for o in rec["options"])
        if len(options) < 2:
            raise QuestionFileError(f"record {i}: needs at least two options")
        qid = str(rec.get("id", f"{path.stem}/{i}"))
        yield Question(
            id=qid, videos=(str(rec["video"]),), question=str(rec["question"]), options=options,
            answer=_answer_index(rec["answer"], options, qid), task=str(rec.get("task") or path.stem),
            layout="plain", start=_seconds(rec.get("start")), end=_seconds(rec.get("end")))


READERS: dict[str, Callable[[Path, object], Iterable[Question]]] = {
    "mvbench": read_mvbench, "videomme": read_videomme, "nextqa": read_nextqa,
    "egoschema": read_egoschema, "perceptiontest": read_perceptiontest,
    "perceptiontest_flat": read_perceptiontest_flat, "plain": read_plain,
}


# ------------------------------------------------------------------------------------------ videos
def resolve_video(question: Question, root: str | os.PathLike) -> Path | None:
    """The first candidate that is a file under ``root`` (absolute candidates as given).

    A candidate without a file found is also tried with the video package's extensions
    (:data:`mugstan_chat.options.SUPPORTED_EXTENSIONS`, lower and upper case) in place of its
    own (Video-MME and EgoSchema ship some .MP4 / .mkv files).
    """
    root = Path(root)
    for candidate in question.videos:
        path = Path(candidate) if os.path.isabs(candidate) else root / candidate
        if path.is_file():
            return path
        for ext in (e for lower in SUPPORTED_EXTENSIONS for e in (lower, lower.upper())):
            alt = path.with_suffix(ext)
            if alt.is_file():
                return alt
    return None


def resolve_videos(questions: list[Question], root: str | os.PathLike) -> dict[str, Path]:
    """Question id -> video path for every question; one error naming the first missing video."""
    found: dict[str, Path] = {}
    missing = []
    for q in questions:
        path = resolve_video(q, root)
        if path is None:
            missing.append(q)
        else:
            found[q.id] = path
    if missing:
        first = missing[0]
        tried = ", ".join(str(Path(root) / c) for c in first.videos[:3])
        note = " (MVBench Episodic Reasoning ships frame folders, which are not supported)" \
            if first.task == "Episodic Reasoning" else ""
        raise QuestionFileError(f"{len(missing)} of {len(questions)} videos not found under {root}; first: question "
                                f"{first.id!r}, tried {tried}{note}")
    return found
