"""What every front end answers, asked only through interfaces that survive a module move.

The one copy of the logic behind ``tests/test_golden_answers.py`` (which compares with
``tests/fixtures/golden_answers.json``) and ``scripts/record_golden_answers.py`` (which writes it).
Every answer comes from a subprocess or over HTTP: ``python -m mugstan_chat ask`` and ``chat`` (stdout),
``python -m mugstan_chat.entrypoints.openai`` (the ``openai`` client), ``python app.py`` (``gradio_client``) and
``python -m mugstan_chat eval`` (its ``predictions.jsonl`` and ``summary.json``). Nothing here imports
``mugstan_chat``: only the recording script does, to measure the greedy margins.

Every front end gets the same settings (:data:`SETTINGS`), passed as explicit flags or parameters, so a
default changing later does not change what is compared. Subprocesses inherit ``OMP_NUM_THREADS`` (the
server's is 1: :func:`live_process.serve_demo` sets it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import live_process
from live_process import STARTUP_TIMEOUT_S, serve_demo

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = FIXTURES / "golden_answers.json"

# the one video: `python -m mugstan_chat.synthetic videos DIR --num 2 --seed 2` (byte-identical every run;
# its sha256 is recorded, so a generator that changes is reported as that, not as changed answers)
VIDEO_ARGS = {"num": 2, "seed": 2, "size": 64, "frames": 24}
VIDEO_NAME = "pair0000_a.mp4"
QUESTIONS = ("what is shown in the video?", "what color is the shape?")  # a two-turn conversation
SETTINGS = {"frames": 4, "clips": 1, "clip_times": "off", "temporal": "stan", "max_new_tokens": 16,
            "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "device": "cpu", "dtype": "fp32"}
# eval: likelihood scoring, options scored as text (the demo vocabulary has no capital letters)
EVAL_SETTINGS = {"questions": "tests/fixtures/golden_questions.jsonl", "modes": ["stan", "mean"],
                 "scoring": "likelihood", "answer_format": "text", "bootstrap": 10, "seed": 0}
TIMEOUT_S = 180


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False"}


def _run(args: list[str], stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_video(folder: Path) -> Path:
    """The synthetic video every front end is asked about, written under ``folder``."""
    flags = [f"--{k}={v}" for k, v in VIDEO_ARGS.items()]
    _run(["-m", "mugstan_chat.synthetic", "videos", str(folder), *flags, "--no-progress"])
    return Path(folder) / VIDEO_NAME


def model_flags(sampling: bool = True) -> list[str]:
    """:data:`SETTINGS` as the flags every command line front end shares (``eval``, greedy only, refuses the
    sampling ones: ``sampling=False`` leaves them out)."""
    s = SETTINGS
    flags = ["--demo", "--device", s["device"], "--dtype", s["dtype"], "--temporal", s["temporal"],
             "--frames", str(s["frames"]), "--clips", str(s["clips"]), "--clip-times", s["clip_times"],
             "--max-new-tokens", str(s["max_new_tokens"])]
    if sampling:
        flags += ["--temperature", str(s["temperature"]), "--top-p", str(s["top_p"]),
                  "--repetition-penalty", str(s["repetition_penalty"])]
    return flags


# ---------------------------------------------------------------------------------------- command line


def ask_answer(video: Path, question: str = QUESTIONS[0]) -> str:
    """``python -m mugstan_chat ask VIDEO QUESTION`` (its stdout is the answer and a newline)."""
    return _run(["-m", "mugstan_chat", "ask", str(video), question, *model_flags()]).strip()


def chat_answers(video: Path, questions=QUESTIONS) -> list[str]:
    """``python -m mugstan_chat chat VIDEO`` with ``questions`` on stdin: one ``assistant> `` line each."""
    out = _run(["-m", "mugstan_chat", "chat", str(video), *model_flags()], stdin="\n".join(questions) + "\n/exit\n")
    answers = [line[len("assistant> "):].strip() for line in out.splitlines() if line.startswith("assistant> ")]
    if len(answers) != len(questions):
        raise RuntimeError(f"chat printed {len(answers)} answers for {len(questions)} questions:\n{out}")
    return answers


# ---------------------------------------------------------------------------------------- the API server


def serve(log: Path, media: Path) -> contextlib.AbstractContextManager[str]:
    """``python -m mugstan_chat.entrypoints.openai`` on a free port allowed to read ``media``: its base URL."""
    flags = [flag for flag in model_flags() if flag != "--demo"]  # serve_demo gives --demo
    return contextlib.contextmanager(serve_demo)(log, "--allowed-local-media-path", str(media), *flags)


def serve_answers(base: str, video: Path, questions=QUESTIONS, stream: bool = False) -> list[str]:
    """A conversation through the ``openai`` client: each turn resends the history with the answers so far."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    s = SETTINGS
    messages: list[dict] = []
    answers = []
    for number, question in enumerate(questions):
        content = [{"type": "text", "text": question}]
        if number == 0:
            content.insert(0, {"type": "video_url", "video_url": {"url": f"file://{video}"}})
        messages.append({"role": "user", "content": content})
        request = dict(model="demo", messages=messages, temperature=s["temperature"], top_p=s["top_p"],
                       max_tokens=s["max_new_tokens"])
        if stream:
            chunks = client.chat.completions.create(**request, stream=True)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(**request).choices[0].message.content
        answers.append(answer.strip())
        messages.append({"role": "assistant", "content": answer})
    return answers


