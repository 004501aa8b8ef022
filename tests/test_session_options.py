"""mugstan_chat.session_options: one record of how a session reads its video, its defaults and rules written once.

Every front end builds one (flags, a request, the web page's panel, an eval task) and validates it with its own
names for the fields; the rule and the default are the same everywhere."""

from __future__ import annotations

import argparse
import dataclasses

import pytest


from mugstan_chat.entrypoints import ModelArgs
from mugstan_chat.evaluation.runner import EvalSettings
from mugstan_chat.options import DEFAULT_CANDIDATES, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SELECTION
from mugstan_chat.entrypoints.openai.planning import ServiceConfig, api_name
from mugstan_chat.session_options import DEFAULTS, OptionError, SessionOptions, flag_name
from mugstan_chat.engine.turns import GenerationSettings

BAD = [  # (options, the field named, words of the message)
    (SessionOptions(frames=0), "frames", "frames"),
    (SessionOptions(clips=9), "clips", "clips"),
    (SessionOptions(clip_times="sometimes"), "clip_times", "must be one of"),
    (SessionOptions(candidates=16), "candidates", "needs"),
    (SessionOptions(selection="coverage"), "selection", "needs"),
    (SessionOptions(shortlist=4), "shortlist", "needs"),
    (SessionOptions(select=2, clips=3), "clips", "shows K clips"),
    (SessionOptions(select=2, clips="auto"), "clips", "shows K clips"),
    (SessionOptions(select=4, candidates=3), "candidates", "at least as many"),
    (SessionOptions(select=2, candidates=8, shortlist=8), "shortlist", "K <= S < M"),
    (SessionOptions(select=2, selection="best"), "selection", "must be one of"),
]


@pytest.mark.parametrize("options, field, words", BAD)
def test_each_rule_names_the_field_in_the_front_ends_words(options, field, words):
    for name in (flag_name, api_name, lambda f: f"<{f}>"):
        with pytest.raises(OptionError) as caught:
            options.validate(name)
        assert caught.value.field == field and words in str(caught.value) and name(field) in str(caught.value)


def test_what_holds_and_what_a_session_is_given():
    assert DEFAULTS.validate() is DEFAULTS
    chosen = SessionOptions(select=3).validate()
    assert (chosen.candidate_count, chosen.strategy) == (DEFAULT_CANDIDATES, DEFAULT_SELECTION)
    assert chosen.session_kwargs() == {"frames": 8, "clips": None, "clip_times": "auto", "select": 3,
                                       "candidates": DEFAULT_CANDIDATES, "selection_strategy": None, "shortlist": None}
    assert SessionOptions(select=2, clips=None).validate().session_kwargs()["clips"] is None
    assert SessionOptions(clips="auto").validate().session_kwargs()["clips"] == "auto"
    assert (SessionOptions().candidate_count, SessionOptions().strategy) == (None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.frames = 4


def test_every_front_end_takes_its_defaults_from_one_place():
    parser = ModelArgs.add_cli_args(argparse.ArgumentParser())
    flags = ModelArgs.from_cli_args(parser.parse_args([]))
    assert flags.session_options() == DEFAULTS  # argparse defaults are the record's
    for field in ("frames", "clips", "clip_times", "select", "shortlist"):
        assert getattr(app_settings(), field) == getattr(DEFAULTS, field), field
    assert ServiceConfig("x").frames == EvalSettings().frames == DEFAULTS.frames
    assert ServiceConfig("x").clips == DEFAULTS.clips and ServiceConfig("x").clip_times == DEFAULTS.clip_times
    assert ServiceConfig("x").candidates == app_settings().candidates == DEFAULT_CANDIDATES
    assert ServiceConfig("x").max_new_tokens == GenerationSettings().max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert app_settings().max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert flags.answer_limit == DEFAULT_MAX_NEW_TOKENS


def test_the_web_panel_refuses_in_its_own_words(app_module):
    with pytest.raises(OptionError, match="Select K 4 needs at least as many Candidate clips"):
        SessionOptions(select=4, candidates=3).validate(app_module.PANEL_NAMES.get)


def app_settings():
    from mugstan_chat.entrypoints.web import AppSettings

    return AppSettings()
