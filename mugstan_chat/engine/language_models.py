"""The language model that answers a turn: our own LLaVA's, or a vLLM server's; one interface, chosen at load.

A conversation (:class:`~mugstan_chat.engine.conversation.ChatSession`) does everything both routes
share: it checks the turn fits, builds and tokenises the prompt once, clips the answer budget to
the context and records the turn. What runs the language model is a :class:`LanguageModel`:

* :class:`LocalLanguageModel`: ``generate(mm_encoder_outputs=...)`` on the loaded LLaVA, reusing the
  conversation's KV cache (only the tokens after the common prefix are prefilled);
* :class:`RemoteLanguageModel`: the same conversation sent to an OpenAI-compatible vLLM server, each
  clip as its projected features (:mod:`mugstan_chat.engine.remote_llm`; docs/design.md section 4d).

The :class:`~mugstan_chat.engine.engine.Engine` picks one when it is built (``--llm-url`` or not); no
code path asks which one it has.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from .prefix_cache import ConversationCache
from .remote_llm import RemoteLLM, RemoteTurn
from .threads import current_threads, inherit_threads
from .turns import GenerationSettings, StopOnEvent, TimedStreamer, TurnStats


@dataclass
class PreparedTurn:
    """One question, checked and tokenised, ready for a language model; the model fills in what it produced."""

    question: str
    started: float  # perf_counter() when the question was asked
    stats: TurnStats  # prompt facts in; first_token_ms, new_tokens, prefill/reused tokens filled by the model
    inputs: dict  # the tokenised prompt: input_ids, attention_mask (1, L)
    generation: GenerationSettings
    features: list  # the clips' projected features, one tensor per ``<image>``
    kv: ConversationCache | None  # the conversation's keys/values to reuse (None: prefill everything)
    messages: Callable[[], list[dict]]  # the conversation in OpenAI's format (each clip its embeddings)
    add_special_tokens: bool  # the tokenizer adds BOS (the template does not start with one)
    sequence: torch.Tensor | None = None  # prompt + answer ids once done (local: what the KV cache holds)
    cache: object = None  # the KV cache ``sequence`` was computed with (local)


class LanguageModel(Protocol):
    """What answers a :class:`PreparedTurn`."""

    remote: bool  # the model runs elsewhere (its prefix cache, not ours, spares prefill)
    notice: str  # a line for users ('' when nothing to say)

    def generate(self, turn: PreparedTurn) -> str:
        """The whole answer (stripped)."""

    def stream(self, turn: PreparedTurn, stop: threading.Event | None) -> Iterator[str]:
        """The answer as text pieces; setting ``stop`` ends it after the current token; closing it ends it now."""

    def generate_many(self, turns: list[PreparedTurn]) -> list[str]:
        """Each turn's whole answer (first turns of several conversations; no KV cache is reused or kept)."""


