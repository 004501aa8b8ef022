"""One conversation about one video: :class:`ChatSession`, multi-turn, streaming; no UI code.

Front ends never build one: :meth:`mugstan_chat.engine.engine.Engine.open` does, settles its video and
hands back a :class:`~mugstan_chat.engine.engine.Conversation`. A session runs on its engine's loaded
model, feature cache, KV budget, retrieval head and language model (ours or vLLM's,
:mod:`mugstan_chat.engine.language_models`).

Which clips a session shows (their number, times and question-aware selection) is planned by the
parts of :mod:`mugstan_chat.engine.planning` it is composed of. A session
decodes and encodes its video once (video reader -> video tower ->
LLaVA's projector) and keeps the projected visual features; every question
reuses them through ``generate(mm_encoder_outputs=...)``, so follow-ups never
touch the video file or the tower again. The prompt is built with the model
processor's own chat template (one ``{"type": "image"}`` entry per clip in the
first user turn), and each ``<image>`` is expanded to one clip's worth of
placeholder tokens, as the processor does for an image.

Each session also keeps its conversation's language-model cache (keys/values of the
previous prompt and answer, a :class:`~mugstan_chat.engine.prefix_cache.ConversationCache`); the
next question prefills only the tokens after the longest common prefix, with the same
answers. :meth:`ChatSession.loglikelihood` scores given continuations of a question on the
same features and prompt (multiple-choice evaluation uses it; it never calls the model itself).

Sessions are independent objects: a server opens one per request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Iterator

import torch

from ..llava.chat_template import render_prompt
from ..options import DEFAULT_CANDIDATES, DEFAULT_SELECTION, SELECTIONS
from ..timeline import CLIP_TIMES_CHOICES, labelled_messages
from ..video import VideoClips, VideoLimits, clip_spans, load_video_clips
from .encoding import EncodedClips, encode_clips
from .feature_cache import FeatureCache
from .language_models import PreparedTurn
from .likelihood import ContinuationScore, score_continuations
from .moments import Reference, find_references
from .feature_cache import file_sha256, model_identity, session_key
from .planning import AUTO_MAX_CLIPS, QUESTION_RESERVE, ClipSelector, PromptCounter, VideoPlan, labelled, \
    largest_fitting
from .prefix_cache import CacheBudget, ConversationCache
from .remote_llm import openai_messages
from .selection import CandidateEmbeddings, Selection
from ..timeline import ClipSpan, clip_labels, make_spans, precise_times, times_shown
# the turn's parts live in .turns; re-exported here, where callers have always imported them
from .turns import ConversationTooLong, GenerationSettings, TurnStats, VideoFeatures, encode_image, \
    neutralise_image_token

__all__ = ["ChatSession", "ContinuationScore", "ConversationTooLong", "GenerationSettings", "TurnStats",
           "VideoFeatures", "encode_image", "neutralise_image_token"]

logger = logging.getLogger(__name__)

class ChatSession:
    """A conversation about one video.

    Its clips are planned by the parts it is composed of (:mod:`mugstan_chat.engine.planning`): the
    video's :class:`~mugstan_chat.engine.planning.VideoPlan` (header, frame times, which frames make
    which clips), a :class:`~mugstan_chat.engine.planning.PromptCounter` for ``clips="auto"`` and, with
    ``select``, a :class:`~mugstan_chat.engine.planning.ClipSelector`.

    Args:
        engine: the :class:`~mugstan_chat.engine.engine.Engine` it runs on (its model, caches, retrieval
            head and language model).
        video_path: the video file.
        frames: T frames per clip (default: the model's settings).
        clips: C clips (default: the model's settings); each fills one ``<image>``. ``"auto"``: as
            many as the context leaves room for after the clip labels, the question and the answer
            budget (:meth:`resolve_clips`; docs/design.md section 4c).
        generation: :class:`GenerationSettings` (greedy by default).
        temporal: "stan" or "mean" for this session's video features (default: the tower's mode);
            sessions sharing one model can differ without touching the shared tower.
        system: optional system prompt (rendered only if the chat template supports it).
        start, end: optional time window of the video, in seconds.
        limits: :class:`mugstan_chat.video.VideoLimits` the video must satisfy (default: the module's defaults).
        prepare: decode and encode the video now (else on the first question).
        frames_as_images: give LLaVA every decoded frame as its own image (C x T ``<image>``
            entries, plain CLIP per frame: the frame-concatenation baseline) instead of one
            image's worth per clip; the frames are the same C x T the clips would use.
        text_only: a conversation without a video (a chat front end's title request, a question
            asked before the video is attached): no ``<image>`` in the prompt, the language model
            alone answers; ``video_path`` only names the session in logs.
        reuse_cache: keep the conversation's KV cache and prefill only new tokens (same answers;
            False recomputes the whole prompt every turn, for tests and benchmarks).
        cache_budget: :class:`~mugstan_chat.engine.prefix_cache.CacheBudget` this session's cache counts
            against (default: the engine's, shared by all its conversations).
        clip_times: "auto" (default: each clip's time span before its ``<image>`` when there are
            several clips, none for one clip, whose prompt stays stock LLaVA's), "on" or "off"
            (:mod:`mugstan_chat.timeline`).
        select: K: split the video into ``candidates`` (M) candidate clips, rank them against each
            question with the model's own dual encoder and show the top K in temporal order
            (:mod:`mugstan_chat.engine.selection`; docs/design.md section 4c). None: C uniform clips.
        candidates: M (default :data:`mugstan_chat.options.DEFAULT_CANDIDATES`); only with ``select``.
        selection_strategy: how the K shown are picked from the ranked candidates: ``"topk"`` (the K
            best) or ``"coverage"`` (relevance balanced with coverage of the video,
            :func:`mugstan_chat.engine.selection.cover`); only with ``select``.
        shortlist: S: a coarse pass first: every candidate is scored on its middle frame, only the S picked
            on those scores are embedded with all T frames and scored again, and the K shown are chosen among
            them (:func:`mugstan_chat.engine.selection.select_with_shortlist`); K <= S < M; only with ``select``.
        feature_cache: the :class:`FeatureCache` candidate embeddings and chosen clips go through
            (default: the engine's, shared by all its conversations).
        content_hash: sha256 of the video file for cache keys (default: hashed when first needed).
        max_auto_clips: the most clips ``clips="auto"`` may choose (a server's ``--max-clips``).
        history: earlier (question, answer) turns the conversation starts with (a stateless request's).

    Raises (when preparing):
        ConversationTooLong: the prompt cannot fit the context with these clips/frames (raised
            before any frame is decoded; the message names the largest clips that fits).
        video.VideoDecodeError: missing or undecodable video (the message names the file).
    """

    def __init__(self, engine, video_path: str | os.PathLike, frames: int | None = None,
                 clips: int | None = None, generation: GenerationSettings | None = None,
                 temporal: str | None = None, system: str | None = None, start: float | None = None, end: float | None = None,
                 limits: VideoLimits | None = None, prepare: bool = True, frames_as_images: bool = False,
                 reuse_cache: bool = True, cache_budget: CacheBudget | None = None, text_only: bool = False,
                 clip_times: str = "auto", select: int | None = None, candidates: int | None = None,
                 selection_strategy: str | None = None, shortlist: int | None = None, feature_cache: FeatureCache | None = None, content_hash: str | None = None,
                 max_auto_clips: int = AUTO_MAX_CLIPS, history: list[tuple[str, str]] | tuple = ()):
        self.engine = engine
        self.chat_model = chat_model = engine.model
        self.video_path = os.fspath(video_path)
        self.text_only = text_only
        self.frames = frames or chat_model.settings.frames
        clips = clips or chat_model.settings.clips
        self.auto_clips = clips == "auto"
        self.clips: int | None = None if self.auto_clips else int(clips)  # None until resolve_clips
        if self.frames < 1 or (self.clips is not None and self.clips < 1):
            raise ValueError(f"frames and clips must be positive (got {self.frames}, {self.clips})")
        if clip_times not in CLIP_TIMES_CHOICES:
            raise ValueError(f"clip_times must be one of {', '.join(CLIP_TIMES_CHOICES)}, got {clip_times!r}")
        self.clip_times = clip_times
        self.frames_as_images = frames_as_images
        self.select = select
        candidates = (candidates or DEFAULT_CANDIDATES) if select is not None else None
        if select is not None:
            if self.auto_clips or frames_as_images:
                raise ValueError("clip selection shows K clips: it combines with neither clips='auto' nor frames "
                                 "as images")
            if select < 1 or candidates < select:
                raise ValueError(f"candidates (M={candidates}) must be at least select (K={select}) >= 1")
            self.clips = select
            if shortlist is not None and not select <= shortlist < candidates:
                raise ValueError(f"shortlist (S={shortlist}) must lie between select (K={select}) and candidates "
                                 f"(M={candidates}): K <= S < M")
        elif candidates is not None or selection_strategy is not None or shortlist is not None:
            raise ValueError("candidates, selection_strategy and shortlist apply to clip selection only "
                             "(give select too)")
        self.selection_strategy = selection_strategy or DEFAULT_SELECTION
        if self.selection_strategy not in SELECTIONS:
            raise ValueError(f"selection_strategy must be one of {', '.join(SELECTIONS)}, got {selection_strategy!r}")
        self.feature_cache = feature_cache if feature_cache is not None else engine.features
        self.content_hash = content_hash
        self.max_auto_clips = max_auto_clips
        self._tokenized = None  # (prompt text, its ids): the last prompt tokenised
        if text_only:  # no video: no clips, no selection
            self.clips, self.auto_clips, self.select = 0, False, None
        self.generation = generation or GenerationSettings()
        self.temporal = temporal or chat_model.tower.mode
        if self.temporal not in chat_model.tower.available_modes:
            raise ValueError(f"temporal mode {self.temporal!r} is not available with this model "
                             f"(available: {', '.join(chat_model.tower.available_modes)})")
        self.system = system
        self.window = (start, end)
        self.limits = limits
        self.plan = VideoPlan(self.video_path, self.frames, self.window, limits)  # read only until settled
        self.selector = None if self.select is None else ClipSelector(
            engine.retriever, self.plan, select, candidates, shortlist, self.selection_strategy, self.temporal,
            self.feature_cache, self._content_hash, model_identity(chat_model), chat_model.processor.image_processor,
            self._encode, lambda m, chosen: dataclasses.replace(session_key(self, self._content_hash()),
                                                                selection=(m, chosen)))
        self.history: list[tuple[str, str]] = [(str(q), str(a)) for q, a in history]  # (question, answer) pairs
        self.turns: list[TurnStats] = []
        self._video: VideoFeatures | None = None
        self._lock = threading.Lock()  # one generation at a time per session
        self.reuse_cache = reuse_cache
        self.cache_budget = cache_budget if cache_budget is not None else engine.kv_budget
        self.kv = ConversationCache(chat_model.model.config, self.cache_budget)  # the conversation's keys/values
        if text_only:  # nothing to decode or encode: the session is prepared with no clips
            self._video = VideoFeatures([], [], None, 0.0, 0.0, reported=True)
        if prepare:
            self.prepare()

    # ----------------------------------------------------------------- video features

    @property
    def prepared(self) -> bool:
        return self._video is not None

    @property
    def visual_tokens(self) -> int:
        """Placeholder tokens the video fills (C x tokens per clip); 0 before :meth:`prepare`."""
        return 0 if self._video is None else sum(f.shape[0] for f in self._video.features)

    @property
    def features(self) -> list[torch.Tensor]:
        """The cached projected visual features: C tensors (tokens per clip, text width)."""
        self.prepare()
        return list(self._video.features)

    @property
    def video_info(self):
        """:class:`mugstan_chat.video.VideoInfo` of the video (displayed size, rotation); decodes it if needed."""
        self.prepare()
        return self._video.info if self._video is not None else self.selector.embeddings.info

    @property
    def frame_indices(self) -> list[list[int]]:
        return [] if self._video is None else self._video.indices

    @property
    def video_features(self) -> VideoFeatures | None:
        """The encoded video (None before :meth:`prepare`); a server may cache it for other sessions."""
        return self._video

    def attach_features(self, features: VideoFeatures, cached: bool = True) -> None:
        """Uses features encoded elsewhere (another session, or :func:`encode_image`) instead of decoding.

        They must come from the same model and settings (frames, clips, temporal mode, window);
        the caller's cache key guarantees that. ``cached=True``: turns report them as cached
        (no decode/encode time); ``cached=False``: they were made for this session, and its
        first answer reports their decode/encode times.
        """
        self.resolve_clips()
        if len(features.features) != self.clips:
            raise ValueError(f"features hold {len(features.features)} clips, this session expects {self.clips}")
        self.drop_prefix_cache()  # new features behind the same placeholder ids: the cache is stale
        self._video = dataclasses.replace(features, reported=cached)

    def prepare(self, decoded: VideoClips | None = None, encoded: EncodedClips | None = None) -> bool:
        """Decodes and encodes the video unless already done; True if work was done now.

        ``decoded``: this video's clips already decoded (``load_video_clips`` with this session's
        frames, clips and window), so sessions over the same frames share one decode.
        ``encoded``: those clips' projected features, already encoded (:func:`encode_clips`, one
        tower call for several videos); only with ``decoded``.
        """
        if self._video is not None:
            return False
        if encoded is not None and decoded is None:
            raise ValueError("encoded features come with the decoded clips they were encoded from")
        if self.selects and decoded is None:  # the candidates now; the clips when a question chooses them
            embedded = self.prepare_candidates()
            if self.selects:
                return embedded
        self.resolve_clips()
        self.check_fits()  # before decoding a frame
        processor = self.chat_model.processor
        t0 = time.perf_counter()
        start, end = self.window
        if decoded is None:
            decoded = load_video_clips(
                self.video_path, frames_per_clip=self.frames, num_clips=self.clips, mode="eval", start=start,
                end=end, limits=self.limits, image_processor=processor.image_processor, info=self.plan.probed)
        self.drop_prefix_cache()
        self._video = self._encode(decoded, t0, encoded)
        logger.info("encoded %s: %d clips x %d frames -> %d visual tokens (decode %.0f ms, encode %.0f ms)",
                    self.video_path, self.clips, self.frames, self.visual_tokens, self._video.decode_ms,
                    self._video.encode_ms)
        return True

    def _encode(self, decoded: VideoClips, t0: float, encoded: EncodedClips | None = None) -> VideoFeatures:
        """Decoded clips -> projected features (tower + projector, or ``encoded``); ``t0``: when decoding began."""
        clips, info, indices = decoded  # (C, T, 3, H, W)
        if tuple(clips.shape[:2]) != (self.clips, self.frames):
            raise ValueError(f"decoded clips of shape {tuple(clips.shape[:2])} for a session of "
                             f"{self.clips} clips x {self.frames} frames")
        t1 = time.perf_counter()
        if encoded is None:
            encoded = encode_clips(self.chat_model, [clips], self.temporal, self.frames_as_images)[0]
        elif self.frames_as_images or encoded.temporal != self.temporal or len(encoded.features) != self.clips:
            raise ValueError(f"features encoded as {len(encoded.features)} clips ({encoded.temporal}) for a session "
                             f"of {self.clips} clips ({self.temporal})")
        return VideoFeatures(list(encoded.features), indices, info, (t1 - t0) * 1000, encoded.encode_ms,
                             spans=clip_spans(indices, self.plan.frame_times()))

    # ----------------------------------------------------------------- the clips (engine/planning.py)

    @property
    def images(self) -> int:
        """``<image>`` entries of the first user turn: C, or C x T for frames as images."""
        clips = self.resolve_clips() if self.clips is None else self.clips
        return clips * self.frames if self.frames_as_images else clips

    def resolve_clips(self, question: str | None = None) -> int:
        """The number of clips, choosing it now for ``clips="auto"`` (before any frame is decoded).

        Auto: the largest C whose prompt (conversation so far, ``question``, C clips with their
        labels) plus the answer budget (``generation.max_new_tokens``) fits the context, counted
        with the tokenizer (:class:`~mugstan_chat.engine.planning.PromptCounter`), and at most
        ``max_auto_clips`` and the number of T-frame clips the video (or window) has distinct frames
        for; at least 1 (a turn that still does not fit clips its answer or is refused as usual).
        Without ``question`` (a video loaded before the first question)
        :data:`~mugstan_chat.engine.planning.QUESTION_RESERVE` tokens are kept for it.
        """
        if self.clips is not None:
            return self.clips
        budget = self.generation.max_new_tokens + (QUESTION_RESERVE if question is None else 0)
        room = self.chat_model.context_length - budget
        cap = min(self.max_auto_clips, self.plan.distinct_clips())
        per_clip = self.frames if self.frames_as_images else 1
        counter = self._counter(question or "")
        chosen = largest_fitting(lambda c: counter(c * per_clip), room, cap)
        if counter(chosen * per_clip) != self._prompt_tokens(question or "", chosen):  # a template the counter misreads
            logger.warning("prompt counting from two renders disagrees with the full prompt: rendering every count")
            chosen = largest_fitting(lambda c: self._prompt_tokens(question or "", c), room, cap)
        self.clips = chosen
        logger.info("--clips auto: %d clip(s) of %d frames (context %d, answer budget %d, at most %d clips; "
                    "%d template renders)", chosen, self.frames, self.chat_model.context_length, budget, cap,
                    counter.renders)
        return chosen

    def _counter(self, question: str) -> PromptCounter:
        processor = self.chat_model.processor
        image_token = processor.image_token

        def finish(text: str, images: int) -> str:
            text = labelled(text, image_token, self.prompt_labels(images))
            return text.replace(image_token, image_token * self.tokens_per_image)

        return PromptCounter(lambda images: render_prompt(processor, self.messages(question, images)), finish,
                             lambda text: int(self._tokenize(text)["input_ids"].shape[1]), image_token)

    def distinct_clips(self) -> int:
        """T-frame clips the video (or window) has distinct frames for (:meth:`VideoPlan.distinct_clips`)."""
        return self.plan.distinct_clips()

    def frame_times(self):
        """Every frame's presentation time (:meth:`~mugstan_chat.engine.planning.VideoPlan.frame_times`)."""
        return self.plan.frame_times()

    def _shows_times(self, clips: int) -> bool:
        if self.frames_as_images or (self._video is not None and self._video.info is None):
            return False  # the frames-as-images baseline and single images keep the stock prompt
        return times_shown(self.clip_times, clips, self.select is not None)

    def prompt_labels(self, images: int) -> list[str] | None:
        """The label before each of ``images`` ``<image>`` entries, or None when the prompt shows no times.

        Both routes write these: our engine into the rendered prompt, the vLLM route as text parts.
        """
        if not self._shows_times(images):
            return None
        info = self._video.info if self._video is not None else self.plan.info
        spans = (self.clip_spans if self._video is not None and len(self._video.indices) == images
                 else self.plan.spans(images))
        return clip_labels(spans, precise_times(info.duration))

    @property
    def clip_spans(self) -> list[ClipSpan]:
        """The clips shown, with their times (from the frames actually sampled); [] before :meth:`prepare`.

        With selection, each span also names its candidate (index among the M).
        """
        video = self._video
        if video is None or video.info is None:
            return []
        chosen = self.selection.chosen if self.selection is not None and self.selects else None
        times = video.spans if video.spans is not None else clip_spans(video.indices, video.info.fps)
        return make_spans(times, chosen)

    def _content_hash(self) -> str:
        if self.content_hash is None:
            self.content_hash = file_sha256(self.plan.path)
        return self.content_hash

    @property
    def selects(self) -> bool:
        """True when questions choose the clips (selection asked for and available)."""
        return self.selector is not None and self.selector.available

    @property
    def selection(self) -> Selection | None:
        """What the last question chose (None without selection)."""
        return None if self.selector is None else self.selector.selection

    @property
    def selection_notice(self) -> str | None:
        """Why this session shows uniform clips instead of selecting (None when it selects or never meant to)."""
        return None if self.selector is None else self.selector.notice

    @property
    def selection_capped(self) -> dict | None:
        """With select: what was asked ({"candidates", "select", "distinct_clips"}) when the video holds fewer clips."""
        return None if self.selector is None else self.selector.capped

    @property
    def candidates(self) -> int | None:
        """M with select (capped to the video's distinct clips once known); None without."""
        return None if self.selector is None else self.selector.candidates

    @property
    def shortlist(self) -> int | None:
        """S of the coarse pass with select (None without, or when the video holds too few candidates)."""
        return None if self.selector is None else self.selector.shortlist

    @property
    def candidate_embeddings(self) -> CandidateEmbeddings | None:
        """The candidates' retrieval embeddings and their decode/encode cost; None before they are embedded."""
        return None if self.selector is None else self.selector.embeddings

    @property
    def candidate_spans(self) -> list[tuple[float, float]]:
        """Every candidate's (start, end) seconds; [] before the candidates are embedded."""
        embeddings = self.candidate_embeddings
        return [] if embeddings is None else list(embeddings.times)

    def prepare_candidates(self) -> bool:
        """Embeds the M candidates (or takes them from the feature cache); True if the tower ran now.

        Without a text side for retrieval the session falls back to K uniform clips (with a one-line
        :attr:`selection_notice`), which :meth:`prepare` then encodes.
        """
        if self.selector is None:
            return False
        embedded = self.selector.prepare()
        self.clips = self.selector.keep  # K, capped to the video's distinct clips
        return embedded

    def select_clips(self, question: str) -> Selection | None:
        """Ranks the candidates against ``question`` and gives the session the chosen clips' features.

        A follow-up re-ranks the cached candidate embeddings without the tower; asking again what was
        chosen before needs no tower at all. Returns the Selection (None when the session does not select).
        """
        if self.selector is None:
            return None
        self.prepare_candidates()
        selection, features, cached = self.selector.choose(question, self.tokens_per_image, self._video is not None)
        if features is not None:
            self.attach_features(features, cached=cached)
        return selection

    # ----------------------------------------------------------------- conversation

    def reset(self) -> None:
        """Forgets the conversation; keeps the video features.

        The KV cache stays: the next prompt shares its system and video prefix, and only
        what matches the new prompt token for token is reused.
        """
        self.history.clear()

    def drop_prefix_cache(self) -> None:
        """Frees the conversation's KV cache (the next question prefills its whole prompt)."""
        self.kv.drop()

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys/values the session holds for the next question (0: none)."""
        return self.kv.tokens

    def undo_last(self) -> tuple[str, str] | None:
        """Forgets the last question and its answer (to ask it again); returns them, or None."""
        if not self.history:
            return None
        if self.turns:
            self.turns.pop()
        return self.history.pop()

    @property
    def last_stats(self) -> TurnStats | None:
        return self.turns[-1] if self.turns else None

    def messages(self, question: str | None = None, images: int | None = None) -> list[dict]:
        """The conversation in the processor's chat format, with an optional new question.

        ``images``: ``<image>`` entries in the first user turn (default: this session's).
        """
        images = self.images if images is None else images
        messages = []
        if self.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        turns = self.history + ([(question, None)] if question is not None else [])
        image_token = getattr(self.chat_model.processor, "image_token", "<image>")
        for i, (q, a) in enumerate(turns):
            content = [{"type": "image"} for _ in range(images)] if i == 0 else []
            text = neutralise_image_token(q, image_token)  # the user's text never becomes a placeholder
            messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
            if a is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        return messages

    def prompt_text(self, question: str) -> str:
        """The prompt as text, each ``<image>`` expanded to one clip's placeholder tokens.

        Scorers that append a continuation (an option's letter or text) tokenise
        ``prompt_text(q) + continuation`` against it; :meth:`build_prompt` tokenises it alone.
        With selection the clips are those ``question`` chooses (unless :meth:`select_clips` ran already).
        """
        if self.select is not None and self._video is None:
            self.select_clips(question)
        self.prepare()
        return self._prompt_text(question, self.images)

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens one ``<image>`` expands to; known from the configs before any encoding."""
        if self._video is not None and self._video.features:
            return self._video.features[0].shape[0]
        config = self.chat_model.model.config
        drop_cls = config.vision_feature_select_strategy == "default"  # LLaVA drops [CLS] under "default"
        return self.chat_model.tower.tokens_per_clip - int(drop_cls)

    def _prompt_text(self, question: str, images: int) -> str:
        processor = self.chat_model.processor
        text = render_prompt(processor, self.messages(question, images), self.prompt_labels(images))
        return text.replace(processor.image_token, processor.image_token * self.tokens_per_image)

    def _tokenize(self, text: str) -> dict[str, torch.Tensor]:
        """The prompt's ids; the last prompt's are kept, so checking a turn's length and running it (a server
        checks the context before it answers) tokenise it once. Callers never change the tensors."""
        if self._tokenized is not None and self._tokenized[0] == text:
            return self._tokenized[1]
        tokenizer = self.chat_model.processor.tokenizer
        # like the processor: no extra BOS when the template already starts with one
        add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        encoded = tokenizer(text, add_special_tokens=add_special, return_tensors="pt")
        result = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        self._tokenized = (text, result)
        return result

    def build_prompt(self, question: str) -> dict[str, torch.Tensor]:
        """Tokenised prompt (input_ids, attention_mask), each ``<image>`` expanded to one clip's tokens."""
        return self._tokenize(self.prompt_text(question))

    def _prompt_tokens(self, question: str, clips: int) -> int:
        images = clips * self.frames if self.frames_as_images else clips
        return self._tokenize(self._prompt_text(question, images))["input_ids"].shape[1]

    def check_fits(self, question: str = "") -> int:
        """Prompt tokens of the conversation plus ``question``, computed without decoding or encoding.

        Raises:
            ConversationTooLong: no room is left for one answer token; the message gives the
                largest number of clips that fits (0 if not even one clip does).
        """
        context = self.chat_model.context_length
        tokens = self._prompt_tokens(question, self.resolve_clips(question or None))
        if tokens < context:
            return tokens
        if self.text_only:
            raise ConversationTooLong(f"the conversation is {tokens} tokens and the model's context is {context}")
        one = self._prompt_tokens(question, 1)
        per_clip = max(1, self._prompt_tokens(question, 2) - one)
        largest = 0 if one >= context else 1 + (context - 1 - one) // per_clip
        while largest > 0 and self._prompt_tokens(question, largest) >= context:
            largest -= 1
        unit = f"{self.frames} frames x {self.tokens_per_image}" if self.frames_as_images else f"{self.tokens_per_image}"
        advice = (f"the largest --clips that fits is {largest}" if largest else
                  "not even one clip fits: use fewer frames or a model with a longer context")
        raise ConversationTooLong(
            f"{self.clips} clip(s) x {unit} visual tokens make a prompt of {tokens} tokens and the model's "
            f"context is {context}: {advice} (nothing was decoded)")

    def _begin_turn(self, question: str, generation: GenerationSettings | None) -> PreparedTurn:
        """The checks and the prompt both language models share: the turn, ready to answer."""
        if not question or not question.strip():
            raise ValueError("empty question")
        question = question.strip()
        if generation is not None:
            self.generation = generation.validate()
        started = time.perf_counter()
        if not self.prepared:
            self.resolve_clips(question)
            self.check_fits(question)  # refuse before decoding a frame
        if self.select is not None:
            self.select_clips(question)  # this question's clips (a re-rank of cached candidates)
        self.prepare()
        text = self._prompt_text(question, self.images)
        inputs = self._tokenize(text)
        prompt_tokens = inputs["input_ids"].shape[1]
        context = self.chat_model.context_length
        room = context - prompt_tokens
        if room < 1:
            raise ConversationTooLong(
                f"the conversation is {prompt_tokens} tokens and the model's context is {context}: "
                "nothing is left for an answer; reset the conversation or start a new session")
        max_new = min(self.generation.max_new_tokens, room)
        first_use = not self._video.reported  # the one-time video cost is reported with the first answer
        stats = TurnStats(
            decode_ms=self._video.decode_ms if first_use else 0.0,
            encode_ms=self._video.encode_ms if first_use else 0.0,
            prompt_tokens=prompt_tokens, visual_tokens=self.visual_tokens, max_new_tokens=max_new,
            clipped=max_new < self.generation.max_new_tokens, cached_features=not first_use)
        if stats.clipped:
            logger.info("max_new_tokens clipped to %d: the context has %d tokens left", max_new, room)
        bos = self.chat_model.processor.tokenizer.bos_token
        return PreparedTurn(question, started, stats, inputs, self.generation, list(self._video.features),
                            self.kv if self.reuse_cache else None, lambda: self._openai_messages(question),
                            add_special_tokens=not (bos and text.startswith(bos)))

    def _openai_messages(self, question: str) -> list[dict]:
        """The conversation :meth:`messages` gives, each ``<image>`` sent as its clip's projected features (after its
        clip label when the prompt shows times, where the template ``export-llava`` writes renders it)."""
        messages, labels = self.messages(question), self.prompt_labels(self.images)
        if labels is not None:
            messages = labelled_messages(messages, labels)
        return openai_messages(messages, list(self._video.features))

    def _record(self, turn: PreparedTurn, answer: str) -> None:
        """Adds the turn; keeps the language model's keys/values of its sequence for the next one."""
        turn.stats.total_ms = (time.perf_counter() - turn.started) * 1000
        self.history.append((turn.question, answer))
        self.turns.append(turn.stats)
        self._video.reported = True
        if turn.kv is not None and turn.cache is not None and turn.sequence is not None:
            turn.kv.keep(turn.cache, turn.sequence)

    @contextlib.contextmanager
    def _busy(self):
        """One answer at a time per session; a second concurrent question is an error, not a wait."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this chat session is still answering the previous question")
        try:
            yield
        finally:
            self._lock.release()

    def _cached_outputs(self) -> dict:
        """A fresh mm_encoder_outputs dict (generate writes into it)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=list(self._video.features))}

    def ask(self, question: str, generation: GenerationSettings | None = None) -> str:
        """Answers ``question`` (no streaming) and records it in the conversation.

        ``generation``: this turn's answer settings (they stay the session's for later turns).
        """
        with self._busy():
            turn = self._begin_turn(question, generation)
            answer = self.engine.llm.generate(turn)
            self._record(turn, answer)
            return answer

    def ask_stream(self, question: str, stop: threading.Event | None = None,
                   generation: GenerationSettings | None = None) -> Iterator[str]:
        """Streams the answer to ``question`` as text pieces; records the turn when done.

        Closing the iterator early stops generation; the partial answer is kept. Setting
        ``stop`` (from any thread) ends generation after the current token, e.g. when a
        server's client goes away; the event is set when the answer ends. A failed answer
        (the language model raised) is not recorded.
        Raises ConversationTooLong (before yielding) if the conversation no longer fits.
        """
        with self._busy():
            turn = self._begin_turn(question, generation)
            pieces: list[str] = []
            stream = self.engine.llm.stream(turn, stop)
            failed = False
            try:
                for piece in stream:
                    pieces.append(piece)
                    yield piece
            except Exception:
                failed = True
                raise
            finally:
                stream.close()
                if not failed:
                    self._record(turn, "".join(pieces).strip())

    def score(self, question: str, continuations: list[str], select_by: str | None = None) -> list[ContinuationScore]:
        """:meth:`loglikelihood` on the clips ``select_by`` (default: ``question``) selects, when the session selects."""
        if self.select is not None:
            self.select_clips((select_by or question).strip())
        return self.loglikelihood(question, continuations)

    def loglikelihood(self, question: str, continuations: list[str]) -> list[ContinuationScore]:
        """Log-probability of each continuation right after the assistant prompt for ``question``.

        The prompt is this session's (conversation so far, its video features, the chat
        template) and runs through the language model once; each continuation is scored on a
        copy of its cache. Continuation tokens are those of ``tokenise(prompt + text)`` past
        ``tokenise(prompt)`` (the lm-evaluation-harness rule), so a tokenizer that merges the
        space into the first word is handled. Nothing is recorded in the conversation.

        Raises:
            ValueError: a continuation has no tokens, or the prompt plus the longest
                continuation does not fit the context.
        """
        with self._busy():
            prompt = self.prompt_text(question)
            return score_continuations(self.chat_model.model, self.chat_model.processor.tokenizer, prompt,
                                       continuations, self._cached_outputs(), self.chat_model.context_length)

    def references(self, answer: str) -> list[Reference]:
        """The moments ``answer`` names (``01:23``, ``1:23-1:40``, ``Clip 3``: :mod:`mugstan_chat.engine.moments`).

        Only when this session's prompt showed clip times: without them the model was never told
        when anything happens, so a time it writes points at nothing. [] otherwise.
        """
        spans = self.clip_spans
        if self.text_only or not spans or not self._shows_times(len(spans)):
            return []
        return find_references(answer, spans, self.video_info.duration)

    def summary(self) -> dict:
        """Session facts for logs and JSON output."""
        settings = self.chat_model.settings
        return {
            "video": self.video_path, "model": settings.model, "temporal": self.temporal,
            "frames": self.frames, "clips": self.clips, "visual_tokens": self.visual_tokens,
            "turns": len(self.history), "clip_spans": [span.to_dict() for span in self.clip_spans],
            "selection": None if self.selection is None else self.selection.to_dict(),
            "selection_notice": self.selection_notice,
        }


def ask_together(sessions: list[ChatSession], questions: list[str],
                 generation: GenerationSettings | None = None) -> list[str | Exception]:
    """Answers each session's question with ONE padded ``generate`` over all of them (the language model's
    ``generate_many``); each answer or the error that session's turn raised (a prompt that does not fit).

    Every turn is checked and tokenised as :meth:`ChatSession.ask` does and recorded the same way; the
    batch carries no KV cache (each session's next question prefills its whole prompt).
    """
    results: list[str | Exception | None] = [None] * len(sessions)
    turns, held = [], []
    with contextlib.ExitStack() as stack:
        for i, (session, question) in enumerate(zip(sessions, questions)):
            try:
                stack.enter_context(session._busy())
                turn = session._begin_turn(question, generation)
            except Exception as error:  # noqa: BLE001 - this session's answer is its error; the others go on
                results[i] = error
                continue
            turn.kv = None  # a batch's keys/values are padded rows: none is kept for the next turn
            turns.append(turn)
            held.append(i)
        if turns:
            answers = sessions[held[0]].engine.llm.generate_many(turns)
            for i, turn, answer in zip(held, turns, answers):
                sessions[i]._record(turn, answer)
                results[i] = answer
    return results

