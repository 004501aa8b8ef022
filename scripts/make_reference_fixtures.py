"""Golden fixtures from the authors' own code: run by hand, never at test time.

It loads the authors' two model files, ``mmaction/models/backbones/clip_stan_hf.py``
and ``mmaction/models/heads/mug_head.py``, from a local clone of their repository
(farewellthree/STAN; nothing of theirs is copied into this project), builds their
video and text towers on a tiny random CLIP with **every** parameter randomised
(the zero-initialised ``temporal_fc`` layers included), and saves under
``tests/fixtures/authors/``:

* ``mugstan_tiny.pth``: an mmengine-style checkpoint (``meta`` with the config text
  as mmengine's ``Config.pretty_text`` writes it, ``state_dict`` named exactly as
  their ``CLIPSimilarity_split`` model names it, and a ``message_hub``), the layout of
  a checkpoint their training writes;
* ``outputs.safetensors``: input pixels, their frame embeddings for T in {1, 5, 12},
  their text tower's per-token projections of padded captions, their Mug scores in
  the modes ``mug_frame_token``, ``mug_frame_token_simple`` and ``mug_frame_text``
  (also with the pad tokens' embeddings zeroed, which is how their head then excludes
  padding), and the plain-CLIP mean baseline of their ``VITCLIPPretrained``.

Their code needs transformers 4.40 (tuple-returning ``CLIPEncoderLayer``), so run it
in a throw-away virtual environment::

    python -m venv /tmp/authors-venv
    /tmp/authors-venv/bin/pip install torch==2.13.0 transformers==4.40.2 einops mmengine
    git clone https://github.com/farewellthree/STAN /tmp/STAN      # or any local clone
    /tmp/authors-venv/bin/python scripts/make_reference_fixtures.py --authors-repo /tmp/STAN

mmaction2 and mmcv are not installed: their registry, ``DropPath`` (identity at
evaluation) and ``constant_init`` are replaced by the small stand-ins below, which
only supply the names the two files import. ``tests/model/test_authors_reference.py``
converts the checkpoint with our converter and matches every saved output.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME_COUNTS = (1, 5, 12)  # not 3: their forward reads a 5-D input with shape[1] == 3 as (B, C, T, H, W)
MUG_MODES = ("mug_frame_token", "mug_frame_token_simple", "mug_frame_text")
STAN_DEPTH = 3  # not the default 4, so the converter must read it from the checkpoint's config
CONFIG = "configs/exp/stan/mugstan_msrvt_b32_hf.py"  # the released Mug-STAN config the meta text is made from


def _install_stand_ins(torch) -> None:
    """The framework names the two files import, without mmaction2/mmcv (eval-mode behaviour only)."""
    from torch import nn

    class Registry:
        def register_module(self, *args, **kwargs):
            return (lambda cls: cls) if not args else args[0]

    class DropPath(nn.Module):  # stochastic depth: identity at evaluation, all this script runs
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            assert not self.training, "fixtures are made in eval mode"
            return x

    def constant_init(module, val, bias=0):
        nn.init.constant_(module.weight, val)
        if getattr(module, "bias", None) is not None:
            nn.init.constant_(module.bias, bias)

    class GatherLayer(torch.autograd.Function):  # only used while training on GPU
        pass

    names = {
        "mmaction": {}, "mmaction.registry": {"MODELS": Registry()},
        "mmaction.utils": {}, "mmaction.utils.mask_generator": {"TubeMaskingGenerator": object,
                                                                "RandomMaskingGenerator": object},
        "mmaction.models": {}, "mmaction.models.recognizers": {},
        "mmaction.models.recognizers.clip_similarity": {"GatherLayer": GatherLayer},
        "mmcv": {}, "mmcv.cnn": {}, "mmcv.cnn.bricks": {"DropPath": DropPath},
    }
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    import mmengine.model  # real mmengine provides constant_init too; keep theirs when present

    if not hasattr(mmengine.model, "constant_init"):
        mmengine.model.constant_init = constant_init


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_clip(directory: Path, torch, transformers) -> None:
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 16, "vocab_size": 100, "bos_token_id": 98, "eos_token_id": 99,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 4},
        projection_dim=24)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(directory)


def _randomise(module, torch, seed: int) -> None:
    """Every parameter moved off its initial value, so no term of the forward can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith("time_embed.weight") or "embedding" in name:
                param.copy_(0.1 * noise)
            elif param.ndim == 1 and ("norm" in name):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(param.shape[-1] ** -0.5 * noise)


