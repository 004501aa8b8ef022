"""Which clips a chat session shows: their number (``clips="auto"``), their times, and question-aware selection.

:class:`ClipPlanning` is the part of :class:`mugstan_chat.engine.conversation.ChatSession` that decides the clips
before any is decoded (docs/design.md section 4c): ``--clips auto`` counts the prompt with the
tokenizer against the context; the spans come from the frames actually sampled; with ``select``
the M candidates are embedded once (through the shared feature cache) and every question
re-ranks them with the branch's own dual encoder (:mod:`mugstan_chat.engine.selection`), the top K
shown in temporal order. It is a mixin: it reads the session's settings (``chat_model``,
``frames``, ``clips``, ``window``, ``limits`` ...) and calls its ``_encode``,
``attach_features`` and ``_prompt_tokens``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from .feature_cache import FeatureCache, FeatureKey, file_sha256, model_identity, session_key
from ..llava.retrieval import SelectionUnavailable
from .selection import CandidateEmbeddings, Selection, candidate_plan, embed_candidates, \
    middle_frames, retriever_for, select, select_with_shortlist
from ..timeline import ClipSpan, clip_labels, make_spans, precise_times, times_shown
from .turns import VideoFeatures
from ..video import (FrameTimes, VideoDecodeError, VideoLimits, clip_spans, load_video_clips, plan_clips, probe_video,
                    read_frame_times, seconds_to_frames)

logger = logging.getLogger(__name__)

AUTO_MAX_CLIPS = 64  # --clips auto never encodes more clips than this, whatever the context leaves room for
SESSION_CACHE_BYTES = 256 * 2**20  # a session given no shared feature cache keeps its candidates in one this big
QUESTION_RESERVE = 64  # tokens --clips auto keeps for a question not yet asked (a video loaded before it)


class ClipPlanning:
    """The clips of a :class:`~mugstan_chat.engine.conversation.ChatSession`: how many, which, and when they are."""

    # with select: what was asked ({"candidates", "select", "distinct_clips"}) when the video holds fewer clips
    selection_capped: dict | None = None

    @property
    def images(self) -> int:
        """``<image>`` entries of the first user turn: C, or C x T for frames as images."""
        clips = self.resolve_clips() if self.clips is None else self.clips
        return clips * self.frames if self.frames_as_images else clips

    def resolve_clips(self, question: str | None = None) -> int:
        """The number of clips, choosing it now for ``clips="auto"`` (before any frame is decoded).

        Auto: the largest C whose prompt (conversation so far, ``question``, C clips with their
        labels) plus the answer budget (``generation.max_new_tokens``) fits the context, counted
        with the tokenizer, and at most ``max_auto_clips`` (:data:`AUTO_MAX_CLIPS` by default) and
        the number of T-frame clips the video (or window) has distinct frames for; at least 1 (a turn that still does not fit
        clips its answer or is refused as usual). Without ``question`` (a video loaded before
        the first question) :data:`QUESTION_RESERVE` tokens are kept for it.
        """
        if self.clips is not None:
            return self.clips
        budget = self.generation.max_new_tokens + (QUESTION_RESERVE if question is None else 0)
        room = self.chat_model.context_length - budget
        cap = min(self.max_auto_clips, self.distinct_clips())
        low, high = 1, cap  # the prompt grows with C: the largest C that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if self._prompt_tokens(question or "", middle) <= room:
                low = middle
            else:
                high = middle - 1
        self.clips = low
        logger.info("--clips auto: %d clip(s) of %d frames (context %d, answer budget %d, at most %d clips)",
                    low, self.frames, self.chat_model.context_length, budget, cap)
        return low

    def distinct_clips(self) -> int:
        """T-frame clips the video (or window) has distinct frames for, at least 1: more would repeat frames.

        The one cap on how many clips a session encodes (``clips="auto"``) or ranks (``select``'s candidates).
        """
        first, last = seconds_to_frames(self._probe(), *self.window)
        return max(1, (last - first) // self.frames)

    def _probe(self):
        """The video's header (read once)."""
        if self._info is None:
            self._info = probe_video(self.video_path, self.limits or VideoLimits())
        return self._info

    def frame_times(self) -> FrameTimes:
        """Every frame's presentation time (read once, while the file can be read; demux only): the clips'
        spans come from these and travel with the encoded features (``VideoFeatures.spans``).

        A file whose timestamps cannot be read falls back to ``index / fps`` (logged), as a
        constant-rate video's times.
        """
        if self._frame_times is None:
            try:
                self._frame_times = read_frame_times(self.video_path, self.limits)
            except VideoDecodeError as error:
                info = self._probe()
                logger.info("frame times from the frame rate (%s)", error)
                self._frame_times = FrameTimes.constant_rate(info.num_frames, info.fps)
        return self._frame_times

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
        info = self._video.info if self._video is not None else self._probe()
        return clip_labels(self._spans_for(images), precise_times(info.duration))

    @property
    def clip_spans(self) -> list[ClipSpan]:
        """The clips shown, with their times (from the frames actually sampled); [] before :meth:`mugstan_chat.engine.conversation.ChatSession.prepare`.

        With selection, each span also names its candidate (index among the M).
        """
        video = self._video
        if video is None or video.info is None:
            return []
        chosen = self.selection.chosen if self.selection is not None and self.selects else None
        times = video.spans if video.spans is not None else clip_spans(video.indices, video.info.fps)
        return make_spans(times, chosen)

    # ----------------------------------------------------------------- clip selection (docs/design.md section 4c)

    @property
    def selects(self) -> bool:
        """True when questions choose the clips (selection asked for and available)."""
        return self.select is not None and self.selection_notice is None

    @property
    def candidate_embeddings(self) -> CandidateEmbeddings | None:
        """The candidates' retrieval embeddings and their decode/encode cost; None before they are embedded."""
        return self._candidates

    @property
    def candidate_spans(self) -> list[tuple[float, float]]:
        """Every candidate's (start, end) seconds; [] before the candidates are embedded."""
        return [] if self._candidates is None else list(self._candidates.times)

    def _cache(self) -> FeatureCache:
        if self.feature_cache is None:
            self.feature_cache = FeatureCache(SESSION_CACHE_BYTES)
        return self.feature_cache

    def _content_hash(self) -> str:
        if self.content_hash is None:
            self.content_hash = file_sha256(self.video_path)
        return self.content_hash

    def prepare_candidates(self) -> bool:
        """Embeds the M candidates (or takes them from the feature cache); True if the tower ran now.

        Without a text side for retrieval (:class:`mugstan_chat.llava.retrieval.SelectionUnavailable`) the session
        falls back to K uniform clips, with a one-line :attr:`selection_notice`, and prepares those.
        """
        if not self.selects or self._candidates is not None:
            return False
        try:
            retriever = retriever_for(self.chat_model)
        except SelectionUnavailable as error:  # the caller prepares the uniform clips (prepare() goes on to them)
            self.selection_notice = f"clip selection unavailable ({error}): {self.clips} uniform clip(s) instead"
            logger.warning(self.selection_notice)
            return False
        distinct = self.distinct_clips()
        if self.candidates > distinct:  # a short video: M candidates would be copies of the same frames
            self.selection_capped = {"candidates": self.candidates, "select": self.clips, "distinct_clips": distinct}
            logger.info("%s holds %d distinct clip(s) of %d frames: %d candidates and select %d capped to it",
                        self.video_path, distinct, self.frames, self.candidates, self.clips)
            self.candidates, self.clips = distinct, min(self.clips, distinct)
            if self.shortlist is not None and self.shortlist >= self.candidates:  # no coarse pass over so few
                self.selection_capped["shortlist"] = self.shortlist
                self.shortlist = None
        start, end = self.window
        info, indices = candidate_plan(self.video_path, self.frames, self.candidates, start, end, self.limits,
                                       info=self._info)
        self._info = info
        what = f"{'coarse' if self.shortlist else 'candidates'}:{self.temporal}"  # one frame each, or all T
        key = FeatureKey(self._content_hash(), self.frames, self.candidates, what, start, end,
                         f"{model_identity(self.chat_model)}|text={retriever.source}")
        candidates, cached = self._cache().get_or_encode(key, lambda: self._embed_candidates(retriever, indices, info))
        self._candidates, self._candidates_cached = candidates, cached
        logger.info("%s: %d candidate clips%s %s", self.video_path, self.candidates,
                    " (one frame each)" if self.shortlist else "",
                    "from the cache" if cached else f"embedded in {candidates.encode_ms:.0f} ms")
        return not cached

    def _embed_candidates(self, retriever, indices: list[list[int]], info) -> CandidateEmbeddings:
        """All M candidates with T frames each, or (coarse pass) their middle frames: then the record keeps the
        full candidates' indices and spans, for the shortlist's second pass and the timeline."""
        image_processor = self.chat_model.processor.image_processor
        if not self.shortlist:
            return embed_candidates(retriever, self.video_path, indices, info, image_processor, self.temporal,
                                    self.limits, self.frame_times())
        coarse = embed_candidates(retriever, self.video_path, middle_frames(indices), info, image_processor,
                                  self.temporal, self.limits, self.frame_times())
        return dataclasses.replace(coarse, indices=indices, times=clip_spans(indices, self.frame_times()))

    def _embed_shortlisted(self, retriever, chosen: list[int]):
        """((S, T, P) frame embeddings of candidates ``chosen``, ms spent now): each candidate is embedded once
        and kept in the feature cache, so a later question's shortlist pays only for candidates new to it."""
        start, end = self.window
        candidates = self._candidates
        frames, spent = [], 0.0
        for i in chosen:
            key = FeatureKey(self._content_hash(), self.frames, self.candidates, f"candidates:{self.temporal}", start,
                             end, f"{model_identity(self.chat_model)}|text={retriever.source}", selection=("one", i))
            one, cached = self._cache().get_or_encode(key, lambda i=i: embed_candidates(
                retriever, self.video_path, [candidates.indices[i]], candidates.info,
                self.chat_model.processor.image_processor, self.temporal, self.limits, self.frame_times()))
            frames.append(one.frames)
            spent += 0.0 if cached else one.decode_ms + one.encode_ms
        return torch.cat(frames), spent

    def select_clips(self, question: str) -> Selection | None:
        """Ranks the candidates against ``question`` and gives the session the top K clips' features.

        The candidates' embeddings come from the feature cache after the first question, so a
        follow-up re-ranks without the tower; the chosen clips' chat features are cached per
        selection too, so asking again what was chosen before needs no tower at all. Returns the
        :class:`Selection` (None when the session does not select).
        """
        if self.select is None:
            return None
        self.prepare_candidates()
        if not self.selects:
            return None
        if self._selected_for == question and self._video is not None:
            return self.selection
        retriever = retriever_for(self.chat_model)
        if self.shortlist:
            selection = select_with_shortlist(
                retriever, self._candidates, lambda short: self._embed_shortlisted(retriever, short), question,
                self.clips, self.shortlist, self.temporal, self.tokens_per_image, cached=self._candidates_cached,
                strategy=self.selection_strategy, capped=self.selection_capped)
        else:
            selection = select(retriever, self._candidates, question, self.clips, self.temporal,
                               self.tokens_per_image, cached=self._candidates_cached, strategy=self.selection_strategy,
                               capped=self.selection_capped)
        self._candidates_cached = True  # every later question re-ranks the same embeddings
        if self._video is None or self.selection is None or selection.chosen != self.selection.chosen:
            key = dataclasses.replace(session_key(self, self._content_hash()),
                                      selection=(self.candidates, tuple(selection.chosen)))
            features, cached = self._cache().get_or_encode(key, lambda: self._encode_chosen(selection.chosen))
            self.attach_features(features, cached=cached)
        self.selection, self._selected_for = selection, question
        return selection

    def _encode_chosen(self, chosen: list[int]) -> VideoFeatures:
        started = time.perf_counter()
        candidates = self._candidates
        decoded = load_video_clips(self.video_path, frames_per_clip=self.frames,
                                   indices=[candidates.indices[c] for c in chosen], info=candidates.info,
                                   limits=self.limits, image_processor=self.chat_model.processor.image_processor)
        return self._encode(decoded, started)

    def _spans_for(self, clips: int) -> list[ClipSpan]:
        """The spans ``clips`` clips would have: the encoded ones, or planned from the header alone."""
        if self._video is not None and len(self._video.indices) == clips:
            return self.clip_spans
        start, end = self.window
        info, indices = plan_clips(self.video_path, self.frames, clips, start, end, self.limits, info=self._probe())
        return make_spans(clip_spans(indices, self.frame_times()))