class LocalLanguageModel:
    """LLaVA's own language model, in this process."""

    remote = False
    notice = ""

    def __init__(self, chat_model):
        self.chat_model = chat_model

    def _generate_kwargs(self, turn: PreparedTurn) -> dict:
        model = self.chat_model.model
        kwargs = {k: v.to(self.chat_model.device) for k, v in turn.inputs.items()}
        kwargs.update(turn.generation.generate_kwargs())
        kwargs.update(max_new_tokens=turn.stats.max_new_tokens)
        ids = turn.inputs["input_ids"][0]
        reused = 0
        if turn.kv is not None:
            kwargs["cache"], reused = turn.kv.take(ids)
        if (ids[reused:] == model.config.image_token_id).any():  # placeholders left to fill
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            # a fresh dict each turn: generate writes into it
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(turn.features))}
        turn.stats.prefill_tokens, turn.stats.reused_tokens = turn.stats.prompt_tokens - reused, reused
        pad = self.chat_model.processor.tokenizer.pad_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
        return kwargs

    def generate(self, turn: PreparedTurn) -> str:
        kwargs = self._generate_kwargs(turn)
        with torch.inference_mode():
            output = self.chat_model.model.generate(**kwargs)
        new = output[0, kwargs["input_ids"].shape[1]:]
        turn.stats.new_tokens = int(new.numel())
        turn.sequence, turn.cache = output[0], kwargs.get("cache")
        return self.chat_model.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    def generate_many(self, turns: list[PreparedTurn]) -> list[str]:
        """One padded ``generate`` for all ``turns``: prompts left-padded to the longest, an attention mask over
        the padding (positions count from each row's first real token), every row's clip features in
        ``mm_encoder_outputs`` in row order (LLaVA fills the placeholders of the whole batch in that order).

        Greedy rows answer as each turn alone would up to fp32 rounding: the padded rows' matrix products
        have other shapes, so a near-tie between two tokens can go the other way (docs/batch.md). Sampling or
        a repetition penalty: each turn its own ``generate`` (the same answers as alone, one after another).
        """
        if any(turn.generation != turns[0].generation for turn in turns):
            raise ValueError("turns answered together need one GenerationSettings")
        settings = turns[0].generation
        if len(turns) == 1 or settings.temperature > 0 or settings.repetition_penalty != 1.0:
            # sampling draws each row's noise from one generator and the repetition penalty would count the
            # padding: one generate per turn keeps every answer the one it has alone
            return [self.generate(turn) for turn in turns]
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tokenizer = self.chat_model.processor.tokenizer
        model = self.chat_model.model
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        longest = max(int(turn.inputs["input_ids"].shape[1]) for turn in turns)
        ids = torch.full((len(turns), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(turns), longest), dtype=torch.long)
        for row, turn in enumerate(turns):
            length = int(turn.inputs["input_ids"].shape[1])
            ids[row, longest - length:] = turn.inputs["input_ids"][0]
            mask[row, longest - length:] = turn.inputs["attention_mask"][0]
        features = [f for turn in turns for f in turn.features]
        kwargs = {"input_ids": ids.to(self.chat_model.device), "attention_mask": mask.to(self.chat_model.device),
                  "max_new_tokens": max(turn.stats.max_new_tokens for turn in turns), "pad_token_id": pad}
        kwargs.update(turns[0].generation.generate_kwargs())
        if features:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        with torch.inference_mode():
            output = model.generate(**kwargs)
        answers = []
        for row, turn in enumerate(turns):
            new = output[row, longest:longest + turn.stats.max_new_tokens].tolist()
            ends = [i for i, token in enumerate(new) if token in eos]
            new = new[:ends[0] + 1] if ends else new  # a single generate stops at (and returns) its EOS
            turn.stats.new_tokens = len(new)
            turn.stats.prefill_tokens, turn.stats.reused_tokens = turn.stats.prompt_tokens, 0
            answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers

    def stream(self, turn: PreparedTurn, stop: threading.Event | None) -> Iterator[str]:
        from transformers import StoppingCriteriaList

        kwargs = self._generate_kwargs(turn)
        streamer = TimedStreamer.create(self.chat_model.processor.tokenizer, turn.started)
        stop = stop if stop is not None else threading.Event()
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]))
        errors: list[BaseException] = []
        outputs: list[torch.Tensor] = []
        threads = current_threads()  # the request's intra-op threads: a new thread starts from torch's default

        def run():
            inherit_threads(threads)
            try:
                with torch.inference_mode():
                    outputs.append(self.chat_model.model.generate(**kwargs))
            except BaseException as error:  # re-raised in the consumer's thread
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, name="mugstan-chat-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            thread.join()
            if streamer.first_token_at is not None:
                turn.stats.first_token_ms = (streamer.first_token_at - turn.started) * 1000
            turn.stats.new_tokens = streamer.new_tokens
            if outputs:
                turn.sequence, turn.cache = outputs[0][0], kwargs.get("cache")
        if errors:
            raise errors[0]


class RemoteLanguageModel:
    """A vLLM server's language model (``--llm-url``); our process keeps the tower and the conversation."""

    remote = True

    def __init__(self, client: RemoteLLM):
        self.client = client
        self.notice = f"language model: {client.model} on {client.url}"

    def generate(self, turn: PreparedTurn) -> str:
        return "".join(self.stream(turn, None)).strip()

    def generate_many(self, turns: list[PreparedTurn]) -> list[str]:
        """One request each, in turn (the server batches what is in flight: ``batch --in-flight``)."""
        return [self.generate(turn) for turn in turns]

    def stream(self, turn: PreparedTurn, stop: threading.Event | None) -> Iterator[str]:
        """Raises remote_llm.RemoteLLMError when the server fails; the stream to vLLM is closed when this one is."""
        progress = RemoteTurn()
        stream = self.client.stream(turn.messages(), turn.generation, turn.stats.max_new_tokens,
                                    turn.add_special_tokens, progress, stop)
        try:
            yield from stream
        finally:
            stream.close()  # closes the HTTP stream now (vLLM aborts the request), not when collected
            if stop is not None:
                stop.set()
            if progress.first_token_at is not None:
                turn.stats.first_token_ms = (progress.first_token_at - turn.started) * 1000
            turn.stats.new_tokens = progress.completion_tokens
            turn.stats.prefill_tokens = turn.stats.prompt_tokens  # what vLLM's prefix cache spared is vLLM's to say
