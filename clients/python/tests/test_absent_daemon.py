"""An absent daemon is reported at once, with the address tried, the daemon's
default socket and how to start it; a daemon that is only slow still works."""
import os
import socket
import threading
import time

import numpy as np
import pytest

from gtar_logd import Client, DaemonUnavailable, Trajectory, default_socket_path
from conftest import _free_port

FAST = 1.0  # seconds: the limit the clients promise for a missing or refused daemon


def _stale_socket(path):
    """A socket file nobody listens on (what a killed daemon leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    return path


def _addresses(tmp_path):
    return {
        "missing socket file": "unix:" + str(tmp_path / "nobody.sock"),
        "refused on a socket file": "unix:" + _stale_socket(str(tmp_path / "stale.sock")),
        "refused on TCP": f"127.0.0.1:{_free_port()}",
    }


def _write_frame(address):
    with Client(address) as c:
        c.write_frame("x.zip", 1, {"a": np.zeros(3)})


def _trajectory(address):
    Trajectory("x.zip", address=address)


def _trajectory_w(address):
    Trajectory("x.zip", "w", address=address)


def _logger(address):
    # on_train_begin is where GTARLogger connects: time it alone, not the
    # model's compilation.
    from gtar_logd.keras import GTARLogger
    from kerasutil import make_model
    model = make_model()
    logger = GTARLogger("x.zip", address=address)
    logger.set_model(model)
    t0 = time.monotonic()
    try:
        logger.on_train_begin()
    finally:
        _logger.elapsed = time.monotonic() - t0


@pytest.mark.parametrize("kind", ["missing socket file", "refused on a socket file",
                                  "refused on TCP"])
@pytest.mark.parametrize("call", [_write_frame, _trajectory, _trajectory_w, _logger],
                         ids=["write_frame", "Trajectory", "Trajectory-w", "GTARLogger"])
def test_absent_daemon_is_reported_within_a_second(tmp_path, kind, call):
    address = _addresses(tmp_path)[kind]
    if call is _logger:
        pytest.importorskip("keras")
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable) as e:
        call(address)
    elapsed = getattr(_logger, "elapsed", None) if call is _logger else time.monotonic() - t0
    assert elapsed < FAST, f"{kind}: took {elapsed:.2f} s"
    msg = str(e.value)
    assert repr(address) in msg
    assert "gtar-logd serve" in msg
    # The daemon's actual default, spelled out.
    assert "unix:" + default_socket_path() in msg
    assert "$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock" in msg
    assert "/tmp/gtar-logd-$UID/gtar-logd.sock" in msg
    if kind == "refused on TCP":
        assert f"--tcp {address}" in msg
        assert "listens on that socket" not in msg
        assert "connection refused" in msg
    else:
        assert f"--uds {address[len('unix:'):]}" in msg
    if kind == "missing socket file":
        assert "no socket file" in msg


def test_absent_daemon_at_the_default_address(tmp_path, monkeypatch):
    for var in ("GTAR_LOGD_ADDRESS", "GTAR_LOGD_UDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable) as e:
        Trajectory("x.zip")
    assert time.monotonic() - t0 < FAST
    msg = str(e.value)
    assert repr(f"unix:{tmp_path}/gtar-logd/gtar-logd.sock") in msg
    assert "Start it with `gtar-logd serve`: with no flags it listens on that socket" in msg


def test_queries_on_an_absent_daemon_say_why(tmp_path):
    with Client("unix:" + str(tmp_path / "nobody.sock")) as c:
        with pytest.raises(DaemonUnavailable, match="no socket file"):
            c.list_archives()


class _SlowProxy:
    """A Unix socket that accepts at once but passes bytes on to the daemon
    only after `delay` seconds: a daemon that is there, but slow."""

    def __init__(self, path, target, delay):
        self.path, self.target, self.delay = path, target, delay
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        time.sleep(self.delay)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.target)

        def pump(a, b):
            try:
                while True:
                    data = a.recv(1 << 16)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)

    def close(self):
        self.sock.close()


def test_a_slow_daemon_is_waited_for(daemon, tmp_path):
    proxy = _SlowProxy(str(tmp_path / "slow.sock"), daemon.uds, delay=1.5)
    try:
        t0 = time.monotonic()
        with Client("unix:" + proxy.path) as c:
            c.ping(timeout=10)
            assert time.monotonic() - t0 >= 1.5  # it did wait, and it worked
            c.list_archives()
        with Trajectory("t/slow.zip", "a", address="unix:" + proxy.path) as t:
            assert t.frames == []
    finally:
        proxy.close()
