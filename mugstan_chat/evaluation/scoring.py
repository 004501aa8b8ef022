"""Scoring a multiple-choice question on cached video features: log-likelihood or greedy answer.

The prompt is one template for every mode (:data:`PROMPT_TEMPLATE`): the question, the options
as ``A. text`` lines, and an instruction that depends only on the answer format. It goes through
the model's own chat template with the video's ``<image>`` entries first
(:meth:`mugstan_chat.engine.conversation.ChatSession.prompt_text`), so stan, mean and concat differ only in
the visual tokens.

* ``likelihood`` (default): each option's continuation after the assistant prompt is scored by
  the language model's log-probability. With ``answer_format="letter"`` the continuation is
  ``" B"`` (one token for Llama), with ``"text"`` it is ``" " + option text`` and the score is the
  mean log-probability per token (length-normalised). The highest score is the choice.
* ``generate``: greedy decoding (at most ``max_new_tokens``); the choice is parsed from the text
  by :func:`parse_choice`.

The likelihoods come from the chat engine (:meth:`mugstan_chat.engine.conversation.ChatSession.loglikelihood`:
the prompt once, continuation tokens by the lm-evaluation-harness rule); scoring never calls
the model itself.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .prompt import (ANSWER_FORMATS, INSTRUCTIONS, OPTION_LINE, PROMPT_TEMPLATE, SCORINGS,  # noqa: F401
                     build_question_text)
from .readers import LETTERS, Question

def continuations(question: Question, answer_format: str) -> list[str]:
    """What follows the assistant prompt for each option."""
    if answer_format == "letter":
        return [f" {letter}" for letter in question.letters]
    return [f" {text.strip()}" for text in question.options]


@dataclass
class Score:
    """The outcome of one question in one mode."""

    chosen: int | None  # index of the chosen option (None: no option could be parsed)
    option_scores: list[float] | None  # likelihood: per option (mean log-prob per token for texts)
    option_tokens: list[int] | None  # likelihood: continuation length per option
    answer_text: str | None  # generate: the decoded answer
    prompt_tokens: int
    score_ms: float


# ------------------------------------------------------------------------------------------ checks
def check_distinct(question: Question, answer_format: str, conts: list[list[int]], unk_id: int | None) -> None:
    """Options the model cannot tell apart would score identically: refuse instead of a silent tie."""
    if len({tuple(c) for c in conts}) != len(conts) or (unk_id is not None and any(c == [unk_id] for c in conts)):
        hint = " (the demo model's word vocabulary has no letter tokens: use --answer-format text)" \
            if answer_format == "letter" else ""
        raise ValueError(f"question {question.id!r}: the options' {answer_format}s are not distinct tokens for "
                         f"this tokenizer{hint}")


# ------------------------------------------------------------------------------------------ scorers
def score_likelihood(session, question: Question, answer_format: str = "letter") -> Score:
    """Log-likelihood of each option's continuation after the prompt (see the module docstring)."""
    started = time.perf_counter()
    try:
        results = session.loglikelihood(build_question_text(question, answer_format),
                                        continuations(question, answer_format))
    except ValueError as error:
        raise ValueError(f"question {question.id!r}: {error}") from None
    check_distinct(question, answer_format, [r.ids for r in results],
                   session.chat_model.processor.tokenizer.unk_token_id)
    scores = [r.mean_logprob if answer_format == "text" else r.logprob for r in results]
    chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first option
    return Score(chosen=chosen, option_scores=scores, option_tokens=[len(r.ids) for r in results], answer_text=None,
                 prompt_tokens=results[0].prompt_tokens, score_ms=(time.perf_counter() - started) * 1000)


def score_generate(session, question: Question, answer_format: str = "letter") -> Score:
    """Greedy answer through the chat engine (cached features), then :func:`parse_choice`."""
    started = time.perf_counter()
    session.reset()  # every question is a fresh conversation on the same features
    answer = session.ask(build_question_text(question, answer_format))
    stats = session.last_stats
    session.reset()
    return Score(chosen=parse_choice(answer, question), option_scores=None, option_tokens=None,
                 answer_text=answer, prompt_tokens=stats.prompt_tokens,
                 score_ms=(time.perf_counter() - started) * 1000)


_PREFIXES = re.compile(r"^\s*(the )?(best |correct )?(answer|option)( is)?\s*[:：]?", re.IGNORECASE)


def parse_choice(answer: str, question: Question) -> int | None:
    """The option a generated answer picks, or None.

    Rule: (1) after dropping a leading "The (best|correct) answer/option is", the first option
    letter standing alone (not inside a word: "B", "(B)", "B.", "B)") wins; (2) otherwise, if
    exactly one option's text occurs in the answer as whole words (case-insensitive), that option;
    (3) else None,
    which counts as wrong. A leading article "A" is read as option A, as in the peers' parsers.
    """
    text = _PREFIXES.sub("", answer.strip(), count=1)
    letters = question.letters
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if match:
        return letters.index(match.group(1))
    hits = [i for i, option in enumerate(question.options) if option.strip() and re.search(
        rf"(?<![A-Za-z0-9]){re.escape(option.strip())}(?![A-Za-z0-9])", answer, re.IGNORECASE)]
    return hits[0] if len(hits) == 1 else None


def score_question(session, question: Question, scoring: str, answer_format: str) -> Score:
    if scoring == "likelihood":
        return score_likelihood(session, question, answer_format)
    if scoring == "generate":
        return score_generate(session, question, answer_format)
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
