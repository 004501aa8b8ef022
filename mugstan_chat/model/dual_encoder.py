"""MugStan: the video-text dual encoder (backbone + STAN for video, the backbone's text tower, Mug scoring).

With ``stan=None`` it is the plain-CLIP baseline: every frame encoded as an
image, and (with Mug mode "mean") frames mean-pooled against the end-of-text token.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backbone import BackboneConfig, TextFeatures, create_backbone
from .checkpoint import CheckpointError, check_fingerprint, load_checkpoint, save_checkpoint
from .mug import MugConfig, score_matrix
from .stan import STAN, StanConfig, encode_video_tokens
from .tokenizer import CaptionTokenizer


@dataclass
class MugStanConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    stan: StanConfig | None = field(default_factory=StanConfig)  # None: plain CLIP, no temporal branch
    mug: MugConfig = field(default_factory=MugConfig)
    freeze_backbone: bool = False  # train STAN only (the LLaVA-compatible mode); saves the branch alone
    context_length: int = 64  # caption tokens (64 for post-pretraining, 32 for MSR-VTT/LSMDC)
    tokenizer: str | None = None  # transformers tokenizer name/path; None: open_clip's bundled CLIP BPE
    frames: int | None = None  # frames per clip it was trained with: evaluation's default (None: unknown)

    def to_dict(self) -> dict:
        return {
            "backbone": asdict(self.backbone),
            "stan": None if self.stan is None else self.stan.to_dict(),
            "mug": self.mug.to_dict(),
            "freeze_backbone": self.freeze_backbone,
            "context_length": self.context_length,
            "tokenizer": self.tokenizer,
            "frames": self.frames,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "MugStanConfig":
        return cls(
            backbone=BackboneConfig(**data["backbone"]),
            stan=None if data.get("stan") is None else StanConfig(**data["stan"]),
            mug=MugConfig(**data.get("mug", {})),
            freeze_backbone=data.get("freeze_backbone", False),
            context_length=data.get("context_length", 64),
            tokenizer=data.get("tokenizer"),
            frames=data.get("frames"),
        )


class MugStan(nn.Module):
    """Video encoder (backbone + STAN), text encoder, and Mug scoring."""

    def __init__(self, config: MugStanConfig | None = None):
        super().__init__()
        self.config = config or MugStanConfig()
        self.vision, self.text = create_backbone(self.config.backbone)
        self.stan = STAN(self.vision, self.config.stan) if self.config.stan is not None else None
        self.gradient_checkpointing = False
        if self.config.freeze_backbone:
            self.freeze_backbone()

    # ----------------------------------------------------------------- encoders

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def freeze_backbone(self) -> None:
        """Freezes both towers; only STAN trains (needed to stay swappable into LLaVA)."""
        for module in (self.vision, self.text):
            for param in module.parameters():
                param.requires_grad_(False)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised clips -> (B, T, P) frame embeddings (not normalised)."""
        B, T = video.shape[:2]
        tokens = encode_video_tokens(self.vision, self.stan, video, checkpointing=self.gradient_checkpointing)
        return self.vision.pool_and_project(tokens.flatten(0, 1)).view(B, T, -1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """(B, K) ids and bool mask -> projected tokens (B, K, P), mask (B, K), pooled (B, P)."""
        return self.text(input_ids, attention_mask)

    def score(self, text: TextFeatures, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B_text, B_video) Mug scores between encoded captions and clips."""
        return score_matrix(text.tokens, text.mask, text.pooled, frames, frame_mask, self.config.mug)

    def forward(self, video: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Encodes a batch of clips and captions: returns (frames (B, T, P), TextFeatures)."""
        return self.encode_video(video), self.encode_text(input_ids, attention_mask)

    def build_tokenizer(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.config.context_length, self.config.tokenizer)

    # ----------------------------------------------------------------- checkpoints

    def backbone_fingerprint(self) -> dict:
        fingerprint = self.vision.fingerprint()
        if self.stan is not None:
            fingerprint["fuse_layer"] = self.stan.fuse_layer
        return fingerprint

    def saves_branch_only(self) -> bool:
        return self.config.freeze_backbone and self.stan is not None and self.config.backbone.is_reloadable

    def branch_state_dict(self) -> dict[str, torch.Tensor]:
        """STAN's weights alone, keys prefixed ``stan.``."""
        return {f"stan.{key}": value for key, value in self.stan.state_dict().items()}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes config.json + model.safetensors (the branch alone when the backbone is frozen and named)."""
        branch_only = self.saves_branch_only()
        config = {
            "model": self.config.to_dict(),
            "weights": "branch" if branch_only else "full",
            "backbone_fingerprint": self.backbone_fingerprint(),
        }
        save_checkpoint(directory, config, self.branch_state_dict() if branch_only else self.state_dict())

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MugStan":
        """Loads a directory (or hub id) written by :meth:`save_pretrained`."""
        saved, state, _ = load_checkpoint(path_or_id)
        if "model" not in saved:
            raise CheckpointError(f"{path_or_id} holds a branch for LLaVA, not a MugStan model")
        model = cls(MugStanConfig.from_dict(saved["model"]))
        check_fingerprint(saved.get("backbone_fingerprint", {}), model.backbone_fingerprint(), str(path_or_id))
        if saved.get("weights") == "branch":
            missing = set(model.branch_state_dict()) - set(state)
            unexpected = set(state) - set(model.branch_state_dict())
            if missing or unexpected:
                raise CheckpointError(f"branch in {path_or_id} does not fit: missing {sorted(missing)[:5]}, "
                                      f"unexpected {sorted(unexpected)[:5]}")
            model.stan.load_state_dict({k[len("stan."):]: v for k, v in state.items()})
        else:
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise CheckpointError(f"weights in {path_or_id} do not fit the model: missing "
                                      f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return model.to(map_location).eval()


def build_stan_branch(vision, stan_config: StanConfig, branch_state: dict[str, torch.Tensor],
                      fingerprint: dict, source: str, ignore: tuple[str, ...] = ()) -> STAN:
    """A STAN built on ``vision`` and loaded with a saved branch, after checking the tower fingerprint."""
    stan = STAN(vision, stan_config)
    actual = {**vision.fingerprint(), "fuse_layer": stan.fuse_layer}
    check_fingerprint(fingerprint, actual, source, ignore=ignore)
    try:
        stan.load_state_dict({k[len("stan."):]: v for k, v in branch_state.items() if k.startswith("stan.")})
    except RuntimeError as error:
        raise CheckpointError(f"branch {source} does not fit the tower: {error}") from error
    return stan
