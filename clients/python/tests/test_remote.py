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
            # Loose records and scalars: one unit, one commit each.
            w.write_records([("notes/a.json", b"{}"), ("notes/b.json", b"[]")],
                            scalars=[("", "loss", 3, 0.5)])
            w.flush(replicated=True, timeout=120)
            # Counted per unit, like durable_count: not per commit.
            assert w.replicated_count == w.durable_count == 5
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


def test_keras_run_through_a_30s_store_outage(tmp_path, s3):
    """The S3 server is killed for 30 s in the middle of a Keras run and started
    again on the same port and directory. Training never waits on it: durable
    acks go on during the outage (a durable flush returns while the store is
    down), `wait='replicated'` returns at on_train_end once the store is back,
    and a daemon with an empty data dir reads every frame bit-exact. Epoch
    times are recorded and printed, not asserted (timing is for benchmarks)."""
    import threading
    import time

    from gtar_logd import Trajectory
    from gtar_logd.keras import GTARLogger

    epochs, outage_at, outage_s = 40, 4, 30.0
    d = remote_daemon(tmp_path / "n1", s3)
    restarted = threading.Event()

    class Outage(keras.callbacks.Callback):
        """Stops the store after epoch `outage_at`, a timer starts it 30 s later;
        records per epoch: seconds, store up, durable and replicated acks so far.
        Each epoch also 'computes' for 1 s (sleep) so the run outlasts the outage."""

        def __init__(self, logger):
            super().__init__()
            self.logger, self.rows, self.t = logger, [], None
            self.flushed_while_down = None

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()
            time.sleep(1.0)

        def on_epoch_end(self, epoch, logs=None):
            w = self.logger.writer  # the logger's on_epoch_end ran first
            down = s3.proc is None
            if down and self.flushed_while_down is None and epoch >= outage_at + 3:
                # Durable acks go on without the store: this returns while it is down.
                w.flush(60)
                self.flushed_while_down = (epoch + 1, w.durable_count, s3.proc is None)
            self.rows.append((epoch, time.perf_counter() - self.t, not down,
                              w.durable_count, w.replicated_count))
            if epoch == outage_at:
                s3.stop()

                def back():
                    s3.start()
                    restarted.set()
                threading.Timer(outage_s, back).start()

    try:
        model, cap = make_model(seed=7), Capture()
        logger = GTARLogger("outage.zip", address=d.address, wait="replicated",
                            durable_timeout=300)
        out = Outage(logger)
        model.fit(*data(), epochs=epochs, batch_size=16, verbose=0,
                  callbacks=[logger, out, cap])
        print("epoch, seconds, store up, durable acks, replicated acks")
        for r in out.rows:
            print(f"{r[0]:3d} {r[1]:6.3f} {'up' if r[2] else 'DOWN':4s} {r[3]:3d} {r[4]:3d}")
        assert restarted.is_set(), "the store came back before the run ended"
        down = [r for r in out.rows if not r[2]]
        assert down and out.rows[-1][2], "the outage was in the middle of the run"
        frames, durable, still_down = out.flushed_while_down
        assert still_down and durable >= frames, out.flushed_while_down
        # Replication stalls (acks already on the way aside) while durable acks go on.
        assert down[2][4] == down[-1][4] < down[-1][3], down
        # Every epoch's frame is durable and, at on_train_end, replicated
        # (the counters also count the writer's record-only frames).
        assert logger.stats["durable"] >= epochs
        assert logger.stats["replicated"] == logger.stats["durable"], logger.stats
        assert all(r[4] <= r[3] for r in out.rows), out.rows
        log = d.log_path.read_text()
        assert "replication failed" in log and "replication works again" in log
    finally:
        d.kill9()
        d.cleanup()
    d2 = remote_daemon(tmp_path / "n2", s3)  # a new node: empty data dir, same store
    try:
        with Trajectory("outage.zip", address=d2.address) as t:
            assert len(t) == epochs
            for e in range(epochs):
                assert all(np.array_equal(a, b)
                           for a, b in zip(t.get_weights(e), cap.post_epoch[e])), e
    finally:
        d2.cleanup()
