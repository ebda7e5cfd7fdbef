"""Remote storage through the Python client: `flush(replicated=True)` and
`GTARLogger(wait='replicated')` against a daemon started with --remote and a
real S3 server (s3s-fs); then a daemon on an empty disk serves the frames."""
import numpy as np
import pytest

from conftest import Daemon
from s3 import S3Server

keras = pytest.importorskip("keras")
from kerasutil import Capture, data, make_model  # noqa: E402


@pytest.fixture
def s3(tmp_path):
    s = S3Server(tmp_path / "s3")
    s.bucket("ckpt")
    yield s
    s.stop()


def remote_daemon(base, s3):
    return Daemon(base, args=["--remote", "s3://ckpt/py"], env=s3.env()).start()


def test_flush_replicated_then_node_loss(tmp_path, s3):
    from gtar_logd import Client
    d1 = remote_daemon(tmp_path / "n1", s3)
    arrays = {k: np.random.default_rng(k).standard_normal((32, 16)).astype("float32")
              for k in range(4)}
    try:
        with Client(d1.address) as c:
            w = c.writer("run.zip")
            for k, a in arrays.items():
                w.write_tensors(str(k), {"w": a})
            w.flush(replicated=True, timeout=120)
            assert w.replicated_count == 4
            w.close()
    finally:
        d1.kill9()
        d1.cleanup()
    d2 = remote_daemon(tmp_path / "n2", s3)  # an empty data dir
    try:
        with Client(d2.address) as c:
            assert c.list_frames("run.zip") == ["0", "1", "2", "3"]
            for k, a in arrays.items():
                got = c.read_frame("run.zip", str(k))
                assert np.array_equal(got["w"], a)
    finally:
        d2.cleanup()


def test_flush_replicated_without_remote_says_so(own_daemon):
    from gtar_logd import Client
    from gtar_logd.errors import WriteFailed
    with Client(own_daemon.address) as c:
        w = c.writer("plain.zip")
        w.write_tensors("0", {"w": np.zeros(3, "float32")})
        with pytest.raises(WriteFailed, match="--remote"):
            w.flush(replicated=True, timeout=60)
        w.close()


def test_keras_wait_replicated(tmp_path, s3):
    from gtar_logd import Trajectory
    from gtar_logd.keras import GTARLogger
    d = remote_daemon(tmp_path / "n1", s3)
    try:
        model, cap = make_model(seed=5), Capture()
        logger = GTARLogger("fit.zip", address=d.address, wait="replicated")
        model.fit(*data(), epochs=3, batch_size=16, verbose=0, callbacks=[logger, cap])
        assert logger.stats["replicated"] >= 3
    finally:
        d.kill9()
        d.cleanup()
    d2 = remote_daemon(tmp_path / "n2", s3)
    try:
        with Trajectory("fit.zip", address=d2.address) as t:
            assert len(t) == 3
            for w_got, w_want in zip(t.get_weights(-1), cap.post_epoch[2]):
                assert np.array_equal(w_got, w_want)
    finally:
        d2.cleanup()
