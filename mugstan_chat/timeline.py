"""Where in the video each clip comes from: spans, their one prompt template, and when it is shown.

A clip is T frames sampled from one part of the video; its span is [time of its first sampled
frame, time of its last sampled frame] (real frame times, not the nominal segment grid;
:func:`mugstan_chat.video.clip_spans`). With clip times on, the first user turn names every
clip before its ``<image>``, with one template (:data:`CLIP_TIME_TEMPLATE`)::

    USER: Clip 1 (00:00-00:28): <image>
    Clip 2 (00:30-00:58): <image>
    what does she do after opening the fridge? ASSISTANT:

so the language model can say when things happen (docs/design.md section 4c). The labels are
written into the prompt the processor's chat template rendered, in front of each image
placeholder, so they work with any template (LLaVA-1.5's puts every image before the text).
The vLLM route sends each label as a text part right before its image (:func:`labelled_messages`),
which the template ``export-llava`` writes renders in that same place (:mod:`mugstan_chat.llava.chat_template`).

Default (``auto``): times are shown for several clips or a selection, and never for a single
uniform clip, whose prompt stays exactly stock LLaVA's one-image prompt. ``on``/``off`` force it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CLIP_TIME_TEMPLATE = "Clip {number} ({start}-{end}): "
CLIP_TIMES_CHOICES = ("auto", "on", "off")
PRECISE_BELOW_S = 60.0  # videos shorter than this get tenths of a second (else every span reads 00:00-00:01)


@dataclass(frozen=True)
class ClipSpan:
    """One clip shown to the language model: its place in the prompt and its times in the video."""

    number: int  # 1-based, the order of the <image> entries (temporal order)
    start: float  # seconds: time of the clip's first sampled frame
    end: float  # seconds: time of its last sampled frame
    candidate: int | None = None  # with selection: the clip's index among the M candidates (0-based)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def format_time(seconds: float, precise: bool = False) -> str:
    """``MM:SS`` (``H:MM:SS`` from one hour), with tenths when ``precise``; seconds are floored.

    Floored, not rounded, so a label never names a time after the frame it describes.
    """
    if precise:
        tenths = int(seconds * 10 + 1e-6)
        whole, fraction = divmod(tenths, 10)
    else:
        whole, fraction = int(seconds + 1e-6), None
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
    return text if fraction is None else f"{text}.{fraction}"


def clip_label(span: ClipSpan, precise: bool = False) -> str:
    """The text written before a clip's ``<image>``: ``Clip 2 (00:30-00:58): ``."""
    return CLIP_TIME_TEMPLATE.format(number=span.number, start=format_time(span.start, precise),
                                     end=format_time(span.end, precise))


def make_spans(times: list[tuple[float, float]], candidates: list[int] | None = None) -> list[ClipSpan]:
    """:class:`ClipSpan` s numbered 1..C from (start, end) seconds (and candidate indices, with selection)."""
    return [ClipSpan(i + 1, start, end, None if candidates is None else candidates[i])
            for i, (start, end) in enumerate(times)]


def clip_labels(spans: list[ClipSpan], precise: bool = False) -> list[str]:
    """Every clip's label, in the order of its ``<image>``."""
    return [clip_label(span, precise) for span in spans]


def write_labels(text: str, image_token: str, labels: list[str]) -> str:
    """``text`` with ``labels[i]`` written before its i-th ``image_token``.

    Raises ValueError when the number of placeholders is not the number of labels.
    """
    parts = text.split(image_token)
    if len(parts) - 1 != len(labels):
        raise ValueError(f"{len(parts) - 1} {image_token} placeholders for {len(labels)} clip labels")
    return parts[0] + "".join(label + image_token + after for label, after in zip(labels, parts[1:]))


def label_images(text: str, image_token: str, spans: list[ClipSpan], precise: bool = False) -> str:
    """``text`` with the label of clip i written before its i-th ``image_token`` (:func:`write_labels`)."""
    return write_labels(text, image_token, clip_labels(spans, precise))


def image_parts(messages: list[dict]) -> int:
    """``{"type": "image"}`` parts in a processor-format conversation."""
    return sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")


def labelled_messages(messages: list[dict], labels: list[str]) -> list[dict]:
    """A processor-format conversation with ``labels[i]`` as a text part right before its i-th image part.

    What the vLLM route sends: the chat template export-llava writes renders such a text right
    before the image's placeholder (:mod:`mugstan_chat.llava.chat_template`), as :func:`write_labels` does.
    """
    if image_parts(messages) != len(labels):
        raise ValueError(f"{len(labels)} clip labels for {image_parts(messages)} images")
    pending = iter(labels)
    out = []
    for message in messages:
        if isinstance(message["content"], str):
            out.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "text", "text": next(pending)})
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def times_shown(setting: str, clips: int, selecting: bool) -> bool:
    """Whether the prompt carries clip times: ``on``, or ``auto`` with several clips or a selection."""
    if setting not in CLIP_TIMES_CHOICES:
        raise ValueError(f"clip times must be one of {', '.join(CLIP_TIMES_CHOICES)}, got {setting!r}")
    return setting == "on" or (setting == "auto" and (clips > 1 or selecting))


def precise_times(duration: float) -> bool:
    """Tenths of a second for short videos (below :data:`PRECISE_BELOW_S`)."""
    return duration < PRECISE_BELOW_S
