"""Benchmark: resume cost. `Trajectory.restore` of a ~100 MB model with its
optimizer state (Adam: two more copies of every weight) through the daemon,
against Keras `model.load_weights` of the same weights from a local
`.weights.h5` (weights only), in the same run.

    GTAR_LOGD_BIN=target/release/gtar-logd KERAS_BACKEND=jax \
        .venv-client/bin/python clients/python/bench/bench_resume.py

Starts its own daemon on a temp socket. BENCH_ROUNDS (default 5) interleaved
rounds of load_weights -> restore -> load_weights; a round's ratio is the
restore's time over the mean of its two load_weights; the median is the
`summary:` line (target <= 2). Timings are printed, never asserted.
"""
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conftest import Daemon  # noqa: E402
from gtar_logd import Trajectory  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402
import pathlib  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def make_model():
    keras.utils.set_random_seed(0)
    # 6 Dense 2048x2048 float32: 6 * (2048 * 2048 + 2048) * 4 B = 100.7 MB
    m = keras.Sequential([keras.Input((2048,))]
                         + [keras.layers.Dense(2048) for _ in range(6)])
    m.compile(optimizer="adam", loss="mse")
    return m


def main():
    base = pathlib.Path(tempfile.mkdtemp(prefix="bench-resume-"))
    d = Daemon(base)
    d.start()
    try:
        model = make_model()
        x = np.random.default_rng(0).standard_normal((64, 2048)).astype("float32")
        cb = GTARLogger("resume.zip", address=d.address, save_optimizer="always")
        model.fit(x, x, batch_size=32, epochs=1, verbose=0, callbacks=[cb])
        nbytes = sum(np.asarray(w).nbytes for w in model.get_weights())
        opt = sum(np.asarray(v).nbytes for v in model.optimizer.variables)
        h5 = str(base / "model.weights.h5")
        model.save_weights(h5)
        print(f"model: {nbytes / 1e6:.1f} MB of weights, {opt / 1e6:.1f} MB of optimizer state; "
              f".weights.h5 {os.path.getsize(h5) / 1e6:.1f} MB")
        target = make_model()
        target.optimizer.build(target.trainable_variables)
        traj = Trajectory("resume.zip", address=d.address)

        def load_h5():
            t0 = time.perf_counter()
            target.load_weights(h5)
            return time.perf_counter() - t0

        def restore():
            t0 = time.perf_counter()
            epoch = traj.restore(target)
            dt = time.perf_counter() - t0
            assert epoch == 1
            return dt

        restore()  # first call: connection, imports
        load_h5()
        ratios = []
        for r in range(ROUNDS):
            a = load_h5()
            b = restore()
            c = load_h5()
            ratio = b / ((a + c) / 2)
            ratios.append(ratio)
            print(f"  round {r}: restore {b * 1e3:.0f} ms (weights + optimizer), "
                  f"load_weights {a * 1e3:.0f} / {c * 1e3:.0f} ms: ratio {ratio:.2f}")
        got = [np.asarray(w) for w in target.get_weights()]
        want = [np.asarray(w) for w in model.get_weights()]
        assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want))
        traj.close()
        print(f"summary: Trajectory.restore (weights + optimizer state) at "
              f"{statistics.median(ratios):.2f}x the time of model.load_weights(.weights.h5) "
              f"(median of {ROUNDS} rounds; target <= 2)")
    finally:
        d.stop()
        d.cleanup()


if __name__ == "__main__":
    main()
