"""Readers of mugstan_chat.evaluation.readers on samples in each benchmark's published layout.

Every sample below is built from the benchmark's own public files (source named above it): the
field names, value types and answer encodings are theirs; where the source shows no concrete
record, the values are illustrative and say so.
"""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mugstan_chat.entrypoints.cli import main
from mugstan_chat.evaluation.readers import (
    QUESTION_SUFFIXES, QuestionFileError, detect_layout, read_questions, resolve_video, resolve_videos)
from mugstan_chat.synthetic import make_synthetic_mc
from mugstan_chat.video import SUPPORTED_EXTENSIONS


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# MVBench: one JSON list per task file, records {"video", "question", "candidates", "answer"} with the
# answer the right candidate's text; Charades-based tasks add "start"/"end" seconds. Fields and the
# task-file -> video-folder table from OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb (MVBench_dataset,
# qa_template, data_list) and lmms_eval/tasks/mvbench/utils.py (DATA_LIST). Values illustrative.
MVBENCH_ACTION_SEQUENCE = [
    {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
     "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.", "Took the box."],
     "answer": "Ate the medicine.", "start": 11.1, "end": 19.6},
]
MVBENCH_MOVING_DIRECTION = [
    {"video": "video_10009.mp4", "question": "What direction is the cyan sphere moving in within the video?",
     "candidates": ["The object is stationary.", "Up and to the left.", "Down and to the right."],
     "answer": "Down and to the right."},
]


def test_mvbench_task_files_folders_and_windows(tmp_path):
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    _write(json_dir / "action_sequence.json", MVBENCH_ACTION_SEQUENCE)
    _write(json_dir / "moving_direction.json", MVBENCH_MOVING_DIRECTION)
    questions = read_questions([json_dir])  # a folder: every task file in it
    assert [q.layout for q in questions] == ["mvbench", "mvbench"]
    seq, direction = questions
    assert (seq.task, seq.answer, seq.options[0]) == ("Action Sequence", 0, "Ate the medicine.")
    assert (seq.start, seq.end) == (11.1, 19.6)  # Action Sequence is one of the bounded tasks
    assert seq.videos[0] == "star/Charades_v1_480/ZS9XR.mp4"
    assert (direction.task, direction.answer, direction.start) == ("Moving Direction", 2, None)
    assert direction.videos[0] == "clevrer/video_validation/video_10009.mp4"
    # the video root is MVBench's video/ folder, laid out as the authors' notebook expects
    video = tmp_path / "video" / "clevrer" / "video_validation" / "video_10009.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"x")
    assert resolve_video(direction, tmp_path / "video") == video


# Video-MME: lmms-lab/Video-MME videomme/test-00000-of-00001.parquet (dataset card features: video_id,
# duration, domain, sub_category, url, videoID, question_id, task_type, question, options, answer),
# rows as exported to JSONL; this row is the first of the test split as quoted in showlab/livecc's README
# and lmms_eval/tasks/videomme/utils.py reads it (options carry "A. " prefixes, answer is the letter).
VIDEOMME_ROW = {
    "video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
    "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
    "task_type": "Counting Problem",
    "question": "When demonstrating the Germany modern Christmas tree is initially decorated with apples, "
                "candles and berries, which kind of the decoration has the largest number?",
    "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
    "answer": "C",
}


# The parquet's schema as the dataset card lists it: every column a string, options a list of strings.
VIDEOMME_SCHEMA = pa.schema([(name, pa.list_(pa.string()) if name == "options" else pa.string())
                             for name in VIDEOMME_ROW])


def _videomme_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=VIDEOMME_SCHEMA), path)
    return path


def test_videomme_parquet_as_published(tmp_path):
    """lmms-lab/Video-MME ships videomme/test-00000-of-00001.parquet: read as it is, same questions as JSONL."""
    folder = tmp_path / "videomme"
    folder.mkdir()
    path = _videomme_parquet(folder / "test-00000-of-00001.parquet", [VIDEOMME_ROW])
    assert path.read_bytes()[:4] == b"PAR1"  # a real parquet (not UTF-8: the old reader failed on it)
    (q,) = read_questions([path])
    jsonl = tmp_path / "videomme.jsonl"
    jsonl.write_text(json.dumps(VIDEOMME_ROW) + "\n", encoding="utf-8")
    assert q == read_questions([jsonl])[0] and q.extra == read_questions([jsonl])[0].extra
    assert q.options[3] == "The three kinds are of the same number." and q.answer == 2
    assert [x.id for x in read_questions([folder])] == ["001-1"]  # a folder holding the parquet


