"""Which clips a conversation shows, decided before any is decoded: three parts a session is composed of.

* :class:`VideoPlan`: what one video (or time window) offers at T frames per clip, read once: its
  header, every frame's presentation time, and which frames make which clips for any number C of
  them, with their spans (a pure function of the file, T and the window; docs/design.md section 4c).
* :class:`PromptCounter`: prompt tokens of one conversation and question for any C, from three renders
  of the chat template, so ``--clips auto``'s bisection (:func:`largest_fitting`) tokenises
  candidates without templating the whole conversation again for each.
* :class:`ClipSelector`: question-aware clips (``select``): the M candidates embedded once through the
  feature cache, each question re-ranked with the branch's own dual encoder
  (:mod:`mugstan_chat.engine.selection`), the chosen clips' chat features cached per choice.

:class:`~mugstan_chat.engine.conversation.ChatSession` holds one of each it needs and hands them what
they need explicitly (the encoder of chosen clips, the cache key of its features); none reads the
session.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from ..llava.retrieval import SelectionUnavailable
from ..timeline import ClipSpan, make_spans, write_labels
from ..video import FrameTimes, VideoDecodeError, VideoLimits, clip_spans, load_video_clips, plan_clips, \
    probe_video, read_frame_times, seconds_to_frames
from .feature_cache import FeatureCache, FeatureKey
from .selection import CandidateEmbeddings, Selection, candidate_plan, embed_candidates, middle_frames, select, \
    select_with_shortlist
from .turns import VideoFeatures

logger = logging.getLogger(__name__)

AUTO_MAX_CLIPS = 64  # --clips auto never encodes more clips than this, whatever the context leaves room for
QUESTION_RESERVE = 64  # tokens --clips auto keeps for a question not yet asked (a video loaded before it)


class VideoPlan:
    """One video (or window) at T frames per clip: header, frame times and clip plans, each read or computed once.

    Args:
        path: the video file (read only here, and only until the conversation's video is settled).
        frames: T frames per clip.
        window: (start, end) seconds, None for either end of the video.
        limits: what the file must satisfy (:class:`mugstan_chat.video.VideoLimits`).
    """

    def __init__(self, path: str, frames: int, window: tuple[float | None, float | None] = (None, None),
                 limits: VideoLimits | None = None):
        self.path, self.frames, self.window, self.limits = path, frames, window, limits
        self._info = None
        self._times: FrameTimes | None = None
        self._clips: dict[int, tuple[list[list[int]], list[tuple[float, float]]]] = {}

    @property
    def info(self):
        """The video's header (:class:`mugstan_chat.video.VideoInfo`), probed once."""
        if self._info is None:
            self._info = probe_video(self.path, self.limits or VideoLimits())
        return self._info

    @property
    def probed(self):
        """The header if it was read already, else None (a decoder may read it itself)."""
        return self._info

    def frame_times(self) -> FrameTimes:
        """Every frame's presentation time (read once; demux only): clip spans come from these.

        A file whose timestamps cannot be read falls back to ``index / fps`` (logged), as a
        constant-rate video's times.
        """
        if self._times is None:
            try:
                self._times = read_frame_times(self.path, self.limits)
            except VideoDecodeError as error:
                logger.info("frame times from the frame rate (%s)", error)
                self._times = FrameTimes.constant_rate(self.info.num_frames, self.info.fps)
        return self._times

    def distinct_clips(self) -> int:
        """T-frame clips the video (or window) has distinct frames for, at least 1: more would repeat frames.

        The one cap on how many clips a session encodes (``clips="auto"``) or ranks (``select``'s candidates).
        """
        first, last = seconds_to_frames(self.info, *self.window)
        return max(1, (last - first) // self.frames)

    def clips(self, count: int) -> tuple[list[list[int]], list[tuple[float, float]]]:
        """(``count`` lists of T frame indices, their (start, end) seconds): the evaluation-mode sampling."""
        if count not in self._clips:
            start, end = self.window
            _, indices = plan_clips(self.path, self.frames, count, start, end, self.limits, info=self.info)
            self._clips[count] = (indices, clip_spans(indices, self.frame_times()))
        return self._clips[count]

    def spans(self, count: int) -> list[ClipSpan]:
        """The numbered spans ``count`` uniform clips would have."""
        return make_spans(self.clips(count)[1])


def largest_fitting(tokens: Callable[[int], int], room: int, cap: int) -> int:
    """The largest C in [1, cap] with ``tokens(C) <= room`` (the prompt grows with C), by bisection; 1 if none."""
    low, high = 1, max(1, cap)
    while low < high:
        middle = (low + high + 1) // 2
        if tokens(middle) <= room:
            low = middle
        else:
            high = middle - 1
    return low


class PromptCounter:
    """Prompt tokens of one conversation and question for any number of ``<image>`` entries, templated three times.

    The chat template renders the first user turn's images one after another, so the text for N
    images is the text for one with N - 1 more copies of what the second image added; labels (clip
    times) are then written before the placeholders and each placeholder expanded, as the session's
    prompt is. A template for which that does not hold (checked on a third render, of three images:
    one that numbers its images fails it) is rendered for every count instead.

    Args:
        render: N -> the conversation's prompt text with N image entries (no labels, placeholders unexpanded).
        finish: (text, N) -> the prompt as the session tokenises it (labels written, placeholders expanded).
        count: text -> its number of tokens.
        image_token: the placeholder the template writes per image.
    """

    def __init__(self, render: Callable[[int], str], finish: Callable[[str, int], str], count: Callable[[str], int],
                 image_token: str):
        self.render, self.finish, self.count, self.image_token = render, finish, count, image_token
        one, two = render(1), render(2)
        cut = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one))
        unit = two[cut:cut + len(two) - len(one)]
        linear = two == one[:cut] + unit + one[cut:] and unit.count(image_token) == 1
        linear = linear and render(3) == one[:cut] + unit * 2 + one[cut:]
        self._parts = (one[:cut], unit, one[cut:]) if linear else None
        self.renders = 3

    def text(self, images: int) -> str:
        """The unlabelled prompt text with ``images`` entries (from the two renders when the template allows)."""
        if self._parts is None or images < 1:
            self.renders += 1
            return self.render(images)
        head, unit, tail = self._parts
        return head + unit * (images - 1) + tail

    def __call__(self, images: int) -> int:
        return self.count(self.finish(self.text(images), images))


