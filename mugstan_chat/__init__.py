"""mugstan-chat: Mug-STAN video encoders on CLIP backbones, and zero-shot video chat with LLaVA."""

__version__ = "0.1.0"
