"""The Gradio web chat: upload a video, ask LLaVA (with the Mug-STAN video tower) about it.

Usage (``app.py`` at the repository root runs :func:`main`)::

    python app.py --model llava-hf/llava-1.5-7b-hf --stan PATH     # real weights, STAN branch
    python app.py --model llava-hf/llava-1.5-7b-hf                 # no branch: temporal mean mode
    python app.py --demo                                            # offline toy model (CPU, seconds)
    python app.py --demo --host 0.0.0.0 --auth alice:secret         # reachable from the network

See docs/app.md for serving safely and the limits. This file only wires the UI: the
flags come from :mod:`mugstan_chat.entrypoints` (the same as every other front end),
the engine from :meth:`~mugstan_chat.entrypoints.ModelArgs.load_engine`, conversations from
:meth:`mugstan_chat.engine.engine.Engine.open`. Nothing here is global: the model reaches
the callbacks through a :class:`ChatApp` instance (a closure), and each browser
session keeps its own :class:`UserSession` in a ``gr.State``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..engine.threads import use_threads
from ..options import DEFAULT_CANDIDATES, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SELECTION
from ..session_options import DEFAULTS, SessionOptions
from . import ModelArgs, ServingArgs, configure_logging, load_engine_or_report, port_message
from .serving_args import ServingDefaults
from .values import megabytes_to_bytes, positive_float, positive_int

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPOSITORY / "examples"  # the bundled example videos of a checkout (absent from an installed wheel)
MAX_QUESTION_CHARS = 2000  # a question longer than this is refused, not truncated
SESSION_TTL_S = 2 * 3600  # a browser session's conversation and features are dropped after this idle time
CACHE_CLEANUP = (3600, 2 * 3600)  # (every s, older than s): uploaded files gradio deletes
TITLE = "mugstan-chat: video chat with LLaVA + Mug-STAN"
CSS = (".turn-notice {color: #92400e} footer {display: none !important} "
       "#timeline .strip {display: flex; gap: 4px; overflow-x: auto; padding: 2px 0} "
       "#timeline figure {margin: 0; flex: 0 0 auto; text-align: center; font-size: 11px; opacity: 0.45; "
       "border: 2px solid transparent; border-radius: 4px} "
       "#timeline figure.shown {opacity: 1; border-color: #2563eb} "
       "#timeline img {width: 56px; height: 42px; object-fit: cover; display: block; border-radius: 2px}")
THUMB_SIDE = 96  # px of the longer side of a timeline thumbnail
# A moment link (``[01:23](#t=83.0)``, :func:`link_moments`) seeks the player instead of following the anchor.
SEEK_JS = """
<script>
document.addEventListener("click", (event) => {
  const link = event.target.closest && event.target.closest('a[href*="#t="]');
  if (!link) return;
  const seconds = parseFloat(link.getAttribute("href").split("#t=")[1]);
  const player = document.querySelector("#video video");
  if (!player || !isFinite(seconds)) return;
  event.preventDefault();
  event.stopPropagation();
  player.currentTime = seconds;
  player.scrollIntoView({block: "nearest"});
}, true);
</script>
"""


# the Advanced panel's names of the session options, for their errors (the flags' names elsewhere)
PANEL_NAMES = {"frames": "Frames per clip (T)", "clips": "Clips (C)", "clip_times": "--clip-times",
               "select": "Select K", "candidates": "Candidate clips (M)", "selection": "Pick the K by",
               "shortlist": "--shortlist"}


class UploadRejected(Exception):
    """An upload refused before decoding (too large, wrong type); the message is for users."""


@dataclass
class AppSettings:
    """What the web app allows and the defaults of its "Advanced" controls."""

    # the Advanced panel's defaults (mugstan_chat.session_options: the defaults and rules of every front end)
    frames: int = DEFAULTS.frames  # T: default frames per clip
    clips: int | str = DEFAULTS.clips  # C: default clips per video; "auto": as many as the context leaves room for
    clip_times: str = DEFAULTS.clip_times  # each clip's time span before its <image> (docs/chat.md)
    select: int | None = DEFAULTS.select  # K: default clips chosen per question; None: uniform clips
    candidates: int = DEFAULT_CANDIDATES  # M: candidate clips ranked when selecting
    shortlist: int | None = DEFAULTS.shortlist  # S: coarse pass first (--shortlist); None: all M in full
    selection: str = DEFAULT_SELECTION  # how K are picked from the ranked M: topk or coverage (options.SELECTIONS)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # default answer length limit (the slider's range: options.MAX_NEW_TOKENS)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_upload_mb: float = 200.0  # larger uploads are refused before decoding
    max_video_seconds: float = 600.0  # longer videos are refused after reading the header
    concurrency: int = 1  # model jobs (encode or generate) at once
    threads_per_request: int | None = None  # torch intra-op threads of each model job (None: torch's default)
    queue_size: int = 16  # waiting jobs beyond this are refused
    max_sessions: int = 100  # browser sessions whose state is kept (least recently used are dropped)
    examples_dir: Path | None = EXAMPLES_DIR  # bundled example videos; None: no examples

    @property
    def max_upload_bytes(self) -> int:
        return megabytes_to_bytes(self.max_upload_mb)


@dataclass
class UserSession:
    """One browser session: its conversation, its video and the displayed messages."""

    chat: object | None = None  # an engine.Conversation, None until a video is loaded
    video_name: str | None = None
    messages: list[dict] = field(default_factory=list)  # what the Chatbot shows
    stop: threading.Event = field(default_factory=threading.Event)
    last_question: str | None = None  # for "Regenerate"
    last_recorded: bool = False  # the last question is in chat.history (answered, not an error)
    thumbnails: dict = field(default_factory=dict)  # (start, end) -> data URL of the clip's middle frame

    def close(self) -> None:
        """Drops the conversation and the cached video features (called when gradio deletes the state)."""
        self.stop.set()
        self.chat = None


def _error(text: str) -> dict:
    return {"role": "assistant", "content": f"⚠️ {text}"}


def moment_link(text: str, seconds: float) -> str:
    """A markdown link the page's :data:`SEEK_JS` turns into a seek of the player to ``seconds``."""
    return f"[{text}](#t={seconds:.3f})"


