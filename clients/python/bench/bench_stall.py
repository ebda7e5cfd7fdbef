"""Benchmark: the training thread's stall per save, against `model.get_weights()`.

    GTAR_LOGD_BIN=target/release/gtar-logd KERAS_BACKEND=jax \
        .venv-client/bin/python clients/python/bench/bench_stall.py
    GTAR_LOGD_BIN=target/release/gtar-logd KERAS_BACKEND=tensorflow \
        .venv-kgtar/bin/python clients/python/bench/bench_stall.py

A 100 MB float32 model (6 Dense 2048x2048) trains for ~1 s (BENCH_GAP seconds
of real `train_on_batch` steps) before every measurement, so each save sees
weights that training just moved, as in `fit`. Each round measures, in an
order rotated from round to round (interleaved; BENCH_ROUNDS=7 rounds):

* `model.get_weights()`: the anchor, the one copy out of the backend that
  any saver makes;
* `GTARLogger.on_epoch_end`: what the callback holds the training thread for
  (a snapshot of the weights into shared memory, then a queue append);
* Keras's `model.save_weights(.weights.h5)`;
* keras_gtar 1.1.0's `Trajectory.save_weights` in process (libgetar), when
  importable: it needs tensorflow, so only with KERAS_BACKEND=tensorflow in
  a venv set up by `clients/python/bench/setup_keras_gtar.sh`.

Prints medians and ratios to get_weights (target: GTARLogger <= 1.0x), and a
breakdown of GTARLogger's stall: reading the variables as host arrays without
a copy (`host_view`), and the copy into shared memory. No assertions.
Torch: KERAS_BACKEND=torch with a CPU torch wheel installed, by hand.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
import pathlib

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conftest import Daemon  # noqa: E402
from gtar_logd._keras_frames import host_view  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402
from bench_callback import big_model  # noqa: E402  (the same 100 MB model)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
GAP = float(os.environ.get("BENCH_GAP", "1.0"))


def main():
    backend = keras.backend.backend()
    base = pathlib.Path(tempfile.mkdtemp(prefix="gtar-stall-"))
    d = Daemon(base)
    d.start()
    try:
        model = big_model()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((128, 2048)).astype("float32")
        y = rng.standard_normal((128, 2048)).astype("float32")
        model.train_on_batch(x, y)  # compile the step
        nbytes = sum(w.nbytes for w in model.get_weights())
        print(f"backend {backend}, keras {keras.__version__}, numpy {np.__version__}; model "
              f"6 x Dense(2048), {nbytes / 1e6:.1f} MB float32; {ROUNDS} interleaved rounds, "
              f"~{GAP:.1f} s of train_on_batch before each measurement; daemon "
              f"{os.environ.get('GTAR_LOGD_BIN', '(default)')}")

        def train():
            t = time.perf_counter()
            while time.perf_counter() - t < GAP:
                model.train_on_batch(x, y)

        logger = GTARLogger("stall.zip", address=d.address, append=False)
        logger.set_model(model)
        logger.on_train_begin()
        epoch = [0]

        def gtar_logd():
            logger.on_epoch_end(epoch[0])
            epoch[0] += 1

        def views():
            # The part of the stall that is reading the variables (no copy).
            [host_view(w) for w in model.weights]

        h5 = str(base / "m.weights.h5")
        kinds = {"get_weights": model.get_weights, "GTARLogger": gtar_logd,
                 "  of which host_view": views,
                 "keras save_weights(.weights.h5)": lambda: model.save_weights(h5)}
        try:
            import keras_gtar
            ktraj = keras_gtar.Trajectory(str(base / "keras_gtar.zip"), "w")
            kframe = [0]

            def kgtar():
                ktraj.save_weights(model, str(kframe[0]))
                kframe[0] += 1
            kinds["keras_gtar 1.1.0 save_weights"] = kgtar
            why_not = None
        except Exception as e:  # noqa: BLE001 -- printed: the anchor is skipped
            ktraj, why_not = None, f"{type(e).__name__}: {e}"
        # The first save of a run also faults in the shared memory region's
        # pages (once per fit): printed apart, not a round.
        train()
        t = time.perf_counter()
        gtar_logd()
        first = time.perf_counter() - t
        wall = {k: [] for k in kinds}
        cpu = {k: [] for k in kinds}
        names = list(kinds)
        for r in range(ROUNDS):
            for k in names[r % len(names):] + names[:r % len(names)]:
                train()
                c, t = time.thread_time(), time.perf_counter()
                kinds[k]()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.thread_time() - c)
        logger.on_train_end()
        if ktraj is not None:
            ktraj.close()
        med = statistics.median
        gw = med(wall["get_weights"])
        print(f"\n{'':34s} {'median':>9s} {'range':>19s} {'thread CPU':>11s} {'/ get_weights':>14s}")
        for k in names:
            w = wall[k]
            print(f"{k:34s} {med(w) * 1e3:7.1f} ms {min(w) * 1e3:7.1f}-{max(w) * 1e3:7.1f} ms "
                  f"{med(cpu[k]) * 1e3:8.1f} ms {med(w) / gw:11.2f}x")
        print(f"(GTARLogger's first save, fresh shared memory pages: {first * 1e3:.1f} ms)")
        if why_not:
            print(f"keras_gtar 1.1.0: not measured ({why_not}); see setup_keras_gtar.sh")
        print(f"ratio GTARLogger stall / get_weights = {med(wall['GTARLogger']) / gw:.2f} "
              f"(target <= 1.0); by the training thread's CPU (steadier under load) "
              f"{med(cpu['GTARLogger']) / med(cpu['get_weights']):.2f}; the copy into shared memory ~ "
              f"{(med(wall['GTARLogger']) - med(wall['  of which host_view'])) * 1e3:.1f} ms")
        st = logger.stats
        print(f"GTARLogger: {st['durable']} units durable, {st['shm_bytes'] / 1e6:.0f} MB through "
              f"shared memory (refused: {st['shm_refused']})")
    finally:
        d.stop()
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)  # ~1 GB of archives


if __name__ == "__main__":
    main()
