"""Question-aware clip selection: the chat's own video tower, as a retrieval model, picks the clips to show.

Why: LLaVA-1.5's 4,096-token context holds about six clips of 576 tokens, so a long video gets six
uniform glimpses. Mug-STAN's post-pretraining made the branch and its Mug head a text-video
retrieval model; this module uses that same model to find the clips a question is about and shows
the language model only those (docs/design.md section 4c).

* The video is split into M candidate clips (uniform; :func:`candidate_plan`), T frames each,
  exactly as the chat samples clips.
* Each candidate runs through the tower the chat uses (LLaVA's CLIP weights, the STAN branch in
  ``stan`` mode, none in ``mean`` mode) on to its **last** layer (LLaVA reads layer -2, the same
  forward pass continues), and each frame's [CLS] goes through the post-layernorm and the CLIP
  checkpoint's visual projection: (M, T, P) frame embeddings (:meth:`Retriever.embed_clips`).
* The question goes through the text tower of the CLIP checkpoint the branch was trained against
  and is scored with the Mug mode the branch was trained with (``mean``, the plain cosine of the
  frame mean, without a branch); the top K, ties broken by the earlier start, are shown in
  temporal order (:func:`rank`).

A LLaVA checkpoint holds only the vision tower: the text tower and the visual projection come from
the CLIP checkpoint the branch's export names (``model.backbone``: hub id and revision, or an inline
architecture and seed), the Mug mode and temperature from its ``model.mug``
(:func:`~mugstan_chat.llava.retrieval.load_retrieval_head`). A branch without them falls back to uniform clips, saying so in one
line (:class:`SelectionUnavailable`). Selection is a pure function of (video, question, settings).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..llava.retrieval import Retriever, SelectionUnavailable, load_retriever
from ..options import DEFAULT_CANDIDATES, DEFAULT_SELECTION, SELECTIONS  # noqa: F401  (DEFAULT_CANDIDATES: re-exported)

logger = logging.getLogger(__name__)

FRAMES_PER_BATCH = 64  # candidate frames decoded and encoded at once: bounds memory on long videos
COVERAGE_SHARPEN = 1.0  # exponent on the normalised scores in :func:`cover` (BOLT's default: none)


# ------------------------------------------------------------------------------ candidates and ranking


@dataclass
class CandidateEmbeddings:
    """The M candidates of one video: what the feature cache keeps, so follow-ups re-rank without the tower."""

    features: list[torch.Tensor]  # [frame embeddings (M, T, P)]: a list, as the feature cache counts bytes
    indices: list[list[int]]  # M lists of T frame indices
    times: list[tuple[float, float]]  # (start, end) seconds of every candidate (its sampled frames)
    info: object  # video.VideoInfo
    decode_ms: float
    encode_ms: float

    @property
    def frames(self) -> torch.Tensor:
        return self.features[0]


@dataclass
class Selection:
    """Which candidates a question chose, and what finding them cost."""

    candidates: int  # M
    chosen: list[int]  # candidate indices shown, in temporal order
    scores: list[float]  # every candidate's score against the question
    times: list[tuple[float, float]]  # every candidate's (start, end) seconds
    mode: str  # the Mug mode that scored ("mean": plain CLIP cosine)
    rank_ms: float  # question through the text tower + scoring the M candidates
    embed_ms: float  # decoding + embedding the candidates (0 when they came from the cache)
    cached: bool  # candidate embeddings came from the feature cache (no tower work)
    tokens_saved: int  # visual tokens of the M - K candidates not shown
    strategy: str = DEFAULT_SELECTION  # how the K were chosen from the scores (STRATEGIES)
    # with a coarse pass (shortlist S): ``scores`` are every candidate's one-frame scores; these S were then
    # embedded in full and scored again (``shortlist_scores``), and the K chosen among them
    shortlist: list[int] | None = None
    shortlist_scores: list[float] | None = None
    capped: dict | None = None  # what was asked (candidates, select) when the video holds fewer distinct clips

    def to_dict(self) -> dict:
        out = {
            "candidates": self.candidates, "chosen": list(self.chosen), "mode": self.mode, "strategy": self.strategy,
            "scores": [round(s, 5) for s in self.scores],
            "candidate_spans": [[round(a, 3), round(b, 3)] for a, b in self.times],
            "rank_ms": round(self.rank_ms, 2), "embed_ms": round(self.embed_ms, 2), "cached": self.cached,
            "tokens_saved": self.tokens_saved,
            "capped": None if self.capped is None else dict(self.capped),
        }
        if self.shortlist is not None:
            out.update(shortlist=list(self.shortlist), shortlist_scores=[round(s, 5) for s in self.shortlist_scores])
        return out


def rank(scores: torch.Tensor | list[float], times: list[tuple[float, float]], keep: int) -> list[int]:
    """The ``keep`` best candidates (ties: the earlier start first), returned in temporal order."""
    values = [float(s) for s in scores]
    best = sorted(range(len(values)), key=lambda i: (-values[i], times[i][0], i))[:keep]
    return sorted(best, key=lambda i: (times[i][0], i))


def cover(scores: torch.Tensor | list[float], times: list[tuple[float, float]], keep: int,
          sharpen: float = COVERAGE_SHARPEN) -> list[int]:
    """``keep`` candidates that balance relevance with coverage of the video, in temporal order.

    Why: the top K by similarity cluster on one scene (its neighbouring candidates score alike), so a
    question about two moments, or one that recurs, sees only one of them. Following BOLT's inverse
    transform sampling (Liu et al., CVPR 2025), relevance is a density over time: scores are min-max
    normalised and raised to ``sharpen``, and the video (in temporal order) is cut where the
    cumulative relevance crosses 1/K, 2/K, ...: K bins of equal relevance mass, narrow where the
    question matches much, wide where it matches little. Each bin shows its best candidate (not the
    bin's quantile point, so K = 1 shows the best candidate and a bin never shows its least
    relevant clip); a candidate belongs to the bin holding the middle of its mass. A candidate heavier
    than a bin leaves bins empty; those picks go to the best candidates not yet shown. Equal scores
    give the middle candidate of each of K equal stretches of the video: uniform clips.
    """
    values = [float(s) for s in scores]
    order = sorted(range(len(values)), key=lambda i: (times[i][0], i))
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        weights = [1.0] * len(values)
    else:
        weights = [((v - low) / (high - low)) ** sharpen for v in values]
    total = sum(weights[i] for i in order) or 1.0
    bins: dict[int, list[int]] = {}
    mass = 0.0
    for i in order:
        middle = (mass + weights[i] / 2) / total
        mass += weights[i]
        bins.setdefault(min(keep - 1, int(middle * keep)), []).append(i)
    def best(group: list[int]) -> int:  # ties: the candidate nearest the bin's middle
        centre = (len(group) - 1) / 2
        return min(range(len(group)), key=lambda j: (-values[group[j]], abs(j - centre), j))

    chosen = {group[best(group)] for group in bins.values()}
    for i in sorted(range(len(values)), key=lambda i: (-values[i], times[i][0], i)):
        if len(chosen) >= keep:
            break
        chosen.add(i)
    return sorted(chosen, key=lambda i: (times[i][0], i))


STRATEGIES = dict(zip(SELECTIONS, (rank, cover)))  # --selection: how the K shown clips are chosen from the scores


def candidate_plan(path, frames: int, candidates: int, start: float | None, end: float | None, limits, info=None):
    """(info, M lists of T indices): the video (or window) cut into M equal parts, T frames in each.

    Uniform rather than at scene cuts: the candidates are a pure function of the duration, found from
    the header alone, and a 30-minute video is never decoded in full (scene detection would have to).
    """
    from ..video import plan_clips

    return plan_clips(path, frames, candidates, start, end, limits, info=info)


def embed_candidates(retriever: Retriever, path, indices: list[list[int]], info, image_processor, temporal: str,
                     limits=None, times=None) -> CandidateEmbeddings:
    """Decodes and embeds every candidate, :data:`FRAMES_PER_BATCH` frames at a time.

    ``times``: the video's :class:`mugstan_chat.video.FrameTimes` for the candidates' spans (default: index / fps).
    """
    from ..video import clip_spans, load_video_clips

    frames = len(indices[0])
    per_batch = max(1, FRAMES_PER_BATCH // frames)
    decode_ms = encode_ms = 0.0
    out = []
    for first in range(0, len(indices), per_batch):
        t0 = time.perf_counter()
        clips = load_video_clips(path, frames_per_clip=frames, indices=indices[first:first + per_batch], info=info,
                                 limits=limits, image_processor=image_processor).clips
        t1 = time.perf_counter()
        out.append(retriever.embed_clips(clips, temporal))
        if retriever.device.type == "cuda":
            torch.cuda.synchronize(retriever.device)
        t2 = time.perf_counter()
        decode_ms += (t1 - t0) * 1000
        encode_ms += (t2 - t1) * 1000
    return CandidateEmbeddings([torch.cat(out).cpu()], indices, clip_spans(indices, times or info.fps), info, decode_ms,
                               encode_ms)


def select(retriever: Retriever, candidates: CandidateEmbeddings, question: str, keep: int, temporal: str,
           tokens_per_clip: int, cached: bool, strategy: str = DEFAULT_SELECTION,
           capped: dict | None = None) -> Selection:
    """Scores ``question`` against the candidates and keeps ``keep`` of them by ``strategy``
    (:data:`STRATEGIES`: :func:`rank`, the top K, or :func:`cover`, relevance and coverage).

    ``capped``: what was asked, when M and K were capped at the clips the video holds (reported as is).
    """
    started = time.perf_counter()
    scores = retriever.scores(question, candidates.frames, temporal)
    chosen = STRATEGIES[strategy](scores, candidates.times, keep)
    rank_ms = (time.perf_counter() - started) * 1000
    total = len(candidates.indices)
    return Selection(total, chosen, [float(s) for s in scores], list(candidates.times),
                     retriever.mug_for(temporal).mode, rank_ms,
                     0.0 if cached else candidates.decode_ms + candidates.encode_ms, cached,
                     (total - len(chosen)) * tokens_per_clip, strategy, capped=capped)


def middle_frames(indices: list[list[int]]) -> list[list[int]]:
    """The coarse pass's input: each candidate's middle sampled frame, one frame per candidate."""
    return [[clip[len(clip) // 2]] for clip in indices]


def select_with_shortlist(retriever: Retriever, coarse: CandidateEmbeddings, embed_full, question: str, keep: int,
                          shortlist: int, temporal: str, tokens_per_clip: int, cached: bool,
                          strategy: str = DEFAULT_SELECTION, capped: dict | None = None) -> Selection:
    """Two passes: every candidate scored on one frame, the ``shortlist`` best (by ``strategy``) embedded with all
    T frames and scored again, the ``keep`` shown chosen among those.

    Why: embedding the candidates is the whole cost of selection (M x T frames through the tower); one
    frame per candidate finds where the question is about at 1/T of it, and only S of the M candidates
    pay for their T frames (docs/performance.md). ``coarse``: the M one-frame embeddings (``indices`` and
    ``times`` are the full candidates'); ``embed_full(indices) -> ((S, T, P) frame embeddings, ms)``.
    """
    started = time.perf_counter()
    pick = STRATEGIES[strategy]
    coarse_scores = retriever.scores(question, coarse.frames, temporal)
    short = pick(coarse_scores, coarse.times, shortlist)
    scored = time.perf_counter()
    frames, embed_ms = embed_full(short)
    embedded = time.perf_counter()
    fine = retriever.scores(question, frames, temporal)
    local = pick(fine, [coarse.times[i] for i in short], keep)
    chosen = sorted((short[j] for j in local), key=lambda i: (coarse.times[i][0], i))
    rank_ms = ((scored - started) + (time.perf_counter() - embedded)) * 1000
    total = len(coarse.indices)
    first_ms = 0.0 if cached else coarse.decode_ms + coarse.encode_ms
    return Selection(total, chosen, [float(s) for s in coarse_scores], list(coarse.times),
                     retriever.mug_for(temporal).mode, rank_ms, first_ms + embed_ms, cached and embed_ms == 0,
                     (total - len(chosen)) * tokens_per_clip, strategy, list(short), [float(s) for s in fine],
                     capped=capped)


def retriever_for(chat_model) -> Retriever:
    """The chat model's :class:`Retriever`, loaded on first use and kept on the model (thread-safe).

    Raises SelectionUnavailable (every time, with the same line) when there is no text side.
    """
    with chat_model.retrieval_lock:
        loaded = chat_model.retrieval
        if loaded is None:
            loaded = load_retriever(chat_model)
            chat_model.retrieval = loaded
    if isinstance(loaded, SelectionUnavailable):
        raise loaded
    return loaded
