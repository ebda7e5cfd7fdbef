"""GTARLogger and Trajectory under the Keras backend of this process.

Keras picks its backend once per process, from KERAS_BACKEND. test.sh runs this
file (and test_keras.py) under jax in .venv-client and again under tensorflow
in .venv-tf, so each of those backends is exercised with the real daemon.
The tests are written against `keras.backend.backend()`, not one backend.
"""
import os

import keras
import numpy as np
import pytest

from gtar_logd import Trajectory
from gtar_logd.keras import GTARLogger, host_copy, host_view, optimizer_entries, weight_entries
from kerasutil import Capture, data, make_model, same

EPOCHS = 3


def fit(model, callbacks, epochs=EPOCHS):
    x, y = data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


def test_runs_the_requested_backend():
    # A run meant for one backend that quietly got another would test nothing new.
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]


def test_train_log_and_restore_exactly(daemon, archive):
    model = make_model(seed=11)
    cap = Capture()
    logger = GTARLogger(archive, address=daemon.address, save_optimizer="always")
    hist = fit(model, [logger, cap])
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == [str(e) for e in range(EPOCHS)]
        # Every frame holds the weights of its epoch, bit for bit: a frame sent
        # after training moved on must not see the later values.
        for e in range(EPOCHS):
            same(t.get_weights(str(e)), cap.post_epoch[e])
        first, last = cap.post_epoch[0], cap.post_epoch[EPOCHS - 1]
        assert not all(np.array_equal(a, b) for a, b in zip(first, last)), "no training"
        same(t.get_weights(), model.get_weights())
        # load() rebuilds the model (compiled) with the last frame: same predictions.
        x, _ = data(seed=12)
        loaded = t.load()
        assert loaded.optimizer is not None
        assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
        same(t.load(frame=0, compile=False).get_weights(), cap.post_epoch[0])
        # The optimizer state of the last frame is the model's final one.
        opt = t.load_optimizer()
        assert list(opt) == [v.path for v in model.optimizer.variables]
        for v, a in zip(model.optimizer.variables, opt.values()):
            same([a], [keras.ops.convert_to_numpy(v)])
        steps, loss = t.metrics("epoch")["loss"]
        assert steps == [str(e) for e in range(EPOCHS)]
        assert np.array_equal(loss, np.array(hist.history["loss"], dtype=np.float64))


def test_frames_are_snapshots_not_views():
    """What the callback hands its writer thread must not change when training
    goes on: backends that update variables in place need a copy."""
    model = make_model(seed=13)
    fit(model, [], epochs=1)
    weights, _ = weight_entries(model)
    opt, _ = optimizer_entries(model)
    before = [np.array(t[4], copy=True) for t in weights + opt]
    assert len(opt) == len(model.optimizer.variables) > 0
    fit(model, [], epochs=1)
    after = [t[4] for t in weights + opt]
    same(after, before)
    now, _ = weight_entries(model)
    assert not all(np.array_equal(a, t[4]) for a, t in zip(before, now)), "training changed nothing"

    v = keras.Variable(np.zeros((4, 3), dtype="float32"))
    snap = host_copy(v)
    v.assign(np.ones((4, 3), dtype="float32"))
    assert np.array_equal(snap, np.zeros((4, 3), dtype="float32"))
    v.assign_add(np.ones((4, 3), dtype="float32"))
    assert np.array_equal(snap, np.zeros((4, 3), dtype="float32"))
    two = np.full((4, 3), 2, dtype="float32")
    assert np.array_equal(host_copy(v, copy="always"), two)
    # 'never' still works everywhere (torch refuses .numpy() on a tensor that needs grad).
    assert np.array_equal(host_copy(v, copy="never"), two)
    with pytest.raises(ValueError, match="copy must be"):
        GTARLogger("x.zip", copy="no")


def test_the_snapshot_is_one_copy():
    """The save's one copy is the caller's (into shared memory, or
    host_copy's): reading a variable as a host array copies nothing on jax and
    tensorflow (torch too, by hand), so two reads share their bytes; and
    host_copy's copy owns its memory."""
    v = keras.Variable(np.arange(12, dtype="float32").reshape(4, 3))
    a, b = host_view(v), host_view(v)
    assert np.array_equal(a, np.arange(12, dtype="float32").reshape(4, 3))
    assert np.shares_memory(a, b), "host_view copied the variable"
    c = host_copy(v, copy="always")
    assert not np.shares_memory(c, a)
    assert c.flags.owndata and np.array_equal(c, a)
    # What GTARLogger stages: views (with shared memory) of every weight.
    model = make_model(seed=14)
    views, _ = weight_entries(model, copy="never")
    again, _ = weight_entries(model, copy="never")
    assert all(np.shares_memory(x[4], y[4]) for x, y in zip(views, again))
