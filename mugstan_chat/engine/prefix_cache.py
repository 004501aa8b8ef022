"""Conversation KV reuse: a follow-up question pays only for its new tokens.

A :class:`ConversationCache` (one per chat session) keeps the token ids whose
keys/values sit in its language model cache (the previous prompt plus the answer
generated after it). For the next question the full prompt is built as before; the
cache is cropped to the longest common prefix of the two id sequences and only the
rest is prefilled. The prefix's
keys/values are the ones a full prefill would compute (causal attention: a token's
keys/values depend only on the tokens before it), so answers are unchanged.

Memory: one cached token costs ``2 x layers x kv_heads x head_dim x bytes per value``
(:func:`kv_bytes_per_token`); e.g. LLaVA-1.5-7B in float16: 2 x 32 x 32 x 128 x 2 B =
512 KiB per token, so a 600-token conversation holds about 300 MiB. Idle sessions'
caches count against a :class:`CacheBudget` (bytes, least recently used dropped first);
a dropped cache only costs the next question a full prefill.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import torch

DEFAULT_BUDGET_MB = 2048  # MUGSTAN_KV_BUDGET_MB overrides it (read when a budget is created)


def default_budget_bytes() -> int:
    return int(float(os.environ.get("MUGSTAN_KV_BUDGET_MB", DEFAULT_BUDGET_MB)) * 2**20)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in every layer of the language model."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * element


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key/value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class CacheBudget:
    """Bounds the bytes of conversation caches; least recently used dropped first.

    A :class:`ConversationCache` calls :meth:`charge` after each answer (it is then the most
    recent) and :meth:`release` when it drops its keys/values. One over the budget on its own
    keeps nothing. Thread-safe; holders are held weakly (a closed session frees its share).
    """

    def __init__(self, max_bytes: int | None = None):
        max_bytes = default_budget_bytes() if max_bytes is None else max_bytes
        if max_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._held: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()  # id(holder) -> (holder, bytes)
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for ref, size in self._held.values() if ref() is not None)

    def charge(self, holder, size: int) -> None:
        """Records ``holder``'s cache of ``size`` bytes as most recent; drops the oldest others over budget."""
        evict = []
        with self._lock:
            self._held.pop(id(holder), None)
            self._held[id(holder)] = (weakref.ref(holder), size)
            total = 0
            for key, (ref, held) in reversed(list(self._held.items())):  # newest first
                if ref() is None:
                    del self._held[key]
                elif total + held > self.max_bytes:
                    evict.append(ref())
                    del self._held[key]
                else:
                    total += held
        for victim in evict:  # outside the lock: a victim's drop calls release()
            victim.drop()

    def release(self, holder) -> None:
        with self._lock:
            self._held.pop(id(holder), None)


_budgets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_budgets_lock = threading.Lock()


def budget_for(model) -> CacheBudget:
    """The budget shared by every session on ``model`` (created with the default size on first use).

    Its size is ``MUGSTAN_KV_BUDGET_MB`` (read once, when the budget is made).
    """
    with _budgets_lock:
        budget = _budgets.get(model)
        if budget is None:
            budget = _budgets[model] = CacheBudget()
        return budget


class ConversationCache:
    """One conversation's language-model keys/values and the token ids they belong to.

    :meth:`take` hands the next turn the cache cropped to its longest common prefix with the
    new prompt (the cache leaves this object for the turn, so a failed turn leaves none
    behind); :meth:`keep` stores the turn's cache afterwards and charges it to the budget.

    Args:
        model_config: the LLaVA config (a fresh ``DynamicCache`` is built from it; its
            ``image_token_id`` marks the video placeholders).
        budget: the :class:`CacheBudget` the kept bytes count against.
    """

    def __init__(self, model_config, budget: CacheBudget):
        self.model_config = model_config
        self.budget = budget
        self.cache = None  # a transformers DynamicCache, or None
        self.ids: torch.Tensor | None = None  # (N,) the token ids whose keys/values ``cache`` holds

    @property
    def tokens(self) -> int:
        """Tokens whose keys/values are held for the next turn (0: none)."""
        return 0 if self.ids is None else int(self.ids.numel())

    def drop(self) -> None:
        """Frees the keys/values (the next turn prefills its whole prompt)."""
        self.cache = None
        self.ids = None
        self.budget.release(self)

    def take(self, ids: torch.Tensor):
        """(cache, reused tokens) for a prompt of token ids ``ids`` (1-D).

        At least one token is always prefilled (it yields the first answer token's logits),
        and the video placeholders are never split: LLaVA fills them from the features only
        in the prefilled part, so the prefix either covers all of them or stops before the first.
        """
        from transformers import DynamicCache

        cache, cached_ids = self.cache, self.ids
        self.drop()
        keep = 0
        if cache is not None:
            keep = min(common_prefix_length(cached_ids, ids), ids.numel() - 1)
            image = (ids == self.model_config.image_token_id).nonzero()
            if image.numel() and int(image[0]) < keep <= int(image[-1]):
                keep = int(image[0])
        if keep == 0:
            return DynamicCache(config=self.model_config), 0
        cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count of tokens to remove
        return cache, keep

    def keep(self, cache, sequence: torch.Tensor) -> None:
        """Holds ``cache``, the keys/values of ``sequence``'s first tokens, for the next turn."""
        held = cache.get_seq_length()  # the last generated token was never fed back: not in the cache
        self.cache, self.ids = cache, sequence[:held].detach().cpu()
        self.budget.charge(self, cache_bytes(cache))
