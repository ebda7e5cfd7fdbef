"""Where the daemon listens by default (the same rules as `gtar-logd serve`)."""
from __future__ import annotations

import os


def default_socket_path() -> str:
    """$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock, else /tmp/gtar-logd-$UID/gtar-logd.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "gtar-logd", "gtar-logd.sock")
    return f"/tmp/gtar-logd-{os.getuid()}/gtar-logd.sock"


def resolve(address: str | None = None) -> str:
    """The gRPC target to use.

    In order: the `address` argument; $GTAR_LOGD_ADDRESS; $GTAR_LOGD_UDS (the
    daemon's own variable, as `unix:PATH`); the daemon's default socket.
    Targets are gRPC targets: `unix:/path/to.sock` or `host:port`.
    """
    if address:
        return address
    env = os.environ.get("GTAR_LOGD_ADDRESS")
    if env:
        return env
    uds = os.environ.get("GTAR_LOGD_UDS")
    if uds:
        return "unix:" + os.path.abspath(uds)
    return "unix:" + default_socket_path()
