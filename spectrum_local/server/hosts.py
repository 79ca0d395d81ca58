"""Names and addresses: which hosts are this machine only, and whether an address can be
listened on."""

from __future__ import annotations

import ipaddress
import socket

from ..errors import InputError


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address, or the name in a Host header) is this machine only."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port: ``[::1]:8717`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_address(host: str, port: int) -> None:
    """Fail before the model loads if ``host:port`` cannot be listened on (a port in use, an
    address this machine does not have), with one line instead of uvicorn's log."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
