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
   (target <= 5 % slower than their mean; BENCH_ROUNDS=3 interleaved rounds,
   median, for the short epochs, BENCH_LONG_ROUNDS=1 for the long ones), at
   two epoch lengths (512 and BENCH_LONG_SAMPLES=4096 samples of 2048 floats:
   about 0.5 s and 4 s per epoch on the 2-core dev VM), with the CPU each
   save costs outside the training thread (daemon, and this process beyond
   the unlogged run). On a machine whose cores training keeps busy, that CPU
   is what a save takes from training, so overhead ~ CPU per save / epoch
   time / cores. Each logged run is done twice: tensor bytes through shared
   memory (the default on a Unix socket) and through the socket
   (`shared_memory=False`), so the two compare in the same run.
3. End-to-end throughput of `Writer` to the daemon, 100 MB frames, through
   the socket, shared memory, and the socket again, with the CPU each frame
   costs the calling thread, the process's other threads and the daemon.
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
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
LONG_ROUNDS = int(os.environ.get("BENCH_LONG_ROUNDS", "1"))
TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """user + system CPU of a whole process (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


class EpochClock(keras.callbacks.Callback):
    """Wall-clock length of each epoch (end to end, saves included: the
    logger runs before this callback)."""

    def on_train_begin(self, logs=None):
        self.marks = [time.perf_counter()]

    def on_epoch_end(self, epoch, logs=None):
        self.marks.append(time.perf_counter())

    def steady(self):
        """Median length of the epochs after the first (which also pays for
        first-time costs: the shared memory region's pages, the archive)."""
        return statistics.median(np.diff(self.marks)[1:])

    def first(self):
        return self.marks[1] - self.marks[0]


def logged_run(model, d, x, y, tag, shared_memory):
    """One run with GTARLogger: (logger, seconds, this process's CPU, daemon
    CPU, epoch clock)."""
    me = os.getpid()
    logger = GTARLogger(f"bench/{tag}.zip", address=d.address, append=False,
                        shared_memory=shared_memory)
    clock = EpochClock()
    c0, dc0, t0 = cpu_seconds(me), cpu_seconds(d.proc.pid), time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=EPOCHS, verbose=0, callbacks=[logger, clock])
    out = (logger, time.perf_counter() - t0, cpu_seconds(me) - c0, cpu_seconds(d.proc.pid) - dc0,
           clock)
    os.remove(d.path(f"bench/{tag}.zip"))  # 2 GB a run: keep the disk from filling
    return out


