"""Fixtures: the REAL gtar-logd daemon on a temp Unix socket and 127.0.0.1 port.

The binary is $GTAR_LOGD_BIN (test.sh sets it from cargo's target
directory), else debug/gtar-logd in cargo's target directory for this repo. Keras runs with $KERAS_BACKEND, by default jax on CPU
(test.sh runs the Keras tests under tensorflow too).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _default_bin() -> pathlib.Path:
    """target/debug/gtar-logd under cargo's target directory (which honours
    CARGO_TARGET_DIR), else under the repo."""
    try:
        out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        target = json.loads(out.stdout)["target_directory"]
    except (OSError, ValueError, KeyError, subprocess.SubprocessError):
        target = ROOT / "target"
    return pathlib.Path(target) / "debug" / "gtar-logd"


BIN = pathlib.Path(os.environ.get("GTAR_LOGD_BIN") or _default_bin())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One `gtar-logd serve` process; restartable on the same socket and data dir."""

    def __init__(self, base: pathlib.Path, args=(), env=None):
        self.args = list(args)
        self.env = dict(env or {})
        if not BIN.exists():
            pytest.fail(f"daemon binary {BIN} not found: run `cargo build` or set GTAR_LOGD_BIN")
        self.data_dir = base / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes: keep it short.
        self._sockdir = tempfile.mkdtemp(prefix="gl-")
        self.uds = os.path.join(self._sockdir, "d.sock")
        self.port = _free_port()
        self.log_path = base / "daemon.log"
        self.proc = None
        self.starts = 0

    @property
    def address(self) -> str:
        return "unix:" + self.uds

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--data-dir", str(self.data_dir), "--uds", self.uds,
             "--tcp", self.tcp_address, *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.starts += 1
        from gtar_logd import Client, DaemonUnavailable
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gtar-logd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.address) as c:
                    c.ping(timeout=1.0)
                return self
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gtar-logd did not come up:\n{self.log()}")
                time.sleep(0.05)

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("gtar-logd did not stop on SIGTERM within 30 s")
            return self.proc.returncode
        return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def path(self, archive: str) -> pathlib.Path:
        return self.data_dir / archive

    def cleanup(self):
        try:
            self.kill9()
        finally:
            shutil.rmtree(self._sockdir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    d.start()
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"gtar-logd exited with {rc} on SIGTERM:\n{d.log()}"


@pytest.fixture
def own_daemon(tmp_path):
    """A daemon of this test's own (for kill -9 and restarts)."""
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def client(daemon):
    from gtar_logd import Client
    with Client(daemon.address) as c:
        yield c


_counter = [0]


@pytest.fixture
def archive(request):
    """A fresh archive name per test."""
    _counter[0] += 1
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    return f"t/{name}-{_counter[0]}.zip"


ORACLE = os.environ.get("GTAR_ORACLE_PYTHON")


def run_oracle(script: str, *args, timeout=120) -> str:
    """Run `script` in the libgetar oracle interpreter (numpy<2 + gtar 1.1.7)."""
    if not ORACLE:
        pytest.skip("GTAR_ORACLE_PYTHON is not set (test.sh sets it)")
    r = subprocess.run([ORACLE, "-c", script, *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"oracle script failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout
