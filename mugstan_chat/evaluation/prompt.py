"""The one prompt template of multiple-choice evaluation, the same for every mode (no torch: the CLI imports it)."""

from __future__ import annotations

from .readers import LETTERS, Question

PROMPT_TEMPLATE = "{question}\n{options}\n{instruction}"
OPTION_LINE = "{letter}. {text}"
INSTRUCTIONS = {
    "letter": "Answer with the option's letter from the given choices directly.",
    "text": "Answer with the text of the correct option.",
}
ANSWER_FORMATS = tuple(INSTRUCTIONS)
SCORINGS = ("likelihood", "generate")


def build_question_text(question: Question, answer_format: str = "letter") -> str:
    """The user turn's text for ``question`` (the template above, filled in)."""
    if answer_format not in INSTRUCTIONS:
        raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    options = "\n".join(OPTION_LINE.format(letter=LETTERS[i], text=text) for i, text in enumerate(question.options))
    return PROMPT_TEMPLATE.format(question=question.question.strip(), options=options,
                                  instruction=INSTRUCTIONS[answer_format])
