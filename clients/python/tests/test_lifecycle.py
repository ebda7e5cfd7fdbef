"""The lifecycle through the Python client and GTARLogger (Keras 3 on
$KERAS_BACKEND): Client.compact / Client.snapshot against the real daemon,
GTARLogger(keep=...) compacting as training goes, GTARLogger(monitor=...) and
Trajectory.best()."""
import keras
import numpy as np
import pytest

from gtar_logd import Client, Trajectory
from gtar_logd.errors import GtarLogdError
from gtar_logd.keras import GTARLogger
from kerasutil import data, make_model, same


def _frames(client, archive, n, size=1000):
    for i in range(n):
        client.write_frame(archive, i, {"w": np.full(size, i, dtype=np.float32)})


def test_compact_and_snapshot_through_the_client(client, archive):
    _frames(client, archive, 10)
    dry = client.compact(archive, keep_last=2, keep_every=4, dry_run=True)
    assert dry["kept"] == ["0", "4", "8", "9"] and not dry["written"]
    assert client.list_frames(archive) == [str(i) for i in range(10)]
    snap = archive.replace(".zip", "-snap.zip")
    s = client.snapshot(archive, snap)
    assert s["frames"] == 10 and s["destination"] == snap and s["size"] > 0
    r = client.compact(archive, keep_last=2, keep_every=4)
    assert r["written"] and r["dropped"] == ["1", "2", "3", "5", "6", "7"]
    assert r["bytes_reclaimed"] >= 6 * 4000
    assert r["new_size"] == r["old_size"] - r["bytes_reclaimed"]
    assert client.list_frames(archive) == ["0", "4", "8", "9"]
    got = client.read_frame(archive, 8)
    assert np.array_equal(got["w"], np.full(1000, 8, dtype=np.float32))
    # The snapshot still has every frame.
    assert len(client.list_frames(snap)) == 10
    with pytest.raises(GtarLogdError, match="exists"):
        client.snapshot(archive, snap)
    with pytest.raises(GtarLogdError, match="keep"):
        client.compact(archive)  # no policy: refused, nothing dropped
    assert client.list_frames(archive) == ["0", "4", "8", "9"]


def _fit(model, callbacks, epochs=6):
    x, y = data()
    # Validation data whose loss is not monotonic in the epoch: the best is
    # somewhere in the middle for this model and seed (asserted by value below).
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     validation_data=data(n=32, seed=7), callbacks=callbacks)


def test_keras_monitor_records_the_best_frame_and_best_returns_it(daemon, archive):
    model = make_model(seed=3)
    cb = GTARLogger(archive, address=daemon.address, monitor="val_loss", mode="min")
    hist = _fit(model, [cb])
    losses = hist.history["val_loss"]
    best_epoch = int(np.argmin(losses))
    assert cb.best["frame"] == str(best_epoch) and cb.best["epoch"] == best_epoch
    with Trajectory(archive, address=daemon.address) as t:
        b = t.best()
        assert b["frame"] == str(best_epoch) and b["monitor"] == "val_loss" and b["mode"] == "min"
        assert b["value"] == pytest.approx(losses[best_epoch], rel=1e-6)
        # The same answer from the stored metrics.
        assert t.best("val_loss", "min")["frame"] == str(best_epoch)
        assert t.best("val_loss", "max")["frame"] == str(int(np.argmax(losses)))
        # Every frame is still there (a pointer, not a copy).
        assert len(t.frames) == 6
        w = t.get_weights(b["frame"])
    assert len(w) == len(model.get_weights())


def test_keras_keep_compacts_as_training_goes_and_keeps_the_best(daemon, archive):
    model = make_model(seed=3)
    cap = []

    class Weights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            cap.append([np.array(w) for w in self.model.get_weights()])

    cb = GTARLogger(archive, address=daemon.address, keep={"last": 2},
                    monitor="val_loss", mode="min", save_optimizer="always")
    hist = _fit(model, [Weights(), cb], epochs=8)
    assert not cb.compact_errors, cb.compact_errors
    assert cb.compactions, "no compaction ran"
    best = str(int(np.argmin(hist.history["val_loss"])))
    want = sorted({"6", "7", best}, key=int)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == want
        assert t.best()["frame"] == best
        # Kept frames are the weights as they were, bit for bit.
        for f in want:
            same(t.get_weights(f), cap[int(f)])
        # The metrics of every epoch stay (continuous records are kept).
        assert len(t.metrics()["val_loss"][0]) == 8
        # And the newest frame still resumes (optimizer state kept).
        fresh = make_model(seed=99)
        assert t.restore(fresh) == 8
    same(fresh.get_weights(), cap[-1])


def test_keras_keep_is_checked_up_front(daemon, archive):
    with pytest.raises(ValueError, match="unknown keys"):
        GTARLogger(archive, keep={"lats": 2})
    with pytest.raises(ValueError, match="empty"):
        GTARLogger(archive, keep={})
    with pytest.raises(TypeError):
        GTARLogger(archive, keep="last 2")
    with pytest.raises(ValueError, match="mode"):
        GTARLogger(archive, monitor="val_loss", mode="lowest")
