"""Image-language backbones behind the one small interface STAN needs (docs/design.md section 1).

STAN reads the outputs of individual backbone layers, copies layers to initialise
its intra-frame modules and runs their attention and MLP sub-blocks separately,
and needs the backbone's class and position embeddings. Two families provide it:

* transformers' ``CLIPModel`` / ``CLIPVisionModel`` (the tower inside LLaVA);
* open_clip ViT models: CLIP and CoCa (paper Table VII).

Shapes: N images, L patches + 1 [CLS] token, width D, joint-space width P;
text: B captions of K tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextFeatures:
    """Projected text-token embeddings for Mug (docs/design.md section 2).

    tokens: (B, K, P) every token projected into the joint space.
    mask: (B, K) bool, True for real tokens (up to and including end-of-text).
    pooled: (B, P) the backbone's own sentence embedding (end-of-text token or CoCa's CLS).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class VisionBackbone(nn.Module):
    """The vision tower as STAN sees it: embeddings, a list of layers, and a head.

    Subclasses set ``width``, ``num_layers``, ``num_heads``, ``patch_size``,
    ``image_size`` and implement the abstract methods.
    """

    width: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def class_embedding(self) -> torch.Tensor:
        """(D,) the learned [CLS] embedding."""
        raise NotImplementedError

    @property
    def position_embedding(self) -> torch.Tensor:
        """(L+1, D) position embeddings; row 0 is the [CLS] slot."""
        raise NotImplementedError

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L+1, D): patch + class + position embeddings and pre-norm."""
        raise NotImplementedError

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Runs backbone layer ``index`` on (N, L+1, D) tokens."""
        layer = self.layers[index]
        hidden = hidden + self.attention_branch(layer, hidden)
        return hidden + self.mlp_branch(layer, hidden)

    @staticmethod
    def attention_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The pre-norm attention residual branch of ``layer`` (without the residual add)."""
        raise NotImplementedError

    @staticmethod
    def mlp_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The pre-norm MLP residual branch of ``layer`` (without the residual add)."""
        raise NotImplementedError

    def pool_and_project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L+1, D) last-layer tokens -> (N, P) image embeddings (final norm + projection)."""
        raise NotImplementedError

    def copy_layer(self, index: int) -> nn.Module:
        """A trainable deep copy of layer ``index`` (STAN's intra-frame modules start from it)."""
        layer = copy.deepcopy(self.layers[index])
        for param in layer.parameters():
            param.requires_grad_(True)
        return layer

    def fingerprint(self) -> dict:
        """What a trained STAN branch depends on; checked when a branch is loaded onto a tower."""
        return {
            "width": self.width,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Plain image encoding: (N, 3, H, W) -> (N, P)."""
        hidden = self.embed(pixel_values)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden)
        return self.pool_and_project(hidden)


class TextBackbone(nn.Module):
    """The text tower as Mug sees it: every token projected into the joint space."""

    context_length: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        raise NotImplementedError


# --------------------------------------------------------------------------- transformers


class HFCLIPVision(VisionBackbone):
    """transformers ``CLIPVisionModel`` (optionally with ``CLIPModel.visual_projection``).

    Wraps the module it is given, without copying, so the LLaVA adapter can own
    LLaVA's own tower weights.
    """

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection
        config = vision_model.config
        self.width = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    @property
    def class_embedding(self) -> torch.Tensor:
        return self.vision_model.embeddings.class_embedding

    @property
    def position_embedding(self) -> torch.Tensor:
        return self.vision_model.embeddings.position_embedding.weight

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model.embeddings(pixel_values)
        return self.vision_model.pre_layrnorm(hidden)

    @staticmethod
    def attention_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)
        return out

    @staticmethod
    def mlp_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.mlp(layer.layer_norm2(hidden))

    def pool_and_project(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model.post_layernorm(tokens[:, 0])
        if self.projection is None:
            return pooled
        return self.projection(pooled)


class HFCLIPText(TextBackbone):
    """transformers ``CLIPTextModel`` plus ``text_projection`` applied to every token."""

    def __init__(self, text_model: nn.Module, projection: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.projection = projection
        self.context_length = text_model.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        mask = attention_mask.bool()
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask.long())
        tokens = self.projection(out.last_hidden_state)  # (B, K, P), final norm already applied
        eot = _last_true(mask)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
        return TextFeatures(tokens=tokens, mask=mask, pooled=pooled)


# --------------------------------------------------------------------------- open_clip


class OpenCLIPVision(VisionBackbone):
    """open_clip ``VisionTransformer`` (CLIP, or CoCa with its attentional pooler as head)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise TypeError(f"open_clip vision tower {type(visual).__name__} is not a ViT; STAN needs a ViT")
        if not getattr(visual.transformer, "batch_first", True):
            raise TypeError("open_clip towers built with batch_first=False are not supported")
        self.visual = visual
        self.width = visual.transformer.width
        self.num_layers = len(visual.transformer.resblocks)
        self.num_heads = visual.transformer.resblocks[0].attn.num_heads
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size[0]

    @property
    def layers(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def class_embedding(self) -> torch.Tensor:
        return self.visual.class_embedding

    @property
    def position_embedding(self) -> torch.Tensor:
        return self.visual.positional_embedding

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(pixel_values)

    @staticmethod
    def attention_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.ls_1(layer.attention(q_x=layer.ln_1(hidden)))

    @staticmethod
    def mlp_branch(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.ls_2(layer.mlp(layer.ln_2(hidden)))

    def pool_and_project(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled


class OpenCLIPText(TextBackbone):
    """open_clip text tower (CLIP's, or CoCa's with an appended CLS) with every token projected."""

    def __init__(self, model: nn.Module):
        super().__init__()
        text = getattr(model, "text", None)
        self.is_coca = text is not None and getattr(text, "cls_emb", None) is not None
        if text is None:  # plain open_clip.CLIP keeps the text tower's parts on the model itself
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            self.text = None
        else:
            self.text = text
        self.context_length = (text.context_length if text is not None else model.context_length)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.text.text_projection if self.text is not None else self.text_projection
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        mask = attention_mask.bool()
        if self.text is not None:
            x, attn_mask = self.text._embeds(input_ids)
            x = self.text.transformer(x, attn_mask=attn_mask)
            ln_final = self.text.ln_final
        else:
            x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
            x = self.transformer(x, attn_mask=self.attn_mask[: input_ids.shape[1], : input_ids.shape[1]])
            ln_final = self.ln_final
        if self.is_coca:  # CoCa appends a CLS token whose output is the sentence embedding
            pooled = self._project(ln_final(x[:, -1]))
            tokens = self._project(ln_final(x[:, :-1]))
        else:
            tokens = self._project(ln_final(x))
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), _last_true(mask)]
        return TextFeatures(tokens=tokens, mask=mask, pooled=pooled)


def _last_true(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) bool -> (B,) index of the last True (the end-of-text token)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)


# --------------------------------------------------------------------------- factory


@dataclass
class BackboneConfig:
    """Which image-language backbone to build; chosen by fields, never by name substrings."""

    family: str = "hf"  # "hf" (transformers CLIPModel) or "open_clip"
    name: str | None = None  # hub id or local dir (hf); model name (open_clip)
    pretrained: str | None = None  # open_clip pretrained tag or weights file; unused for hf
    model_config: dict | None = None  # inline architecture for locally built (tiny) models
    seed: int = 0  # initialisation seed when the weights are random
    revision: str | None = None  # hf: the hub revision (commit, tag) of ``name``, so an export pins what it names

    @property
    def is_reloadable(self) -> bool:
        """True when the same weights can be rebuilt from this config alone."""
        if self.model_config is not None:
            return True  # random weights rebuilt from the seed
        if self.family == "hf":
            return self.name is not None
        return self.name is not None and self.pretrained is not None


def create_backbone(config: BackboneConfig) -> tuple[VisionBackbone, TextBackbone]:
    """Builds (vision, text) towers from a :class:`BackboneConfig`."""
    if config.family == "hf":
        return _create_hf(config)
    if config.family == "open_clip":
        return _create_open_clip(config)
    raise ValueError(f"unknown backbone family {config.family!r}; expected 'hf' or 'open_clip'")


def _create_hf(config: BackboneConfig):
    from transformers import CLIPConfig, CLIPModel

    if config.model_config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = CLIPModel(CLIPConfig(**config.model_config))
    elif config.name is not None:
        model = CLIPModel.from_pretrained(config.name, revision=config.revision)
    else:
        raise ValueError("hf backbone needs a name (hub id or directory) or an inline model_config")
    model.eval()
    vision = HFCLIPVision(model.vision_model, model.visual_projection)
    text = HFCLIPText(model.text_model, model.text_projection)
    return vision, text


def _create_open_clip(config: BackboneConfig):
    import open_clip

    if config.model_config is not None:
        cfg = dict(config.model_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if "multimodal_cfg" in cfg:
                model = open_clip.CoCa(**cfg)
            else:
                model = open_clip.CLIP(**cfg)
    elif config.name is not None:
        model = open_clip.create_model(config.name, pretrained=config.pretrained)
    else:
        raise ValueError("open_clip backbone needs a model name or an inline model_config")
    model.eval()
    return OpenCLIPVision(model.visual), OpenCLIPText(model)


def tiny_backbone_config(family: str = "hf", coca: bool = False, seed: int = 0,
                         image_size: int = 32, patch_size: int = 8, width: int = 32,
                         layers: int = 6, heads: int = 4) -> BackboneConfig:
    """A tiny random backbone (no download) for tests and the offline demo.

    Uses CLIP's real 49408-token vocabulary so open_clip's bundled BPE tokenizer applies.
    """
    text_width, text_layers, text_heads, projection = 32, 2, 4, 16
    if family == "hf":
        model_config = {
            "text_config": {
                "hidden_size": text_width, "intermediate_size": 4 * text_width,
                "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
                "max_position_embeddings": 77, "vocab_size": 49408,
                "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
            },
            "vision_config": {
                "hidden_size": width, "intermediate_size": 4 * width,
                "num_hidden_layers": layers, "num_attention_heads": heads,
                "image_size": image_size, "patch_size": patch_size,
            },
            "projection_dim": projection,
        }
    elif family == "open_clip":
        model_config = {
            "embed_dim": projection,
            "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width,
                           "layers": layers, "head_width": width // heads},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width,
                         "heads": text_heads, "layers": text_layers},
        }
        if coca:
            model_config["vision_cfg"].update({"attentional_pool": True, "attn_pooler_heads": heads,
                                               "attn_pooler_queries": 8, "output_tokens": True})
            model_config["text_cfg"].update({"embed_cls": True, "output_tokens": True})
            model_config["multimodal_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": text_width,
                                              "heads": text_heads, "layers": 1, "attn_pooler_heads": heads}
    else:
        raise ValueError(f"unknown backbone family {family!r}")
    return BackboneConfig(family=family, model_config=model_config, seed=seed)

