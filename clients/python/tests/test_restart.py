"""kill -9 and restart the daemon while a Keras model trains with GTARLogger."""
import collections
import random
import subprocess
import threading
import time
import zipfile

import keras

from gtar_logd import Trajectory
from gtar_logd.keras import GTARLogger
from conftest import BIN
from kerasutil import Capture, data, same

EPOCHS = 12
KILL_AFTER = {2, 5, 8}  # epochs after whose save the daemon is killed


class Killer(keras.callbacks.Callback):
    """After selected epochs' saves: wait a random moment (so a frame is in
    flight), kill -9 the daemon, restart it a little later, in the background."""

    def __init__(self, daemon, seed=0):
        super().__init__()
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.threads = []
        # Training can outpace a kill/restart cycle: cycles must not overlap,
        # or two restarts race for the socket.
        self.one_at_a_time = threading.Lock()

    def on_epoch_end(self, epoch, logs=None):
        if epoch in KILL_AFTER:
            delay, down = self.rng.uniform(0, 0.05), self.rng.uniform(0.2, 0.6)
            t = threading.Thread(target=self._cycle, args=(delay, down))
            t.start()
            self.threads.append(t)
            t.join(0.01)

    def _cycle(self, delay, down):
        with self.one_at_a_time:
            time.sleep(delay)
            self.daemon.kill9()
            time.sleep(down)
            self.daemon.start()


def test_kill9_and_restart_during_training(own_daemon):
    keras.utils.set_random_seed(21)
    # ~4 MiB of weights, so frames take a moment to stream.
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1024, activation="relu"),
                              keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    cap = Capture()
    logger = GTARLogger("crash.zip", address=own_daemon.address, reconnect_timeout=60)
    killer = Killer(own_daemon)
    # Order: the logger enqueues the frame, the capture records, the killer strikes.
    model.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False,
              callbacks=[logger, cap, killer])
    for t in killer.threads:
        t.join(30)
    assert own_daemon.starts == 1 + len(KILL_AFTER)
    print("writer stats:", logger.stats)
    assert logger.stats["reconnects"] >= 1, logger.stats
    # The bytes went through shared memory (a fresh region per reconnect).
    assert logger.stats["shm_bytes"] > 0 and logger.stats["shm_refused"] is None, logger.stats
    with Trajectory("crash.zip", address=own_daemon.address) as t:
        assert t.frames == [str(e) for e in range(EPOCHS)]
        for e in range(EPOCHS):
            same(t.get_weights(e), cap.post_epoch[e])
    assert own_daemon.stop() == 0, own_daemon.log()
    # The last kill may strike after the last save, before the daemon wrote
    # the central directory; only a write-open or `repair` rewrites it (reads
    # recover in memory: the file may be another writer's, e.g. libgetar's).
    r = subprocess.run([str(BIN), "repair", str(own_daemon.path("crash.zip"))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Every frame's records are in the file exactly once.
    with zipfile.ZipFile(own_daemon.path("crash.zip")) as z:
        names = collections.Counter(n for n in z.namelist() if "/frames/" in n)
    dup = {n: c for n, c in names.items() if c > 1}
    assert not dup, dup
    assert sum(1 for n in names if n.endswith("/weight.f32.uni")) == EPOCHS * len(model.weights)
