"""The prompt text of a conversation, on both routes: our engine's, and the chat template vLLM renders it with.

Our engine renders the conversation with the processor's chat template and then writes each
clip's label right before its image placeholder (:func:`render_prompt`; the labels are
:mod:`mugstan_chat.timeline`'s). vLLM renders what it is sent with a chat template of its own
choosing, and LLaVA-1.5's stock template puts every image before the text, so a label sent as a
text part would land after all the images. ``mugstan-chat export-llava`` therefore writes
:data:`IN_ORDER_TEMPLATE_FILE` beside the processor's template: :func:`in_order_template` wraps
the processor's own template, so it is derived, not rewritten. It takes the text parts that come
before an image out of the message, renders the rest with the processor's template unchanged, and
writes each such text right before its image placeholder: exactly what our engine does, so both
routes render ``Clip 1 (00:00-00:30): <image> ... Clip 3 (...): <image>`` alike. vLLM must hand
the template the parts in order (``--chat-template-content-format openai``; docs/serve.md).

:func:`check_in_order_template` renders sample conversations both ways at export time, so a
template that drifts from our prompt is refused there, not discovered at serving.
"""

from __future__ import annotations

import json

from ..timeline import clip_labels, image_parts, labelled_messages, make_spans, write_labels

IN_ORDER_TEMPLATE_FILE = "vllm_chat_template.jinja"  # vllm serve DIR --chat-template DIR/<this>


class TemplateMismatch(ValueError):
    """The chat template for vLLM cannot be derived, or does not render our engine's prompt (one line)."""

_HEADER = ("{#- Written by mugstan-chat export-llava: the processor's chat template (inside 'rendered' below), with "
           "each text part that comes before an image written right before that image's placeholder, as "
           "mugstan-chat's engine writes clip labels. Serve with --chat-template-content-format openai. -#}\n")

# Jinja (transformers' sandbox: trim_blocks, lstrip_blocks). IMAGE is the image placeholder, ORIGINAL the
# processor's template; "+%}" / "{%+" keep the original's first and last whitespace as it is.
_WRAPPER = (
    "{%- set mugstan = namespace(labels=[], messages=[], pending='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set mugstan.messages = mugstan.messages + [message] -%}"
    "{%- else -%}{%- set kept = namespace(parts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- set mugstan.labels = mugstan.labels + [mugstan.pending] -%}{%- set mugstan.pending = '' -%}"
    "{%- set kept.parts = kept.parts + [part] -%}"
    "{%- elif part['type'] == 'text' and "
    "(message['content'][loop.index0 + 1:] | selectattr('type', 'equalto', 'image') | list) -%}"
    "{%- set mugstan.pending = mugstan.pending + part['text'] -%}"
    "{%- else -%}{%- set kept.parts = kept.parts + [part] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set mugstan.messages = mugstan.messages + [dict(message, content=kept.parts)] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = mugstan.messages -%}"
    "{%- set rendered +%}ORIGINAL{%+ endset -%}"
    "{%- set pieces = rendered.split(IMAGE) -%}"
    "{%- if pieces | length != mugstan.labels | length + 1 -%}"
    "{{- raise_exception('the chat template rendered ' ~ (pieces | length - 1) ~ ' image placeholders for ' ~ "
    "(mugstan.labels | length) ~ ' images') -}}"
    "{%- endif -%}"
    "{{- pieces[0] -}}"
    "{%- for label in mugstan.labels -%}{{- label ~ IMAGE ~ pieces[loop.index] -}}{%- endfor -%}"
)


def render_prompt(processor, messages: list[dict], labels: list[str] | None = None) -> str:
    """Our engine's prompt text: the processor's chat template, then ``labels[i]`` before the i-th placeholder.

    ``messages`` hold images and texts only (no labels); the placeholders stay one per image.
    Raises ValueError when the template does not render one placeholder per image.
    """
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token, images = processor.image_token, image_parts(messages)
    if text.count(image_token) != images:
        raise ValueError(f"chat template produced {text.count(image_token)} {image_token} placeholders "
                         f"for {images} images")
    return text if labels is None else write_labels(text, image_token, labels)


def in_order_template(template: str, image_token: str) -> str:
    """The chat template vLLM renders our labelled conversations with: ``template`` wrapped (module docstring)."""
    if not template:
        raise TemplateMismatch("the processor has no chat template to derive vLLM's from")
    literal = json.dumps(image_token, ensure_ascii=False)  # a JSON string is a Jinja string literal
    return _HEADER + _WRAPPER.replace("IMAGE", literal).replace("ORIGINAL", template)


def _samples() -> list[tuple[list[dict], list[str] | None]]:
    """(conversation, clip labels or None) pairs covering what our routes send: labels, history, none, no video."""
    spans = make_spans([(0.0, 29.5), (30.0, 59.5), (3600.0, 3629.5)])
    labels = clip_labels(spans)

    def user(images: int, text: str) -> dict:
        return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}

    history = [user(3, "what happens after the door opens?"),
               {"role": "assistant", "content": [{"type": "text", "text": "a dog runs in."}]},
               user(0, "and then?")]
    system = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
    return [(history, labels), ([system] + history, labels), ([user(2, "what moves?")], None),
            ([user(0, "what is a video?")], None)]


def check_in_order_template(processor, template: str) -> None:
    """Refuses (:class:`TemplateMismatch`, one line) a template that does not render our conversations as we do.

    Each sample is rendered as vLLM renders it (the tokenizer's ``apply_chat_template`` with
    ``template``, the labels as text parts before their images) and as our engine does
    (:func:`render_prompt`); the texts must be equal, character for character.
    """
    for messages, labels in _samples():
        try:
            ours = render_prompt(processor, messages, labels)
        except Exception as error:  # noqa: BLE001 - a template may refuse a system turn: our engine never sends one
            if messages[0]["role"] == "system":
                continue
            raise TemplateMismatch(f"the processor's chat template fails on a sample conversation: "
                                   f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
        sent = messages if labels is None else labelled_messages(messages, labels)
        try:
            theirs = processor.tokenizer.apply_chat_template(sent, chat_template=template, add_generation_prompt=True,
                                                             tokenize=False)
        except Exception as error:  # noqa: BLE001 - a template error is the check's answer
            raise TemplateMismatch(f"the chat template for vLLM fails on a sample conversation: "
                                   f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TemplateMismatch(f"the chat template for vLLM does not render our engine's prompt: at character "
                                   f"{at} ours reads {ours[at:at + 40]!r}, the template's {theirs[at:at + 40]!r}")
