"""The language model behind an OpenAI-compatible vLLM server: our tower in front, vLLM's batching behind.

With ``--llm-url`` (docs/serve.md, docs/design.md section 4d) a :class:`~mugstan_chat.engine.conversation.ChatSession`
still decodes the video, runs the CLIP + STAN tower and LLaVA's projector, and builds the
conversation with the processor's chat template; :class:`RemoteLLM` then sends that conversation
to vLLM with one ``image_embeds`` content part per clip (the projected features, ``torch.save``d
and base64-encoded, as ``vllm serve --enable-mm-embeds`` takes them), each after its clip label as
a text part when the prompt shows clip times, and streams the answer back. vLLM renders it with
the chat template ``mugstan-chat export-llava`` writes (``--chat-template``, parts in order with
``--chat-template-content-format openai``: :mod:`mugstan_chat.llava.chat_template`), which writes each
label before its placeholder as our engine does, and expands each part to one clip's placeholder
tokens, so greedy answers equal our engine's token for token.

vLLM gets continuous batching, paged attention and automatic prefix caching (a second user
asking about the same video reuses the video prefix's keys/values). Embedding inputs must come
from trusted clients only: vLLM must listen where only our server reaches it.

Faults of the server are answered, never waited on or passed through raw (docs/serve.md, errors):
a connect or a streamed chunk that takes longer than ``--llm-timeout`` ends the answer (504
``llm_timeout``); a reply that is not JSON, or not in OpenAI's shape, is 502 ``llm_bad_response``;
a 5xx is 502 ``llm_server_error``; a stream that breaks off is 502 ``llm_stream_broken``. When our
client goes away the HTTP stream to vLLM is shut at once (vLLM aborts the request), even while
vLLM sends nothing.

The client is the ``openai`` package (the field's client for OpenAI-compatible servers); it is
imported only on this route; importing this module imports neither torch nor openai.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlsplit

LLM_API_KEY_ENV = "MUGSTAN_LLM_API_KEY"
DEFAULT_TIMEOUT_S = 120.0  # --llm-timeout: room for a long prefill on a CPU before the first chunk
STOP_POLL_S = 0.05  # how often a stream checks whether its client went away while vLLM sends nothing


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
    """The processor-format conversation (``{"type": "image"}`` entries) with each image as its clip's embeddings.

    Text parts (the question, clip labels before their images) stay where they are.
    """
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
    first_token_at: float | None = None  # perf_counter: the first chunk carrying a generated token, text or not


@dataclass
class ChunkFields:
    """What one streamed chunk says, once :func:`read_chunk` found it in OpenAI's shape."""

    usage: tuple[int, int] | None  # (prompt_tokens, completion_tokens) when the chunk carries them
    texts: list[str]  # the content of each choice that carries a generated token ("" when it decodes to nothing)
    finish_reason: str | None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_chunk(chunk) -> ChunkFields:
    """The fields of one streamed chunk; ValueError saying what is wrong when it is not OpenAI's chunk.

    Why checked here: the ``openai`` client builds its objects without validating them, so a
    malformed chunk would otherwise fail later as a TypeError deep in our server. A choice
    carries a generated token when its delta has content, even empty: a token that decodes to
    no text (a piece of a character, a special token) still counts for time to first token.
    vLLM's role-only first chunk (``role`` with ``content: ""``) does not.
    """
    from openai.types import CompletionUsage
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

    if not isinstance(chunk, ChatCompletionChunk):
        raise ValueError(f"a streamed event is a JSON {type(chunk).__name__}, not a chat.completion.chunk object")
    usage = None
    if chunk.usage is not None:
        if not (isinstance(chunk.usage, CompletionUsage) and _count(chunk.usage.prompt_tokens)
                and _count(chunk.usage.completion_tokens)):
            raise ValueError(f"a streamed chunk's usage is not token counts: {chunk.usage!r}")
        usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    if not isinstance(chunk.choices, list):
        raise ValueError(f"a streamed chunk's choices are not a list: {chunk.choices!r}")
    texts, finish = [], None
    for choice in chunk.choices:
        if not isinstance(choice, Choice) or not (choice.delta is None or isinstance(choice.delta, ChoiceDelta)):
            raise ValueError(f"a streamed choice is not an object with a delta: {choice!r}")
        if not (choice.finish_reason is None or isinstance(choice.finish_reason, str)):
            raise ValueError(f"a streamed finish_reason is not a string: {choice.finish_reason!r}")
        finish = choice.finish_reason or finish
        if choice.delta is None:
            continue
        content, role = choice.delta.content, choice.delta.role
        if not (content is None or isinstance(content, str)) or not (role is None or isinstance(role, str)):
            raise ValueError(f"a streamed delta's content or role is not a string: {choice.delta!r}")
        if content is not None and (role is None or content):
            texts.append(content)
    return ChunkFields(usage, texts, finish)


