"""mugstan_chat.evaluation: scoring on rigged tiny models, features once per video and mode, resume after a
kill, the summary, and ``mugstan-chat eval`` end to end on the demo model and the synthetic question set."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mugstan_chat.llava import demo as demo_module
from mugstan_chat.engine.conversation import ChatSession
from mugstan_chat.entrypoints.cli import main
from mugstan_chat.evaluation import runner as runner_module
from mugstan_chat.evaluation.modes import session_shape
from mugstan_chat.evaluation.readers import Question, read_questions, resolve_videos
from mugstan_chat.evaluation.runner import (
    PREDICTIONS, EvalRun, EvalSettings, OutputError, prepare_output, read_predictions)
from mugstan_chat.evaluation.scoring import (
    build_question_text, parse_choice, score_likelihood)
from mugstan_chat.evaluation.summary import bootstrap_interval, markdown_tables, summarize
from mugstan_chat.engine.likelihood import continuation_ids
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.synthetic import make_synthetic_mc, question_for_caption
from mugstan_chat.engine.engine import Engine

FRAMES = 2


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_set")
    return make_synthetic_mc(root, num=4, seed=3, size=32, frames=8), root


@pytest.fixture(scope="module")
def chat_model():
    return load_chat_model(demo=True)  # its own: _rig swaps its LM head


def _rig(chat_model, preferred: dict[str, float]):
    """Replaces the LM head by zero weights plus a bias: every position then predicts the same
    distribution, whatever the video and prompt, with the given tokens raised by the given logits."""
    model = chat_model.model
    tokenizer = chat_model.processor.tokenizer
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, logit in preferred.items():
            head.bias[tokenizer.convert_tokens_to_ids(token)] = logit
    model.lm_head = head
    return old


def _question(options, answer=0, qid="q"):
    return Question(id=qid, videos=("v.mp4",), question="In which direction does the red circle move?",
                    options=tuple(options), answer=answer, task="t", layout="plain")


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("mode", ["stan", "mean", "concat"])
def test_likelihood_picks_the_option_the_rigged_model_prefers(chat_model, synthetic_set, mode):
    questions_file, root = synthetic_set
    shape = session_shape(mode, FRAMES)
    session = ChatSession(Engine(chat_model), root / "pair0000_a.mp4", frames=shape.frames, clips=shape.clips,
                          temporal=shape.temporal)
    old = _rig(chat_model, {"right": 12.0})
    try:
        for options in (["left", "right"], ["right", "left"], ["up", "moving left", "right"]):
            score = score_likelihood(session, _question(options), "text")
            assert options[score.chosen] == "right"
            assert score.option_scores[score.chosen] > max(s for i, s in enumerate(score.option_scores)
                                                           if i != score.chosen)
    finally:
        chat_model.model.lm_head = old


def test_text_scores_are_length_normalised(chat_model, synthetic_set):
    """With uniform next-token distributions every token costs log(1/V): the mean per token ties
    a two-token option with a one-token one (a sum would favour the shorter); ties go to the first."""
    _, root = synthetic_set
    session = ChatSession(Engine(chat_model), root / "pair0000_a.mp4", frames=FRAMES)
    old = _rig(chat_model, {})
    try:
        score = score_likelihood(session, _question(["moving left", "up"]), "text")
    finally:
        chat_model.model.lm_head = old
    assert score.option_tokens == [2, 1]
    vocab = chat_model.model.config.text_config.vocab_size
    assert score.option_scores[0] == score.option_scores[1] == pytest.approx(-np.log(vocab), rel=1e-6)
    assert score.chosen == 0


def test_letter_scoring_on_a_tiny_model_with_letter_tokens(monkeypatch, synthetic_set):
    """The demo vocabulary has no capital letters; a variant with them scores letters, and the
    demo itself refuses letter scoring rather than tie every option on <unk>."""
    _, root = synthetic_set
    plain = load_chat_model(demo=True)
    session = ChatSession(Engine(plain), root / "pair0000_a.mp4", frames=FRAMES)
    with pytest.raises(ValueError, match="--answer-format text"):
        score_likelihood(session, _question(["left", "right"]), "letter")
    monkeypatch.setattr(demo_module, "_WORDS", demo_module._WORDS + ["A", "B", "C"])
    lettered = load_chat_model(demo=True)
    session = ChatSession(Engine(lettered), root / "pair0000_a.mp4", frames=FRAMES)
    _rig(lettered, {"B": 9.0})
    score = score_likelihood(session, _question(["left", "right", "up"]), "letter")
    assert score.chosen == 1 and score.option_tokens == [1, 1, 1]


def test_cached_continuation_scores_equal_a_full_forward(chat_model, synthetic_set):
    """The scorer runs the prompt once and multi-token options on a copy of its cache; the result must
    be what one forward pass over prompt + option gives. fp32, 64-wide model: rounding differences
    of the two attention orders are ~1e-6 per log-prob; 1e-4 absolute is a safe bound."""
    _, root = synthetic_set
    session = ChatSession(Engine(chat_model), root / "pair0001_b.mp4", frames=FRAMES)
    question = _question(["moving left", "growing", "up down left"])
    score = score_likelihood(session, question, "text")
    prompt = session.prompt_text(build_question_text(question, "text"))
    context, conts = continuation_ids(chat_model.processor.tokenizer, prompt, [" moving left", " growing",
                                                                              " up down left"])
    expected = []
    with torch.no_grad():
        for cont in conts:
            ids = torch.tensor([context + cont])
            visual = {"image": BaseModelOutputWithPooling(pooler_output=session.features)}
            logits = chat_model.model(input_ids=ids, mm_encoder_outputs=visual).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            expected.append(float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(cont))) / len(cont))
    assert score.option_scores == pytest.approx(expected, abs=1e-4)
    assert score.prompt_tokens == len(context)


@pytest.mark.parametrize("answer, chosen", [
    ("B", 1), ("(C) up", 2), ("The answer is A.", 0), ("B. right", 1), ("I think it moves right", 1),
    ("left or right", None), ("nothing useful", None), ("Bright", None),
])
def test_parse_choice_rule(answer, chosen):
    assert parse_choice(answer, _question(["left", "right", "up"])) == chosen


# ------------------------------------------------------------------------------------------ runner
def _run(chat_model, questions, videos, out, modes=("stan", "mean", "concat"), done=None, scoring="likelihood"):
    settings = EvalSettings(modes=list(modes), frames=FRAMES, scoring=scoring, answer_format="text", model="demo",
                            bootstrap=200)
    run = EvalRun(Engine(chat_model), questions, videos, settings, out, done=done, progress=False)
    return run, run.run()


def test_features_are_computed_once_per_video_and_mode(chat_model, synthetic_videos, tmp_path, monkeypatch):
    folder, made = synthetic_videos(2, seed=5, size=32, frames=8)
    rows = [{"id": f"{i}-{k}", "video": path.name, "question": f"question {k}?", "options": ["left", "right"],
             "answer": k % 2} for i, (path, _) in enumerate(made) for k in range(3)]
    (tmp_path / "q.json").write_text(json.dumps(rows), encoding="utf-8")
    questions = read_questions([tmp_path / "q.json"])
    videos = resolve_videos(questions, folder)
    calls = chat_model.tower.calls

    def session_decoding(*args, **kwargs):
        raise AssertionError("sessions must encode the frames the run decoded, not decode again")

    monkeypatch.setattr("mugstan_chat.engine.conversation.load_video_clips", session_decoding)
    run, summary = _run(chat_model, questions, videos, tmp_path / "out")
    assert run.decodes == 2  # each video decoded once, for all three modes (they read the same frames)
    assert run.encodes == {"stan": 2, "mean": 2, "concat": 2}  # 2 videos x 3 modes, 3 questions each
    assert chat_model.tower.calls - calls == 6  # the tower ran once per (video, mode), never per question
    records = read_predictions(tmp_path / "out" / PREDICTIONS)
    assert len(records) == 18 and {r["mode"] for r in records} == {"stan", "mean", "concat"}
    by_mode = {m: {r["visual_tokens"] for r in records if r["mode"] == m} for m in ("stan", "mean", "concat")}
    assert by_mode == {"stan": {16}, "mean": {16}, "concat": {16 * FRAMES}}  # one image's worth vs T images
    # decode is charged once per video, encode once per video and mode, to their first question
    assert sum(1 for r in records if r["timings_ms"]["decode"] > 0) == 2
    assert sum(1 for r in records if r["timings_ms"]["encode"] > 0) == 6
    assert summary["modes"]["concat"]["visual_tokens_per_question"] == 16 * FRAMES


def _strip_timing(summary):
    summary = json.loads(json.dumps(summary))
    for entry in summary["modes"].values():
        entry.pop("timing")
    return summary


def test_resume_after_a_kill_gives_the_same_summary(chat_model, synthetic_set, tmp_path, monkeypatch):
    questions_file, root = synthetic_set
    questions = read_questions([questions_file])
    videos = resolve_videos(questions, root)
    settings = EvalSettings(modes=["stan", "mean", "concat"], frames=FRAMES, answer_format="text", model="demo",
                            bootstrap=200)
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    prepare_output(full_dir, settings, resume=False)
    full = EvalRun(Engine(chat_model), questions, videos, settings, full_dir, progress=False).run()

    # the killed run: dies at its 7th question, after a half-written line (what SIGKILL mid-write leaves)
    real = runner_module.score_question
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            with open(killed_dir / PREDICTIONS, "a", encoding="utf-8") as sink:
                sink.write('{"id": "pair0001_a", "mode": "st')
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    prepare_output(killed_dir, settings, resume=False)
    monkeypatch.setattr(runner_module, "score_question", dying)
    with pytest.raises(KeyboardInterrupt):
        EvalRun(Engine(chat_model), questions, videos, settings, killed_dir, progress=False).run()
    monkeypatch.setattr(runner_module, "score_question", real)
    with pytest.raises(OutputError, match="--resume"):
        prepare_output(killed_dir, settings, resume=False)  # nothing is overwritten by accident

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "score_question", counting)
    done = prepare_output(killed_dir, settings, resume=True)
    assert len(done) == 6  # the partial 7th line was dropped
    resumed = EvalRun(Engine(chat_model), questions, videos, settings, killed_dir, done=done, progress=False).run()
    assert counted["n"] == 3 * len(questions) - 6  # only the missing (question, mode) pairs ran
    assert _strip_timing(resumed) == _strip_timing(full)
    assert len(read_predictions(killed_dir / PREDICTIONS)) == 3 * len(questions)
    other = EvalSettings(**{**settings.__dict__, "frames": FRAMES + 1})
    with pytest.raises(OutputError, match="frames"):
        prepare_output(killed_dir, other, resume=True)


def test_generate_scoring_runs_and_records_answers(chat_model, synthetic_set, tmp_path):
    questions_file, root = synthetic_set
    questions = read_questions([questions_file])[:2]
    run, summary = _run(chat_model, questions, resolve_videos(questions, root), tmp_path / "gen",
                        modes=("mean",), scoring="generate")
    records = read_predictions(tmp_path / "gen" / PREDICTIONS)
    assert all(r["answer_text"] and r["option_scores"] is None for r in records)
    assert all(r["chosen"] == parse_choice(r["answer_text"], q) for r, q in zip(records, questions))
    assert summary["modes"]["mean"]["unanswered"] == sum(r["chosen"] is None for r in records)


# ------------------------------------------------------------------------------------------ summary
def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    correct = np.array([1.0] * 30 + [0.0] * 10)
    low, high = bootstrap_interval(correct, 2000, np.random.default_rng(0))
    assert low < 0.75 < high and 0.55 < low and high < 0.9  # binomial sd = 0.068 -> ~ +-0.13
    assert (low, high) == bootstrap_interval(correct, 2000, np.random.default_rng(0))
    assert bootstrap_interval(np.ones(5), 100, np.random.default_rng(1)) == (1.0, 1.0)


def test_summary_groups_by_mode_and_task_and_pairs_modes():
    questions = [Question(id=f"q{i}", videos=("v",), question="?", options=("l", "r"), answer=0,
                          task="a" if i < 2 else "b", layout="plain") for i in range(4)]
    records = []
    for i, q in enumerate(questions):
        for mode, correct in (("stan", True), ("mean", i % 2 == 0)):
            records.append({"id": q.id, "mode": mode, "task": q.task, "correct": correct, "chosen": 0,
                            "visual_tokens": 576,
                            "timings_ms": {"decode": 0.0, "encode": 0.0, "score": 1.0, "total": 1.0}})
    summary = summarize(records, questions, ["stan", "mean"], resamples=100)
    assert summary["modes"]["stan"]["accuracy"] == 1.0 and summary["modes"]["mean"]["accuracy"] == 0.5
    assert summary["modes"]["mean"]["tasks"] == {
        "a": {"n": 2, "correct": 1, "accuracy": 0.5, "ci95": summary["modes"]["mean"]["tasks"]["a"]["ci95"]},
        "b": {"n": 2, "correct": 1, "accuracy": 0.5, "ci95": summary["modes"]["mean"]["tasks"]["b"]["ci95"]}}
    assert summary["comparisons"]["stan - mean"]["delta"] == 0.5 and summary["chance"] == 0.5
    table = markdown_tables(summary)
    assert "| stan | 4 | 100.0 |" in table and "| stan - mean | 4 | +50.0 |" in table


# ------------------------------------------------------------------------------------------ CLI
def test_synthetic_questions_match_their_videos(synthetic_set):
    questions_file, root = synthetic_set
    rows = [json.loads(line) for line in questions_file.read_text().splitlines()]
    annotations = csv.DictReader((root / "annotations.csv").read_text().splitlines())
    captions = {r["video"]: r["caption"] for r in annotations}
    for row in rows:
        motion, question, options, answer = question_for_caption(captions[row["video"]])
        assert row["question"] == question and sorted(row["options"]) == options
        assert row["options"]["AB".index(row["answer"])] == answer
    # each pair holds the same frames in opposite orders, so its two answers differ
    pairs = {}
    for row in rows:
        pairs.setdefault(row["id"][:8], []).append(row["options"]["AB".index(row["answer"])])
    assert all(len(set(a)) == 2 for a in pairs.values())


def test_cli_eval_end_to_end_on_the_demo_model(synthetic_set, tmp_path, capsys):
    questions_file, root = synthetic_set
    out = tmp_path / "out"
    argv = ["eval", str(questions_file), "--video-root", str(root), "--demo", "--answer-format", "text",
            "--frames", str(FRAMES), "--out", str(out), "--no-progress", "--bootstrap", "200"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    for mode in ("stan", "mean", "concat"):
        assert f"| {mode} | 4 |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"stan", "mean", "concat"} and summary["chance"] == 0.5
    assert len(read_predictions(out / PREDICTIONS)) == 12
    assert main(argv) == 1  # a second run into the same folder needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # nothing left to do; the same summary comes back
    assert _strip_timing(json.loads((out / "summary.json").read_text())) == _strip_timing(summary)


@pytest.mark.parametrize("extra, message", [
    (["--video-root", "{root}/nowhere"], "videos not found"),
    (["--modes", "stan", "mean"], "needs a STAN branch"),
    (["--temperature", "0.7"], "greedily"),
    (["--video-root", "{root}", "--limit", "0"], "positive integer"),
])
def test_cli_eval_checks_arguments_before_loading_the_model(synthetic_set, tmp_path, capsys, monkeypatch, extra,
                                                            message):
    questions_file, root = synthetic_set

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("mugstan_chat.llava.loader.load_chat_model", no_load)
    argv = ["eval", str(questions_file), "--out", str(tmp_path / "o"), "--no-progress"]
    if "--video-root" not in extra:
        argv += ["--video-root", str(root)]
    if "--modes" not in extra:
        argv += ["--demo"]
    code = None
    try:
        code = main(argv + [e.format(root=root) for e in extra])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    assert code in (1, 2)
    assert message in capsys.readouterr().err


def test_prompt_text_is_what_build_prompt_tokenises(chat_model, synthetic_set):
    """The ChatSession.prompt_text hook: build_prompt is exactly its tokenisation (one BOS)."""
    _, root = synthetic_set
    session = ChatSession(Engine(chat_model), root / "pair0000_b.mp4", frames=FRAMES, clips=2)
    text = session.prompt_text("what happens ?")
    ids = session.build_prompt("what happens ?")["input_ids"][0].tolist()
    assert text.count(chat_model.processor.image_token) == session.visual_tokens == 2 * 16
    assert ids == chat_model.processor.tokenizer(text)["input_ids"] and ids.count(ids[0]) == 1


@pytest.mark.parametrize("frames, clips", [(5, 1), (3, 2), (8, 1)])
def test_every_mode_reads_the_same_frames(chat_model, synthetic_set, frames, clips):
    """24-frame videos: T = 5 does not divide them, where sampling T one-frame clips would pick other
    frames than one T-frame clip; concat must see exactly the stan/mean frames, one image each."""
    _, root = synthetic_set
    seen = {}
    for mode in ("stan", "mean", "concat"):
        shape = session_shape(mode, frames, clips)
        session = ChatSession(Engine(chat_model), root / "pair0001_a.mp4", frames=shape.frames, clips=shape.clips,
                              temporal=shape.temporal, frames_as_images=shape.frames_as_images)
        seen[mode] = session.frame_indices
        images = session.prompt_text("?").count(chat_model.processor.image_token) // 16
        assert images == (frames * clips if mode == "concat" else clips)
        assert session.visual_tokens == images * 16
    assert seen["stan"] == seen["mean"] == seen["concat"]


def test_a_mode_over_the_context_is_refused_before_any_video_is_read(chat_model, tmp_path):
    """The demo context is 2048 tokens and an image 16: concat at 128 frames needs 2048."""
    question = _question(["left", "right"])
    settings = EvalSettings(modes=["mean", "concat"], frames=128, answer_format="text")
    with pytest.raises(ValueError, match="'concat' at --frames 128 --clips 1 needs 2048 visual tokens"):
        EvalRun(Engine(chat_model), [question], {"q": tmp_path / "never_read.mp4"}, settings, tmp_path / "o")
    EvalRun(Engine(chat_model), [question], {"q": tmp_path / "never_read.mp4"},
            EvalSettings(modes=["concat"], frames=127, answer_format="text"), tmp_path / "o")  # 2032 fits


def test_prepare_with_decoded_clips_equals_decoding_itself(chat_model, synthetic_set):
    """The ChatSession.prepare(decoded) hook: the same features as a session that decodes; a
    decode of another shape is refused."""
    from mugstan_chat.video import load_video_clips

    _, root = synthetic_set
    video = root / "pair0000_a.mp4"
    decoded = load_video_clips(video, frames_per_clip=4, num_clips=1, mode="eval",
                               image_processor=chat_model.processor.image_processor)
    own = ChatSession(Engine(chat_model), video, frames=4)
    shared = ChatSession(Engine(chat_model), video, frames=4, prepare=False)
    assert shared.prepare(decoded) and not shared.prepare(decoded)
    assert torch.equal(own.features[0], shared.features[0]) and own.frame_indices == shared.frame_indices
    with pytest.raises(ValueError, match="decoded clips of shape"):
        ChatSession(Engine(chat_model), video, frames=3, prepare=False).prepare(decoded)


def test_an_undecodable_video_stops_the_run_with_one_line_and_resume_continues(synthetic_set, tmp_path, capsys):
    questions_file, root = synthetic_set
    rows = [json.loads(line) for line in questions_file.read_text().splitlines()][:2]
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / rows[0]["video"]).write_bytes((root / rows[0]["video"]).read_bytes())
    (videos / rows[1]["video"]).write_bytes(b"not a video at all")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["eval", str(questions), "--video-root", str(videos), "--demo", "--answer-format", "text",
            "--frames", str(FRAMES), "--out", str(tmp_path / "out"), "--no-progress", "--modes", "mean"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert rows[1]["video"] in err[-1] and err[-1].startswith("mugstan-chat: error:")
    assert len(read_predictions(tmp_path / "out" / PREDICTIONS)) == 1  # the first video's result is kept
    (videos / rows[1]["video"]).write_bytes((root / rows[1]["video"]).read_bytes())
    assert main(argv + ["--resume"]) == 0
    assert len(read_predictions(tmp_path / "out" / PREDICTIONS)) == 2


def test_cli_eval_compares_uniform_and_selected_clips_by_video_length(synthetic_set, tmp_path, capsys):
    """A Video-MME file (its duration field) over the synthetic videos, with --select 1 --candidates 2:
    every mode runs on K uniform clips and on K selected clips, and the summary splits by duration."""
    questions_file, root = synthetic_set
    plain = [json.loads(line) for line in questions_file.read_text().splitlines()]
    videomme = [{"video_id": str(i), "duration": ("short", "long")[i % 2], "domain": "d", "sub_category": "s",
                 "videoID": Path(q["video"]).stem, "question_id": q["id"], "task_type": q["task"],
                 "question": q["question"], "options": [f"{'AB'[j]}. {o}" for j, o in enumerate(q["options"])],
                 "answer": q["answer"]} for i, q in enumerate(plain)]
    (tmp_path / "videomme.json").write_text(json.dumps(videomme))
    out = tmp_path / "out"
    argv = ["eval", str(tmp_path / "videomme.json"), "--video-root", str(root), "--demo", "--answer-format", "text",
            "--frames", "2", "--modes", "stan", "mean", "--select", "1", "--candidates", "2", "--out", str(out),
            "--no-progress", "--bootstrap", "50"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["modes"]) == ["stan", "mean", "stan+select", "mean+select"]
    assert "stan+select - stan" in summary["comparisons"] or "stan - stan+select" in summary["comparisons"]
    for entry in summary["modes"].values():
        assert set(entry["durations"]) == {"short", "long"} and entry["visual_tokens_per_question"] == 16
    assert "| duration |" in stdout and "| long |" in stdout
    records = read_predictions(out / PREDICTIONS)
    selected = [r for r in records if r["mode"].endswith("+select")]
    assert len(selected) == 8 and all(r["selection"]["candidates"] == 2 and len(r["clip_spans"]) == 1
                                      for r in selected)
