"""``ModelArgs``: the model, video and generation settings every front end takes, checked once.

The anchor is vLLM's ``EngineArgs``: one dataclass that adds its flags to any parser
(:meth:`ModelArgs.add_cli_args`), is built from the parsed namespace
(:meth:`ModelArgs.from_cli_args`), validates itself in one place (:meth:`ModelArgs.validate`,
which the argparse types also apply flag by flag) and loads the model (:meth:`ModelArgs.load`).
``mugstan-chat ask|chat|eval|serve`` and ``app.py`` all take these flags from here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..options import (CANDIDATES, CLIPS, CLIP_TIMES, DEFAULT_CANDIDATES, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL,
                       DEFAULT_SELECTION, FRAMES, MAX_NEW_TOKENS, REPETITION_PENALTY, SELECT, SELECTIONS, SHORTLIST,
                       TEMPERATURE, TOP_P, Range)

from ..engine.remote_llm import DEFAULT_TIMEOUT_S as DEFAULT_LLM_TIMEOUT_S
from ..session_options import DEFAULTS, SessionOptions
from .values import llm_url, non_empty, positive_float

DEMO_MAX_NEW_TOKENS = 48  # the demo's answers are noise; keep them short unless asked otherwise
TEMPORAL_CHOICES = ("stan", "mean")
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def span(allowed: Range) -> str:
    """``low..high`` of a range, for help texts."""
    return f"{allowed.low:g}..{allowed.high:g}"


@dataclass
class ModelArgs:
    """Which model to load and how it answers by default.

    Field names are the flags' (``--load-4bit`` -> ``load_4bit``).
    """

    model: str = DEFAULT_MODEL  # LLaVA hub id or local directory
    stan: str | None = None  # STAN branch directory or hub id; None: 'stan' falls back to 'mean'
    temporal: str = "stan"  # the tower's default mode: 'stan' (fused branch) or 'mean' (training-free baseline)
    demo: bool = False  # the tiny offline model with random weights
    allow_resolution_mismatch: bool = False  # accept a branch trained at another image size
    device: str = "auto"
    dtype: str = "auto"
    load_4bit: bool = False  # bitsandbytes, language model only
    load_8bit: bool = False
    # the session options (mugstan_chat.session_options.SessionOptions: its defaults, its rules)
    frames: int = DEFAULTS.frames
    clips: int | str = DEFAULTS.clips
    clip_times: str = DEFAULTS.clip_times
    select: int | None = DEFAULTS.select
    candidates: int | None = DEFAULTS.candidates
    selection: str | None = DEFAULTS.selection
    shortlist: int | None = DEFAULTS.shortlist
    retrieval_clip: str | None = None  # CLIP checkpoint whose text tower ranks clips (default: the branch's)
    max_new_tokens: int | None = None  # None: 512, or 48 with the demo model
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1: off
    llm_url: str | None = None  # an OpenAI-compatible vLLM server running the language model (docs/serve.md)
    llm_api_key: str | None = None  # its --api-key (default: $MUGSTAN_LLM_API_KEY)
    llm_model: str | None = None  # its served model name (default: the only one it serves)
    llm_timeout: float | None = None  # seconds for a connection or the next streamed chunk (None: 120)
    debug: bool = False  # tracebacks and library logs

    # ------------------------------------------------------------------ command line

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds the model, video and generation flags (groups "model", "video", "generation") to ``parser``."""
        model = parser.add_argument_group("model")
        model.add_argument("--model", default=DEFAULT_MODEL,
                           help="LLaVA hub id or local directory (default: %(default)s)")
        model.add_argument("--stan", default=None, metavar="PATH",
                           help="STAN branch directory or hub id; without it 'stan' mode falls back to 'mean'")
        model.add_argument("--temporal", choices=TEMPORAL_CHOICES, default="stan",
                           help="stan: fused temporal branch; mean: temporal mean of plain CLIP features")
        model.add_argument("--demo", action="store_true",
                           help="tiny offline model with random weights (answers are meaningless)")
        model.add_argument("--allow-resolution-mismatch", action="store_true",
                           help="accept a branch trained at another image size (e.g. 224 px on the 336 px tower)")
        model.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
        model.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16/fp16 on GPU; on CPU bf16 where it computes bf16 natively "
                                "(avx512_bf16, AMX), else fp32 (the demo model: fp32)")
        quant = model.add_mutually_exclusive_group()
        quant.add_argument("--load-4bit", action="store_true", help="4-bit NF4 language model (bitsandbytes; CUDA or CPU)")
        quant.add_argument("--load-8bit", action="store_true", help="8-bit language model (bitsandbytes; CUDA or CPU)")
        llm = parser.add_argument_group("language model server (vLLM)")
        llm.add_argument("--llm-url", type=llm_url, default=None, metavar="URL",
                         help="run the language model on this vLLM server (vllm serve DIR with the flags mugstan-chat "
                              "export-llava prints: --enable-mm-embeds --chat-template DIR/vllm_chat_template.jinja "
                              "--chat-template-content-format openai; where only this process reaches it); the video "
                              "tower stays here")
        llm.add_argument("--llm-api-key", type=non_empty, default=None, metavar="KEY",
                         help="the vLLM server's --api-key (default: $MUGSTAN_LLM_API_KEY)")
        llm.add_argument("--llm-model", type=non_empty, default=None, metavar="NAME",
                         help="the vLLM server's model name (default: the only model it serves)")
        llm.add_argument("--llm-timeout", type=positive_float, default=None, metavar="SECONDS",
                         help="seconds to wait for the vLLM server to connect, answer or send the next streamed "
                              f"chunk; longer ends the answer with a 504 (default: {DEFAULT_LLM_TIMEOUT_S:g})")
        video = parser.add_argument_group("video")
        video.add_argument("--frames", type=FRAMES.parse, default=DEFAULTS.frames,
                           help=f"frames per clip, T, {span(FRAMES)} (default: %(default)s)")
        video.add_argument("--clips", type=CLIPS.parse_or_auto, default=DEFAULTS.clips,
                           help=f"clips per video, C, {span(CLIPS)}, or 'auto': as many as the context leaves room for "
                                "after the question and the answer budget; each fills one <image> (default: %(default)s)")
        video.add_argument("--clip-times", choices=CLIP_TIMES, default=DEFAULTS.clip_times,
                           help="write each clip's time span before its <image> ('Clip 2 (00:30-01:00): '); auto: "
                                "for several clips or --select, never for one clip (default: %(default)s)")
        video.add_argument("--select", type=SELECT.parse, default=None, metavar="K",
                           help=f"show the K clips ({span(SELECT)}) that best match the question among --candidates, "
                                "ranked with the branch's own dual encoder, in temporal order")
        video.add_argument("--candidates", type=CANDIDATES.parse, default=None, metavar="M",
                           help=f"candidate clips --select ranks, {span(CANDIDATES)} (default: {DEFAULT_CANDIDATES})")
        video.add_argument("--selection", choices=SELECTIONS, default=None,
                           help="how --select picks its K clips: topk (the K best matches) or coverage (relevance "
                                f"balanced with coverage of the video; docs/chat.md) (default: {DEFAULT_SELECTION})")
        video.add_argument("--shortlist", type=SHORTLIST.parse, default=None, metavar="S",
                           help="a coarse pass first: rank the candidates on one frame each, then embed only S of "
                                "them with all their frames (K <= S < M; saves tower time on a video's first "
                                "questions)")
        video.add_argument("--retrieval-clip", default=None, metavar="CLIP",
                           help="CLIP checkpoint (hub id or directory) whose text tower and projection rank clips "
                                "(default: the one the STAN branch's export names; needed without a branch)")
        gen = parser.add_argument_group("generation")
        gen.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS.parse, default=None,
                         help=f"answer length limit, {span(MAX_NEW_TOKENS)} "
                              f"(default: {DEFAULT_MAX_NEW_TOKENS}; {DEMO_MAX_NEW_TOKENS} with --demo)")
        gen.add_argument("--temperature", type=TEMPERATURE.parse, default=0.0,
                         help=f"{span(TEMPERATURE)}; 0 = greedy (default)")
        gen.add_argument("--top-p", type=TOP_P.parse, default=1.0, help=f"{span(TOP_P)} (default: %(default)s)")
        gen.add_argument("--repetition-penalty", type=REPETITION_PENALTY.parse, default=1.0,
                         help=f"{span(REPETITION_PENALTY)}; 1 = off (default)")
        parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ModelArgs:
        """The fields of ``args`` that :meth:`add_cli_args` added, validated."""
        built = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        built.validate()
        return built

    # ------------------------------------------------------------------ checks and derived values

    def validate(self) -> ModelArgs:
        """Checks every field (the argparse types check the same ranges flag by flag); ValueError naming the flag."""
        self.session_options().validate()  # frames, clips, clip times, selection: their rules live there
        for name, allowed in (("temperature", TEMPERATURE), ("top_p", TOP_P), ("repetition_penalty", REPETITION_PENALTY)):
            self._check(name, allowed, getattr(self, name))
        if self.max_new_tokens is not None:
            self._check("max_new_tokens", MAX_NEW_TOKENS, self.max_new_tokens)
        for name, choices in (("temporal", TEMPORAL_CHOICES), ("device", DEVICE_CHOICES), ("dtype", DTYPE_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.load_4bit and self.load_8bit:
            raise ValueError("choose one of --load-4bit and --load-8bit")
        if self.llm_url is not None:
            from ..engine.remote_llm import normalise_llm_url

            self.llm_url = normalise_llm_url(self.llm_url)
            if self.load_4bit or self.load_8bit:
                raise ValueError("--load-4bit/--load-8bit quantise our language model, which --llm-url replaces: "
                                 "quantise on the vLLM server instead (vllm serve --quantization ...)")
        elif self.llm_api_key is not None or self.llm_model is not None or self.llm_timeout is not None:
            raise ValueError("--llm-api-key, --llm-model and --llm-timeout need --llm-url")
        if self.llm_timeout is not None:
            try:
                positive_float(str(self.llm_timeout))
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"--llm-timeout: {error}") from None
        for name in ("llm_api_key", "llm_model"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(f"--{name.replace('_', '-')} must not be empty")
        return self

    @staticmethod
    def _check(name: str, allowed: Range, value) -> None:
        try:
            allowed.check(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--{name.replace('_', '-')}: {error}") from None

    @property
    def candidate_count(self) -> int | None:
        """M with --select (the default when --candidates is left out); None without selection."""
        return self.session_options().candidate_count

    def session_options(self) -> SessionOptions:
        """The session options these flags give (not yet validated: :meth:`validate` does)."""
        return SessionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SessionOptions)})

    def session_kwargs(self) -> dict:
        """The clip settings a :class:`mugstan_chat.engine.conversation.ChatSession` takes from these flags."""
        return self.session_options().session_kwargs()

    def open_session(self, chat_model, video: str, **extra):
        """A :class:`mugstan_chat.engine.conversation.ChatSession` on ``video`` with these flags' clip and generation settings,
        not yet decoded: ``ask``'s and ``batch``'s (so a batch row's greedy answer is ``ask``'s)."""
        from ..engine.conversation import ChatSession

        return ChatSession(chat_model, video, **self.session_kwargs(), generation=self.generation(), prepare=False,
                           **extra)

    @property
    def answer_limit(self) -> int:
        """``max_new_tokens``, or the default (shorter for the demo model, whose answers are noise)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return DEMO_MAX_NEW_TOKENS if self.demo else DEFAULT_MAX_NEW_TOKENS

    def generation(self, **overrides):
        """The :class:`mugstan_chat.engine.turns.GenerationSettings` these flags describe, checked."""
        from ..engine.turns import GenerationSettings

        settings = GenerationSettings(**{
            "max_new_tokens": self.answer_limit, "temperature": self.temperature, "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty, **overrides})
        settings.validate()
        return settings

    def load(self, **overrides):
        """The :class:`mugstan_chat.llava.loader.ChatModel` these flags describe; ``overrides`` replace single settings.

        The one loader call of every front end (the CLI, the web app, the server and eval).
        """
        from ..llava.loader import load_chat_model

        settings = dict(
            model=self.model, stan=self.stan, temporal=self.temporal, device=self.device, dtype=self.dtype,
            load_4bit=self.load_4bit, load_8bit=self.load_8bit, frames=self.frames,
            clips=self.clips if isinstance(self.clips, int) else 1,  # "auto" is chosen per session
            demo=self.demo, allow_resolution_mismatch=self.allow_resolution_mismatch)
        llm = self.remote_llm() if self.llm_url is not None else None  # unreachable: one line before minutes of loading
        chat_model = load_chat_model(**{**settings, **overrides})
        chat_model.settings.retrieval_clip = self.retrieval_clip
        if llm is not None:
            chat_model.llm = llm
            chat_model.notices.append(f"language model: {llm.model} on {llm.url}")
        return chat_model

    def remote_llm(self):
        """The :class:`mugstan_chat.engine.remote_llm.RemoteLLM` of ``--llm-url``, connected (its model name resolved).

        Raises remote_llm.RemoteLLMError (one line) when the server cannot be reached or lacks the model.
        """
        import os

        from ..engine.remote_llm import LLM_API_KEY_ENV, RemoteLLM

        key = self.llm_api_key if self.llm_api_key is not None else os.environ.get(LLM_API_KEY_ENV) or None
        timeout = self.llm_timeout if self.llm_timeout is not None else DEFAULT_LLM_TIMEOUT_S
        return RemoteLLM(self.llm_url, api_key=key, model=self.llm_model, timeout=timeout).connect()
