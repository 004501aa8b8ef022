"""Caption tokenisation with the padding mask Mug needs.

CLIP's BPE vocabulary ships inside open_clip, so tiny models and open_clip
backbones tokenise offline. transformers backbones use the tokenizer saved with
the model (same BPE, same ids for OpenAI CLIP). Every token up to and including
end-of-text is real; everything after it is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedText:
    input_ids: torch.Tensor  # (B, K) long
    attention_mask: torch.Tensor  # (B, K) bool, True up to and including end-of-text


class CaptionTokenizer:
    """Tokenises captions to a fixed length; truncation keeps the end-of-text token."""

    def __init__(self, context_length: int = 64, hf_name_or_path: str | None = None):
        self.context_length = context_length
        if hf_name_or_path is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._bpe = SimpleTokenizer(context_length=context_length)
            self._hf = None
            self.eot_token_id = self._bpe.eot_token_id
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(hf_name_or_path)
            self._bpe = None
            self.eot_token_id = self._hf.eos_token_id

    def __call__(self, captions: str | list[str]) -> TokenizedText:
        if isinstance(captions, str):
            captions = [captions]
        if self._hf is not None:
            out = self._hf(list(captions), padding="max_length", truncation=True,
                           max_length=self.context_length, return_tensors="pt")
            ids = out["input_ids"]
        else:
            ids = self._bpe(list(captions), context_length=self.context_length)
        return TokenizedText(input_ids=ids, attention_mask=self._mask(ids))

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including the first end-of-text token (padding may reuse its id)."""
        is_eot = ids == self.eot_token_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
        return torch.arange(ids.shape[1])[None] <= first[:, None]
