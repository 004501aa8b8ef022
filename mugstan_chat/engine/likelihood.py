"""Log-likelihood of given continuations after a prompt: the engine's scoring primitive.

:meth:`mugstan_chat.engine.conversation.ChatSession.loglikelihood` builds the prompt (conversation, video
features, chat template) and calls :func:`score_continuations`; multiple-choice evaluation
(:mod:`mugstan_chat.evaluation.scoring`) uses that method and never calls the model itself.

Continuation tokens are those of ``tokenise(prompt + text)`` past ``tokenise(prompt)`` (the
lm-evaluation-harness rule), so a tokenizer merging a leading space into a word is handled.
The prompt runs once; each continuation longer than one token runs on a copy of its cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass
class ContinuationScore:
    """One continuation's log-probability under the model, and the tokens it was scored as."""

    logprob: float  # sum over its tokens
    ids: list[int]  # its token ids after the prompt
    prompt_tokens: int  # tokens of the prompt it continues

    @property
    def mean_logprob(self) -> float:
        """Per-token mean (length-normalised, for continuations of different lengths)."""
        return self.logprob / len(self.ids)


def continuation_ids(tokenizer, prompt: str, texts: list[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, continuation ids per text), tokenising prompt + text against the prompt alone."""
    add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    context = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    result = []
    for text in texts:
        whole = tokenizer(prompt + text, add_special_tokens=add_special)["input_ids"]
        if len(whole) > len(context) and whole[: len(context)] == context:
            result.append(whole[len(context):])
        else:  # the tokenizer merged across the boundary: tokenise the continuation alone
            alone = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not alone:
                raise ValueError(f"continuation {text!r} has no tokens")
            result.append(alone)
    return context, result


@torch.inference_mode()
def score_continuations(model, tokenizer, prompt: str, texts: list[str], mm_encoder_outputs: dict,
                        context_length: int) -> list[ContinuationScore]:
    """Sum of log-probabilities of each text's tokens right after ``prompt``.

    Args:
        model: the LLaVA model (``mm_encoder_outputs`` fill the prompt's image placeholders).
        tokenizer: its tokenizer.
        prompt: the whole prompt text, placeholders expanded.
        texts: the continuations.
        mm_encoder_outputs: cached visual features for ``generate``-style filling.
        context_length: the model's context; prompt + longest continuation must fit.
    """
    context, conts = continuation_ids(tokenizer, prompt, texts)
    longest = max(len(c) for c in conts)
    if len(context) + longest > context_length:
        raise ValueError(f"a prompt of {len(context)} tokens + answer does not fit the model's context of "
                         f"{context_length} tokens")
    device = next(model.parameters()).device
    ids = torch.tensor([context], device=device)  # (1, P)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                mm_encoder_outputs=mm_encoder_outputs)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
    scores = []
    for cont in conts:
        total = float(first[cont[0]])
        if len(cont) > 1:  # the rest of the continuation, on a copy of the prompt's cache
            rest = torch.tensor([cont[:-1]], device=device)  # (1, K-1): predicts cont[1:]
            step = model(input_ids=rest, cache=copy.deepcopy(out.cache), use_cache=True)
            logp = torch.log_softmax(step.logits[0].float(), dim=-1)  # (K-1, V)
            total += float(logp.gather(1, torch.tensor(cont[1:], device=device)[:, None]).sum())
        scores.append(ContinuationScore(total, list(cont), len(context)))
    return scores