def _meta_config_text(authors_repo: Path, clip_dir: Path) -> str:
    """The released config, pointed at the tiny CLIP with STAN depth 3, as mmengine's pretty_text."""
    from mmengine.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(authors_repo / "configs", Path(tmp) / "configs")
        path = Path(tmp) / CONFIG
        text = path.read_text()
        released = 'pretrained_model="openai/clip-vit-base-patch32"'
        assert released in text and "depth=4" in text, "the released config changed; update this script"
        path.write_text(text.replace(released, f'pretrained_model="{clip_dir}"').replace("depth=4",
                                                                                        f"depth={STAN_DEPTH}"))
        return Config.fromfile(str(path)).pretty_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", required=True, help="local clone of farewellthree/STAN")
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "authors"))
    args = parser.parse_args(argv)

    import torch
    import transformers
    from mmengine.logging import MessageHub
    from safetensors.torch import save_file

    if not transformers.__version__.startswith("4.40"):
        parser.error(f"run in a venv with transformers 4.40 (found {transformers.__version__}); see the docstring")
    repo = Path(args.authors_repo)
    _install_stand_ins(torch)
    backbones = _load(repo / "mmaction/models/backbones/clip_stan_hf.py", "authors_clip_stan_hf")
    heads = _load(repo / "mmaction/models/heads/mug_head.py", "authors_mug_head")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "tiny-clip"
        _tiny_clip(clip_dir, torch, transformers)

        class Recognizer(torch.nn.Module):  # the two attribute names of their CLIPSimilarity_split
            def __init__(self):
                super().__init__()
                # clip_weight: their STAN class does not pass pretrained_model on to its parent
                self.backbone = backbones.VITCLIPPretrained_STAN(depth=STAN_DEPTH, return_mean=False,
                                                                 clip_weight=str(clip_dir))
                self.text_backbone = backbones.CLIPTextPretrained(all_proj=True, clip_weight=str(clip_dir))

        model = Recognizer()
        _randomise(model, torch, seed=1)
        model.eval()
        # the plain-CLIP baseline of the released code on the same (randomised) tower weights
        plain = backbones.VITCLIPPretrained(clip_weight=str(clip_dir), return_mean=True)
        plain.load_state_dict({k[len("backbone."):]: v for k, v in model.state_dict().items()
                               if k.startswith("backbone.") and "STAN" not in k})
        plain.eval()
        meta_cfg = _meta_config_text(repo, clip_dir)

    g = torch.Generator().manual_seed(2)
    tensors = {}
    with torch.no_grad():
        for frames in FRAME_COUNTS:
            pixels = torch.randn(2, frames, 3, 16, 16, generator=g)
            tensors[f"pixels_T{frames}"] = pixels
            tensors[f"frames_T{frames}"] = model.backbone(pixels).contiguous()  # (B, T, P)
        tensors["mean_T5"] = plain(tensors["pixels_T5"]).contiguous()  # (B, P): their baseline's video embedding
        # captions: <bos> words <eos>, then their pad id 0, of three lengths
        ids = torch.zeros(3, 16, dtype=torch.long)
        for row, length in enumerate((16, 9, 4)):
            ids[row, 0], ids[row, length - 1] = 98, 99
            ids[row, 1:length - 1] = torch.randint(1, 98, (length - 2,), generator=g)
        tokens, pooled = model.text_backbone(ids)  # their recognizer calls it without a mask
        tensors.update(input_ids=ids, text_tokens=tokens.contiguous(), text_pooled=pooled.contiguous())
        mask = torch.where(ids == 0, 0, 1)  # their recognizer's mask
        for mode in MUG_MODES:
            head = heads.Mug_head(mode=mode).eval()
            tensors[f"scores_{mode}"] = head(tokens, tensors["frames_T5"], mask).contiguous()  # (B_text, B_video)
            # their head lets (normalised) pad embeddings into mug_frame_token's token softmax; with pad
            # embeddings zeroed it excludes them, the formula docs/design.md section 2 follows
            zeroed = tokens * mask[..., None]
            tensors[f"scores_{mode}_zero_pads"] = head(zeroed, tensors["frames_T5"], mask).contiguous()

    hub = MessageHub.get_instance("fixture")
    hub.update_scalar("train/loss", 1.25)
    checkpoint = {"meta": {"cfg": meta_cfg, "epoch": 1, "iter": 10, "seed": 0,
                           "mmengine_version": __import__("mmengine").__version__},
                  "state_dict": model.state_dict(), "message_hub": hub.state_dict()}
    torch.save(checkpoint, out / "mugstan_tiny.pth")
    save_file(tensors, str(out / "outputs.safetensors"))
    (out / "README.md").write_text(
        "Fixtures made by `scripts/make_reference_fixtures.py` from the authors' code (farewellthree/STAN)\n"
        f"with torch {torch.__version__} and transformers {transformers.__version__}; do not edit by hand.\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB): {len(model.state_dict())} tensors in the checkpoint, "
          f"{len(tensors)} outputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
