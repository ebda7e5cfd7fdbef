"""GTARLogger and Trajectory with a real Keras 3 model and the real daemon (CPU; the
backend is $KERAS_BACKEND: test.sh runs this file under jax and under tensorflow)."""
import json

import keras
import numpy as np
import pytest

from gtar_logd import DaemonUnavailable, Trajectory
from gtar_logd.keras import GTARLogger
from kerasutil import Capture, data, make_model, same

EPOCHS = 4
STEPS = 4  # 64 samples / batch 16


def fit(model, callbacks, epochs=EPOCHS):
    x, y = data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


def test_every_epoch_exact_load_and_metrics(daemon, archive):
    model = make_model()
    cap = Capture()
    logger = GTARLogger(archive, address=daemon.address)
    hist = fit(model, [logger, cap])
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == [str(e) for e in range(EPOCHS)]
        assert len(t) == EPOCHS
        for e in range(EPOCHS):
            same(t.get_weights(e), cap.post_epoch[e])
        same(t.get_weights(), model.get_weights())
        same(t.get_weights("2"), cap.post_epoch[2])
        with pytest.raises(IndexError, match=rf"frame 99 is out of range: {archive!r} has "
                                             rf"{EPOCHS} frames \(positions -{EPOCHS}\.\.{EPOCHS - 1}\)"):
            t.get_weights(99)
        # load() rebuilds the model; predictions match exactly.
        x, _ = data(seed=5)
        loaded = t.load()
        assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
        same(t.load(frame=1, compile=False).get_weights(), cap.post_epoch[1])
        # keras_gtar's model.json and our weights.json.
        assert json.loads(t.client.read_record(archive, "keras/model.json")) == json.loads(model.to_json())
        meta = json.loads(t.client.read_record(archive, "gtar_logd/keras/weights.json"))
        assert [l["name"] for l in meta["layers"]] == [l.name for l in model.layers]
        assert meta["layers"][0]["weights"][0]["name"] == "kernel"
        # Metrics: one continuous record per logs key, indexed by epoch.
        m = t.metrics("epoch")
        steps, loss = m["loss"]
        assert steps == [str(e) for e in range(EPOCHS)]
        assert np.array_equal(loss, np.array(hist.history["loss"], dtype=np.float64))
    assert logger.save_seconds and len(logger.save_seconds) == EPOCHS


# (when, period, step_offset, epochs) -> the frames keras_gtar writes
CASES = [
    ("post_epoch", 2, 0, 5, ["0", "2", "4"]),
    ("pre_epoch", 1, 3, 3, ["3", "4", "5"]),
    ("post_batch", 3, 1, 3, [str(i) for i in range(3, 13, 3)]),
    ("pre_batch", 5, 0, 3, ["0", "5", "10"]),
]


@pytest.mark.parametrize("when,period,offset,epochs,expected", CASES)
def test_when_period_step_offset_group(daemon, archive, when, period, offset, epochs, expected):
    model = make_model(seed=3)
    cap = Capture()
    logger = GTARLogger(archive, when=when, period=period, step_offset=offset, group="runA",
                        address=daemon.address, log_metrics="both")
    fit(model, [logger, cap], epochs=epochs)
    snaps = getattr(cap, when)
    with Trajectory(archive, group="runA", address=daemon.address) as t:
        assert t.frames == expected
        for f in expected:
            same(t.get_weights(f), snaps[int(f) - offset])
        assert "loss" in t.metrics("batch")
    # The group keeps the run apart: nothing outside it.
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == []


def test_positions_out_of_range_say_what_there_is(daemon, archive):
    fit(make_model(seed=3), [GTARLogger(archive, period=2, address=daemon.address)], epochs=5)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0", "2", "4"]
        # keras_gtar's meaning: an int is a position; the message says so
        # when the user probably meant the index.
        with pytest.raises(IndexError, match=r"frame 4 is out of range: .* has 3 frames.*"
                                             r"for the frame with index '4' pass frame='4'"):
            t.get_weights(4)
        same(t.get_weights("4"), t.get_weights(-1))
        with pytest.raises(IndexError, match="has 0 frames with optimizer state"):
            t.load_optimizer(-1)


def test_append_false_replaces_the_archive(daemon, archive):
    fit(make_model(), [GTARLogger(archive, address=daemon.address)], epochs=2)
    fit(make_model(), [GTARLogger(archive, address=daemon.address, step_offset=10)], epochs=1)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0", "1", "10"]
    fit(make_model(), [GTARLogger(archive, address=daemon.address, append=False)], epochs=1)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0"]