def test_unknown_file_types_and_broken_parquet_get_one_line(tmp_path):
    notes = tmp_path / "questions.txt"
    notes.write_text("what happens?\n")
    with pytest.raises(QuestionFileError) as error:
        read_questions([notes])
    assert str(error.value) == f"{notes}: not a question file type; reads .json, .jsonl, .csv, .parquet"
    assert QUESTION_SUFFIXES == (".json", ".jsonl", ".csv", ".parquet")
    broken = tmp_path / "test.parquet"
    broken.write_bytes(b"\xa0 not a parquet file")
    with pytest.raises(QuestionFileError, match=r"test.parquet: cannot read as parquet") as error:
        read_questions([broken])
    assert "\n" not in str(error.value)


def test_videos_are_found_with_every_extension_the_video_package_reads(tmp_path):
    """One list of video extensions (mugstan_chat.video's), in both cases: .ts included."""
    (q,) = read_questions([_write(tmp_path / "q.json", [{"id": "q", "video": "clip.mp4", "question": "q",
                                                          "options": ["x", "y"], "answer": 0}])])
    assert ".ts" in SUPPORTED_EXTENSIONS
    for ext in SUPPORTED_EXTENSIONS + (".MP4", ".TS"):
        video = tmp_path / f"clip{ext}"
        video.write_bytes(b"x")
        assert resolve_video(q, tmp_path) == video, ext
        video.unlink()


def test_eval_scores_every_question_of_a_videomme_parquet(tmp_path, capsys):
    """`mugstan-chat eval videomme.parquet --video-root DIR`: Video-MME's columns, the synthetic videos under
    DIR/data/{videoID}.mp4 (Video-MME's video layout), the demo model: every question scored once per mode."""
    plain_file = make_synthetic_mc(tmp_path / "synthetic", num=4, seed=5, size=32, frames=8)
    root = tmp_path / "videomme"
    (root / "data").mkdir(parents=True)
    rows = []
    for i, line in enumerate(plain_file.read_text().splitlines()):
        q = json.loads(line)
        video_id = f"yt{i:02d}{Path(q['video']).stem[-6:]}"  # YouTube-like ids, not the file's own name
        shutil.copy(plain_file.parent / q["video"], root / "data" / f"{video_id}.mp4")
        rows.append({"video_id": f"{i + 1:03d}", "duration": ("short", "medium")[i % 2], "domain": "Knowledge",
                     "sub_category": "Synthetic", "url": f"https://www.youtube.com/watch?v={video_id}",
                     "videoID": video_id, "question_id": f"{i + 1:03d}-1", "task_type": q["task"],
                     "question": q["question"], "options": [f"{'AB'[j]}. {o}" for j, o in enumerate(q["options"])],
                     "answer": q["answer"]})
    path = _videomme_parquet(tmp_path / "videomme.parquet", rows)
    out = tmp_path / "out"
    assert main(["eval", str(path), "--video-root", str(root), "--demo", "--answer-format", "text", "--frames", "2",
                 "--modes", "mean", "stan", "--out", str(out), "--no-progress", "--bootstrap", "20"]) == 0
    assert "| mean | 4 |" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["mode"]) for r in records) == sorted(
        (row["question_id"], mode) for row in rows for mode in ("mean", "stan"))
    assert {r["layout"] for r in records} == {"videomme"}
    assert {r["id"]: r["answer"] for r in records} == {row["question_id"]: "AB".index(row["answer"]) for row in rows}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]["mean"]["durations"]) == {"short", "medium"}


def test_videomme_rows_strip_letters_and_find_data_folder(tmp_path):
    path = tmp_path / "videomme.jsonl"
    path.write_text(json.dumps(VIDEOMME_ROW) + "\n", encoding="utf-8")
    (q,) = read_questions([path])
    assert q.layout == "videomme" and q.id == "001-1" and q.task == "Counting Problem"
    assert q.options == ("Apples.", "Candles.", "Berries.", "The three kinds are of the same number.")
    assert q.answer == 2 and q.extra["duration"] == "short"
    (tmp_path / "data").mkdir()
    video = tmp_path / "data" / "fFjv93ACGo8.MP4"  # some Video-MME files carry an upper-case extension
    video.write_bytes(b"x")
    assert resolve_video(q, tmp_path) == video


