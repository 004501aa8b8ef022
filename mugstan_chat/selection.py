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
(:func:`load_retrieval_head`). A branch without them falls back to uniform clips, saying so in one
line (:class:`SelectionUnavailable`). Selection is a pure function of (video, question, settings).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone import BackboneConfig, TextBackbone, TextFeatures, VisionBackbone, create_backbone
from .checkpoint import CheckpointError, load_checkpoint
from .mug import MugConfig, score_matrix
from .options import DEFAULT_CANDIDATES, DEFAULT_SELECTION, SELECTIONS
from .stan import STAN, encode_video_tokens
from .tokenizer import CaptionTokenizer

logger = logging.getLogger(__name__)

FRAMES_PER_BATCH = 64  # candidate frames decoded and encoded at once: bounds memory on long videos
COVERAGE_SHARPEN = 1.0  # exponent on the normalised scores in :func:`cover` (BOLT's default: none)


class SelectionUnavailable(Exception):
    """The loaded model cannot rank clips (no text tower to be had); the message is one line for users."""


@dataclass
class Retriever:
    """The dual encoder selection scores with: a video side (tower + branch to the last layer) and a text side.

    Args:
        backbone: the vision tower (for chat: LLaVA's own CLIP weights, ``VideoTower.backbone``).
        stan: the STAN branch fused in ``stan`` mode (None: plain CLIP only).
        text: the CLIP text tower (every token projected, as Mug needs).
        tokenizer: captions to ids and mask, with the context length the branch was trained with.
        mug: the branch's Mug mode and temperature; ``mean`` mode (and ``stan=None``) uses plain cosine.
        projection: the CLIP checkpoint's visual projection, when ``backbone.pool_and_project``
            stops at the post-layernorm (LLaVA's tower has none); None when the backbone projects.
        source: where the text side came from, for notices and cache keys.
    """

    backbone: VisionBackbone
    stan: STAN | None
    text: TextBackbone
    tokenizer: CaptionTokenizer
    mug: MugConfig
    projection: nn.Module | None = None
    source: str = ""
    encodes: int = 0  # clips embedded so far (tests count tower work with it)
    frames_encoded: int = 0  # frames through the tower so far (what a coarse pass saves)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return self.backbone.position_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.position_embedding.dtype

    def mug_for(self, temporal: str) -> MugConfig:
        """The branch's Mug mode in ``stan`` mode; the plain cosine of the frame mean in ``mean`` mode."""
        if temporal == "stan" and self.stan is not None:
            return self.mug
        return MugConfig(mode="mean", tau=self.mug.tau)

    def embed_clips(self, clips: torch.Tensor, temporal: str = "stan") -> torch.Tensor:
        """(B, T, 3, H, W) preprocessed clips -> (B, T, P) frame embeddings in the joint space (float32)."""
        stan = self.stan if temporal == "stan" else None
        with torch.inference_mode():
            pixels = clips.to(device=self.device, dtype=self.dtype)
            tokens = encode_video_tokens(self.backbone, stan, pixels)  # every layer, the last included
            pooled = self.backbone.pool_and_project(tokens.flatten(0, 1))  # [CLS] -> post-layernorm (-> projection)
            if self.projection is not None:
                pooled = self.projection(pooled.to(self.projection.weight.dtype))
        with self._lock:
            self.encodes += clips.shape[0]
            self.frames_encoded += clips.shape[0] * clips.shape[1]
        return pooled.float().view(clips.shape[0], clips.shape[1], -1)

    def embed_question(self, question: str) -> TextFeatures:
        tokens = self.tokenizer([question])
        param = next(self.text.parameters())
        with torch.inference_mode():
            out = self.text(tokens.input_ids.to(param.device), tokens.attention_mask.to(param.device))
        return TextFeatures(out.tokens.float(), out.mask, out.pooled.float())

    def scores(self, question: str, frames: torch.Tensor, temporal: str = "stan") -> torch.Tensor:
        """(M,) scores of the candidates' frame embeddings (M, T, P) against ``question``."""
        text = self.embed_question(question)
        with torch.inference_mode():
            return score_matrix(text.tokens, text.mask, text.pooled, frames.to(text.tokens.device), None,
                                self.mug_for(temporal))[0].cpu()


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
    from .video import plan_clips

    return plan_clips(path, frames, candidates, start, end, limits, info=info)


def embed_candidates(retriever: Retriever, path, indices: list[list[int]], info, image_processor, temporal: str,
                     limits=None, times=None) -> CandidateEmbeddings:
    """Decodes and embeds every candidate, :data:`FRAMES_PER_BATCH` frames at a time.

    ``times``: the video's :class:`.video.FrameTimes` for the candidates' spans (default: index / fps).
    """
    from .video import clip_spans, load_video_clips

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


# ------------------------------------------------------------------------------ the text side for LLaVA


@dataclass
class RetrievalHead:
    """What a LLaVA checkpoint lacks for retrieval: the CLIP text tower, visual projection and Mug settings."""

    text: TextBackbone
    tokenizer: CaptionTokenizer
    projection: nn.Module | None
    mug: MugConfig
    source: str
    notice: str = ""  # e.g. the CLIP checkpoint's vision tower differs from LLaVA's


def _same_weights(vision: VisionBackbone, tower_backbone: VisionBackbone) -> bool:
    mine = vision.vision_model.state_dict()
    theirs = tower_backbone.vision_model.state_dict()
    if mine.keys() != theirs.keys():
        return False
    return all(torch.equal(mine[k].float().cpu(), theirs[k].float().cpu()) for k in mine)


