"""Listening ports for the servers (the web app, and any other server entry point).

A port in use is found before a model loads, so a second server on the same
port fails in a second with one line, not after minutes of loading with a
traceback from deep inside the web framework.
"""

from __future__ import annotations

import argparse
import socket


def parse_port(text: str) -> int:
    """argparse type for ``--port``: a TCP port 1..65535 (usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {value}")
    return value


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "Address already in use"), or None.

    Binds like uvicorn does (SO_REUSEADDR), so a port in TIME_WAIT is not reported.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        return f"cannot resolve {host} ({error.strerror or error})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.strerror or str(error)
    return None


def port_message(prog: str, host: str, port: int, reason: str) -> str:
    """The one line a server prints when it cannot listen."""
    return f"{prog}: error: cannot listen on {host}:{port} ({reason}); choose another port with --port"
