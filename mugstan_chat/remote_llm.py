"""The language model behind an OpenAI-compatible vLLM server: our tower in front, vLLM's batching behind.

With ``--llm-url`` (docs/serve.md, docs/design.md section 4d) a :class:`~mugstan_chat.chat.ChatSession`
still decodes the video, runs the CLIP + STAN tower and LLaVA's projector, and builds the
conversation with the processor's chat template; :class:`RemoteLLM` then sends that conversation
to vLLM with one ``image_embeds`` content part per clip (the projected features, ``torch.save``d
and base64-encoded, as ``vllm serve --enable-mm-embeds`` takes them) and streams the answer back.
vLLM applies the same chat template (``mugstan-chat export-llava`` writes it) and expands each
part to one clip's placeholder tokens, so greedy answers equal our engine's token for token.

vLLM gets continuous batching, paged attention and automatic prefix caching (a second user
asking about the same video reuses the video prefix's keys/values). Embedding inputs must come
from trusted clients only: vLLM must listen where only our server reaches it.

The client is the ``openai`` package (the field's client for OpenAI-compatible servers); it is
imported only on this route; importing this module imports neither torch nor openai.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlsplit

LLM_API_KEY_ENV = "MUGSTAN_LLM_API_KEY"


class RemoteLLMError(Exception):
    """The language model server refused or failed a request; carries OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "server_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def normalise_llm_url(url: str) -> str:
    """``http(s)://host:port[/v1]`` -> the API base ending in ``/v1``; ValueError naming the flag otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--llm-url must be an http(s) URL such as http://127.0.0.1:8001/v1, got {url!r}")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


def embeds_part(features) -> dict:
    """One clip's projected features (tokens, LM width) as vLLM's ``image_embeds`` content part."""
    import torch

    buffer = io.BytesIO()
    torch.save(features.detach().to("cpu").contiguous().clone(), buffer)  # clone: never the whole storage
    return {"type": "image_embeds", "image_embeds": base64.b64encode(buffer.getvalue()).decode("ascii")}


def openai_messages(messages: list[dict], features: list) -> list[dict]:
    """The processor-format conversation (``{"type": "image"}`` entries) with each image as its clip's embeddings."""
    clips = iter(features)
    out = []
    for message in messages:
        parts = [embeds_part(next(clips)) if part["type"] == "image" else part for part in message["content"]]
        out.append({"role": message["role"], "content": parts})
    return out


@dataclass
class RemoteTurn:
    """What one streamed answer cost, filled in while it streams."""

    completion_tokens: int = 0
    prompt_tokens: int | None = None  # as vLLM counted them (None when the stream was closed early)
    finish_reason: str | None = None
    first_token_at: float | None = None  # perf_counter


@dataclass
class RemoteLLM:
    """A vLLM (or any OpenAI-compatible) server that runs the language model.

    Args:
        url: API base, e.g. ``http://127.0.0.1:8001/v1`` (:func:`normalise_llm_url`).
        api_key: vLLM's ``--api-key``, if it has one.
        model: served model name (default: the server's only model, from /v1/models).
        timeout: seconds to wait for a response or the next streamed token.
    """

    url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = 600.0
    max_model_len: int | None = None
    _client: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self):
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "none", max_retries=0,
                                             timeout=self.timeout)
            return self._client

    def connect(self) -> RemoteLLM:
        """Asks the server for its models: resolves ``model``, checks it is served; RemoteLLMError otherwise."""
        try:
            import openai
        except ImportError:
            raise RemoteLLMError(500, "--llm-url needs the openai package: pip install 'mugstan-chat[vllm]'") from None

        try:
            served = {m.id: m for m in self.client().models.list().data}
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise RemoteLLMError(503, f"cannot reach the language model server at {self.url}: {error}",
                                 code="llm_unavailable") from None
        if self.model is None:
            if len(served) != 1:
                raise RemoteLLMError(400, f"{self.url} serves {len(served)} models ({', '.join(served)}): "
                                     "choose one with --llm-model")
            self.model = next(iter(served))
        elif self.model not in served:
            raise RemoteLLMError(404, f"{self.url} does not serve {self.model!r} (it serves: {', '.join(served)})")
        self.max_model_len = (served[self.model].model_extra or {}).get("max_model_len")
        return self

    def stream(self, messages: list[dict], generation, max_tokens: int, add_special_tokens: bool,
               turn: RemoteTurn, stop: threading.Event | None = None) -> Iterator[str]:
        """Streams the answer's text pieces; fills ``turn``. Setting ``stop`` closes the stream (vLLM aborts).

        Args:
            messages: OpenAI-format messages (:func:`openai_messages`).
            generation: :class:`mugstan_chat.turns.GenerationSettings` (temperature, top_p,
                repetition_penalty, seed pass through; seeds are vLLM's, not our sampler's).
            max_tokens: the answer limit, already clipped to the context.
            add_special_tokens: tokenise the rendered prompt with the tokenizer's BOS, as our engine
                does when the chat template does not write one.
        """
        import openai

        extra = {"add_special_tokens": add_special_tokens}
        if generation.repetition_penalty != 1.0:
            extra["repetition_penalty"] = generation.repetition_penalty
        request = dict(model=self.model or self.connect().model, messages=messages, max_tokens=max_tokens,
                       temperature=generation.temperature, top_p=generation.top_p, stream=True,
                       stream_options={"include_usage": True}, extra_body=extra)
        if generation.seed is not None and generation.temperature > 0:
            request["seed"] = generation.seed
        try:
            response = self.client().chat.completions.create(**request)
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise RemoteLLMError(503, f"cannot reach the language model server at {self.url}: {error}",
                                 code="llm_unavailable") from None
        try:
            for chunk in response:
                if chunk.usage is not None:
                    turn.prompt_tokens = chunk.usage.prompt_tokens
                    turn.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.finish_reason:
                        turn.finish_reason = choice.finish_reason
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        if turn.first_token_at is None:
                            turn.first_token_at = time.perf_counter()
                        if turn.prompt_tokens is None:
                            turn.completion_tokens += 1  # until the usage chunk says exactly
                        yield piece
                if stop is not None and stop.is_set():
                    break
        except openai.APIStatusError as error:  # an error event inside the stream
            raise self._status_error(error) from None
        except (openai.APIError, OSError, RuntimeError) as error:  # the connection broke mid-answer
            raise RemoteLLMError(502, f"the language model server at {self.url} ended the answer early: "
                                 f"{type(error).__name__}: {error}", code="llm_stream_broken") from None
        except Exception as error:  # httpx transport errors (the package is openai's dependency)
            if type(error).__module__.startswith(("httpx", "httpcore")):
                raise RemoteLLMError(502, f"the language model server at {self.url} ended the answer early: "
                                     f"{type(error).__name__}: {error}", code="llm_stream_broken") from None
            raise
        finally:
            response.close()
        if turn.finish_reason is None and not (stop is not None and stop.is_set()):
            raise RemoteLLMError(502, f"the language model server at {self.url} ended the answer early "
                                 "(no finish reason)", code="llm_stream_broken")

    def _status_error(self, error) -> RemoteLLMError:
        body = error.body if isinstance(error.body, dict) else {}
        detail = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        message = detail.get("message") or str(error)
        status = error.status_code if 400 <= error.status_code < 500 else 502
        return RemoteLLMError(status, f"language model server: {message}",
                              detail.get("type") or ("invalid_request_error" if status < 500 else "server_error"),
                              detail.get("param"), detail.get("code") if isinstance(detail.get("code"), str) else None)
