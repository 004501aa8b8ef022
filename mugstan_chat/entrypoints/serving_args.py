"""``ServingArgs``: where a server listens and how much it admits, shared by ``serve`` and ``app.py``.

Both servers take ``--host``, ``--port``, ``--concurrency``, ``--threads-per-request``, ``--queue-size``,
``--feature-cache-mb`` and ``--max-video-seconds`` from here, with the same types and
checks; only their defaults differ (:class:`ServingDefaults`). :meth:`ServingArgs.validate`
refuses, before any model loads, a port that is taken and an address other machines can
reach without authentication.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..engine.threads import default_threads
from .network import is_loopback, port_in_use, port_message
from .values import megabytes_to_bytes, non_negative_float, non_negative_int, port, positive_float, positive_int


@dataclass(frozen=True)
class ServingDefaults:
    """What differs between the servers: their usual port and the longest video they accept."""

    port: int
    max_video_seconds: float


@dataclass
class ServingArgs:
    """Listening address, admission control and the shared feature-cache budget."""

    host: str = "127.0.0.1"  # loopback by default; any other address needs authentication
    port: int = 8000
    concurrency: int = 1  # model jobs at once; 1 per GPU
    threads_per_request: int | None = None  # intra-op torch threads of one job; None: cores // concurrency (>= 1)
    queue_size: int = 16  # jobs waiting beyond the running ones; more are refused
    feature_cache_mb: float = 1024.0  # encoded videos kept for every user, least recently used out; 0: off
    max_video_seconds: float = 3 * 3600.0  # longer videos are refused after reading the header

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, defaults: ServingDefaults,
                     auth_hint: str) -> argparse.ArgumentParser:
        """Adds the group "server" to ``parser``; ``auth_hint`` names the front end's own authentication flag."""
        server = parser.add_argument_group("server")
        server.add_argument("--host", default="127.0.0.1",
                            help=f"address to listen on (default: %(default)s); any other address needs {auth_hint}")
        server.add_argument("--port", type=port, default=defaults.port,
                            help="TCP port, 1..65535 (default: %(default)s)")
        server.add_argument("--concurrency", type=positive_int, default=1,
                            help="model jobs (encode or generate) at once; 1 per GPU (default: %(default)s)")
        server.add_argument("--threads-per-request", type=positive_int, default=None,
                            help="torch intra-op threads each model job uses (default: the usable cores divided "
                                 "by --concurrency, at least 1, so concurrent jobs do not oversubscribe the cores)")
        server.add_argument("--queue-size", type=non_negative_int, default=16,
                            help="jobs waiting beyond the running ones; more are refused (default: %(default)s)")
        server.add_argument("--feature-cache-mb", type=non_negative_float, default=1024.0,
                            help="memory for encoded videos shared by every user, least recently used out; "
                                 "0 turns the cache off (default: %(default)s)")
        server.add_argument("--max-video-seconds", type=positive_float, default=defaults.max_video_seconds,
                            help="longest accepted video (default: %(default)s)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServingArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def threads(self, cores: int | None = None) -> int:
        """Intra-op threads per job: ``--threads-per-request``, else max(1, cores // concurrency)."""
        if self.threads_per_request is not None:
            return self.threads_per_request
        return default_threads(self.concurrency, cores)

    @property
    def feature_cache_bytes(self) -> int:
        return megabytes_to_bytes(self.feature_cache_mb)

    def validate(self, authenticated: bool, auth_hint: str, public: bool = False) -> ServingArgs:
        """ValueError (a usage error for the caller's parser) when this cannot or must not serve.

        Args:
            authenticated: the front end requires a key or login.
            auth_hint: how to require one (e.g. "--api-key KEY"), for the message.
            public: the front end is asked to publish itself anyway (gradio's --share).
        """
        if (public or not is_loopback(self.host)) and not authenticated:
            where = "a public share link" if public else f"--host {self.host}"
            raise ValueError(f"{where} exposes the server to other machines: pass {auth_hint}")
        busy = port_in_use(self.host, self.port)  # found now, not after minutes of loading weights
        if busy:
            raise ValueError(port_message(self.host, self.port, busy))
        return self
