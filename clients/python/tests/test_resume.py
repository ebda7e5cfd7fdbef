"""Resume: a run killed with SIGKILL continues, with resume=True, exactly
where its newest frame was (Keras 3 on $KERAS_BACKEND)."""
import collections
import json
import os
import signal
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from gtar_logd import Trajectory
from gtar_logd.keras import GTARLogger
from kerasutil import Capture, data, make_model, same

HERE = os.path.dirname(os.path.abspath(__file__))
EPOCHS = 6
KILL_AFTER = 2  # the third epoch: frames 0, 1, 2 are durable, then SIGKILL


def _run(archive, address, *args):
    r = subprocess.run([sys.executable, os.path.join(HERE, "resume_run.py"), archive, address,
                        *map(str, args)], capture_output=True, text=True, timeout=300)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return r, lines


def _fit(model, callbacks, epochs, **kw):
    x, y = data()
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks, **kw)


def test_a_killed_run_resumes_bit_for_bit(own_daemon):
    addr = own_daemon.address
    # The reference: six epochs, uninterrupted.
    r, out = _run("whole.zip", addr, "--epochs", EPOCHS)
    assert r.returncode == 0, r.stderr
    assert out[-1]["epochs"] == list(range(EPOCHS)) and out[-1]["resumed"] is None
    # The same script, killed with SIGKILL once epoch 2's frame is durable...
    r, out = _run("resumed.zip", addr, "--epochs", EPOCHS, "--kill-after", KILL_AFTER)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert out == [{"killed_after": KILL_AFTER}]
    # ... then run again with resume=True, from other initial weights.
    r, out = _run("resumed.zip", addr, "--epochs", EPOCHS, "--resume", "--init-seed", 99)
    assert r.returncode == 0, r.stderr
    assert out[-1]["epochs"] == list(range(KILL_AFTER + 1, EPOCHS))
    assert out[-1]["resumed"] == {"frame": str(KILL_AFTER), "epoch": KILL_AFTER + 1,
                                  "step": (KILL_AFTER + 1) * 4, "optimizer": True}
    assert "no optimizer state" not in r.stderr
    with Trajectory("whole.zip", address=addr) as whole, \
            Trajectory("resumed.zip", address=addr) as resumed:
        assert resumed.frames == whole.frames == [str(e) for e in range(EPOCHS)]
        for e in range(EPOCHS):  # every frame, weights and optimizer, bit for bit
            same(resumed.get_weights(e), whole.get_weights(e))
            same(list(resumed.load_optimizer(e).values()), list(whole.load_optimizer(e).values()))
        assert resumed.progress(-1)["step"] == EPOCHS * 4
    assert own_daemon.stop() == 0, own_daemon.log()
    # Each epoch's frame is in the file exactly once.
    with zipfile.ZipFile(own_daemon.path("resumed.zip")) as z:
        names = collections.Counter(n for n in z.namelist() if "/frames/" in n)
    assert max(names.values()) == 1, {n: c for n, c in names.items() if c > 1}
    frames = sorted(n.split("/")[6] for n in names if n.startswith("keras/layer/0/weight/0/"))
    assert sorted(frames, key=int) == [str(e) for e in range(EPOCHS)]


def test_resume_without_optimizer_state_restores_weights_and_warns(daemon, archive):
    first = make_model(seed=4)
    cap1 = Capture()
    _fit(first, [GTARLogger(archive, address=daemon.address), cap1], epochs=2)
    model, cap = make_model(seed=9), Capture()
    logger = GTARLogger(archive, address=daemon.address, resume=True)
    with pytest.warns(UserWarning, match=r"frame '1' .* has no optimizer state .* will not "
                                         r"continue exactly"):
        hist = _fit(model, [logger, cap], epochs=4)
    assert hist.epoch == [2, 3]
    assert logger.resumed == {"frame": "1", "epoch": 2, "step": 8, "optimizer": False}
    same(cap.pre_epoch[2], cap1.post_epoch[1])  # started from frame 1's weights
    assert model._initial_epoch is None  # fit() of this model starts at 0 again
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0", "1", "2", "3"]
        same(t.get_weights("3"), model.get_weights())


def test_resume_with_nothing_to_resume_trains_from_the_start(daemon, archive):
    model, cap = make_model(seed=4), Capture()
    init = [np.array(w) for w in model.get_weights()]
    logger = GTARLogger(archive, address=daemon.address, resume=True)
    hist = _fit(model, [logger, cap], epochs=2)
    assert hist.epoch == [0, 1] and logger.resumed is None
    same(cap.pre_epoch[0], init)
    with pytest.raises(ValueError, match="needs append=True"):
        GTARLogger(archive, resume=True, append=False)


def test_post_batch_resumes_from_the_newest_frame_that_ends_an_epoch(daemon, archive):
    # 4 batches an epoch, a frame every 3 batches: frames 0, 3, 6; only
    # frame 3 (the last batch of epoch 0) ends an epoch.
    kw = dict(address=daemon.address, when="post_batch", period=3, save_optimizer="always")
    ref = make_model(seed=5)
    _fit(ref, [GTARLogger(archive + ".ref.zip", **kw)], epochs=3)
    first = make_model(seed=5)
    _fit(first, [GTARLogger(archive, **kw)], epochs=2)
    with Trajectory(archive, address=daemon.address) as t:
        assert t.frames == ["0", "3", "6"]
        assert [t.progress(f)["epochs_done"] for f in t.frames] == [None, 1, None]
        before6 = t.get_weights("6")
    model, cap = make_model(seed=6), Capture()
    logger = GTARLogger(archive, resume=True, **kw)
    hist = _fit(model, [logger, cap], epochs=3)
    assert hist.epoch == [1, 2]
    assert logger.resumed == {"frame": "3", "epoch": 1, "step": 4, "optimizer": True}
    with Trajectory(archive, address=daemon.address) as t, \
            Trajectory(archive + ".ref.zip", address=daemon.address) as r:
        # Epoch 1 is trained again: frame 6 is written again, with the same
        # bits, and the run ends as the uninterrupted one does.
        assert t.frames == r.frames == ["0", "3", "6", "9"]
        same(t.get_weights("6"), before6)
        for f in r.frames:
            same(t.get_weights(f), r.get_weights(f))
        same(list(t.load_optimizer("9").values()), list(r.load_optimizer("9").values()))


def test_trajectory_restore_returns_the_epoch_to_continue_at(daemon, archive):
    ref = make_model(seed=7)
    _fit(ref, [], epochs=4)
    first = make_model(seed=7)
    _fit(first, [GTARLogger(archive, address=daemon.address, save_optimizer="always")], epochs=2)
    with Trajectory(archive, address=daemon.address) as t:
        model = make_model(seed=8)
        epoch = t.restore(model)
        assert epoch == 2
        same(model.get_weights(), first.get_weights())
        for v, w in zip(model.optimizer.variables, first.optimizer.variables):
            assert np.array_equal(np.asarray(v), np.asarray(w)), v.path
        hist = _fit(model, [], epochs=4, initial_epoch=epoch)
        assert hist.epoch == [2, 3]
        same(model.get_weights(), ref.get_weights())
        assert t.restore(make_model(seed=8), 0) == 1
        # keras_gtar's frames carry no progress: an index is taken as the epoch.
    with Trajectory(archive + ".kg.zip", "w", address=daemon.address) as t:
        t.save(first, "4")
        with pytest.warns(UserWarning) as caught:
            assert t.restore(make_model(seed=8), "4") == 5
        msgs = " | ".join(str(w.message) for w in caught)
        assert "no progress record" in msgs and "no optimizer state" in msgs
        uncompiled = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        with pytest.raises(ValueError, match="compiled model"):
            t.restore(uncompiled)


def test_restore_of_a_frame_within_an_epoch_warns(daemon, archive):
    _fit(make_model(seed=5), [GTARLogger(archive, address=daemon.address, when="post_batch",
                                         period=3, save_optimizer="always")], epochs=2)
    with Trajectory(archive, address=daemon.address) as t:
        with pytest.warns(UserWarning, match=r"within epoch 1 \(after its batch 2\)"):
            assert t.restore(make_model(seed=5), "6") == 1
