"""Errors raised by the gtar_logd clients."""
from __future__ import annotations

import os

from ._address import DEFAULT_SOCKET_RULE, default_socket_path, host_port, unix_path


class GtarLogdError(RuntimeError):
    """Base class of every error this package raises on purpose."""


class DaemonUnavailable(GtarLogdError):
    """The daemon could not be reached."""

    def __init__(self, address: str, detail: str = ""):
        self.address = address
        self.detail = detail
        super().__init__(f"cannot reach the gtar-logd daemon at {address!r}"
                         + (f" ({detail})" if detail else "") + ". " + _how_to_start(address))


def _how_to_start(address: str) -> str:
    """What to do about an absent daemon, for the address we tried."""
    default = "unix:" + default_socket_path()
    rule = f"{default} ({DEFAULT_SOCKET_RULE})"
    elsewhere = ("or point the client at a running daemon with address='unix:/path/to.sock' "
                 "or 'host:port', or $GTAR_LOGD_ADDRESS.")
    path = unix_path(address)
    if path is not None and os.path.abspath(path) == default_socket_path():
        return (f"Start it with `gtar-logd serve`: with no flags it listens on that socket, "
                f"the default {DEFAULT_SOCKET_RULE}; " + elsewhere)
    if path is not None:
        return (f"Start one there with `gtar-logd serve --uds {path}` (with no flags it "
                f"listens on {rule}, the clients' default address), " + elsewhere)
    hp = host_port(address)
    # The daemon takes an IP address for --tcp, not a host name.
    host = "127.0.0.1" if hp and hp[0] == "localhost" else hp and hp[0]
    flag = (f"[{host}]:{hp[1]}" if ":" in host else f"{host}:{hp[1]}") if hp else "HOST:PORT"
    return (f"Start one there with `gtar-logd serve --tcp {flag}`: the daemon listens on "
            f"TCP only when asked (with no flags it listens on the Unix socket {rule}, the "
            f"clients' default address); " + elsewhere)


class NotFound(GtarLogdError, KeyError):
    """The daemon has no such archive, group, frame or record."""

    def __str__(self):  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class WriteFailed(GtarLogdError):
    """The daemon refused what we sent, or we gave up reconnecting."""


class DurabilityTimeout(GtarLogdError):
    """Frames were not acknowledged as durable in time."""
