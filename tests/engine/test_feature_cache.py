"""The shared feature cache in the web app's callbacks and the CLI's ``chat``, on the demo model.

Encodes and decodes are counted (the tower's forward calls, the video reader's calls),
never timed; the server's own use of the cache is in tests/entrypoints/openai/test_worker.py.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import mugstan_chat.engine.conversation as chat_module
from mugstan_chat.benchmarks import feature_cache as benchmark_feature_cache
from mugstan_chat.engine.conversation import ChatSession
from mugstan_chat.entrypoints.cli import main as cli_main
from mugstan_chat.engine.engine import Engine
from mugstan_chat.engine.feature_cache import FeatureCache, file_sha256, model_identity, session_key
from mugstan_chat.entrypoints.values import megabytes_to_bytes
from mugstan_chat.entrypoints import web as app_module
from web_driver import ask as _ask, load as _load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ONE_VIDEO_BYTES = 16 * 64 * 4  # demo, 1 clip: visual tokens x text width x fp32


@pytest.fixture(scope="module")
def chat_model(demo_chat_model):
    return demo_chat_model(8)  # the loader's default T


@pytest.fixture()
def reads(monkeypatch):
    """Paths the video reader decoded during the test."""
    seen = []
    real_reader = chat_module.load_video_clips

    def counting_reader(*args, **kwargs):
        seen.append(Path(args[0]).name)
        return real_reader(*args, **kwargs)

    monkeypatch.setattr(chat_module, "load_video_clips", counting_reader)
    return seen


def _app(chat_model, cache_mb: float = 64.0):
    settings = app_module.AppSettings(max_new_tokens=8, max_upload_mb=1.0, max_video_seconds=60.0)
    return app_module.ChatApp(Engine(chat_model, feature_cache=FeatureCache(megabytes_to_bytes(cache_mb))), settings)


def test_two_visitors_picking_the_same_example_share_one_decode_and_encode(chat_model, reads, monkeypatch):
    import mugstan_chat.video as video_module

    probes, real_probe = [], video_module.probe_video
    monkeypatch.setattr(video_module, "probe_video", lambda *a, **k: probes.append(a[0]) or real_probe(*a, **k))
    app, example = _app(chat_model), str(EXAMPLES / "red_triangle_growing.mp4")
    calls = chat_model.tower.calls
    first, _, first_status = _load(app, example)
    first, first_texts = _ask(app, first, "what happens?")
    second, _, second_status = _load(app, example)  # a new browser session: state None
    assert len(reads) == 1 and chat_model.tower.calls == calls + 1  # one decode, one encode for both
    assert "from the cache" not in first_status and "from the cache" in second_status
    assert first_status.split("·")[0] == second_status.split("·")[0]  # duration and size, from the cached info
    assert len(probes) == 1  # the hit's bytes passed the header limits when first encoded
    second, second_texts = _ask(app, second, "what happens?")
    answer, stats_line = second_texts[-1].rsplit("\n\n", 1)
    assert answer == first_texts[-1].rsplit("\n\n", 1)[0]  # greedy: the cached features give the same answer
    assert "video features cached" in stats_line and "decode" not in stats_line
    assert "decode" in first_texts[-1].rsplit("\n\n", 1)[1]  # the first visitor paid, and was told so
    assert second.chat.last_stats.cached_features and second.chat.last_stats.encode_ms == 0
    assert app.feature_cache.stats()["hits"] == 1 and len(reads) == 1 and chat_model.tower.calls == calls + 1


def test_same_bytes_under_another_name_hit(chat_model, reads, tmp_path):
    app = _app(chat_model)
    original = EXAMPLES / "blue_triangle_left.mp4"
    renamed = tmp_path / "my holiday.mp4"
    shutil.copyfile(original, renamed)
    _load(app, str(original))
    state, _, status = _load(app, str(renamed))
    assert reads == ["blue_triangle_left.mp4"] and "from the cache" in status
    assert "my holiday.mp4" in status and str(tmp_path) not in status  # the user's name, never a server path


def test_other_settings_or_bytes_miss(chat_model, reads, tmp_path):
    app = _app(chat_model)
    example = str(EXAMPLES / "red_triangle_shrinking.mp4")
    calls = chat_model.tower.calls
    _load(app, example, frames=4, clips=1, temporal="stan")
    _load(app, example, frames=8, clips=1, temporal="stan")
    _load(app, example, frames=4, clips=2, temporal="stan")
    _load(app, example, frames=4, clips=1, temporal="mean")
    other = tmp_path / "red_triangle_shrinking.mp4"  # same name, other bytes
    shutil.copyfile(EXAMPLES / "red_triangle_growing.mp4", other)
    _load(app, str(other), frames=4, clips=1, temporal="stan")
    assert len(reads) == 5 and chat_model.tower.calls == calls + 5
    assert app.feature_cache.stats()["hits"] == 0 and len(app.feature_cache) == 5
    _, _, status = _load(app, example, frames=8, clips=1, temporal="stan")  # each setting is kept apart
    assert len(reads) == 5 and "from the cache" in status


def test_least_recently_used_video_is_evicted_by_bytes(chat_model, reads):
    app = _app(chat_model, cache_mb=1.5 * ONE_VIDEO_BYTES / 2**20)  # room for one video, not two
    a, b = str(EXAMPLES / "red_triangle_growing.mp4"), str(EXAMPLES / "blue_triangle_right.mp4")
    for video in (a, a, b, a):
        _load(app, video)
    assert reads == [Path(a).name, Path(b).name, Path(a).name]  # b pushed a out; a pushed b out
    stats = app.feature_cache.stats()
    assert (stats["hits"], stats["evictions"], stats["entries"], stats["bytes"]) == (1, 2, 1, ONE_VIDEO_BYTES)


def test_zero_megabytes_turns_the_cache_off(chat_model, reads):
    app = _app(chat_model, cache_mb=0)
    example = str(EXAMPLES / "red_triangle_growing.mp4")
    for _ in range(2):
        _load(app, example)
    assert len(reads) == 2 and len(app.feature_cache) == 0


def test_undecodable_video_is_not_cached_and_the_app_goes_on(chat_model, tmp_path):
    app = _app(chat_model)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    state, messages, status = _load(app, str(broken))
    assert state.chat is None and "not loaded" in status and len(app.feature_cache) == 0
    state, _, status = _load(app, str(EXAMPLES / "red_triangle_growing.mp4"), state)
    assert state.chat is not None and len(app.feature_cache) == 1


def test_key_holds_everything_that_changes_the_features(chat_model, tmp_path):
    video = EXAMPLES / "red_triangle_growing.mp4"
    digest = file_sha256(video)
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(video, copy)
    assert file_sha256(copy) == digest and file_sha256(EXAMPLES / "blue_triangle_left.mp4") != digest

    def key(**kwargs):
        return session_key(ChatSession(Engine(chat_model), video, prepare=False, **{"frames": 4, **kwargs}), digest)

    base = key()
    variants = [key(frames=8), key(clips=2), key(temporal="mean"), key(start=0.5), key(end=1.5),
                key(frames_as_images=True)]
    assert len({base, *variants}) == 1 + len(variants) and key() == base
    assert base.model == model_identity(chat_model) and "demo" in base.model


def test_cli_chat_returns_to_a_video_from_the_cache(reads, monkeypatch, capsys, tmp_path):
    a, b = EXAMPLES / "red_triangle_growing.mp4", EXAMPLES / "blue_triangle_left.mp4"
    script = f"what happens?\n/reset\nwhy?\n/video {b}\nwhat?\n/video {a}\nand now?\n/video {tmp_path}/none.mp4\nok?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli_main(["chat", str(a), "--demo", "--frames", "4", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert reads == [a.name, b.name]  # /reset kept the features; returning to a came from the cache
    assert err.count("features from the cache") == 1 and "none.mp4" in err
    assert sum(line.startswith("assistant> ") for line in out.splitlines()) == 5  # the bad /video did not stop it


def test_cache_size_option_is_checked_before_the_model_loads(chat_model, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        app_module.main(["--demo", "--feature-cache-mb", "-1"])
    assert exit_info.value.code == 2 and "--feature-cache-mb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["chat", "video.mp4", "--demo", "--feature-cache-mb", "nan"])
    assert exit_info.value.code == 2 and "--feature-cache-mb" in capsys.readouterr().err
    assert app_module.build_parser().parse_args(["--demo"]).feature_cache_mb == 1024.0
    given = []  # the engine main() would load: its feature cache is --feature-cache-mb's size
    monkeypatch.setattr(app_module, "load_engine_or_report", lambda args, prog, cache: given.append(cache))
    assert app_module.main(["--demo", "--feature-cache-mb", "2"]) == 1 and given[0].max_bytes == 2 * 2**20


def test_benchmark_script_measures_a_hit_against_a_follow_up(tmp_path, capsys):
    out = tmp_path / "cache.json"
    assert benchmark_feature_cache.main(["--demo", "--runs", "2", "--new-tokens", "2", "--frames", "2",
                                         "--out", str(out)]) == 0  # it raises unless A misses and B hits
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["model"] == "demo"
    for row in result["rows"]:
        assert row["new_vs_followup"] == pytest.approx(row["new_session_ttft_ms"] / row["followup_ttft_ms"])
        assert row["miss_load_ms"] > 0 and row["hit_load_ms"] > 0
    assert "target: new-session TTFT" in capsys.readouterr().out