def whole_run(model, d, samples, tag, rounds):
    """`rounds` x (no logging, GTARLogger with bytes through shared memory,
    GTARLogger with bytes through the socket), then no logging once more.
    Each logged run is compared with the mean of the unlogged runs either
    side of it (the machine drifts; the spread shows by how much); the
    medians over rounds are the headline. Returns a shared-memory logger."""
    rng = np.random.default_rng(samples)
    x = rng.standard_normal((samples, 2048)).astype("float32")
    y = rng.standard_normal((samples, 2048)).astype("float32")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # warm up this shape
    me = os.getpid()

    def unlogged():
        clock = EpochClock()
        c0, t0 = cpu_seconds(me), time.perf_counter()
        model.fit(x, y, batch_size=128, epochs=EPOCHS, verbose=0, callbacks=[clock])
        return time.perf_counter() - t0, cpu_seconds(me) - c0, clock

    kinds = (("shared memory", None), ("socket", False))
    base, logged = [unlogged()], {k: [] for k, _ in kinds}
    for r in range(rounds):
        for how, shm in kinds:
            logged[how].append(logged_run(model, d, x, y, f"{tag}-{r}-{shm}", shm))
        base.append(unlogged())
    base_s = statistics.mean(b for b, _, _ in base)
    cores = statistics.mean(c for _, c, _ in base) / base_s
    print(f"\n[2] {EPOCHS} epochs of {samples} samples ({base_s / EPOCHS:.2f} s per epoch, "
          f"training used {cores:.2f} cores), {rounds} round(s). GTARLogger saving every epoch "
          f"(incl. waiting for durability at train end) vs the mean of the unlogged runs "
          f"before and after it (target <= +5 %):")
    print("    unlogged runs: " + ", ".join(f"{b:.2f} s" for b, _, _ in base))
    med = statistics.median
    for how, runs in logged.items():
        over, dcpu, ccpu, stall, end = [], [], [], [], []
        steady, save, first, end_ms = [], [], [], []
        for r, (logger, secs, cpu, daemon_cpu, clock) in enumerate(runs):
            (b0, c0, k0), (b1, c1, k1) = base[r], base[r + 1]
            n = len(logger.save_seconds)
            over.append(100 * (secs / ((b0 + b1) / 2) - 1))
            stall.append(100 * sum(logger.save_seconds) / secs)
            end.append(100 * logger.stats["end_wait_seconds"] / secs)
            dcpu.append(1e3 * daemon_cpu / n)
            ccpu.append(1e3 * (cpu - (c0 + c1) / 2) / n)
            steady.append(1e3 * (clock.steady() - (k0.steady() + k1.steady()) / 2))
            save.append(1e3 * med(logger.save_seconds[1:] or logger.save_seconds))
            first.append(1e3 * (clock.first() - (k0.first() + k1.first()) / 2))
            end_ms.append(1e3 * logger.stats["end_wait_seconds"])
        print(f"    bytes via {how:13s}: median {statistics.median(over):+.1f} % "
              f"(rounds: {', '.join(f'{o:+.1f}' for o in over)}); CPU per save, median: "
              f"daemon {statistics.median(dcpu):.0f} ms, this process "
              f"{statistics.median(ccpu):+.0f} ms beyond the unlogged runs; of the run, "
              f"{statistics.median(stall):.1f} % in the callback's saves and "
              f"{statistics.median(end):.1f} % waiting at train end for the last frame")
        # Where the time goes: every epoch after the first is longer by the
        # save's stall plus what the save's work elsewhere (daemon, sender
        # thread, memory traffic) takes from training; the first epoch and
        # the end add fixed costs.
        print(f"      per run, medians: each epoch after the first {med(steady):+.0f} ms "
              f"({med(steady) / (10 * base_s / EPOCHS):+.1f} % of an epoch; the save's stall "
              f"{med(save):.0f} ms of it), the first epoch {med(first):+.0f} ms, "
              f"the wait at train end {med(end_ms):.0f} ms")
    return logged["shared memory"][0][0]


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
        logger = whole_run(model, d, 512, "short", ROUNDS)
        if LONG_SAMPLES:
            whole_run(model, d, LONG_SAMPLES, "long", LONG_ROUNDS)

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
        print(f"\n[3] Python -> daemon over UDS, {n} frames of {fb / 1e6:.1f} MB, durable:")
        rates = {}
        me = os.getpid()
        for how, shm in (("socket", False), ("shared memory", None), ("socket", False)):
            with Client(d.address) as c:
                with c.writer("bench/throughput.zip", mode="create", max_pending_bytes=3 * fb,
                              shared_memory=shm) as w:
                    caller = 0.0
                    c0, dc0, t0 = cpu_seconds(me), cpu_seconds(d.proc.pid), time.perf_counter()
                    for i in range(n):
                        tc = time.thread_time()
                        w.write_tensors(str(i), frame)
                        caller += time.thread_time() - tc
                    w.flush(600)
                    el = time.perf_counter() - t0
                    cpu, dcpu = cpu_seconds(me) - c0, cpu_seconds(d.proc.pid) - dc0
            rates.setdefault(how, []).append(n * fb / el)
            # What a save costs in CPU wherever it runs: the caller's share is
            # the training thread's stall; the rest competes with training.
            print(f"    bytes via {how:13s}: {n / el:.2f} frames/s, {n * fb / el / 1e6:.0f} MB/s; "
                  f"CPU per frame: calling thread {1e3 * caller / n:.1f} ms, this process's "
                  f"other threads {1e3 * max(cpu - caller, 0) / n:.1f} ms, daemon {1e3 * dcpu / n:.1f} ms")
        print(f"    ratio shared memory / socket (mean of the two socket runs): "
              f"{rates['shared memory'][0] / statistics.mean(rates['socket']):.2f}")
    finally:
        d.stop()
        d.cleanup()


if __name__ == "__main__":
    main()
