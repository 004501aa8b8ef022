"""mugstan_chat.entrypoints: every front end takes the same flags from one place and refuses the same
bad values the same way (exit 2, one message), before any model loads."""

from __future__ import annotations

import argparse
import socket

import pytest

from mugstan_chat.entrypoints import cli
from mugstan_chat.entrypoints import ModelArgs, ServingArgs
from mugstan_chat.entrypoints.serving_args import ServingDefaults
from mugstan_chat.entrypoints.values import non_negative_float, port, positive_float

MODEL_FRONT_ENDS = ("ask", "chat", "eval", "serve", "app")
SERVING_FRONT_ENDS = ("serve", "app")

# (flag, value): refused by every front end that has the flag
MODEL_BAD_VALUES = [
    ("--frames", "nan"), ("--frames", "0"), ("--frames", "65"), ("--frames", "-3"),
    ("--clips", "9"), ("--clips", "-1"), ("--clips", "inf"),
    ("--max-new-tokens", "-5"), ("--max-new-tokens", "4097"),
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"), ("--temperature", "2.5"),
    ("--top-p", "0"), ("--top-p", "nan"), ("--repetition-penalty", "inf"),
    ("--llm-url", "127.0.0.1:8001"), ("--llm-url", "ftp://host/v1"), ("--llm-model", " "), ("--llm-api-key", ""),
    ("--clips", "automatic"), ("--clip-times", "sometimes"), ("--select", "0"), ("--select", "9"),
    ("--select", "nan"), ("--candidates", "1"), ("--candidates", "257"), ("--selection", "best"), ("--shortlist", "0"),
    ("--shortlist", "x"),
    ("--llm-timeout", "0"), ("--llm-timeout", "-1"), ("--llm-timeout", "nan"), ("--llm-timeout", "inf"),
    ("--llm-timeout", "soon"),
]
# (flags, words of the message): settings that are fine alone and refused together, the same way everywhere
MODEL_BAD_COMBINATIONS = [
    (["--candidates", "16"], "--candidates M needs --select K"),
    (["--selection", "coverage"], "--selection needs --select K"),
    (["--shortlist", "4"], "--shortlist S needs --select K"),
    (["--select", "4", "--shortlist", "3"], "--shortlist 3 must lie between --select 4 and --candidates 32"),
    (["--select", "2", "--candidates", "8", "--shortlist", "8"], "(K <= S < M)"),
    (["--select", "4", "--candidates", "3"], "--select 4 needs at least as many --candidates"),
    (["--select", "2", "--clips", "3"], "--select K shows K clips"),
    (["--select", "2", "--clips", "auto"], "--select K shows K clips"),
    (["--llm-timeout", "5"], "--llm-timeout need --llm-url"),
]
SERVING_BAD_VALUES = [
    ("--port", "0"), ("--port", "70000"), ("--port", "-1"), ("--port", "http"),
    ("--concurrency", "0"), ("--concurrency", "-2"), ("--queue-size", "-1"), ("--queue-size", "nan"),
    ("--feature-cache-mb", "nan"), ("--feature-cache-mb", "inf"), ("--feature-cache-mb", "-1"),
    ("--max-video-seconds", "nan"), ("--max-video-seconds", "0"), ("--max-video-seconds", "inf"),
    ("--threads-per-request", "0"), ("--threads-per-request", "-1"), ("--threads-per-request", "nan"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every check must happen before it."""
    def refuse(self, **overrides):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ModelArgs, "load", refuse)


def _argv(front_end: str, tmp_path, extra: list[str]) -> list[str]:
    video = str(tmp_path / "clip.mp4")  # never opened: the arguments fail first
    return {
        "ask": ["ask", video, "what happens?", "--demo", *extra],
        "chat": ["chat", video, "--demo", *extra],
        "eval": ["eval", str(tmp_path / "q.jsonl"), "--video-root", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--demo", *extra],
        "serve": ["serve", "--demo", *extra],
        "app": ["--demo", *extra],
    }[front_end]


def _refusal(front_end: str, argv: list[str], app_module, capsys) -> tuple[int, str]:
    """(exit code, the message after 'error: ') of one front end's usage error."""
    with pytest.raises(SystemExit) as stopped:
        (app_module.main if front_end == "app" else cli.main)(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "error: " in lines[-1], lines
    assert not any("Traceback" in line for line in lines)
    return stopped.value.code, lines[-1].split("error: ", 1)[1]


def _same_refusal_everywhere(front_ends, flag, value, tmp_path, app_module, capsys) -> str:
    seen = {}
    for front_end in front_ends:
        seen[front_end] = _refusal(front_end, _argv(front_end, tmp_path, [flag, value]), app_module, capsys)
    codes = {code for code, _ in seen.values()}
    messages = {message for _, message in seen.values()}
    assert codes == {2}, seen
    assert len(messages) == 1, seen  # word for word the same
    return messages.pop()


@pytest.mark.parametrize("flag, value", MODEL_BAD_VALUES)
def test_every_front_end_refuses_a_bad_model_value_the_same_way(flag, value, tmp_path, app_module, capsys,
                                                                no_model_load):
    message = _same_refusal_everywhere(MODEL_FRONT_ENDS, flag, value, tmp_path, app_module, capsys)
    assert flag in message and value in message


@pytest.mark.parametrize("flags, words", MODEL_BAD_COMBINATIONS)
def test_every_front_end_refuses_a_bad_combination_the_same_way(flags, words, tmp_path, app_module, capsys,
                                                                no_model_load):
    seen = {front_end: _refusal(front_end, _argv(front_end, tmp_path, flags), app_module, capsys)
            for front_end in MODEL_FRONT_ENDS}
    assert {code for code, _ in seen.values()} == {2}, seen
    messages = {message for _, message in seen.values()}
    assert len(messages) == 1 and words in messages.pop(), seen


def test_clip_flags_round_trip():
    parser = ModelArgs.add_cli_args(argparse.ArgumentParser())
    args = ModelArgs.from_cli_args(parser.parse_args(["--clips", "auto", "--clip-times", "off"]))
    assert (args.clips, args.clip_times, args.select, args.candidate_count) == ("auto", "off", None, None)
    assert args.session_kwargs()["clips"] == "auto"
    args = ModelArgs.from_cli_args(parser.parse_args(["--select", "3"]))
    assert args.candidate_count == 32 and args.session_kwargs() == {
        "frames": 8, "clips": None, "clip_times": "auto", "select": 3, "candidates": 32, "selection_strategy": None,
        "shortlist": None}
    args = ModelArgs.from_cli_args(parser.parse_args(["--select", "3", "--selection", "coverage"]))
    assert args.session_kwargs()["selection_strategy"] == "coverage"


@pytest.mark.parametrize("flag, value", SERVING_BAD_VALUES)
def test_every_server_refuses_a_bad_serving_value_the_same_way(flag, value, tmp_path, app_module, capsys,
                                                               no_model_load):
    front_ends = SERVING_FRONT_ENDS + (("chat",) if flag == "--feature-cache-mb" else ())
    message = _same_refusal_everywhere(front_ends, flag, value, tmp_path, app_module, capsys)
    assert flag in message and value in message


def test_a_busy_port_is_refused_the_same_way_before_loading(tmp_path, app_module, capsys, no_model_load):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        number = str(busy.getsockname()[1])
        message = _same_refusal_everywhere(SERVING_FRONT_ENDS, "--port", number, tmp_path, app_module, capsys)
    assert message.startswith(f"cannot listen on 127.0.0.1:{number} (") and "--port" in message


@pytest.mark.parametrize("front_end, auth", [("serve", ["--api-key", "k"]), ("app", ["--auth", "u:p"])])
def test_other_machines_need_authentication(front_end, auth, tmp_path, app_module, capsys, no_model_load,
                                            monkeypatch):
    monkeypatch.delenv("MUGSTAN_API_KEY", raising=False)
    monkeypatch.delenv("MUGSTAN_APP_AUTH", raising=False)
    code, message = _refusal(front_end, _argv(front_end, tmp_path, ["--host", "0.0.0.0"]), app_module, capsys)
    assert code == 2 and message.startswith("--host 0.0.0.0 exposes the server to other machines")
    assert auth[0] in message
    # with authentication the same address passes every check and reaches the (refused) model load
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        free = str(probe.getsockname()[1])
    with pytest.raises(AssertionError, match="the model was loaded"):
        (app_module.main if front_end == "app" else cli.main)(
            _argv(front_end, tmp_path, ["--host", "0.0.0.0", "--port", free, *auth]))


def test_a_public_share_link_needs_a_login(tmp_path, app_module, capsys, no_model_load, monkeypatch):
    monkeypatch.delenv("MUGSTAN_APP_AUTH", raising=False)
    code, message = _refusal("app", ["--demo", "--share"], app_module, capsys)
    assert code == 2 and "public share link" in message and "--auth" in message


def test_model_args_round_trip_and_validate():
    parser = ModelArgs.add_cli_args(argparse.ArgumentParser())
    args = ModelArgs.from_cli_args(parser.parse_args(["--demo", "--frames", "4", "--clips", "2", "--temperature",
                                                      "0.5", "--load-8bit"]))
    assert (args.demo, args.frames, args.clips, args.temperature, args.load_8bit) == (True, 4, 2, 0.5, True)
    assert args.answer_limit == 48 and ModelArgs().answer_limit == 512 and ModelArgs(max_new_tokens=7).answer_limit == 7
    assert args.generation(seed=3).seed == 3
    with pytest.raises(ValueError, match="--frames"):
        ModelArgs(frames=0).validate()
    with pytest.raises(ValueError, match="--temperature"):
        ModelArgs(temperature=float("nan")).validate()
    with pytest.raises(ValueError, match="--device"):
        ModelArgs(device="tpu").validate()
    with pytest.raises(ValueError, match="--load-4bit"):
        ModelArgs(load_4bit=True, load_8bit=True).validate()


def test_serving_args_defaults_differ_only_where_asked():
    parser = ServingArgs.add_cli_args(argparse.ArgumentParser(), ServingDefaults(port=7860, max_video_seconds=600.0),
                                      "--auth USER:PASS")
    serving = ServingArgs.from_cli_args(parser.parse_args([]))
    assert (serving.host, serving.port, serving.concurrency, serving.queue_size, serving.max_video_seconds) == \
        ("127.0.0.1", 7860, 1, 16, 600.0)
    assert serving.feature_cache_bytes == 1024 * 2**20
    assert serving.threads_per_request is None


def test_threads_per_request_default_to_the_cores_the_concurrency_leaves():
    """Issue 30: concurrent jobs never ask for more torch threads than cores; the flag overrides."""
    assert ServingArgs(concurrency=1).threads(cores=8) == 8
    assert ServingArgs(concurrency=4).threads(cores=8) == 2
    assert ServingArgs(concurrency=16).threads(cores=2) == 1  # at least one
    assert ServingArgs(concurrency=16, threads_per_request=2).threads(cores=2) == 2


@pytest.mark.parametrize("parse, good, bad", [
    (port, [("1", 1), ("65535", 65535)], ["0", "65536", "1.5", ""]),
    (positive_float, [("0.5", 0.5), ("1e3", 1000.0)], ["0", "-1", "nan", "inf", "-inf", "x"]),
    (non_negative_float, [("0", 0.0), ("2.5", 2.5)], ["-0.1", "nan", "inf", "x"]),
])
def test_value_types(parse, good, bad):
    for text, value in good:
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