def link_moments(text: str, references) -> str:
    """``text`` with every moment it names (:meth:`mugstan_chat.engine.conversation.ChatSession.references`) as a
    :func:`moment_link` to the moment's start."""
    out, position = [], 0
    for ref in sorted(references, key=lambda r: r.offset):
        if ref.offset < position:
            continue  # overlapping matches: the first one wins
        out += [text[position:ref.offset], moment_link(ref.text, ref.start)]
        position = ref.offset + len(ref.text)
    return "".join(out) + text[position:]


def format_stats(stats, chat=None) -> str:
    """One line under an answer: visual tokens and timings of a ``TurnStats`` (and the clips' times, the
    selection and its cost, given the ``ChatSession``)."""
    parts = [f"{stats.visual_tokens} visual tokens"]
    if chat is not None and chat.clip_spans and (len(chat.clip_spans) > 1 or chat.selection is not None):
        from mugstan_chat.timeline import format_time, precise_times

        precise = precise_times(chat.video_info.duration)
        parts.append("clips " + ", ".join(
            moment_link(f"{format_time(s.start, precise)}–{format_time(s.end, precise)}", s.start)
            for s in chat.clip_spans))
    selection = chat.selection if chat is not None else None
    if selection is not None:
        parts.append(f"{len(selection.chosen)} of {selection.candidates} candidates chosen in "
                     f"{selection.rank_ms:.0f} ms" + ("" if selection.cached else
                                                      f" (+ {selection.embed_ms:.0f} ms embedding them)"))
    if stats.cached_features:
        parts.append("video features cached")
    else:
        parts += [f"decode {stats.decode_ms:.0f} ms", f"encode {stats.encode_ms:.0f} ms"]
    if stats.first_token_ms is not None:
        parts.append(f"first token {stats.first_token_ms:.0f} ms")
    parts.append(f"total {stats.total_ms:.0f} ms")
    parts.append(f"{stats.new_tokens} tokens")
    if stats.clipped:
        parts.append(f"answer limit clipped to {stats.max_new_tokens} by the context")
    return "*" + " · ".join(parts) + "*"