# ---------------------------------------------------------------------------------------- the web app


def serve_app(log: Path) -> Iterator[str]:
    """``python app.py`` (the :data:`SETTINGS` flags) on a free port, for a fixture to ``yield from``: its URL."""
    yield from live_process.serve_app(log, *model_flags(), "--no-examples", env=_env(), timeout_s=STARTUP_TIMEOUT_S)


def _text(content) -> str:
    """A chatbot message's text (gradio gives a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def app_answers(url: str, video: Path, questions=QUESTIONS) -> list[str]:
    """The page's own endpoints through ``gradio_client``: ``/load_video``, then ``/ask`` per question.

    An answer is the assistant message up to its first blank line (after it: the turn's statistics).
    """
    from gradio_client import Client, handle_file

    s = SETTINGS
    client = Client(url, verbose=False)
    try:
        client.predict(handle_file(str(video)), s["frames"], s["clips"], s["temporal"], 0,
                       8, False, "topk", api_name="/load_video")
        answers = []
        for question in questions:
            chatbot, _ = client.predict(question, s["max_new_tokens"], s["temperature"], s["top_p"], api_name="/ask")
            answers.append(_text(chatbot[-1]["content"]).split("\n\n")[0].strip())
        return answers
    finally:
        client.close()


# ---------------------------------------------------------------------------------------- eval


def eval_results(video_root: Path, out: Path) -> dict:
    """``python -m mugstan_chat eval`` over the questions of :data:`EVAL_SETTINGS`: per mode and question,
    the option scores (mean log-probability per token) and the choice, and each mode's accuracy."""
    e = EVAL_SETTINGS
    _run(["-m", "mugstan_chat", "eval", str(ROOT / e["questions"]), "--video-root", str(video_root), "--out", str(out),
          "--modes", *e["modes"], "--scoring", e["scoring"], "--answer-format", e["answer_format"], "--no-progress",
          "--bootstrap", str(e["bootstrap"]), "--seed", str(e["seed"]), *model_flags(sampling=False)])
    results: dict = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        results.setdefault(row["mode"], {})[row["id"]] = {"chosen": row["chosen"], "correct": row["correct"],
                                                          "option_scores": row["option_scores"]}
    summary = json.loads((out / "summary.json").read_text())
    for mode in EVAL_SETTINGS["modes"]:
        results[mode] = {"questions": dict(sorted(results[mode].items())),
                         "accuracy": summary["modes"][mode]["accuracy"]}
    return results


def score_margin(option_scores: list[float]) -> float:
    """Best minus second-best option score, relative to the best score's size."""
    best, second = sorted(option_scores, reverse=True)[:2]
    return (best - second) / max(abs(best), 1.0)


def record_all(work: Path) -> dict:
    """Every front end's answers (and the video's checksum), as ``golden_answers.json`` holds them."""
    work = Path(work)
    video = make_video(work / "videos")
    recorded = {"video": {"generator": "python -m mugstan_chat.synthetic videos", **VIDEO_ARGS, "file": VIDEO_NAME,
                          "sha256": sha256(video)},
                "settings": SETTINGS, "questions": list(QUESTIONS), "eval_settings": EVAL_SETTINGS}
    answers = {"ask": {QUESTIONS[0]: ask_answer(video)},
               "chat": dict(zip(QUESTIONS, chat_answers(video)))}
    (work / "logs").mkdir(exist_ok=True)
    with serve(work / "logs" / "server.log", video.parent) as base:
        answers["serve"] = dict(zip(QUESTIONS, serve_answers(base, video)))
        answers["serve_stream"] = dict(zip(QUESTIONS, serve_answers(base, video, stream=True)))
    with contextlib.contextmanager(serve_app)(work / "logs" / "app.log") as url:
        answers["app"] = dict(zip(QUESTIONS, app_answers(url, video)))
    recorded["answers"] = answers
    recorded["eval"] = eval_results(video.parent, work / "eval")
    return recorded