@pytest.mark.parametrize("mode", ["always", "exit"])
def test_optimizer_state(daemon, archive, mode):
    model = make_model(seed=4)
    fit(model, [GTARLogger(archive, address=daemon.address, save_optimizer=mode)], epochs=3)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.optimizer_frames() == (["0", "1", "2"] if mode == "always" else ["2"])
        opt = t.load_optimizer()
        assert list(opt) == [v.path for v in model.optimizer.variables]
        for v, a in zip(model.optimizer.variables, opt.values()):
            assert np.array_equal(np.asarray(v), a)
        # Restore into a fresh model: optimizer continues where it stopped.
        m2 = t.load()
        t.load_optimizer(model=m2)
        for v, w in zip(m2.optimizer.variables, model.optimizer.variables):
            assert np.array_equal(np.asarray(v), np.asarray(w))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_round_trip(daemon, archive, dtype):
    model = make_model(seed=5, dtype=dtype)
    cap = Capture()
    fit(model, [GTARLogger(archive, address=daemon.address), cap], epochs=2)
    with Trajectory(archive, address=daemon.address) as t:
        for e in range(2):
            w = t.get_weights(e)
            same(w, cap.post_epoch[e])
        assert str(w[0].dtype) == dtype
        same(t.load().get_weights(), model.get_weights())


def test_load_weights_into_by_name_and_skip_mismatch(daemon, archive):
    model = make_model(seed=6)
    fit(model, [GTARLogger(archive, address=daemon.address)], epochs=1)
    with Trajectory(archive, address=daemon.address) as t:
        # Same architecture, in order.
        m = make_model(seed=9)
        t.load_weights_into(m)
        same(m.get_weights(), model.get_weights())
        # By name: only 'out' matches (others renamed); 'd1' would mismatch anyway.
        other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="x1"),
                                  keras.layers.Dense(3, name="out")])
        before = other.layers[0].get_weights()
        t.load_weights_into(other, by_name=True)
        same(other.layers[1].get_weights(), model.layers[3].get_weights())
        same(other.layers[0].get_weights(), before)
        # A mismatched shape raises, unless skipped.
        wide = make_model(seed=9, width=32)
        with pytest.raises(ValueError):
            t.load_weights_into(wide)
        before = wide.get_weights()
        with pytest.warns(UserWarning):
            t.load_weights_into(wide, skip_mismatch=True)
        same(wide.get_weights(), before)  # every layer differs in shape: all skipped


def test_trajectory_save_like_keras_gtar(daemon, archive):
    model = make_model(seed=7)
    with Trajectory(archive, "w", address=daemon.address) as t:
        t.save(model, "0")
        fit(model, [], epochs=1)
        t.save_weights(model, "1")
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0", "1"]
        same(t.get_weights(-1), model.get_weights())
    with Trajectory(archive, "r", address=daemon.address) as t:
        with pytest.raises(PermissionError):
            t.save_model(model)


def test_unreachable_daemon_at_train_begin(tmp_path):
    logger = GTARLogger("x.zip", address="unix:" + str(tmp_path / "none.sock"))
    with pytest.raises(DaemonUnavailable, match="gtar-logd serve"):
        fit(make_model(), [logger], epochs=1)


def test_epoch_frames_keep_kerass_async_dispatch(daemon, archive):
    """With frames per epoch, GTARLogger's batch hook only counts, so Keras
    may run it on its thread pool and not wait for each step's logs (with JAX
    the next step stays queued); the counts are still exact. Per-batch frames
    or metrics need the hook in order, on the training thread."""
    model = make_model(seed=15)
    logger = GTARLogger(archive, address=daemon.address)
    assert logger.async_safe
    if keras.backend.backend() == "jax":  # IS_THREAD_SAFE: Keras dispatches asynchronously
        cbs = keras.callbacks.CallbackList([logger], model=model)
        assert cbs._async_train  # Keras's own switch (private): what this is for
    fit(model, [logger])
    assert logger.batches == EPOCHS * STEPS
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == [str(e) for e in range(EPOCHS)]
        for e in range(EPOCHS):
            p = t.progress(str(e))
            assert (p["step"], p["epochs_done"]) == ((e + 1) * STEPS, e + 1)
    for kw in ({"when": "post_batch"}, {"when": "pre_batch"}, {"log_metrics": "batch"},
               {"log_metrics": "both"}):
        assert not GTARLogger(archive, **kw).async_safe