class StreamAbort:
    """Shuts one HTTP stream from another thread once ``stop`` is set, unless the stream has ended.

    Why: the reading thread is blocked in a socket read while vLLM sends nothing (a long prefill,
    a stalled server); closing the response object does not wake it, shutting its socket does. vLLM
    then sees its client go away and aborts the request, and our worker frees its slot at once.
    """

    def __init__(self, response, stop: threading.Event | None):
        self.response, self.stop = response, stop
        self._lock = threading.Lock()
        self._ended = False
        if stop is not None:
            threading.Thread(target=self._watch, name="mugstan-llm-abort", daemon=True).start()

    def _watch(self) -> None:
        while not self.stop.wait(STOP_POLL_S):
            with self._lock:
                if self._ended:
                    return
        with self._lock:  # the lock: a connection back in the client's pool (another request's) is never shut
            if self._ended:
                return
            raw = getattr(self.response, "response", None)  # the openai Stream's httpx response
            network = raw.extensions.get("network_stream") if raw is not None else None
            sock = network.get_extra_info("socket") if network is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

    def end(self) -> None:
        """The reader is done with the stream: closes it (the watcher leaves it alone from now on)."""
        with self._lock:
            self._ended = True
        self.response.close()


@dataclass
class RemoteLLM:
    """A vLLM (or any OpenAI-compatible) server that runs the language model.

    Args:
        url: API base, e.g. ``http://127.0.0.1:8001/v1`` (:func:`normalise_llm_url`).
        api_key: vLLM's ``--api-key``, if it has one.
        model: served model name (default: the server's only model, from /v1/models).
        timeout: ``--llm-timeout``: seconds to wait for a connection, a response, or the next
            streamed chunk (each read, not the whole answer).
    """

    url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    max_model_len: int | None = None
    _client: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self):
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "none", max_retries=0,
                                             timeout=self.timeout)  # connect, read (each chunk), write, pool
            return self._client

    def connect(self) -> RemoteLLM:
        """Asks the server for its models: resolves ``model``, checks it is served; RemoteLLMError otherwise."""
        try:
            import openai  # noqa: F401  (installed? one line if not, before any call)
        except ImportError:
            raise RemoteLLMError(500, "--llm-url needs the openai package: pip install 'mugstan-chat[vllm]'") from None

        try:
            with self._answered():
                listed = self.client().models.list().data
        except (ValueError, TypeError, AttributeError) as error:  # not JSON, or JSON that is no page of models
            raise self._bad_response(f"{self.url}/models did not answer with a model list", error) from None
        if not isinstance(listed, list) or not all(isinstance(getattr(m, "id", None), str) and m.id for m in listed):
            raise self._bad_response(f"{self.url}/models did not answer with a list of models with ids")
        served = {m.id: m for m in listed}
        if self.model is None:
            if len(served) != 1:
                raise RemoteLLMError(400, f"{self.url} serves {len(served)} models ({', '.join(served)}): "
                                     "choose one with --llm-model")
            self.model = next(iter(served))
        elif self.model not in served:
            raise RemoteLLMError(404, f"{self.url} does not serve {self.model!r} (it serves: {', '.join(served)})")
        extra = served[self.model].model_extra or {}
        self.max_model_len = extra.get("max_model_len") if _count(extra.get("max_model_len")) else None
        return self

    def stream(self, messages: list[dict], generation, max_tokens: int, add_special_tokens: bool,
               turn: RemoteTurn, stop: threading.Event | None = None) -> Iterator[str]:
        """Streams the answer's text pieces; fills ``turn``. Setting ``stop`` shuts the stream at once (vLLM aborts).

        Args:
            messages: OpenAI-format messages (:func:`openai_messages`).
            generation: :class:`mugstan_chat.engine.turns.GenerationSettings` (temperature, top_p,
                repetition_penalty, seed pass through; seeds are vLLM's, not our sampler's).
            max_tokens: the answer limit, already clipped to the context.
            add_special_tokens: tokenise the rendered prompt with the tokenizer's BOS, as our engine
                does when the chat template does not write one.
        """
        extra = {"add_special_tokens": add_special_tokens}
        if generation.repetition_penalty != 1.0:
            extra["repetition_penalty"] = generation.repetition_penalty
        request = dict(model=self.model or self.connect().model, messages=messages, max_tokens=max_tokens,
                       temperature=generation.temperature, top_p=generation.top_p, stream=True,
                       # vLLM's running counts in every chunk: tokens are counted as they come, text or not
                       stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=extra)
        if generation.seed is not None and generation.temperature > 0:
            request["seed"] = generation.seed
        with self._answered():
            response = self.client().chat.completions.create(**request)
        abort = StreamAbort(response, stop)
        try:
            for chunk in self._chunks(response, stop):
                try:
                    fields = read_chunk(chunk)
                except ValueError as error:
                    raise self._bad_response("the language model server sent a malformed chunk", error) from None
                if fields.usage is not None:
                    turn.prompt_tokens, turn.completion_tokens = fields.usage
                elif turn.prompt_tokens is None:
                    turn.completion_tokens += len(fields.texts)  # until a usage chunk says exactly
                if turn.first_token_at is None and (fields.texts or (fields.usage and fields.usage[1] > 0)):
                    turn.first_token_at = time.perf_counter()
                turn.finish_reason = fields.finish_reason or turn.finish_reason
                for piece in fields.texts:
                    if piece:
                        yield piece
                if stop is not None and stop.is_set():
                    break
        finally:
            abort.end()
        if turn.finish_reason is None and not (stop is not None and stop.is_set()):
            raise RemoteLLMError(502, f"the language model server at {self.url} ended the answer early "
                                 "(no finish reason)", code="llm_stream_broken")

    def _chunks(self, response, stop: threading.Event | None) -> Iterator[object]:
        """The stream's chunks as the client parses them; faults become RemoteLLMError.

        A stream that fails after ``stop`` was set was shut by :class:`StreamAbort`: it just ends.
        """
        import openai

        chunks = iter(response)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - sorted below; anything unknown is raised as it is
                if stop is not None and stop.is_set():
                    return
                if isinstance(error, openai.APIStatusError):
                    raise self._status_error(error) from None
                if isinstance(error, openai.APITimeoutError):
                    raise self._timeout_error() from None
                if isinstance(error, (ValueError, TypeError, AttributeError)):  # a data: line that is not JSON
                    raise self._bad_response("the language model server sent a malformed chunk", error) from None
                if isinstance(error, (openai.APIError, OSError, RuntimeError)) or \
                        type(error).__module__.startswith(("httpx", "httpcore")):  # an error event; a broken stream
                    raise RemoteLLMError(502, f"the language model server at {self.url} ended the answer early: "
                                         f"{type(error).__name__}: {error}", code="llm_stream_broken") from None
                raise
            yield chunk

    @contextlib.contextmanager
    def _answered(self):
        """A call to the server whose failures become RemoteLLMError: its refusal or 5xx, a timeout, no connection."""
        import openai

        try:
            yield
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APITimeoutError:
            raise self._timeout_error() from None
        except openai.APIError as error:
            raise RemoteLLMError(503, f"cannot reach the language model server at {self.url}: {error}",
                                 code="llm_unavailable") from None

    def _timeout_error(self) -> RemoteLLMError:
        return RemoteLLMError(504, f"the language model server at {self.url} sent nothing for {self.timeout:g} s "
                              "(--llm-timeout)", code="llm_timeout")

    def _bad_response(self, what: str, error: Exception | None = None) -> RemoteLLMError:
        detail = "" if error is None else f": {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return RemoteLLMError(502, f"{what}{detail}", code="llm_bad_response")

    def _status_error(self, error) -> RemoteLLMError:
        """vLLM's refusal (4xx: its status, type and string code, else ``llm_request_refused``) or failure (5xx: 502)."""
        body = error.body if isinstance(error.body, dict) else {}
        detail = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        message = detail.get("message") if isinstance(detail.get("message"), str) else str(error)
        code = detail.get("code") if isinstance(detail.get("code"), str) else None
        kind = detail.get("type") if isinstance(detail.get("type"), str) else None
        param = detail.get("param") if isinstance(detail.get("param"), str) else None
        if 400 <= error.status_code < 500:
            return RemoteLLMError(error.status_code, f"language model server: {message}",
                                  kind or "invalid_request_error", param, code or "llm_request_refused")
        return RemoteLLMError(502, f"language model server: HTTP {error.status_code}: {message}",
                              "server_error", param, "llm_server_error")
