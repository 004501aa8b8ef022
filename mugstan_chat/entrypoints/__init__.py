"""What every front end shares: typed arguments, their one validation, the loader call, logging, network checks.

The front ends (``mugstan-chat ask|chat`` in :mod:`mugstan_chat.entrypoints.terminal`, ``eval`` in
:mod:`mugstan_chat.entrypoints.evaluation`, ``serve`` in :mod:`mugstan_chat.entrypoints.openai.cli` and the web
app ``app.py``) build on this package and never import each other; :mod:`mugstan_chat.entrypoints.cli`
only dispatches ``mugstan-chat SUBCOMMAND`` to them.

* :mod:`.values`: argparse types for numbers and ports (one message per bad value, exit 2);
* :mod:`.model_args`: :class:`ModelArgs`, the model, video and generation settings;
* :mod:`.serving_args`: :class:`ServingArgs`, host, port, admission and cache budget;
* :mod:`.network`: loopback and port checks;
* :mod:`.progress`: the ``--no-progress`` flag and the one rule for when a progress bar shows;
* :mod:`.reporting`: logging setup and one-line errors.

Importing this package imports neither torch nor transformers (``--help`` stays instant).
"""

from .model_args import DEMO_MAX_NEW_TOKENS, ModelArgs
from .network import is_loopback, port_in_use, port_message
from .reporting import configure_logging, load_model_or_report, run_reporting_errors
from .serving_args import ServingArgs

__all__ = ["DEMO_MAX_NEW_TOKENS", "ModelArgs", "ServingArgs", "configure_logging", "is_loopback", "load_model_or_report", "port_in_use",
           "port_message", "run_reporting_errors"]
