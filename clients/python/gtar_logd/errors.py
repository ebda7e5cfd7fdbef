"""Errors raised by the gtar_logd clients."""
from __future__ import annotations


class GtarLogdError(RuntimeError):
    """Base class of every error this package raises on purpose."""


class DaemonUnavailable(GtarLogdError):
    """The daemon could not be reached."""

    def __init__(self, address: str, detail: str = ""):
        self.address = address
        msg = (
            f"cannot reach the gtar-logd daemon at {address!r}"
            + (f" ({detail})" if detail else "")
            + ". Start it with `gtar-logd serve` (it listens on that socket by "
            "default; `gtar-logd serve --uds PATH --tcp 127.0.0.1:PORT` for "
            "others), or point the client at a running daemon with "
            "address='unix:/path/to.sock' / 'host:port' or $GTAR_LOGD_ADDRESS."
        )
        super().__init__(msg)


class NotFound(GtarLogdError, KeyError):
    """The daemon has no such archive, group, frame or record."""

    def __str__(self):  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class WriteFailed(GtarLogdError):
    """The daemon refused what we sent, or we gave up reconnecting."""


class DurabilityTimeout(GtarLogdError):
    """Frames were not acknowledged as durable in time."""
