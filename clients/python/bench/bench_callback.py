"""Benchmark: what GTARLogger costs the training loop, and client throughput.

    GTAR_LOGD_BIN=target/debug/gtar-logd KERAS_BACKEND=jax \
        .venv-client/bin/python clients/python/bench/bench_callback.py

Starts its own daemon (release build recommended: GTAR_LOGD_BIN=target/release/gtar-logd)
on a temp socket, and prints ratios. No assertions: numbers to read.

1. Training-thread stall per save for a ~100 MB float32 model (6 Dense 2048x2048)
   divided by `model.get_weights()` in the same run (target <= 1.5), next to
   Keras `model.save_weights(...weights.h5)` and, if importable, keras_gtar's
   in-process `Trajectory.save_weights`.
2. 20 epochs with a save every epoch vs no logging before and after it
   (target <= 5 % slower than their mean), at
   two epoch lengths (512 and BENCH_LONG_SAMPLES=4096 samples of 2048 floats:
   about 0.5 s and 4 s per epoch on the 2-core dev VM), with the CPU each
   save costs outside the training thread (daemon, and this process beyond
   the unlogged run). On a machine whose cores training keeps busy, that CPU
   is what a save takes from training, so overhead ~ CPU per save / epoch
   time / cores.
3. End-to-end throughput of `Writer` to the daemon, 100 MB frames.
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
from gtar_logd import Client  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402
import pathlib  # noqa: E402

EPOCHS = int(os.environ.get("BENCH_EPOCHS", "20"))
LONG_SAMPLES = int(os.environ.get("BENCH_LONG_SAMPLES", "4096"))
TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """user + system CPU of a whole process (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def whole_run(model, d, samples, tag):
    """20 epochs without and with GTARLogger; returns the logger."""
    rng = np.random.default_rng(samples)
    x = rng.standard_normal((samples, 2048)).astype("float32")
    y = rng.standard_normal((samples, 2048)).astype("float32")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # warm up this shape
    me = os.getpid()

    def unlogged():
        c0, t0 = cpu_seconds(me), time.perf_counter()
        model.fit(x, y, batch_size=128, epochs=EPOCHS, verbose=0)
        return time.perf_counter() - t0, cpu_seconds(me) - c0

    # Unlogged runs before and after the logged one: the machine drifts
    # (shared host), and the spread of the two shows by how much.
    b1, cpu1 = unlogged()
    logger = GTARLogger(f"bench/{tag}.zip", address=d.address, append=False)
    c0, dc0, t0 = cpu_seconds(me), cpu_seconds(d.proc.pid), time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=EPOCHS, verbose=0, callbacks=[logger])
    logged_s = time.perf_counter() - t0
    logged_cpu = cpu_seconds(me) - c0
    daemon_cpu = cpu_seconds(d.proc.pid) - dc0
    b2, cpu2 = unlogged()
    base_s, base_cpu = (b1 + b2) / 2, (cpu1 + cpu2) / 2
    client_cpu = logged_cpu - base_cpu
    n = len(logger.save_seconds)
    print(f"\n[2] {EPOCHS} epochs of {samples} samples ({base_s / EPOCHS:.2f} s per epoch): "
          f"no logging {b1:.2f} s before, {b2:.2f} s after; GTARLogger every epoch "
          f"{logged_s:.2f} s (incl. waiting for durability at train end) -> "
          f"{100 * (logged_s / base_s - 1):+.1f} % vs their mean  (target <= +5 %)")
    print(f"    CPU per save beyond the unlogged runs: daemon {1e3 * daemon_cpu / n:.0f} ms, "
          f"this process {1e3 * client_cpu / n:+.0f} ms (training itself used "
          f"{base_cpu / base_s:.2f} cores)")
    return logger


def big_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((2048,))] + [keras.layers.Dense(2048) for _ in range(6)])
    m.compile(optimizer="sgd", loss="mse")
    return m


def main():
    base = pathlib.Path(tempfile.mkdtemp(prefix="gtar-bench-"))
    d = Daemon(base)
    d.start()
    print(f"daemon: {os.environ.get('GTAR_LOGD_BIN', 'target/debug/gtar-logd')}; data dir {d.data_dir}")
    try:
        model = big_model()
        nbytes = sum(w.nbytes for w in model.get_weights())
        print(f"model: 6 x Dense(2048), {nbytes / 1e6:.1f} MB float32")

        # --- 2. whole-run overhead (and 1. stall per save from the first run) ---
        logger = whole_run(model, d, 512, "short")
        if LONG_SAMPLES:
            whole_run(model, d, LONG_SAMPLES, "long")

        # --- 1. stall per save vs get_weights, same process, same state ---
        gw = []
        for _ in range(10):
            t = time.perf_counter()
            model.get_weights()
            gw.append(time.perf_counter() - t)
        stall = statistics.median(logger.save_seconds)
        gw_med = statistics.median(gw)
        print(f"\n[1] training-thread stall per save: median {stall * 1e3:.2f} ms, "
              f"max {max(logger.save_seconds) * 1e3:.2f} ms over {len(logger.save_seconds)} saves")
        print(f"    model.get_weights(): median {gw_med * 1e3:.2f} ms")
        print(f"    ratio stall / get_weights = {stall / gw_med:.3f}  (target <= 1.5)")
        h5 = base / "m.weights.h5"
        hs = []
        for _ in range(3):
            t = time.perf_counter()
            model.save_weights(str(h5))
            hs.append(time.perf_counter() - t)
        print(f"    keras model.save_weights(.weights.h5): median {statistics.median(hs) * 1e3:.1f} ms "
              f"(ratio to get_weights {statistics.median(hs) / gw_med:.1f})")
        try:
            import keras_gtar  # noqa: F401
            print("    keras_gtar importable: not measured here (needs tf.keras)")
        except ImportError:
            print("    keras_gtar: not importable in this venv (needs TensorFlow 2 / tf.keras); skipped")

        # --- 3. end-to-end throughput, 100 MB frames ---
        frame = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
        fb = sum(a.nbytes for a in frame.values())
        n = int(os.environ.get("BENCH_FRAMES", "10"))
        with Client(d.address) as c:
            with c.writer("bench/throughput.zip", mode="create", max_pending_bytes=3 * fb) as w:
                t0 = time.perf_counter()
                for i in range(n):
                    w.write_tensors(str(i), frame)
                w.flush(600)
                el = time.perf_counter() - t0
        print(f"\n[3] Python -> daemon over UDS, {n} frames of {fb / 1e6:.1f} MB, durable: "
              f"{n / el:.2f} frames/s, {n * fb / el / 1e6:.0f} MB/s")
    finally:
        d.stop()
        d.cleanup()


if __name__ == "__main__":
    main()