class ChatApp:
    """The callbacks of the page. Holds the engine; all per-user data lives in ``UserSession``.

    Every callback takes the session state and returns it, so it can be tested
    without a browser or a server (tests/entrypoints/test_web.py). The engine's feature cache is every
    visitor's: the same bytes with the same settings are decoded and encoded once.
    """

    def __init__(self, engine, settings: AppSettings | None = None):
        self.engine = engine
        model = engine.model.settings
        self.settings = settings or AppSettings(frames=model.frames, clips=model.clips)

    @property
    def feature_cache(self):
        """The engine's cache of encoded videos (shared by every visitor)."""
        return self.engine.features

    # ------------------------------------------------------------------ facts for the page

    @property
    def temporal_modes(self) -> list[str]:
        """Modes a session may choose: "stan" only when a branch is loaded."""
        return list(self.engine.model.tower.available_modes)

    def notice(self) -> str:
        """Markdown warning shown at the top of the page ('' when nothing to say)."""
        from mugstan_chat.llava.loader import MEAN_FALLBACK_NOTICE

        notes = list(self.engine.notices)
        if "stan" not in self.temporal_modes and MEAN_FALLBACK_NOTICE not in notes:
            notes.append("no STAN branch loaded: temporal mean mode only (training-free baseline)")
        return "\n".join(f"⚠️ **Note:** {note}" for note in notes)

    def model_line(self) -> str:
        s = self.engine.model.settings
        quant = f", {s.quantization}" if s.quantization else ""
        return (f"Model: `{s.model}` · temporal: `{s.temporal}`" + (f" (branch `{s.stan}`)" if s.stan else "")
                + f" · {s.device}, {s.dtype}{quant}")

    # ------------------------------------------------------------------ callbacks

    def load_video(self, video: str | None, frames: int, clips: int, temporal: str,
                   state: UserSession | None, select: int | None = None, candidates: int | None = None,
                   auto_clips: bool = False, selection: str | None = None) -> tuple[UserSession, list[dict], str]:
        """A new video (upload, example, removal) or new video settings: a new session.

        ``select`` K > 0 chooses K of ``candidates`` clips per question by ``selection`` (topk or coverage;
        default the app's) (0 or None: ``clips`` uniform clips, or as many as fit with ``auto_clips``). Returns (state, chatbot messages, video status markdown).
        """
        from mugstan_chat.video import VideoDecodeError

        use_threads(self.settings.threads_per_request)  # gradio's worker thread: the setting is per thread
        if state is not None:
            state.close()
        state = UserSession()
        if not video:
            return state, state.messages, "No video loaded: upload one or pick an example."
        path = os.fspath(video)
        name = os.path.basename(path)
        try:
            self._check_upload(path)
            # the header's limits are checked on a miss only: a hit's bytes passed them when first encoded
            select = int(select) if select else None
            chat, cached = self._new_chat(path, int(frames), "auto" if auto_clips and not select else int(clips),
                                          temporal, before_decoding=lambda: self._check_header(path), select=select,
                                          candidates=int(candidates or self.settings.candidates) if select else None,
                                          selection=(selection or self.settings.selection) if select else None)
            info = chat.video_info
        except (UploadRejected, VideoDecodeError, ValueError) as error:
            message = str(error).replace(path, name)  # never show server paths
            logger.info("video refused: %s", message)
            state.messages.append(_error(f"Cannot use this video: {message}"))
            return state, state.messages, f"⚠️ **{name}** was not loaded."
        except Exception as error:  # noqa: BLE001 -- the app must keep serving (OOM included)
            text = self._failure_text(error, "encoding the video")
            state.messages.append(_error(text))
            return state, state.messages, f"⚠️ **{name}** was not loaded."
        state.chat, state.video_name = chat, name
        shown = (f"{chat.clips} of {chat.candidates} candidate clips chosen per question" if chat.selects
                 else f"{chat.clips} clip(s)")
        status = (f"**{name}**: {info.duration:.1f} s, {info.width}x{info.height} · {shown} x "
                  f"{chat.frames} frames → {chat.clips * chat.tokens_per_image} visual tokens · temporal `{temporal}`"
                  + (" · features from the cache" if cached else "")
                  + (f"\n\n⚠️ {chat.selection_notice}" if chat.selection_notice else ""))
        return state, state.messages, status

    def timeline(self, state: UserSession | None) -> str:
        """The strip under the player: one thumbnail per clip (every candidate when selecting) with its
        times; the clips the last answer was based on are marked (class ``shown``)."""
        chat = state.chat if state is not None else None
        if chat is None:
            return ""
        try:
            return self._timeline(state, chat)
        except Exception:  # noqa: BLE001 -- a strip that cannot be drawn must not break the chat
            logger.exception("timeline")
            return ""

    def _timeline(self, state: UserSession, chat) -> str:
        import html

        from mugstan_chat.timeline import format_time, precise_times

        shown = {(s.start, s.end) for s in chat.clip_spans}
        spans = chat.candidate_spans if chat.selects else [(s.start, s.end) for s in chat.clip_spans]
        info = chat.video_info
        precise = precise_times(info.duration)
        self._thumbnails(state, chat.video_path, spans, chat.frame_times())
        figures = []
        for i, (start, end) in enumerate(spans):
            css = "clip shown" if (start, end) in shown else "clip"
            label = f"{format_time(start, precise)}–{format_time(end, precise)}"
            title = html.escape(f"{'candidate' if chat.selects else 'clip'} {i + 1}: {label}"
                                + (" (shown to the model)" if (start, end) in shown else ""))
            figures.append(f'<figure class="{css}" title="{title}"><img alt="{title}" '
                           f'src="{state.thumbnails[(start, end)]}"><figcaption>{label}</figcaption></figure>')
        if chat.selects:
            what = (f"{len(shown)} of {len(spans)} candidates chosen for the last question" if chat.selection
                    else f"{len(spans)} candidates: each question chooses {chat.clips}")
        else:
            what = f"{len(spans)} clip(s)"
        return f'<div class="timeline-head">Timeline · {what}</div><div class="strip">{"".join(figures)}</div>'

    @staticmethod
    def _thumbnails(state: UserSession, path: str, spans, times) -> None:
        """Adds the middle frame of every span not drawn yet, as a small inline PNG."""
        import base64
        import io

        from PIL import Image

        from mugstan_chat.video import read_frames

        missing = [span for span in spans if span not in state.thumbnails]
        if not missing:
            return
        middles = [times.frame_at((a + b) / 2) for a, b in missing]  # by presentation time
        frames = read_frames(path, middles)
        for span, frame in zip(missing, frames):
            image = Image.fromarray(frame)
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            state.thumbnails[span] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def respond(self, question: str, state: UserSession | None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                temperature: float = 0.0, top_p: float = 1.0) -> Iterator[tuple[list[dict], UserSession, str]]:
        """Streams the answer to ``question``; yields (chatbot messages, state, textbox value)."""
        state = state or UserSession()
        question = (question or "").strip()
        if not question:
            yield state.messages, state, ""
            return
        state.messages.append({"role": "user", "content": question})
        if len(question) > MAX_QUESTION_CHARS:
            state.messages.append(_error(f"The question is too long ({len(question)} characters; "
                                         f"the limit is {MAX_QUESTION_CHARS})."))
        elif state.chat is None:
            state.messages.append(_error("Upload a video first (or pick an example)."))
        else:
            yield from self._answer(state, question, max_new_tokens, temperature, top_p)
            return
        yield state.messages, state, ""

    def regenerate(self, state: UserSession | None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                   top_p: float = 1.0) -> Iterator[tuple[list[dict], UserSession, str]]:
        """Answers the last question again (its previous answer is forgotten)."""
        state = state or UserSession()
        if state.chat is None or state.last_question is None:
            yield state.messages, state, ""
            return
        if state.last_recorded:
            state.chat.undo()
            state.last_recorded = False
        last_user = max(i for i, m in enumerate(state.messages) if m["role"] == "user")
        del state.messages[last_user + 1:]
        yield from self._answer(state, state.last_question, max_new_tokens, temperature, top_p)

    def clear(self, state: UserSession | None) -> tuple[UserSession, list[dict]]:
        """Forgets the conversation; keeps the video and its features."""
        state = state or UserSession()
        if state.chat is not None:
            state.chat.reset()
        state.messages = []
        state.last_question, state.last_recorded = None, False
        return state, state.messages

    @staticmethod
    def stop(state: UserSession | None) -> None:
        """Asks the running answer of this session to stop (the partial answer is kept)."""
        if state is not None:
            state.stop.set()

    # ------------------------------------------------------------------ helpers

    def _check_upload(self, path: str) -> None:
        """Size and type checks, before hashing or decoding."""
        from mugstan_chat.video import SUPPORTED_EXTENSIONS

        if not os.path.isfile(path):
            raise UploadRejected("the file is missing")
        size = os.path.getsize(path)
        if size > self.settings.max_upload_bytes:
            raise UploadRejected(f"the file is {size / 2**20:.1f} MB; the limit is {self.settings.max_upload_mb:g} MB")
        if not path.lower().endswith(SUPPORTED_EXTENSIONS):
            raise UploadRejected(f"unsupported file type; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")

    def _check_header(self, path: str) -> None:
        """The header's (duration, resolution) limits, before decoding."""
        from mugstan_chat.video import probe_video

        probe_video(path, self.video_limits)

    def _new_chat(self, path: str, frames: int, clips: int | str, temporal: str, before_decoding=None,
                  select: int | None = None, candidates: int | None = None, selection: str | None = None):
        """A conversation with its own temporal mode, and whether its features came from the shared cache.

        On a miss it decodes and encodes the video now and stores the features for the next visitor.
        """
        if temporal not in self.temporal_modes:
            raise ValueError(f"temporal mode {temporal!r} is not available (loaded: {', '.join(self.temporal_modes)})")
        options = SessionOptions(frames=frames, clips=None if select else clips, clip_times=self.settings.clip_times,
                                 select=select, candidates=candidates, selection=selection,
                                 shortlist=self._shortlist(select, candidates)).validate(PANEL_NAMES.get)
        chat = self.engine.open(path, options, temporal=temporal, limits=self.video_limits,
                                before_decoding=before_decoding)
        return chat, chat.cached

    def _shortlist(self, select: int | None, candidates: int | None) -> int | None:
        """``--shortlist`` where it fits the page's K and M (the sliders can leave it outside K <= S < M)."""
        shortlist = self.settings.shortlist
        if not select or shortlist is None or not select <= shortlist < (candidates or 0):
            return None
        return shortlist

    @property
    def video_limits(self):
        """The limits every upload is checked against, before and while decoding."""
        from mugstan_chat.video import VideoLimits

        return VideoLimits(max_seconds=self.settings.max_video_seconds)

    def _answer(self, state: UserSession, question: str, max_new_tokens: int, temperature: float,
                top_p: float) -> Iterator[tuple[list[dict], UserSession, str]]:
        from mugstan_chat.engine.turns import ConversationTooLong, GenerationSettings

        use_threads(self.settings.threads_per_request)  # passed on to the generate thread this step starts
        chat = state.chat
        state.stop.clear()
        state.last_question, state.last_recorded = question, False
        answer = {"role": "assistant", "content": ""}
        state.messages.append(answer)
        yield state.messages, state, ""
        pieces: list[str] = []
        turns_before = chat.turn_count
        try:
            generation = GenerationSettings(
                max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                repetition_penalty=self.settings.repetition_penalty).validate()
            stream = chat.ask_stream(question, generation)
            with contextlib.closing(stream):  # closing ends generation early (Stop)
                for piece in stream:
                    pieces.append(piece)
                    answer["content"] = "".join(pieces)
                    yield state.messages, state, ""
                    if state.stop.is_set():
                        break
            stopped = state.stop.is_set()
            state.last_recorded = chat.turn_count > turns_before
            text = "".join(pieces).strip()
            text = link_moments(text, chat.references(text)) if text else "(no answer)"
            if stopped:
                text += " *(stopped)*"
            answer["content"] = (text + "\n\n" + format_stats(chat.last_stats, chat) if state.last_recorded
                                 else text)
        except ConversationTooLong:
            answer["content"] = ("⚠️ This conversation no longer fits the model's context. Press **Clear** to "
                                 "start a new conversation about the same video.")
        except ValueError as error:
            answer["content"] = f"⚠️ {error}"
        except Exception as error:  # noqa: BLE001 -- report, keep serving; the next request must work
            answer["content"] = "⚠️ " + self._failure_text(error, "answering")
        yield state.messages, state, ""

    def _failure_text(self, error: Exception, doing: str) -> str:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of memory while %s", doing)
            return (f"The GPU ran out of memory while {doing}. Try fewer frames or clips, or a shorter answer; "
                    "the next request will run normally.")
        logger.exception("error while %s", doing)
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        return f"Something went wrong while {doing} ({type(error).__name__}: {detail}). Please try again."