# NExT-QA multiple choice: doc-doc/NExT-QA dataset/nextqa/val.csv, header and first row verbatim (answer is
# the index of the right a0..a4); map_vid_vidorID.json maps a video id to "folder/id" (layout from the same
# repository; this id's folder is illustrative).
NEXTQA_CSV = ("video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
              "4010069381,369,640,480,how do the two man play the instrument,0,6,CH,roll the handle,"
              "tap their feet,strum the string,hit with sticks,pat with hand\n")


def test_nextqa_csv_with_video_map(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(NEXTQA_CSV, encoding="utf-8")
    _write(tmp_path / "map_vid_vidorID.json", {"4010069381": "1021/4010069381"})
    (q,) = read_questions([path])
    assert q.layout == "nextqa" and q.id == "4010069381_6" and q.task == "CH"
    assert q.options[0] == "roll the handle" and len(q.options) == 5 and q.answer == 0
    assert q.videos[0] == "1021/4010069381.mp4"


# EgoSchema: egoschema/EgoSchema questions.json (records {"q_uid", "google_drive_id", "question",
# "option 0".."option 4"}; these two records verbatim from commit 617b469) and subset_answers.json
# ({q_uid: index}, answers public for 500 questions only). The first uid's answer is not public: the
# value here is a placeholder; the second uid has none, as most questions.
EGOSCHEMA_QUESTIONS = [
    {"q_uid": "001934bb-81bd-4cd8-a574-0472ef3f6678", "google_drive_id": "15yGB0TI5zG5usdQZOXn0CrRzkJNB0gMl",
     "question": "Although the video is predominantly focused on one recurring action, there is an interruption in "
                 "c's activity. briefly describe this interruption and its significance within the video.",
     "option 0": "C stops scrolling to check notifications on their phone, indicating a possible distraction",
     "option 1": "C briefly stops scrolling to engage in conversation with others, showcasing the social aspect",
     "option 2": "C interrupts scrolling to type on the laptop, adding variety to the video's main focus",
     "option 3": "C briefly stops scrolling, showing a drifting focus.",
     "option 4": "C takes a break to drink from a cup, briefly shifting focus"},
    {"q_uid": "001d2d1b-d2f9-4c39-810e-6e2087ff9d5a", "google_drive_id": "14pm6dj9_3cU-J65fF9u59ZtytG-8WTdN",
     "question": "Based on the events of the video, how would you describe c's behavior in the grocery store and "
                 "its purpose, without listing every action?",
     "option 0": "C shopped carefully, selecting fridge items, interacting with staff, and frequently checking "
                 "surroundings.",
     "option 1": "C acted meticulously in the store, with a focus on beverages and reading papers, repeatedly "
                 "looking around to ensure no one interfered with the shopping experience, and interacting with "
                 "employees as needed.",
     "option 2": "C's behavior could be described as vigilant and thorough, as evidenced by selecting various items "
                 "from the fridge, reading materials on the countertop, and observing their environment at "
                 "multiple points throughout the video.",
     "option 3": "C behaved with precision and caution in the grocery store, opting for a step-by-step process of "
                 "fridge interaction, reading materials, and engaging in a back-and-forth communication with the "
                 "store staff using calculators.",
     "option 4": "C's behavior appeared cautious and observant, aiming to shop for various items while paying "
                 "attention to the surroundings."},
]


def test_egoschema_uses_subset_answers_and_skips_the_rest(tmp_path):
    path = _write(tmp_path / "questions.json", EGOSCHEMA_QUESTIONS)
    with pytest.raises(QuestionFileError, match="subset_answers.json"):
        read_questions([path])
    _write(tmp_path / "subset_answers.json", {"001934bb-81bd-4cd8-a574-0472ef3f6678": 3})
    (q,) = read_questions([path])
    assert q.layout == "egoschema" and q.answer == 3 and len(q.options) == 5
    assert q.videos[0] == "001934bb-81bd-4cd8-a574-0472ef3f6678.mp4"
    # a folder holding both files reads the questions only
    assert [x.id for x in read_questions([tmp_path])] == [q.id]


# Perception Test: google-deepmind/perception_test README ("Multiple-choice video question-answers":
# id, question, options (3), answer_id, area, reasoning, tag; video metadata with video_id) and
# data_visualisation.ipynb (options[answer_id]); the video id, question id 0 and option 'static or shaking'
# appear in the official baseline's results example; other values illustrative. The second layout is
# lmms-lab/PerceptionTest_Val (dataset card: video_name, question_id, options, answer_id as a string,
# area, reasoning, tag).
PERCEPTION_TEST = {
    "video_1009": {
        "metadata": {"split": "valid", "video_id": "video_1009", "frame_rate": 30.0, "num_frames": 900,
                     "resolution": [1080, 1920]},
        "mc_question": [
            {"id": 0, "question": "Is the camera moving or static?",
             "options": ["moving", "static", "static or shaking"], "answer_id": 2, "area": "physics",
             "reasoning": "descriptive", "tag": ["motion"]},
        ],
    },
}


def test_perception_test_both_layouts(tmp_path):
    (q,) = read_questions([_write(tmp_path / "mc_question_valid.json", PERCEPTION_TEST)])
    assert q.layout == "perceptiontest" and q.id == "video_1009/0" and q.task == "physics"
    assert q.answer == 2 and q.options[2] == "static or shaking" and q.videos[0] == "video_1009.mp4"
    flat = [{"video_name": "video_1009", "question_id": "0", "question": "Is the camera moving or static?",
             "options": ["moving", "static", "static or shaking"], "answer_id": "2", "area": "physics",
             "reasoning": "descriptive", "tag": ["motion"]}]
    (f,) = read_questions([_write(tmp_path / "val.json", flat)])
    assert (f.id, f.answer, f.task) == (q.id, q.answer, q.task)


def test_plain_layout_answer_forms(tmp_path):
    rows = [{"id": "q1", "video": "a.mp4", "question": "which way?", "options": ["left", "right"], "answer": "B"},
            {"id": "q2", "video": "a.mp4", "question": "which way?", "options": ["left", "right"], "answer": 0,
             "task": "direction", "start": 1, "end": 2.5},
            {"id": "q3", "video": "b.mp4", "question": "which way?", "options": ["left", "right"], "answer": "right"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    questions = read_questions([path])
    assert [q.answer for q in questions] == [1, 0, 1]
    assert (questions[0].task, questions[1].task) == ("mine", "direction")
    assert (questions[1].start, questions[1].end) == (1.0, 2.5)


@pytest.mark.parametrize("data, message", [
    ([{"foo": 1}], "unknown layout"),
    ([], "no question records"),
    ({"x": 1}, "not a Perception Test"),
    ([{"video": "a", "question": "q", "options": ["x", "y"], "answer": "C"}], "answer 'C'"),
    ([{"video": "a", "question": "q", "options": ["x", "y"], "answer": 5}], "outside the 2 options"),
])
def test_bad_files_get_one_error_naming_the_file(tmp_path, data, message):
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(QuestionFileError, match=message) as error:
        read_questions([path])
    assert str(path) in str(error.value)


def test_unreadable_and_missing_inputs(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(QuestionFileError, match=r"broken.jsonl:2: not JSON"):
        read_questions([broken])
    with pytest.raises(QuestionFileError, match="no such question file"):
        read_questions([tmp_path / "nope.json"])
    rows = [{"id": "same", "video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": 0}] * 2
    with pytest.raises(QuestionFileError, match="appears twice"):
        read_questions([_write(tmp_path / "dup.json", rows)])


def test_missing_videos_are_reported_before_anything_runs(tmp_path):
    path = _write(tmp_path / "q.json", [{"video": "gone.mp4", "question": "q", "options": ["x", "y"], "answer": 0}])
    questions = read_questions([path])
    with pytest.raises(QuestionFileError, match=r"1 of 1 videos not found .*gone.mp4"):
        resolve_videos(questions, tmp_path)


def test_detect_layout_prefers_the_specific_layouts():
    assert detect_layout([VIDEOMME_ROW]) == "videomme"  # has "options" and "answer" like the plain layout
    assert detect_layout(MVBENCH_MOVING_DIRECTION) == "mvbench"
    assert detect_layout(EGOSCHEMA_QUESTIONS) == "egoschema"
    assert detect_layout(PERCEPTION_TEST) == "perceptiontest"