def labelled(text: str, image_token: str, labels: list[str] | None) -> str:
    """``text`` with each label written before its placeholder (unchanged without labels)."""
    return text if labels is None else write_labels(text, image_token, labels)


class ClipSelector:
    """Question-aware clips of one video: K of M candidates, chosen per question (docs/design.md section 4c).

    Args:
        retriever: () -> the engine's :class:`~mugstan_chat.llava.retrieval.Retriever` (raises
            SelectionUnavailable when the model has no text side: the session then shows K uniform clips).
        plan: the video's :class:`VideoPlan`.
        keep, candidates, shortlist, strategy: K, M, S (or None) and ``topk`` | ``coverage``.
        temporal: the session's mode ("stan" or "mean").
        cache: the feature cache the candidates' embeddings and the chosen clips go through.
        content_hash: () -> the file's sha256 (cache keys).
        model: the encoder's identity (cache keys).
        image_processor: LLaVA's image processor (the candidates are preprocessed as chat clips are).
        encode: (decoded clips, when decoding began) -> the chosen clips' chat features.
        chosen_key: the cache key of K chosen clips' chat features, given (M, the chosen indices).
    """

    def __init__(self, retriever: Callable, plan: VideoPlan, keep: int, candidates: int, shortlist: int | None,
                 strategy: str, temporal: str, cache: FeatureCache, content_hash: Callable[[], str], model: str,
                 image_processor, encode: Callable, chosen_key: Callable[[int, tuple], FeatureKey]):
        self._retriever, self.plan = retriever, plan
        self.keep, self.candidates, self.shortlist, self.strategy = keep, candidates, shortlist, strategy
        self.temporal, self.cache, self.content_hash, self.model = temporal, cache, content_hash, model
        self.image_processor, self.encode, self.chosen_key = image_processor, encode, chosen_key
        self.notice: str | None = None  # why the session shows uniform clips instead of selecting
        self.capped: dict | None = None  # what was asked, when the video holds fewer distinct clips
        self.embeddings: CandidateEmbeddings | None = None
        self.embeddings_cached = False
        self.selection: Selection | None = None  # what the last question chose
        self.selected_for: str | None = None

    @property
    def available(self) -> bool:
        """True while questions choose the clips (no notice of a fallback to uniform clips)."""
        return self.notice is None

    def prepare(self) -> bool:
        """Embeds the M candidates (or takes them from the feature cache); True if the tower ran now.

        Without a text side for retrieval (:class:`mugstan_chat.llava.retrieval.SelectionUnavailable`) it
        sets :attr:`notice` (one line) and returns False: the session shows K uniform clips instead.
        """
        if not self.available or self.embeddings is not None:
            return False
        try:
            retriever = self._retriever()
        except SelectionUnavailable as error:
            self.notice = f"clip selection unavailable ({error}): {self.keep} uniform clip(s) instead"
            logger.warning(self.notice)
            return False
        plan = self.plan
        distinct = plan.distinct_clips()
        if self.candidates > distinct:  # a short video: M candidates would be copies of the same frames
            self.capped = {"candidates": self.candidates, "select": self.keep, "distinct_clips": distinct}
            logger.info("%s holds %d distinct clip(s) of %d frames: %d candidates and select %d capped to it",
                        plan.path, distinct, plan.frames, self.candidates, self.keep)
            self.candidates, self.keep = distinct, min(self.keep, distinct)
            if self.shortlist is not None and self.shortlist >= self.candidates:  # no coarse pass over so few
                self.capped["shortlist"] = self.shortlist
                self.shortlist = None
        start, end = plan.window
        info, indices = candidate_plan(plan.path, plan.frames, self.candidates, start, end, plan.limits,
                                       info=plan.info)
        what = f"{'coarse' if self.shortlist else 'candidates'}:{self.temporal}"  # one frame each, or all T
        key = FeatureKey(self.content_hash(), plan.frames, self.candidates, what, start, end,
                         f"{self.model}|text={retriever.source}")
        embeddings, cached = self.cache.get_or_encode(key, lambda: self._embed(retriever, indices, info))
        self.embeddings, self.embeddings_cached = embeddings, cached
        logger.info("%s: %d candidate clips%s %s", plan.path, self.candidates,
                    " (one frame each)" if self.shortlist else "",
                    "from the cache" if cached else f"embedded in {embeddings.encode_ms:.0f} ms")
        return not cached

    def _embed(self, retriever, indices: list[list[int]], info) -> CandidateEmbeddings:
        """All M candidates with T frames each, or (coarse pass) their middle frames: then the record keeps the
        full candidates' indices and spans, for the shortlist's second pass and the timeline."""
        plan = self.plan
        if not self.shortlist:
            return embed_candidates(retriever, plan.path, indices, info, self.image_processor, self.temporal,
                                    plan.limits, plan.frame_times())
        coarse = embed_candidates(retriever, plan.path, middle_frames(indices), info, self.image_processor,
                                  self.temporal, plan.limits, plan.frame_times())
        return dataclasses.replace(coarse, indices=indices, times=clip_spans(indices, plan.frame_times()))

    def _embed_shortlisted(self, retriever, chosen: list[int]):
        """((S, T, P) frame embeddings of candidates ``chosen``, ms spent now): each candidate is embedded once
        and kept in the feature cache, so a later question's shortlist pays only for candidates new to it."""
        plan, embeddings = self.plan, self.embeddings
        start, end = plan.window
        frames, spent = [], 0.0
        for i in chosen:
            key = FeatureKey(self.content_hash(), plan.frames, self.candidates, f"candidates:{self.temporal}", start,
                             end, f"{self.model}|text={retriever.source}", selection=("one", i))
            one, cached = self.cache.get_or_encode(key, lambda i=i: embed_candidates(
                retriever, plan.path, [embeddings.indices[i]], embeddings.info, self.image_processor, self.temporal,
                plan.limits, plan.frame_times()))
            frames.append(one.frames)
            spent += 0.0 if cached else one.decode_ms + one.encode_ms
        return torch.cat(frames), spent

    def choose(self, question: str, tokens_per_clip: int,
               have_features: bool) -> tuple[Selection | None, VideoFeatures | None, bool]:
        """(the selection for ``question``, the chosen clips' chat features or None when the session's still hold,
        whether those came from the cache). The candidates' embeddings come from the feature cache after the
        first question, so a follow-up re-ranks without the tower; the chosen clips' chat features are cached
        per selection too. (None, None, False) when the session does not select (the fallback)."""
        self.prepare()
        if not self.available:
            return None, None, False
        if self.selected_for == question and have_features:
            return self.selection, None, False
        retriever = self._retriever()
        if self.shortlist:
            selection = select_with_shortlist(
                retriever, self.embeddings, lambda short: self._embed_shortlisted(retriever, short), question,
                self.keep, self.shortlist, self.temporal, tokens_per_clip, cached=self.embeddings_cached,
                strategy=self.strategy, capped=self.capped)
        else:
            selection = select(retriever, self.embeddings, question, self.keep, self.temporal, tokens_per_clip,
                               cached=self.embeddings_cached, strategy=self.strategy, capped=self.capped)
        self.embeddings_cached = True  # every later question re-ranks the same embeddings
        features, cached = None, False
        if not have_features or self.selection is None or selection.chosen != self.selection.chosen:
            key = self.chosen_key(self.candidates, tuple(selection.chosen))
            features, cached = self.cache.get_or_encode(key, lambda: self._encode_chosen(selection.chosen))
        self.selection, self.selected_for = selection, question
        return selection, features, cached

    def _encode_chosen(self, chosen: list[int]) -> VideoFeatures:
        started = time.perf_counter()
        embeddings, plan = self.embeddings, self.plan
        decoded = load_video_clips(plan.path, frames_per_clip=plan.frames,
                                   indices=[embeddings.indices[c] for c in chosen], info=embeddings.info,
                                   limits=plan.limits, image_processor=self.image_processor)
        return self.encode(decoded, started)
