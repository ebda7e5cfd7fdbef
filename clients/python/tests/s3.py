"""A real S3 server for the remote-storage tests: s3s-fs, the binary the Rust
tests start too (tests/common/s3.rs): $GTAR_S3S_FS, which ./test.sh installs
once into ~/.cache/gtar-logd/s3s-fs."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest

ACCESS_KEY = "gtar-test-key"
SECRET_KEY = "gtar-test-secret"


def s3s_fs_bin() -> pathlib.Path:
    p = pathlib.Path(os.environ.get("GTAR_S3S_FS")
                     or pathlib.Path.home() / ".cache/gtar-logd/s3s-fs/bin/s3s-fs")
    if not p.exists():
        pytest.fail(f"{p} is missing: the remote-storage tests need s3s-fs; ./test.sh installs it")
    return p


class S3Server:
    """One s3s-fs process on 127.0.0.1 over `root` (a bucket is a directory)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:  # s3s-fs takes a port number: find a free one
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ALLOW_HTTP": "true"}

    def bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        log = open(self.root.with_suffix(".s3s-fs.log"), "ab")
        self.proc = subprocess.Popen(
            [str(s3s_fs_bin()), "--host", "127.0.0.1", "--port", str(self.port),
             "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, str(self.root)],
            stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("s3s-fs did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