def build_demo(engine, settings: AppSettings | None = None):
    """The page, wired to a :class:`ChatApp` on ``engine``; returns the ``gr.Blocks``.

    Queueing and launching are the caller's (``main`` does both).
    """
    import gradio as gr

    from mugstan_chat.options import CANDIDATES, CLIPS, FRAMES, MAX_NEW_TOKENS, SELECT, SELECTIONS, TEMPERATURE, TOP_P

    def slider(allowed, value, label):  # the ranges argparse checked the defaults against
        return gr.Slider(allowed.low, allowed.high, value=value, step=allowed.step, label=label)

    app = ChatApp(engine, settings)
    settings = app.settings
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=lambda s: s and s.close())
        gr.Markdown(f"## {TITLE}\n{app.model_line()}")
        notice = app.notice()
        gr.Markdown(notice, visible=bool(notice), elem_classes=["turn-notice"], elem_id="notice")
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="Video", sources=["upload"], format=None, include_audio=True,
                                 height=260, elem_id="video")
                video_status = gr.Markdown("No video loaded: upload one or pick an example.", elem_id="video-status")
                timeline = gr.HTML("", elem_id="timeline")
                examples = sorted(settings.examples_dir.glob("*.mp4")) if settings.examples_dir else []
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[video], label="Example videos")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot", feedback_options=None,
                                     buttons=["copy", "copy_all"])
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the video and press Enter", show_label=False,
                                          scale=5, max_lines=4, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                frames = slider(FRAMES, settings.frames, "Frames per clip (T)")
                clips = slider(CLIPS, settings.clips if settings.clips != "auto" else 1, "Clips (C)")
                auto_clips = gr.Checkbox(settings.clips == "auto", label="Auto clips (as many as the context holds)",
                                         elem_id="auto-clips")
            with gr.Row():
                select = gr.Slider(0, SELECT.high, value=settings.select or 0, step=1, elem_id="select",
                                   label="Select K clips per question (0 = uniform clips)")
                candidates = slider(CANDIDATES, settings.candidates, "Candidate clips (M) to rank")
                selection = gr.Radio(list(SELECTIONS), value=settings.selection, elem_id="selection",
                                     label="Pick the K by", info="topk: the K best matches; coverage: relevance "
                                     "balanced with coverage of the video")
                temporal = gr.Radio(app.temporal_modes, value=engine.model.settings.temporal, label="Temporal mode",
                                    interactive=len(app.temporal_modes) > 1,
                                    info="changing frames, clips or mode re-encodes the video and starts a new chat")
            with gr.Row():
                max_new = slider(MAX_NEW_TOKENS, settings.max_new_tokens, "Max new tokens")
                temperature = slider(TEMPERATURE, settings.temperature, "Temperature (0 = greedy)")
                top_p = slider(TOP_P, settings.top_p, "Top-p")

        model_job = {"concurrency_limit": settings.concurrency, "concurrency_id": "model"}
        hidden = {"api_visibility": "undocumented"}  # duplicates of a documented endpoint
        video_inputs = [video, frames, clips, temporal, state, select, candidates, auto_clips, selection]
        video_outputs = [state, chatbot, video_status]
        draw = {"fn": app.timeline, "inputs": [state], "outputs": [timeline], "queue": False, **hidden}
        video.change(app.load_video, video_inputs, video_outputs, api_name="load_video", **model_job).then(**draw)
        for control in (frames, clips, select, candidates):
            control.release(app.load_video, video_inputs, video_outputs, **model_job, **hidden).then(**draw)
        for control in (temporal, auto_clips, selection):
            control.input(app.load_video, video_inputs, video_outputs, **model_job, **hidden).then(**draw)
        ask = {"inputs": [question, state, max_new, temperature, top_p], "outputs": [chatbot, state, question],
               "show_progress": "minimal", **model_job}
        question.submit(app.respond, api_name="ask", **ask).then(**draw)
        send.click(app.respond, **ask, **hidden).then(**draw)
        regenerate.click(app.regenerate, [state, max_new, temperature, top_p], [chatbot, state, question],
                         api_name="regenerate", show_progress="minimal", **model_job).then(**draw)
        clear.click(app.clear, [state], [state, chatbot], api_name="clear", queue=False)
        chatbot.clear(app.clear, [state], [state, chatbot], queue=False, **hidden)  # its own trash button
        stop.click(app.stop, [state], None, api_name="stop", queue=False)
    return demo


# ---------------------------------------------------------------------- command line


PROG = "app.py"
AUTH_HINT = "--auth USER:PASS (or set $MUGSTAN_APP_AUTH)"
SERVING_DEFAULTS = ServingDefaults(port=7860, max_video_seconds=600.0)


def build_parser() -> argparse.ArgumentParser:
    """The shared model and server flags (the same as ``mugstan-chat serve``), plus the web app's own."""
    parser = argparse.ArgumentParser(prog=PROG, description="Web chat about videos: LLaVA with a Mug-STAN video tower.")
    ModelArgs.add_cli_args(parser)
    ServingArgs.add_cli_args(parser, SERVING_DEFAULTS, AUTH_HINT)
    web = parser.add_argument_group("web app")
    web.add_argument("--share", action="store_true", help="public gradio.live link (off by default; needs --auth)")
    web.add_argument("--auth", default=None, metavar="USER:PASS",
                     help="require a login (default: $MUGSTAN_APP_AUTH if set)")
    web.add_argument("--max-upload-mb", type=positive_float, default=200.0, help="largest upload (default: %(default)s)")
    web.add_argument("--max-sessions", type=positive_int, default=100,
                     help="browser sessions whose chat state is kept (default: %(default)s)")
    web.add_argument("--no-examples", action="store_true", help="do not offer the bundled example videos")
    return parser


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` as gradio's (user, password), or None; ValueError when malformed."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS")
    return user, password


def _blocked_paths(model_args: ModelArgs) -> list[str]:
    """Weights never go through the file route, even if a folder above them were allowed."""
    paths = [p for p in (model_args.model, model_args.stan) if p and os.path.exists(p)]
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        paths.append(HF_HUB_CACHE)
    except ImportError:
        pass
    return [str(Path(p).resolve()) for p in paths]


def parse_args(argv: list[str] | None = None):
    """(model args, serving args, login, the namespace); every problem is a usage error (exit 2) here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth or os.environ.get("MUGSTAN_APP_AUTH"))
        model_args = ModelArgs.from_cli_args(args)
        model_args.generation()
        serving = ServingArgs.from_cli_args(args).validate(authenticated=auth is not None, auth_hint=AUTH_HINT,
                                                           public=args.share)
    except ValueError as error:
        parser.error(str(error))
    return model_args, serving, auth, args


def main(argv: list[str] | None = None) -> int:
    """Loads the model and serves the page until interrupted; returns the exit status."""
    model_args, serving, auth, args = parse_args(argv)
    configure_logging(model_args.debug)
    logger.setLevel(logging.INFO)
    from ..engine.feature_cache import FeatureCache

    engine = load_engine_or_report(model_args, PROG, FeatureCache(megabytes_to_bytes(serving.feature_cache_mb)))
    if engine is None:
        return 1
    examples_dir = None if args.no_examples or not EXAMPLES_DIR.is_dir() else EXAMPLES_DIR
    settings = AppSettings(
        frames=model_args.frames, clips=model_args.clips, clip_times=model_args.clip_times, select=model_args.select,
        candidates=model_args.candidate_count or AppSettings.candidates,
        selection=model_args.selection or AppSettings.selection, shortlist=model_args.shortlist, max_new_tokens=model_args.answer_limit,
        temperature=model_args.temperature, top_p=model_args.top_p, repetition_penalty=model_args.repetition_penalty,
        max_upload_mb=args.max_upload_mb, max_video_seconds=serving.max_video_seconds,
        concurrency=serving.concurrency, threads_per_request=serving.threads(), queue_size=serving.queue_size,
        max_sessions=args.max_sessions,
        examples_dir=examples_dir)
    demo = build_demo(engine, settings)
    # gradio counts an event as queued until a worker takes it: room for the running ones too
    demo.queue(max_size=settings.queue_size + settings.concurrency, default_concurrency_limit=settings.concurrency)
    try:
        demo.launch(server_name=serving.host, server_port=serving.port, share=args.share, auth=auth,
                    max_file_size=settings.max_upload_bytes, state_session_capacity=settings.max_sessions,
                    allowed_paths=[str(examples_dir)] if examples_dir else [],
                    blocked_paths=_blocked_paths(model_args), show_error=False, ssr_mode=False, footer_links=[],
                    css=CSS, head=SEEK_JS, quiet=False)
    except OSError as error:  # the port was taken while the model loaded
        if model_args.debug:
            raise
        print(f"{PROG}: error: {port_message(serving.host, serving.port, ' '.join(str(error).split())[:200])}",
              file=sys.stderr)
        return 1
    return 0