def head_from_clip(backbone: BackboneConfig, tower_backbone: VisionBackbone, mug: MugConfig, context_length: int,
                   tokenizer: str | None, source: str) -> RetrievalHead:
    """Builds the CLIP named by ``backbone`` and keeps its text tower and visual projection.

    Its vision tower must have LLaVA's shape (fingerprint); if its weights differ, a notice says so
    (the ranking then pairs LLaVA's tower with this checkpoint's projection and text tower).
    """
    if backbone.family != "hf":
        raise SelectionUnavailable(f"{source}: the CLIP checkpoint is an {backbone.family} model; LLaVA's tower is a "
                                   "transformers CLIP, so its text tower cannot be paired with it")
    if backbone.model_config is not None and "text_config" not in backbone.model_config:
        raise SelectionUnavailable(f"{source} names no CLIP text tower (its backbone has a vision config only)")
    if not backbone.is_reloadable:
        raise SelectionUnavailable(f"{source} does not name its CLIP checkpoint (no hub id or inline architecture)")
    try:
        vision, text = create_backbone(backbone)
    except Exception as error:  # offline, missing repo: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SelectionUnavailable(f"cannot load the CLIP checkpoint {backbone.name or 'inline'} named by {source}: "
                                   f"{reason}") from error
    mismatch = {k: v for k, v in vision.fingerprint().items() if tower_backbone.fingerprint().get(k) != v}
    if mismatch:
        raise SelectionUnavailable(f"the CLIP checkpoint named by {source} does not have LLaVA's vision tower "
                                   f"({', '.join(f'{k}={v}' for k, v in mismatch.items())})")
    notice = "" if _same_weights(vision, tower_backbone) else (
        f"the CLIP checkpoint named by {source} has other vision weights than LLaVA's tower: clip ranking pairs "
        "LLaVA's tower with its projection and text tower")
    device, dtype = tower_backbone.position_embedding.device, tower_backbone.position_embedding.dtype
    projection = vision.projection.to(device=device, dtype=dtype).eval()
    text = text.to(device=device).eval()
    return RetrievalHead(text, CaptionTokenizer(context_length, tokenizer), projection, mug, source, notice)


def load_retrieval_head(tower_backbone: VisionBackbone, branch: str | None = None,
                        clip: str | None = None) -> RetrievalHead:
    """The text side for LLaVA: from the branch's export, or from the CLIP checkpoint ``clip`` names.

    Args:
        tower_backbone: LLaVA's tower (``VideoTower.backbone``), to check the CLIP checkpoint against.
        branch: the loaded STAN branch (directory or hub id): its export names the CLIP checkpoint it was
            trained against (``model.backbone``) and its Mug mode and temperature (``model.mug``).
        clip: a CLIP checkpoint (hub id or directory) to take the text tower from instead
            (``--retrieval-clip``); the only source without a branch (Mug mode ``mean`` then).
    Raises:
        SelectionUnavailable: one line saying what is missing.
    """
    mug, context_length, tokenizer, backbone, source = MugConfig(mode="mean"), 77, None, None, clip
    if branch is not None:
        try:
            config, _, _ = load_checkpoint(branch)
        except CheckpointError as error:
            raise SelectionUnavailable(f"cannot read the STAN branch {branch}: {error}") from error
        model = config.get("model") or {}
        if "mug" not in model or "backbone" not in model:
            raise SelectionUnavailable(f"the STAN branch {branch} names no CLIP text tower and Mug head "
                                       "(export it with MugStan.save_pretrained)")
        mug = MugConfig(**model["mug"])
        context_length, tokenizer = model.get("context_length", 64), model.get("tokenizer")
        backbone, source = BackboneConfig(**model["backbone"]), f"the STAN branch {branch}"
    if clip is not None:
        backbone, source = BackboneConfig(family="hf", name=str(clip)), f"--retrieval-clip {clip}"
    if backbone is None:
        raise SelectionUnavailable("no STAN branch and no --retrieval-clip: there is no text tower to rank clips with")
    return head_from_clip(backbone, tower_backbone, mug, context_length, tokenizer, source)


def demo_retrieval_head(tower_backbone: VisionBackbone, seed: int = 0) -> RetrievalHead:
    """The demo model's text side: a tiny random CLIP text tower and projection (rankings are arbitrary)."""
    from .backbone import HFCLIPText

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
                                eos_token_id=49407, pad_token_id=49407)
        text = HFCLIPText(CLIPTextModel(config).eval(), nn.Linear(32, 16, bias=False))
        projection = nn.Linear(tower_backbone.width, 16, bias=False)
    device, dtype = tower_backbone.position_embedding.device, tower_backbone.position_embedding.dtype
    return RetrievalHead(text.to(device).eval(), CaptionTokenizer(32), projection.to(device=device, dtype=dtype),
                         MugConfig(mode="frame-token"), "demo (random text tower)")


def retriever_for(chat_model) -> Retriever:
    """The chat model's :class:`Retriever`, loaded on first use and kept on the model (thread-safe).

    Raises SelectionUnavailable (every time, with the same line) when there is no text side.
    """
    with chat_model.retrieval_lock:
        loaded = chat_model.retrieval
        if loaded is None:
            loaded = _load(chat_model)
            chat_model.retrieval = loaded
    if isinstance(loaded, SelectionUnavailable):
        raise loaded
    return loaded


def _load(chat_model):
    settings, tower = chat_model.settings, chat_model.tower
    clip = getattr(settings, "retrieval_clip", None)
    try:
        if settings.stan == "demo" and clip is None:
            head = demo_retrieval_head(tower.backbone)
        else:
            head = load_retrieval_head(tower.backbone, settings.stan if settings.stan != "demo" else None, clip)
    except SelectionUnavailable as error:
        logger.warning("clip selection unavailable: %s", error)
        return error
    if head.notice:
        logger.warning(head.notice)
    return Retriever(tower.backbone, tower.stan, head.text, head.tokenizer, head.mug, head.projection, head.source)
