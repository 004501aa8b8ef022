"""The engine: the one object every front end talks to (vLLM's ``LLM`` over ``EngineArgs`` is the model).

An :class:`Engine` owns what all conversations on one loaded model share: the
:class:`~mugstan_chat.llava.loader.ChatModel` (never changed after loading), the
:class:`~mugstan_chat.engine.feature_cache.FeatureCache` of encoded videos, the
:class:`~mugstan_chat.engine.prefix_cache.CacheBudget` their KV caches count against, the retrieval
head clip selection ranks with (loaded on first use) and the
:class:`~mugstan_chat.engine.language_models.LanguageModel` that answers (ours, or a vLLM server's).

Its surface is small::

    engine = Engine(chat_model)                     # or ModelArgs.load_engine() from flags
    conversation = engine.open(video, options)      # SessionOptions: frames, clips, selection, ...
    for piece in conversation.ask_stream("what happens?", generation):
        ...
    conversation.score(question, ["left", "right"]) # multiple-choice log-likelihoods
    conversation.undo(); conversation.reset()

:meth:`Engine.open` does the whole lifecycle of a conversation's video (how many clips fit, which
clips a question selects, the features from the cache or decoded and encoded once) and hands back a
:class:`Conversation`, whose members only ask and read; no front end drives a session's steps.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

from ..llava.retrieval import Retriever, SelectionUnavailable, load_retriever
from ..session_options import DEFAULTS, SessionOptions
from ..video import VideoDecodeError, VideoLimits
from .conversation import ChatSession, ask_together
from .encoding import EncodedClips, encode_clips
from .feature_cache import FeatureCache, file_sha256, image_key, session_key
from .language_models import LanguageModel, LocalLanguageModel, RemoteLanguageModel
from .likelihood import ContinuationScore
from .planning import AUTO_MAX_CLIPS
from .prefix_cache import CacheBudget
from .remote_llm import RemoteLLM
from .turns import GenerationSettings, TurnStats, encode_image

DEFAULT_FEATURE_CACHE_BYTES = 256 * 2**20  # an engine given no cache keeps encoded videos in one this big


class Engine:
    """One loaded model and everything its conversations share.

    Args:
        chat_model: from :func:`mugstan_chat.llava.loader.load_chat_model` (or ``ModelArgs.load``).
        llm: a connected :class:`~mugstan_chat.engine.remote_llm.RemoteLLM` to answer instead of the
            loaded language model (``--llm-url``); None: ours.
        retrieval_clip: the CLIP checkpoint whose text tower ranks clips (``--retrieval-clip``;
            default: the one the STAN branch names).
        feature_cache: the cache of encoded videos (default: one of :data:`DEFAULT_FEATURE_CACHE_BYTES`).
        cache_budget: what the conversations' KV caches may hold together (default: the
            ``MUGSTAN_KV_BUDGET_MB`` budget of :class:`~mugstan_chat.engine.prefix_cache.CacheBudget`).
        retriever: the dual encoder clip selection ranks with, given instead of loaded from the model's
            branch on first use (a benchmark's random-weight text tower).
    """

    def __init__(self, chat_model, llm: RemoteLLM | None = None, retrieval_clip: str | None = None,
                 feature_cache: FeatureCache | None = None, cache_budget: CacheBudget | None = None,
                 retriever: Retriever | None = None):
        self.model = chat_model
        self.llm: LanguageModel = RemoteLanguageModel(llm) if llm is not None else LocalLanguageModel(chat_model)
        self.features = feature_cache if feature_cache is not None else FeatureCache(DEFAULT_FEATURE_CACHE_BYTES)
        self.kv_budget = cache_budget if cache_budget is not None else CacheBudget()
        self.retrieval_clip = retrieval_clip
        self._retriever: Retriever | SelectionUnavailable | None = retriever
        self._retriever_lock = threading.Lock()

    @property
    def notices(self) -> list[str]:
        """Lines for users: the model's (demo model, mean fallback ...) and the language model's."""
        return list(self.model.notices) + ([self.llm.notice] if self.llm.notice else [])

    @property
    def notice(self) -> str:
        return "; ".join(self.notices)

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def retriever(self) -> Retriever:
        """The dual encoder clip selection ranks with, loaded on first use (thread-safe).

        Raises SelectionUnavailable (every time, with the same line) when there is no text side.
        """
        with self._retriever_lock:
            if self._retriever is None:
                self._retriever = load_retriever(self.model, self.retrieval_clip)
            loaded = self._retriever
        if isinstance(loaded, SelectionUnavailable):
            raise loaded
        return loaded

    # ------------------------------------------------------------------ opening conversations

    def open(self, video: str | os.PathLike, options: SessionOptions = DEFAULTS, *, question: str | None = None,
             name: str | None = None, generation: GenerationSettings | None = None, system: str | None = None,
             history: list[tuple[str, str]] | tuple = (), temporal: str | None = None, start: float | None = None,
             end: float | None = None, limits: VideoLimits | None = None, content_hash: str | None = None,
             max_auto_clips: int = AUTO_MAX_CLIPS, decoded=None, encoded: EncodedClips | None = None,
             before_decoding: Callable[[], None] | None = None,
             frames_as_images: bool = False, reuse_cache: bool = True, lazy: bool = False) -> Conversation:
        """A conversation about ``video`` whose video features are ready (from the cache, or made now).

        Args:
            video: the video file.
            options: how it is read (:class:`~mugstan_chat.session_options.SessionOptions`, validated here).
            question: the first question, when known: with selection it chooses the clips, with
                ``clips="auto"`` its length counts (else room is kept for one).
            name: what errors and logs call the video (a server's URL instead of its temporary file);
                every error message shows ``name`` in place of the path.
            generation: the default answer settings (each ask may give its own).
            system, history: a system prompt, and earlier (question, answer) turns.
            temporal: "stan" or "mean" (default: the tower's mode).
            start, end: a time window of the video, in seconds.
            limits: what the file must satisfy (:class:`mugstan_chat.video.VideoLimits`).
            content_hash: the file's sha256, if known (the cache key; hashed here otherwise).
            max_auto_clips: the most clips ``clips="auto"`` chooses.
            decoded: this video's clips already decoded with these options (``load_video_clips``):
                encoded directly, not through the cache (evaluation decodes once for several modes).
            encoded: those ``decoded`` clips' features from :meth:`encode_many` (several videos in one
                tower call): used instead of encoding them again.
            before_decoding: called before the file is decoded on a cache miss (a front end's header checks).
            frames_as_images: every frame as its own ``<image>`` (the frame-concatenation baseline).
            reuse_cache: keep the conversation's KV cache between turns (False: prefill every turn).
            lazy: leave the video to the first question, which decodes and encodes it inside its turn (so its
                timings include them) without the cache: a one-question front end (``ask``).
        Raises:
            ValueError: bad options; video.VideoDecodeError: the file cannot be read (naming ``name``);
            ConversationTooLong: the prompt cannot fit (before a frame is decoded).
        """
        options.validate()
        path = os.fspath(video)
        session = ChatSession(self, path, **options.session_kwargs(), generation=generation, temporal=temporal,
                              system=system, start=start, end=end, limits=limits, prepare=False,
                              content_hash=content_hash, max_auto_clips=max_auto_clips,
                              frames_as_images=frames_as_images, reuse_cache=reuse_cache, history=history)
        if lazy:
            return Conversation(session, False)
        try:
            cached = self._prepare(session, question, decoded, before_decoding, encoded)
        except VideoDecodeError as error:
            if name is None:
                raise
            raise VideoDecodeError(str(error).replace(path, name)) from None  # never show a server's temp path
        if name is not None:
            session.video_path = name  # the file may go away now: nothing reads it again
        return Conversation(session, cached)

    def _prepare(self, session: ChatSession, question: str | None, decoded, before_decoding, encoded=None) -> bool:
        """Gives ``session`` its clips' features; True when they came from the cache."""
        question = question.strip() if question else None
        if session.select is not None:  # the candidates go through the cache; the question picks the clips
            if before_decoding is not None:
                before_decoding()
            if question:
                embedded = session.prepare_candidates()
                if session.select_clips(question) is not None:
                    return session.selection.cached
                if not session.selects:  # selection unavailable: uniform clips instead (the notice says so)
                    return not session.prepare()
                return not embedded
            return not session.prepare()
        session.resolve_clips(question)  # --clips auto: the number chosen is part of the cache key
        if decoded is not None:
            session.prepare(decoded, encoded)
            return False
        key = session_key(session, session.content_hash or file_sha256(session.video_path))

        def encode():
            if before_decoding is not None:
                before_decoding()
            session.prepare()
            return session.video_features

        features, cached = self.features.get_or_encode(key, encode)
        if cached:
            session.attach_features(features)
        return cached

    def encode_many(self, decoded: list, options: SessionOptions = DEFAULTS,
                    temporal: str | None = None) -> list[EncodedClips]:
        """Several videos' uniform clips (``load_video_clips`` results, the same ``options``) through the tower
        and the projector in ONE call; hand each to :meth:`open` as ``decoded=..., encoded=...``.

        The features equal each video encoded alone up to fp32 rounding (tests/engine/test_engine_batch.py).
        ``temporal``: "stan" or "mean" (default: the tower's mode).
        """
        options.validate()
        if options.select is not None or options.clips == "auto":
            raise ValueError("encode_many takes uniform clips: neither clip selection nor clips='auto'")
        temporal = temporal or self.model.tower.mode
        if temporal not in self.model.tower.available_modes:
            raise ValueError(f"temporal mode {temporal!r} is not available with this model "
                             f"(available: {', '.join(self.model.tower.available_modes)})")
        return encode_clips(self.model, [clips.clips for clips in decoded], temporal)

    def ask_many(self, conversations: list[Conversation], questions: list[str],
                 generation: GenerationSettings | None = None) -> list[str | Exception]:
        """The first (or next) answer of several conversations at once; each answer, or the error its turn raised.

        On our language model one padded ``generate`` answers them all (left padding, one attention mask,
        each conversation's own clip features): greedy answers equal ``ask``'s up to fp32 rounding, which can
        turn a near-tie (docs/batch.md). On the vLLM route each is its own request.
        """
        if len(conversations) != len(questions):
            raise ValueError(f"{len(conversations)} conversations and {len(questions)} questions")
        if any(conversation.engine is not self for conversation in conversations):
            raise ValueError("ask_many answers conversations this engine opened")
        return ask_together([conversation._session for conversation in conversations], questions, generation)

    def open_text(self, *, generation: GenerationSettings | None = None, system: str | None = None,
                  history: list[tuple[str, str]] | tuple = (), name: str = "text-only conversation") -> Conversation:
        """A conversation without a video: the language model alone answers."""
        session = ChatSession(self, name, generation=generation, system=system, text_only=True, prepare=False,
                              history=history)
        return Conversation(session, False)

    def open_image(self, load_image: Callable[[], object], content_hash: str, *, name: str = "image",
                   generation: GenerationSettings | None = None, system: str | None = None,
                   history: list[tuple[str, str]] | tuple = ()) -> Conversation:
        """A conversation about one image, as stock LLaVA sees it (plain CLIP, one ``<image>``).

        ``load_image()`` gives the PIL image; it is called on a cache miss only.
        """
        session = ChatSession(self, name, frames=1, clips=1, generation=generation, system=system, prepare=False,
                              content_hash=content_hash, history=history)
        features, cached = self.features.get_or_encode(image_key(self.model, content_hash),
                                                       lambda: encode_image(self.model, load_image()))
        session.attach_features(features, cached=cached)
        return Conversation(session, cached)


class Conversation:
    """One conversation opened by :meth:`Engine.open`: ask, score, undo, reset, and read what it shows.

    Every member either answers or reads; the video's clips and features were settled when it was
    opened (a selecting conversation re-ranks its cached candidates for each new question itself).
    """

    def __init__(self, session: ChatSession, cached: bool):
        self._session = session
        self.cached = cached  # the video's features came from the engine's cache when it was opened

    # ------------------------------------------------------------------ asking

    def ask(self, question: str, generation: GenerationSettings | None = None) -> str:
        """The answer to ``question`` (recorded in the conversation)."""
        return self._session.ask(question, generation=generation)

    def ask_stream(self, question: str, generation: GenerationSettings | None = None,
                   stop: threading.Event | None = None) -> Iterator[str]:
        """The answer as text pieces; closing the iterator or setting ``stop`` ends it (the partial answer is kept).

        Raises ConversationTooLong before the first piece when the conversation no longer fits.
        """
        return self._session.ask_stream(question, stop=stop, generation=generation)

    def score(self, question: str, continuations: list[str], select_by: str | None = None) -> list[ContinuationScore]:
        """Log-probability of each continuation right after the assistant prompt for ``question`` (nothing recorded).

        ``select_by``: the text a selecting conversation ranks its clips by (default: ``question``; a
        multiple-choice scorer gives the question without its options).
        """
        return self._session.score(question, continuations, select_by)

    def prompt_tokens(self, question: str) -> int:
        """Tokens of the prompt for ``question`` (a server's context check; the answer reuses this tokenisation)."""
        return int(self._session.build_prompt(question)["input_ids"].shape[1])

    def prompt_text(self, question: str) -> str:
        """The prompt for ``question`` as text, every ``<image>`` expanded (scorers append continuations to it)."""
        return self._session.prompt_text(question)

    def undo(self) -> tuple[str, str] | None:
        """Forgets the last question and its answer; returns them, or None."""
        return self._session.undo_last()

    def reset(self) -> None:
        """Forgets the conversation; keeps the video's features."""
        self._session.reset()

    # ------------------------------------------------------------------ reading

    @property
    def history(self) -> list[tuple[str, str]]:
        """The (question, answer) turns so far (a copy)."""
        return list(self._session.history)

    @property
    def turn_count(self) -> int:
        """Answers recorded so far (a stopped answer counts; a failed one does not)."""
        return len(self._session.turns)

    @property
    def last_stats(self) -> TurnStats | None:
        return self._session.last_stats

    def references(self, answer: str) -> list:
        """The moments ``answer`` names (:meth:`ChatSession.references`)."""
        return self._session.references(answer)

    def summary(self) -> dict:
        return self._session.summary()

    def frame_times(self):
        """Every frame's presentation time (:class:`mugstan_chat.video.FrameTimes`)."""
        return self._session.frame_times()

    @property
    def engine(self) -> Engine:
        return self._session.engine

    @property
    def video_path(self) -> str:
        return self._session.video_path

    @property
    def video_info(self):
        return self._session.video_info

    @property
    def frames(self) -> int:
        return self._session.frames

    @property
    def clips(self) -> int | None:
        return self._session.clips

    @property
    def auto_clips(self) -> bool:
        return self._session.auto_clips

    @property
    def temporal(self) -> str:
        return self._session.temporal

    @property
    def tokens_per_image(self) -> int:
        return self._session.tokens_per_image

    @property
    def visual_tokens(self) -> int:
        return self._session.visual_tokens

    @property
    def features(self) -> list:
        """The clips' projected visual features (one tensor per ``<image>``)."""
        return self._session.features

    @property
    def clip_spans(self) -> list:
        return self._session.clip_spans

    @property
    def candidate_spans(self) -> list[tuple[float, float]]:
        return self._session.candidate_spans

    @property
    def candidates(self) -> int | None:
        return self._session.candidates

    @property
    def selects(self) -> bool:
        return self._session.selects

    @property
    def selection(self):
        return self._session.selection

    @property
    def selection_notice(self) -> str | None:
        return self._session.selection_notice
