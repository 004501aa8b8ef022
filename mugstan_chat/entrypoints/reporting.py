"""Logging setup and one-line errors, the same for every command-line front end."""

from __future__ import annotations

import logging
import sys
import traceback


def configure_logging(debug: bool) -> None:
    """Library logs at INFO with ``--debug``; otherwise only errors (notices are printed once, by the CLI)."""
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        logging.getLogger("mugstan_chat").setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is for users: printed as they are, without 'unexpected'."""
    from ..model.checkpoint import CheckpointError
    from ..llava.loader import ModelLoadError
    from ..engine.remote_llm import RemoteLLMError
    from ..engine.turns import ConversationTooLong
    from ..video import VideoDecodeError

    return (VideoDecodeError, CheckpointError, ModelLoadError, ConversationTooLong, RemoteLLMError, ValueError,
            OSError)


def run_reporting_errors(prog: str, debug: bool, command, *args,
                         expected: tuple[type[BaseException], ...] = ()) -> int:
    """Runs ``command(*args)`` and returns its exit status; errors become one line on stderr (exit 1).

    Ctrl-C exits 130. ``debug`` prints the traceback too. Usage errors (argparse, exit 2)
    happen before this is called. ``expected``: the caller's own errors whose message is for
    users (e.g. the trainer's data and checkpoint errors), besides :func:`expected_errors`.
    """
    try:
        return command(*args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for users; the traceback with --debug
        if debug:
            traceback.print_exc()
        known = isinstance(error, expected_errors() + tuple(expected))
        message = " ".join(str(error).split()) or type(error).__name__
        prefix = "" if known else f"unexpected {type(error).__name__}: "
        print(f"{prog}: error: {prefix}{message}", file=sys.stderr)
        return 1


def load_model_or_report(model_args, prog: str):
    """``model_args.load()`` for a server: a load failure is one line on stderr and None; notices print once."""
    from ..model.checkpoint import CheckpointError
    from ..llava.loader import ModelLoadError
    from ..engine.remote_llm import RemoteLLMError

    try:
        chat_model = model_args.load()
    except (ModelLoadError, CheckpointError, RemoteLLMError) as error:  # RemoteLLMError: --llm-url unreachable
        print(f"{prog}: error: {error}", file=sys.stderr)
        return None
    if chat_model.notice:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    return chat_model
