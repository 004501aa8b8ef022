"""The retrieval side of the chat model: the dual encoder that ranks clips against a question.

A LLaVA checkpoint holds only CLIP's vision tower. Ranking clips (:mod:`mugstan_chat.engine.selection`)
also needs the CLIP text tower, the visual projection and the Mug head the STAN branch was trained
with; this module finds them (the branch's export names its CLIP checkpoint in ``model.backbone`` and
its Mug settings in ``model.mug``, or ``--retrieval-clip`` names one) and pairs them with LLaVA's own
tower as a :class:`Retriever` (docs/design.md section 4c). When none can be had, the reason is one line
(:class:`SelectionUnavailable`) and the chat shows uniform clips.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.backbone import BackboneConfig, TextBackbone, TextFeatures, VisionBackbone, create_backbone
from ..model.checkpoint import CheckpointError, load_checkpoint
from ..model.mug import MugConfig, score_matrix
from ..model.stan import STAN, encode_video_tokens
from ..model.tokenizer import CaptionTokenizer

logger = logging.getLogger(__name__)

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
    from ..model.backbone import HFCLIPText

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


def load_retriever(chat_model) -> Retriever | SelectionUnavailable:
    """The retriever for a loaded chat model (its tower and branch, the text side its settings name), or the
    :class:`SelectionUnavailable` saying why there is none (logged once)."""
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
