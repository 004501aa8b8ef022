"""Reading the authors' released Mug-STAN checkpoints (docs/design.md section 4b).

The authors' mmaction2 model (farewellthree/STAN, ``clip_stan_hf.py``) keeps the
vision embeddings directly on the backbone and builds its cross-frame layers from
CLIP's attention class. This module maps that layout onto :class:`mugstan_chat.model.dual_encoder.MugStan`:

==================================================  ==============================================
authors' key (``state_dict``, ``module.`` stripped)  ours
==================================================  ==============================================
backbone.class_embedding                            vision.vision_model.embeddings.class_embedding
backbone.patch_embedding.weight                     vision.vision_model.embeddings.patch_embedding.weight
backbone.position_embedding.weight                  vision.vision_model.embeddings.position_embedding.weight
backbone.pre_layrnorm.* / post_layernorm.*          vision.vision_model.pre_layrnorm.* / post_layernorm.*
backbone.layers.{i}.* (CLIPEncoderLayer)            vision.vision_model.encoder.layers.{i}.*
backbone.visual_projection.weight                   vision.projection.weight
backbone.STAN_time_embed.weight                     stan.temporal_embedding
backbone.STAN_S_layers.{j}.* (CLIPEncoderLayer)     stan.intra_frame.{j}.layer.*
backbone.STAN_T_layers.{j}.layer_norm1.*            stan.cross_frame.{j}.norm.*
backbone.STAN_T_layers.{j}.self_attn.{q,k,v}_proj   stan.cross_frame.{j}.attn.in_proj_* (q, k, v stacked)
backbone.STAN_T_layers.{j}.self_attn.out_proj.*     stan.cross_frame.{j}.attn.out_proj.*
backbone.STAN_T_layers.{j}.temporal_fc.*            stan.cross_frame.{j}.out.*
text_backbone.text_model.*                          text.text_model.*
text_backbone.text_projection.weight                text.projection.weight
==================================================  ==============================================

``position_ids`` buffers (older transformers saved them) and ``logit_scale`` are
dropped; any other unmapped key is an error.

The architecture is never taken from the keys alone, since a file missing whole
layers would then silently become a smaller model. It comes from, in order: the
caller's explicit layer counts; the checkpoint's own mmengine config text
(``meta['cfg']``: STAN depth, the CLIP it was built from, the Mug head's mode);
the released sizes by width (vision 768 or 1024 wide: 12 or 24 layers; text 512 or
768 wide: 12 layers; STAN depth 4); and only then the keys, with a warning. A
checkpoint that does not fill that architecture is refused, naming what is missing.
"""

from __future__ import annotations

