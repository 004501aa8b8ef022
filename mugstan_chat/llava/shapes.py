"""LLaVA-1.5's architecture at two sizes with random weights, built locally: timings and integration tests.

* ``"7b"``: LLaVA-1.5-7B's shapes (Llama-2-7B text model, CLIP ViT-L/14 at 336 px, 2-layer MLP projector);
* ``"small"``: the same tower and projector with a 0.47 B language model (24 layers, 896 wide, Qwen2-0.5B's
  widths), so prefill still dominates on a CPU.

The processor is the demo's word-level one at 336 px / patch 14, so prompts have the right
number of visual tokens (576 per image). Nothing is downloaded. :mod:`mugstan_chat.benchmarks.chat`
adds a random STAN branch on top; ``mugstan-chat export-llava --size`` writes these weights for vLLM.
"""

from __future__ import annotations

import torch

SIZES = ("small", "7b")
TEXT_SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "small": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2),
}


def llava_shape_config(context: int = 4096, size: str = "7b"):
    """(LlavaConfig, processor) of LLaVA-1.5's architecture with the text model of ``size``.

    Args:
        context: max_position_embeddings of the text model (LLaVA-1.5: 4096).
        size: "7b" or "small" (:data:`TEXT_SHAPES`).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from .demo import IMAGE_TOKEN, DemoSizes, build_demo_processor

    processor = build_demo_processor(DemoSizes(image_size=336, patch_size=14, context=context))
    tokenizer = processor.tokenizer
    tokenizer.model_max_length = context
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, **TEXT_SHAPES[size], max_position_embeddings=context,
                       rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=576,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    return config, processor


def build_random_llava(size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
                       context: int = 4096, seed: int = 0):
    """(LlavaForConditionalGeneration, processor) of :func:`llava_shape_config` with random weights, eval mode.

    Deterministic given ``seed`` on a CPU; built under ``torch.device(device)``, so a 7B never
    materialises in CPU memory first. Does not touch the global RNG state.
    """
    from transformers import LlavaForConditionalGeneration

    config, processor = llava_shape_config(context, size)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(processor.tokenizer, key))
    return model.eval(), processor
