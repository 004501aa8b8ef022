"""The parts of one chat turn, apart from the session that runs them (:mod:`mugstan_chat.engine.conversation`).

Generation settings, what a turn cost, the encoded video features a session (or a
server's cache) holds, single-image encoding for stock LLaVA image chat, and the
streamer / stop helpers ``generate`` runs with.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

from ..llava.loader import ChatModel
from ..options import DEFAULT_MAX_NEW_TOKENS


def neutralise_image_token(text: str, image_token: str = "<image>") -> str:
    """A user's ``<image>`` becomes ``< image>``: only the session places video placeholders.

    Why: the tokenizer turns every literal ``<image>`` into the placeholder token, so a
    question quoting it would ask for a clip that does not exist.
    """
    return text.replace(image_token, f"{image_token[:1]} {image_token[1:]}") if image_token else text


class ConversationTooLong(Exception):
    """The conversation no longer fits the language model's context; reset or start a new session."""


@dataclass
class GenerationSettings:
    """How answers are generated (greedy by default)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # upper bound; clipped to what the context has left
    temperature: float = 0.0  # 0: greedy decoding; > 0: sampling
    top_p: float = 1.0  # nucleus sampling (sampling only)
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # sampling only: the turn's own random generator starts here (None: fresh entropy)

    def validate(self) -> GenerationSettings:
        """ValueError naming the bad setting; returns self."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.repetition_penalty))
        if not finite or self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid generation settings {self}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        return self

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate``: a fresh random generator for this turn when sampling.

        Sampling never draws from torch's global generator (which every thread shares): the
        logits are warped as transformers would (temperature, then top-p) and a
        :class:`SeededSampler` adds Gumbel noise from the turn's own generator, so the argmax
        that follows is a draw from the warped distribution. The same seed gives the same
        answer whatever runs beside it.
        """
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.validate()
        kwargs = {"repetition_penalty": self.repetition_penalty}
        # greedy search over the (possibly perturbed) scores; override the checkpoint's sampling defaults
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.temperature > 0:
            processors = [TemperatureLogitsWarper(self.temperature)]
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
            processors.append(SeededSampler(self.seed))
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        return kwargs


class SeededSampler:
    """A logits processor that turns greedy search into sampling from a generator of its own.

    Gumbel-max: for scores s, argmax(s + G) with G_i = -log(E_i), E_i ~ Exp(1) i.i.d., is a
    draw from softmax(s). The generator is created on the scores' device at the first step
    and seeded with ``seed`` (fresh OS entropy when None); one sampler serves one turn.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != scores.device:
            self.generator = torch.Generator(device=scores.device)
            self.generator.manual_seed(self.seed)
        noise = torch.empty_like(scores).exponential_(generator=self.generator)  # (B, V) E ~ Exp(1)
        return scores - noise.clamp_min_(torch.finfo(noise.dtype).tiny).log()  # masked -inf stays -inf


@dataclass
class TurnStats:
    """What one answer cost. decode/encode are 0 on follow-ups, which reuse the cached features."""

    decode_ms: float = 0.0  # video decode + preprocessing (reported with the session's first answer)
    encode_ms: float = 0.0  # video tower + projector (reported with the session's first answer)
    first_token_ms: float | None = None  # question -> first generated token (None without streaming)
    total_ms: float = 0.0  # question -> last token (includes decode/encode when they ran inside this turn)
    prompt_tokens: int = 0  # whole prompt, visual placeholder tokens included
    visual_tokens: int = 0  # placeholder tokens filled with video features (all clips)
    new_tokens: int = 0  # generated tokens
    max_new_tokens: int = 0  # the limit this turn ran with, after clipping to the context
    clipped: bool = False  # max_new_tokens was reduced to fit the context
    cached_features: bool = False  # the video features came from the session's cache
    prefill_tokens: int = 0  # prompt tokens run through the language model (the rest came from the KV cache)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the previous turn's cache

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VideoFeatures:
    """An encoded video: what a session holds and a server's cache shares across stateless sessions."""

    features: list[torch.Tensor]  # C tensors (tokens per clip, text width): projected, ready for placeholders
    indices: list[list[int]]  # frame indices per clip
    info: object  # video.VideoInfo
    decode_ms: float
    encode_ms: float
    reported: bool = False  # decode/encode times already shown in a turn's stats
    # (start, end) seconds of each clip from its frames' presentation timestamps, found while the file could be
    # read (a server's cached features outlive its temporary file); None: index / fps (images have no times)
    spans: list[tuple[float, float]] | None = None


def encode_image(chat_model: ChatModel, image) -> VideoFeatures:
    """One image as stock LLaVA sees it (plain CLIP, no temporal branch), ready for one ``<image>``.

    Args:
        chat_model: the loaded model.
        image: a PIL image (RGB).
    Returns:
        :class:`VideoFeatures` with one entry: (tokens per image, text width); attach it to a
        session with ``clips=1`` (:meth:`mugstan_chat.engine.conversation.ChatSession.attach_features`).
    """
    t0 = time.perf_counter()
    pixels = chat_model.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, H, W)
    t1 = time.perf_counter()
    tower = chat_model.tower
    with torch.inference_mode():
        pixels = pixels.to(device=tower.device, dtype=tower.dtype)
        output = chat_model.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        features = [f.detach() for f in output.pooler_output]  # 1 x (tokens, text width)
    if tower.device.type == "cuda":
        torch.cuda.synchronize(tower.device)
    t2 = time.perf_counter()
    return VideoFeatures(features, [[0]], None, (t1 - t0) * 1000, (t2 - t1) * 1000)


class TimedStreamer:
    """A ``TextIteratorStreamer`` that records when the first generated token arrives and counts tokens.

    Build one with :meth:`create` (transformers is imported then, not at import time).
    """

    @staticmethod
    def create(tokenizer, started: float):
        """A streamer over ``tokenizer``'s pieces; ``started`` is the perf_counter time the turn began."""
        from transformers import TextIteratorStreamer

        class Streamer(TextIteratorStreamer):
            first_token_at: float | None = None
            new_tokens = 0

            def put(self, value):
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    self.new_tokens += value.numel()
                super().put(value)

        streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.started = started
        return streamer


class StopOnEvent:
    """A stopping criterion that ends generation when ``event`` is set (the consumer went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
