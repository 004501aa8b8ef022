"""The offline demo model: a tiny random LLaVA plus a tiny STAN branch, built locally from a seed.

Nothing is downloaded. The model has LLaVA-1.5's structure (CLIP vision tower,
two-layer MLP projector, Llama language model, ``LlavaProcessor`` with a
``CLIPImageProcessor`` and a chat template) at toy sizes, so every entry point
(CLI, app, benchmarks, tests) can run end to end on a CPU in about a second.
Its weights are random: **its answers are meaningless word sequences**, and
everything that shows them says so (:data:`DEMO_NOTICE`).

Sizes: CLIP tower hidden 32, 4 layers, 4 heads, 32 px images, 8 px patches
(L = 16 patches + [CLS]); Llama hidden 64, 2 layers; a word-level vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..model.stan import STAN, StanConfig

DEMO_NOTICE = "demo model (tiny, random weights, offline): answers are meaningless word sequences"

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# Word list of the demo tokenizer; question words out of it become <unk>, which is fine for a toy.
_WORDS = """
USER ASSISTANT SYSTEM : . , ? ! ' - a an the this that these those it its is are was were be been
being do does did what which who whom whose when where why how happens happen happened happening
video clip frame frames scene image picture shot camera view in on at of to from with without by
for into onto over under above below up down left right forward backward before after then first
last next during while and or but not no yes there here some many few more most all any each every
one two three four five six seven eight nine ten person people man woman child dog cat car ball
bird tree house street room table chair door window water sky road circle square triangle shape
shapes object objects thing things red green blue yellow black white gray colour color big small
large little bright dark moving moves move moved running runs walking walks jumping jumps sitting
standing falling rising growing shrinking appearing disappearing turning rotating opening closing
fast slow quickly slowly again still now later describe explain tell me you i we they he she him
her them can could would should will may might see seen shown show shows looks look like seems
time start end beginning middle motion action event events background foreground center centre
side top bottom edge across around through toward towards away near far inside outside
""".split()


@dataclass
class DemoSizes:
    """Toy sizes of the demo model (LLaVA-1.5's structure, not its dimensions)."""

    vision_width: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context: int = 2048  # max_position_embeddings of the language model
    stan_layers: int = 2  # K; the branch fuses at layer N-2 = 2 and reads layers 1..2


# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."), written as a chat template:
# every image of a turn first, then its text; answers end with the end-of-sequence token.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_demo_tokenizer():
    """A word-level fast tokenizer with LLaVA's special tokens and ``<image>`` as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with single spaces
    core.add_special_tokens(SPECIAL_TOKENS)
    # LLaVA's Llama tokenizer prepends <s>; a WordLevel model needs a post-processor for that
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=DemoSizes.context)
    return tokenizer


def build_demo_processor(sizes: DemoSizes | None = None):
    """``LlavaProcessor`` (CLIP image processor + demo tokenizer + chat template)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    sizes = sizes or DemoSizes()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_demo_tokenizer(), patch_size=sizes.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=DEMO_CHAT_TEMPLATE)


def build_demo_llava(seed: int = 0, sizes: DemoSizes | None = None):
    """Builds (model, processor): a tiny random ``LlavaForConditionalGeneration`` in fp32, eval mode.

    Deterministic given ``seed``; does not touch the global RNG state.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    sizes = sizes or DemoSizes()
    processor = build_demo_processor(sizes)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_width, intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=sizes.vision_width)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width, intermediate_size=2 * sizes.text_width,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, max_position_embeddings=sizes.context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    num_patches = (sizes.image_size // sizes.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches, vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        with torch.no_grad():
            # random init gives the language model tiny logits; widen them so greedy answers vary
            model.lm_head.weight.normal_(0.0, 0.5)
            # never end on the first token: a random model would otherwise often answer nothing
            model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def demo_stan_config(sizes: DemoSizes | None = None) -> StanConfig:
    """The demo branch's config: K layers fused at LLaVA's feature layer (N-2)."""
    sizes = sizes or DemoSizes()
    return StanConfig(num_layers=sizes.stan_layers, fuse_layer=-2, drop_path=0.0)


def build_demo_branch(vision_backbone, seed: int = 0, sizes: DemoSizes | None = None) -> STAN:
    """A tiny STAN on the demo tower, deterministic given ``seed``.

    The cross-frame output linears are randomised (a fresh branch is exactly the
    identity), so the demo branch really mixes frames and frame order matters.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        stan = STAN(vision_backbone, demo_stan_config(sizes))
        with torch.no_grad():
            for module in stan.cross_frame:
                module.out.weight.normal_(0.0, 0.2)
                module.out.bias.normal_(0.0, 0.02)
    return stan.eval()


def save_demo_branch(directory: str | os.PathLike, seed: int = 0, sizes: DemoSizes | None = None,
                     image_size: int | None = None) -> str:
    """Writes the demo branch as a branch checkpoint (what ``MugStan.save_pretrained`` writes).

    Args:
        directory: output folder (created).
        image_size: record a different tower image size in the fingerprint (tests of the
            resolution-mismatch check); default: the demo tower's.
    Returns:
        The directory, as a string.
    """
    from dataclasses import asdict

    from ..model.backbone import BackboneConfig, HFCLIPVision
    from ..model.checkpoint import save_checkpoint

    model, _ = build_demo_llava(seed, sizes)
    vision = HFCLIPVision(model.model.vision_tower)
    stan = build_demo_branch(vision, seed, sizes)
    fingerprint = {**vision.fingerprint(), "fuse_layer": stan.fuse_layer}
    if image_size is not None:
        fingerprint["image_size"] = image_size
    vision_config = model.config.vision_config.to_dict()
    backbone = BackboneConfig(family="hf", model_config={"vision_config": vision_config}, seed=seed)
    config = {
        "model": {"backbone": asdict(backbone), "stan": stan.config.to_dict(), "freeze_backbone": True},
        "weights": "branch",
        "backbone_fingerprint": fingerprint,
    }
    save_checkpoint(directory, config, {f"stan.{k}": v for k, v in stan.state_dict().items()})
    return str(directory)
