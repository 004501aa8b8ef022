"""Where a server may listen: loopback detection and a port check made before any model loads.

A port in use is found before the weights load, so a second server on the same port fails
in a second with one line, not after minutes of loading with a traceback from deep inside
the web framework.
"""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "Address already in use"), or None.

    Binds like uvicorn and gradio do (SO_REUSEADDR), so a port in TIME_WAIT is not reported.
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


def port_message(host: str, port: int, reason: str) -> str:
    """What a server says when it cannot listen (after ``PROG: error:``)."""
    return f"cannot listen on {host}:{port} ({reason}); choose another port with --port"