import ast
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# (authors' prefix, our prefix); "{i}" is a layer index
_PREFIXES = [
    ("backbone.class_embedding", "vision.vision_model.embeddings.class_embedding"),
    ("backbone.patch_embedding.", "vision.vision_model.embeddings.patch_embedding."),
    ("backbone.position_embedding.", "vision.vision_model.embeddings.position_embedding."),
    ("backbone.pre_layrnorm.", "vision.vision_model.pre_layrnorm."),
    ("backbone.post_layernorm.", "vision.vision_model.post_layernorm."),
    ("backbone.layers.{i}.", "vision.vision_model.encoder.layers.{i}."),
    ("backbone.visual_projection.weight", "vision.projection.weight"),
    ("backbone.STAN_time_embed.weight", "stan.temporal_embedding"),
    ("backbone.STAN_S_layers.{i}.", "stan.intra_frame.{i}.layer."),
    ("backbone.STAN_T_layers.{i}.layer_norm1.", "stan.cross_frame.{i}.norm."),
    ("backbone.STAN_T_layers.{i}.self_attn.out_proj.", "stan.cross_frame.{i}.attn.out_proj."),
    ("backbone.STAN_T_layers.{i}.temporal_fc.", "stan.cross_frame.{i}.out."),
    ("text_backbone.text_model.", "text.text_model."),
    ("text_backbone.text_projection.weight", "text.projection.weight"),
]
_QKV = re.compile(r"^backbone\.STAN_T_layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_IN_PROJ = re.compile(r"^stan\.cross_frame\.(\d+)\.attn\.in_proj_(weight|bias)$")
_IGNORED = re.compile(r"(^|\.)(position_ids|logit_scale)$")
# objects besides tensors in an mmengine checkpoint ("message_hub", "meta"): inert stand-ins, never their code
_BOOKKEEPING = ("numpy.", "mmengine.", "mmcv.", "mmaction.")
_SAFE_BUILTINS = ("builtins.getattr",)  # numpy pickles its dtype classes through getattr

RELEASED_CLIPS = {  # the CLIPs the released configs name: (vision layers, text layers)
    "clip-vit-base-patch32": (12, 12), "clip-vit-base-patch16": (12, 12),
    "clip-vit-large-patch14": (24, 12), "clip-vit-large-patch14-336": (24, 12),
}
RELEASED_VISION_LAYERS = {768: 12, 1024: 24}
RELEASED_TEXT_LAYERS = {512: 12, 768: 12}
RELEASED_STAN_DEPTH = 4  # VITCLIPPretrained_STAN's default, used by every released config
MUG_MODES = {"mug_frame_token": "frame-token", "mug_frame_token_simple": "frame-token-simple",
             "mug_frame_text": "frame-text"}
RELEASED_MUG_MODE = "mug_frame_token_simple"  # Mug_head's default, used by every released Mug-STAN config


class ConversionError(Exception):
    """The input is not an authors' checkpoint this converter can read completely."""


@dataclass
class OfficialCheckpoint:
    state: dict[str, torch.Tensor]  # the model's tensors under the authors' names
    config_text: str | None = None  # mmengine's meta['cfg'], when the file has it
    source: str = ""


@dataclass
class Architecture:
    vision_layers: int
    text_layers: int
    stan_layers: int  # 0: a plain-CLIP checkpoint
    mug_mode: str
    notes: list[str] = field(default_factory=list)  # where each number came from


# --------------------------------------------------------------------------- reading


class _Inert:
    """Stands in for a bookkeeping object of the checkpoint: takes any arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _inert_class(name: str) -> type:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (_Inert,), {"__module__": module, "__qualname__": qualname})


def load_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Reads an authors' checkpoint with ``torch.load(weights_only=True)``.

    mmengine checkpoints also hold training bookkeeping (the message hub's history
    buffers, numpy arrays): those globals, and only those, are unpickled as inert
    stand-ins, so no code from the file runs. Anything else that needs code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        refused = [g for g in unsafe if not g.startswith(_BOOKKEEPING) and g not in _SAFE_BUILTINS]
        if refused or not unsafe:
            raise ConversionError(
                f"{path} needs code to be unpickled and is refused (weights_only=True): it names "
                f"{refused or str(error).splitlines()[0]}. Re-save only its tensors, e.g. "
                f"torch.save(checkpoint['state_dict'], 'weights.pth'), from a trusted environment.") from error
        with torch.serialization.safe_globals([_inert_class(name) for name in unsafe]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    config_text = None
    if isinstance(data, dict) and isinstance(data.get("meta"), dict) and isinstance(data["meta"].get("cfg"), str):
        config_text = data["meta"]["cfg"]
    for key in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in data.items()}
    return OfficialCheckpoint(state=state, config_text=config_text, source=str(path))


# --------------------------------------------------------------------------- key mapping


def _prefix_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_FORWARD = [(_prefix_regex(a), b) for a, b in _PREFIXES]
_BACKWARD = [(_prefix_regex(b), a) for a, b in _PREFIXES]


def _rename(key: str, table) -> str | None:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            prefix = target.replace("{i}", match[1]) if match.groups() else target
            return prefix + key[match.end():]
    return None


def map_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' names -> ours (q/k/v stacked into one in-projection). Raises on an unmapped key."""
    out, qkv, unmapped = {}, {}, []
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        match = _QKV.match(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensors have no mapping, e.g. {unmapped[:8]}")
    for (layer, kind), parts in qkv.items():
        missing = [f"backbone.STAN_T_layers.{layer}.self_attn.{n}_proj.{kind}" for n in "qkv" if n not in parts]
        if missing:
            raise ConversionError(f"incomplete checkpoint: missing {missing}")
        out[f"stan.cross_frame.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def authors_names(our_key: str) -> list[str]:
    """Our key -> the authors' key(s) it comes from (for messages about missing tensors)."""
    match = _IN_PROJ.match(our_key)
    if match:
        return [f"backbone.STAN_T_layers.{match[1]}.self_attn.{n}_proj.{match[2]}" for n in "qkv"]
    return [_rename(our_key, _BACKWARD) or our_key]


# --------------------------------------------------------------------------- architecture


def _literal(node: ast.AST):
    """A config value: literals and ``dict(...)`` calls only; nothing is executed."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def parse_model_config(text: str) -> dict:
    """The ``model = dict(...)`` of an mmengine config text (mmengine's ``pretty_text``), as a dict."""
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        raise ConversionError(f"the checkpoint's config text does not parse: {error}") from error
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "model" for t in node.targets):
            value = _literal(node.value)
            if isinstance(value, dict):
                return value
    raise ConversionError("the checkpoint's config text has no 'model = dict(...)'")


def _released_clip(name: object) -> tuple[int, int] | None:
    if not isinstance(name, str):
        return None
    return RELEASED_CLIPS.get(name.rstrip("/").rsplit("/", 1)[-1])


def _layer_indices(mapped: dict, pattern: str) -> set[int]:
    return {int(m[1]) for k in mapped if (m := re.match(pattern, k))}


def resolve_architecture(mapped: dict[str, torch.Tensor], config_text: str | None = None, *,
                         vision_layers: int | None = None, stan_layers: int | None = None,
                         text_layers: int | None = None, mug_mode: str | None = None) -> Architecture:
    """Layer counts and Mug mode from what states them (see the module docstring), never silently from keys."""
    notes = []
    model = parse_model_config(config_text) if config_text else {}
    visual = model.get("visual_encoder") or {}
    released = _released_clip(visual.get("clip_weight") or visual.get("pretrained_model"))
    vision_width = mapped["vision.vision_model.embeddings.class_embedding"].shape[0]
    text_width = mapped["text.text_model.embeddings.token_embedding.weight"].shape[1]

    def pick(name, given, from_config, by_width, pattern):
        if given is not None:
            notes.append(f"{name}: {given} (given)")
            return given
        if from_config is not None:
            notes.append(f"{name}: {from_config} (checkpoint config)")
            return from_config
        if by_width is not None:
            notes.append(f"{name}: {by_width} (released size for this width)")
            return by_width
        found = _layer_indices(mapped, pattern)
        count = max(found) + 1 if found else 0
        logger.warning("%s: nothing states it; taking %d from the checkpoint's keys. A file missing its last "
                       "layers would go unnoticed: pass the count explicitly.", name, count)
        notes.append(f"{name}: {count} (from the keys: nothing states it)")
        return count

    has_stan = any(k.startswith("stan.") for k in mapped)
    config_depth = None
    if visual.get("type") == "VITCLIPPretrained_STAN":
        config_depth = visual.get("depth", RELEASED_STAN_DEPTH)
    elif visual.get("type") == "VITCLIPPretrained":
        config_depth = 0
    vision = pick("vision layers", vision_layers, released[0] if released else None,
                  RELEASED_VISION_LAYERS.get(vision_width), r"vision\.vision_model\.encoder\.layers\.(\d+)\.")
    text = pick("text layers", text_layers, released[1] if released else None,
                RELEASED_TEXT_LAYERS.get(text_width), r"text\.text_model\.encoder\.layers\.(\d+)\.")
    stan = pick("STAN layers", stan_layers, config_depth,
                (RELEASED_STAN_DEPTH if has_stan else 0) if vision_width in RELEASED_VISION_LAYERS else None,
                r"stan\.(?:cross_frame|intra_frame)\.(\d+)\.")
    if mug_mode is None:
        if model:
            adapter = model.get("adapter")
            authors_mode = (adapter.get("mode", RELEASED_MUG_MODE) if isinstance(adapter, dict) else None)
            if authors_mode is not None and authors_mode not in MUG_MODES:
                raise ConversionError(f"the checkpoint's Mug head mode {authors_mode!r} has no equivalent here "
                                      f"(known: {sorted(MUG_MODES)})")
            mug_mode = MUG_MODES[authors_mode] if authors_mode else "mean"
        else:
            mug_mode = MUG_MODES[RELEASED_MUG_MODE] if stan else "mean"
    notes.append(f"Mug mode: {mug_mode}")
    return Architecture(vision_layers=vision, text_layers=text, stan_layers=stan, mug_mode=mug_mode, notes=notes)


def build_config(mapped: dict[str, torch.Tensor], arch: Architecture, *, vision_heads: int | None = None,
                 text_heads: int | None = None, fuse_layer: int = -1, text_length: int = 64):
    """A MugStanConfig for an hf CLIP backbone of the resolved architecture; widths from the tensors."""
    from .backbone import BackboneConfig
    from .dual_encoder import MugStanConfig
    from .mug import MugConfig
    from .stan import StanConfig

    v, t = "vision.vision_model.", "text.text_model."
    width = _get(mapped, f"{v}embeddings.class_embedding").shape[0]
    patch = _get(mapped, f"{v}embeddings.patch_embedding.weight").shape[-1]
    positions = _get(mapped, f"{v}embeddings.position_embedding.weight").shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(f"{positions - 1} patch positions do not form a square grid")
    tokens = _get(mapped, f"{t}embeddings.token_embedding.weight")
    vocab, text_width = tokens.shape
    # CLIP's BPE puts <|startoftext|> and <|endoftext|> last (49406, 49407 in the released vocabulary)
    vision_config = {"hidden_size": width, "num_hidden_layers": arch.vision_layers,
                     "intermediate_size": _any_layer(mapped, f"{v}encoder.layers", "mlp.fc1.weight").shape[0],
                     "num_attention_heads": vision_heads or max(1, width // 64),
                     "image_size": grid * patch, "patch_size": patch}
    text_config = {"hidden_size": text_width, "num_hidden_layers": arch.text_layers,
                   "intermediate_size": _any_layer(mapped, f"{t}encoder.layers", "mlp.fc1.weight").shape[0],
                   "num_attention_heads": text_heads or max(1, text_width // 64), "vocab_size": vocab,
                   "max_position_embeddings": _get(mapped, f"{t}embeddings.position_embedding.weight").shape[0],
                   "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 1}
    backbone = BackboneConfig(family="hf", model_config={
        "vision_config": vision_config, "text_config": text_config,
        "projection_dim": _get(mapped, "vision.projection.weight").shape[0]})
    stan = None
    if arch.stan_layers:
        stan = StanConfig(num_layers=arch.stan_layers, fuse_layer=fuse_layer,
                          max_frames=mapped["stan.temporal_embedding"].shape[0]
                          if "stan.temporal_embedding" in mapped else 64)
    return MugStanConfig(backbone=backbone, stan=stan, mug=MugConfig(mode=arch.mug_mode), context_length=text_length)


def _get(mapped: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in mapped:
        raise ConversionError(f"incomplete checkpoint: missing {authors_names(key)[0]}")
    return mapped[key]


def _any_layer(mapped: dict[str, torch.Tensor], layers: str, suffix: str) -> torch.Tensor:
    """A tensor every layer has, from whichever layer is present (sizes only; completeness is checked later)."""
    for key, value in mapped.items():
        if key.startswith(layers + ".") and key.endswith("." + suffix):
            return value
    raise ConversionError(f"incomplete checkpoint: no {authors_names(f'{layers}.0.{suffix}')[0]} in any layer")


def _summarise(keys: list[str]) -> str:
    """Missing authors' keys grouped by layer: 'backbone.STAN_S_layers.3.* (16 tensors)'."""
    groups: dict[str, int] = {}
    for key in keys:
        match = re.match(r"^(.*?\.(?:layers|STAN_S_layers|STAN_T_layers)\.\d+)\.", key)
        group = f"{match[1]}.*" if match else key
        groups[group] = groups.get(group, 0) + 1
    parts = [f"{g} ({n} tensors)" if n > 1 else g for g, n in groups.items()]
    return ", ".join(parts[:12]) + (f", and {len(parts) - 12} more" if len(parts) > 12 else "")


def convert(checkpoint: OfficialCheckpoint, *, vision_layers: int | None = None, stan_layers: int | None = None,
            text_layers: int | None = None, mug_mode: str | None = None, **config_kwargs):
    """An authors' checkpoint -> a loaded MugStan in eval mode, plus the resolved Architecture.

    Refuses a checkpoint that does not fill the architecture (missing or extra tensors, wrong shapes).
    """
    from .dual_encoder import MugStan

    mapped = map_keys(checkpoint.state)
    for needed in ("vision.vision_model.embeddings.class_embedding", "text.text_model.embeddings.token_embedding.weight"):
        if needed not in mapped:
            raise ConversionError(f"{checkpoint.source}: not a Mug-STAN/CLIP checkpoint: "
                                  f"missing {authors_names(needed)[0]}")
    arch = resolve_architecture(mapped, checkpoint.config_text, vision_layers=vision_layers, stan_layers=stan_layers,
                                text_layers=text_layers, mug_mode=mug_mode)
    model = MugStan(build_config(mapped, arch, **config_kwargs))
    expected = model.state_dict()
    missing = sorted({name for k in expected if k not in mapped for name in authors_names(k)})
    extra = sorted({name for k in mapped if k not in expected for name in authors_names(k)})
    if missing or extra:
        where = "; ".join(arch.notes)
        message = f"{checkpoint.source} does not fill the expected architecture ({where})"
        if missing:
            message += f": missing {_summarise(missing)}"
        if extra:
            message += f"; unexpected {_summarise(extra)}"
        raise ConversionError(message)
    wrong = [f"{authors_names(k)[0]}: {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if mapped[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"{checkpoint.source}: tensor shapes do not fit: {wrong[:5]}")
    model.load_state_dict(mapped, strict=True)
    return model.eval(), arch
