"""Where the daemon listens by default (the same rules as `gtar-logd serve`),
and a quick check of whether anything listens at an address at all."""
from __future__ import annotations

import errno
import os
import socket

#: The default socket's rule, as `gtar-logd serve --help` states it.
DEFAULT_SOCKET_RULE = "$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock, else /tmp/gtar-logd-$UID/gtar-logd.sock"


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
        return as_target(address)
    env = os.environ.get("GTAR_LOGD_ADDRESS")
    if env:
        return as_target(env)
    uds = os.environ.get("GTAR_LOGD_UDS")
    if uds:
        return "unix:" + os.path.abspath(uds)
    return "unix:" + default_socket_path()


def as_target(address: str) -> str:
    """A gRPC target for `address`: a bare socket path (`/run/x.sock`,
    `./x.sock`, `~/x.sock`, or any existing socket file) becomes
    `unix:ABSPATH`, as the Rust client and `gtar-logd --address` take it;
    anything else (`unix:...`, `host:port`) is left as it is."""
    if address.startswith(("/", "./", "../", "~")) or (
            ":" not in address and _is_socket(address)):
        return "unix:" + os.path.abspath(os.path.expanduser(address))
    return address


def _is_socket(path: str) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def unix_path(target: str) -> str | None:
    """The socket path of a `unix:` target (None for TCP targets)."""
    if target.startswith("unix:"):
        rest = target[len("unix:"):]
        # gRPC spells absolute paths `unix:/p` and `unix:///p`.
        return rest[2:] if rest.startswith("//") else rest
    if target.startswith("unix-abstract:"):
        return "\0" + target[len("unix-abstract:"):]
    return None


def host_port(target: str):
    """(host, port) of a TCP target, or None when it is not one we can parse."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):  # [::1]:7461
        host, _, port = target[1:].partition("]:")
    else:
        host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def token_for(target: str) -> str | None:
    """The token a TCP request carries (`authorization: Bearer <token>`).

    $GTAR_LOGD_TOKEN, else the file $GTAR_LOGD_TOKEN_FILE, else the daemon's
    default token file for the port (`tcp-<PORT>.token` next to the default
    socket) when it exists. None for a Unix socket, where the kernel tells
    the daemon who is asking.
    """
    if unix_path(target) is not None:
        return None
    token = os.environ.get("GTAR_LOGD_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("GTAR_LOGD_TOKEN_FILE")
    if not path:
        hp = host_port(target)
        if hp is None:
            return None
        path = os.path.join(os.path.dirname(default_socket_path()), f"tcp-{hp[1]}.token")
        if not os.path.exists(path):
            return None
    with open(path) as f:
        return f.read().strip()


# Answers that say at once that no daemon listens there. Anything else
# (a timeout, a full backlog) may be a daemon that is only slow: let gRPC wait.
_ABSENT = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES, errno.EPERM,
           errno.ENOTSOCK, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


def why_unreachable(target: str, timeout: float = 1.0) -> str | None:
    """Why no daemon can be listening at `target`, or None if something
    accepted a connection (or the answer did not come within `timeout`).

    A plain socket connect, closed at once: a missing socket file or a
    refused connection are known in microseconds, where a gRPC call would
    wait out its deadline.
    """
    path = unix_path(target)
    try:
        if path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
            return None
        hp = host_port(target)
        if hp is None:
            return None
        with socket.create_connection(hp, timeout=timeout):
            return None
    except socket.gaierror as e:
        return f"cannot resolve the host name: {e.strerror}"
    except OSError as e:
        if e.errno not in _ABSENT:
            return None
        if e.errno == errno.ENOENT and path is not None:
            return f"no socket file {path}"
        if e.errno == errno.ECONNREFUSED:
            where = "on the socket file" if path is not None else "there"
            return f"connection refused: nothing listens {where}"
        return e.strerror or str(e)
