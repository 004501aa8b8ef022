"""Driving the web app's callbacks (:class:`mugstan_chat.entrypoints.web.ChatApp`) as the page does, for tests."""

from __future__ import annotations


def load(app, video, state=None, frames=4, clips=1, temporal="stan"):
    return app.load_video(video, frames, clips, temporal, state)


def ask(app, state, question, max_new_tokens=12):
    """Runs the streaming callback to the end; returns (state, every yielded answer text)."""
    texts = []
    for messages, state, box in app.respond(question, state, max_new_tokens, 0.0, 1.0):
        assert box == ""  # the question box is cleared
        texts.append(messages[-1]["content"])
    return state, texts
