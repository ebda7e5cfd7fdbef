"""Benchmark: what GTARLogger costs a whole training run, and client throughput.

    GTAR_LOGD_BIN=target/release/gtar-logd KERAS_BACKEND=jax \
        .venv-client/bin/python clients/python/bench/bench_callback.py

Starts its own daemon (release build recommended) on a temp socket, and prints
ratios. No assertions: numbers to read. About 4 minutes on the 2-core dev VM
with the defaults; the issue's setup is BENCH_EPOCHS=20. The stall per save
against `model.get_weights()`, per backend, is `bench_stall.py`.

1. (the stall, here only as seen inside the runs of 2.)
2. BENCH_EPOCHS=10 epochs with a 100 MB save (6 Dense 2048x2048, float32)
   every epoch, against the same run without logging, at two epoch lengths
   (BENCH_SAMPLES=512,1024 samples of 2048 floats: about 0.5 s and 1 s per
   epoch on the dev VM; targets <= +8 % and <= +5 %). BENCH_ROUNDS=6
   interleaved rounds of (no logging, GTARLogger, Keras's OrbaxCheckpoint),
   then no logging once more; each logged run is compared with the mean of
   the unlogged runs either side of it and the medians over rounds are the
   headline. Printed beside wall time: the training process's CPU time
   (steadier than wall time on a loaded machine), and per save: the
   training thread's stall, this process's CPU beyond the unlogged runs
   (target < 2x the stall beyond the stall), split by thread (the training
   thread, XLA's compute threads, our writer thread, gRPC's threads, others),
   and the daemon's CPU. On a machine whose cores training keeps busy, CPU
   spent anywhere is taken from training.
   Keras 3's `keras.callbacks.OrbaxCheckpoint` (save_on_background=True,
   save_weights_only=True, every checkpoint kept) is what a Keras user would
   pick instead; it needs `pip install orbax-checkpoint==0.12.8` (skipped
   with a note when missing; BENCH_ORBAX=0 skips it, BENCH_ORBAX=all also
   runs it at the longer epochs). BENCH_SOCKET=1 adds GTARLogger with tensor
   bytes through the socket (`shared_memory=False`).
3. End-to-end throughput of `Writer` to the daemon, BENCH_FRAMES=5 frames of
   100 MB, through the socket, shared memory, and the socket again, with the
   CPU each frame costs the calling thread, the process's other threads and
   the daemon.
"""
import collections
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conftest import Daemon  # noqa: E402
from gtar_logd import Client  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402

EPOCHS = int(os.environ.get("BENCH_EPOCHS", "10"))
SAMPLES = [int(n) for n in os.environ.get("BENCH_SAMPLES", "512,1024").split(",") if n]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "6"))
ORBAX = os.environ.get("BENCH_ORBAX", "1")
SOCKET = os.environ.get("BENCH_SOCKET", "0") == "1"
TCK = os.sysconf("SC_CLK_TCK")
med = statistics.median


def cpu_seconds(pid):
    """user + system CPU of a whole process (all threads, living or not), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


#: Where this process's CPU goes, by thread: (group, test on the Python
#: thread name or else the OS thread name). Threads that ended during a run
#: (Orbax's) count in 'other' through the process total.
THREAD_GROUPS = ("training thread", "XLA compute", "gtar-logd writer", "gRPC", "other")


def _group(tid, main_tid, pyname, comm):
    if tid == main_tid:
        return "training thread"
    if comm.startswith(("tf_XLA", "XLA")):
        return "XLA compute"
    if pyname and pyname.startswith("gtar-logd"):
        return "gtar-logd writer"
    # grpcio's Python threads (the channel's spin thread, the one that
    # consumes the request iterator) run its ForkManagedThread._run.
    if (pyname or "").endswith("(_run)") or ("grpc" in comm
            or comm.startswith(("event_engine", "default-execu", "lifeguard", "resolver"))):
        return "gRPC"
    return "other"


def thread_cpu():
    """{tid: (group, CPU seconds)} of this process's living threads."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    main_tid = threading.main_thread().native_id
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        tid = int(tid)
        out[tid] = (_group(tid, main_tid, names.get(tid), comm),
                    (int(fields[11]) + int(fields[12])) / TCK)
    return out


class Probe:
    """CPU and wall time of one `fit`: whole process, by thread group, daemon.

    The writer's and gRPC's threads end with the run: a sampler thread keeps
    each thread's last reading (every 0.2 s), so their CPU is not lost to
    'other'. The sampler itself runs in every run, logged or not."""

    def __init__(self, daemon_pid):
        self.daemon_pid = daemon_pid

    def _sample(self):
        while not self._stop.wait(0.2):
            self.last.update(thread_cpu())

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), cpu_seconds(os.getpid())
        self.d0, self.th0 = cpu_seconds(self.daemon_pid), thread_cpu()
        self.last = dict(self.th0)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_seconds(os.getpid()) - self.c0
        self.daemon = cpu_seconds(self.daemon_pid) - self.d0
        self._stop.set()
        self._sampler.join()
        self.last.update(thread_cpu())
        self.groups = collections.Counter()
        for tid, (g, c) in self.last.items():
            self.groups[g] += c - self.th0.get(tid, (g, 0.0))[1]
        self.groups["other"] += self.cpu - sum(self.groups.values())


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


def timed(cls):
    """`cls` with its on_epoch_end timed: wall (the stall) and the training
    thread's CPU in it; and the wait in on_train_end."""
    class Timed(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.stalls, self.stall_cpu, self.end_wait = [], [], 0.0

        def on_epoch_end(self, epoch, logs=None):
            c, t = time.thread_time(), time.perf_counter()
            super().on_epoch_end(epoch, logs)
            self.stalls.append(time.perf_counter() - t)
            self.stall_cpu.append(time.thread_time() - c)

        def on_train_end(self, logs=None):
            t = time.perf_counter()
            super().on_train_end(logs)
            self.end_wait = time.perf_counter() - t
    return Timed


def orbax_missing():
    """Why Orbax is not measured (None: it is)."""
    if ORBAX == "0":
        return "BENCH_ORBAX=0"
    if keras.backend.backend() != "jax":
        return "runs on the jax backend here"
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}): pip install orbax-checkpoint==0.12.8"
    return None


def whole_run(model, d, base, samples, rounds, with_orbax):
    """`rounds` x (no logging, then each logger), then no logging once more."""
    rng = np.random.default_rng(samples)
    x = rng.standard_normal((samples, 2048)).astype("float32")
    y = rng.standard_normal((samples, 2048)).astype("float32")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # warm up this shape

    def run(tag, make):
        cb, cleanup = make(tag)
        clock = EpochClock()
        with Probe(d.proc.pid) as p:
            model.fit(x, y, batch_size=128, epochs=EPOCHS, verbose=0,
                      callbacks=([cb] if cb else []) + [clock])
        cleanup()  # 1-2 GB a run: keep the disk from filling
        return p, cb, clock

    def gtar(shm):
        def make(tag):
            name = f"bench/{tag}.zip"
            return (timed(GTARLogger)(name, address=d.address, append=False, shared_memory=shm),
                    lambda: os.remove(d.path(name)))
        return make

    def orbax(tag):
        path = base / f"orbax-{tag}"
        # Every checkpoint kept, as GTARLogger keeps every frame.
        cb = timed(keras.callbacks.OrbaxCheckpoint)(
            str(path), save_freq="epoch", max_to_keep=None, save_on_background=True,
            save_weights_only=True)
        return cb, lambda: shutil.rmtree(path, ignore_errors=True)

    kinds = {"GTARLogger": gtar(None)}
    if SOCKET:
        kinds["GTARLogger, socket"] = gtar(False)
    if with_orbax:
        kinds["OrbaxCheckpoint"] = orbax
    none = lambda tag: (None, lambda: None)  # noqa: E731
    base_runs, logged = [run("none", none)], {k: [] for k in kinds}
    for r in range(rounds):
        for k, make in kinds.items():
            logged[k].append(run(f"{samples}-{r}-{len(logged[k])}-{k[:5]}", make))
        base_runs.append(run("none", none))
    walls = [p.wall for p, _, _ in base_runs]
    base_s = statistics.mean(walls)
    cores = statistics.mean(p.cpu for p, _, _ in base_runs) / base_s
    print(f"\n[2] {EPOCHS} epochs of {samples} samples ({base_s / EPOCHS:.2f} s per epoch, "
          f"training used {cores:.2f} cores), {rounds} interleaved rounds, a 100 MB save every "
          f"epoch (incl. waiting for the last at train end) vs the mean of the unlogged runs "
          f"before and after it. Unlogged: wall {', '.join(f'{w:.1f}' for w in walls)} s, "
          f"CPU {', '.join(f'{p.cpu:.1f}' for p, _, _ in base_runs)} s")
    for k, runs in logged.items():
        wall, cpu, stall, scpu, beyond, daemon, steady, end = [], [], [], [], [], [], [], []
        groups = collections.defaultdict(list)
        for r, (p, cb, clock) in enumerate(runs):
            (p0, _, k0), (p1, _, k1) = base_runs[r], base_runs[r + 1]
            n = len(cb.stalls)
            wall.append(100 * (p.wall / ((p0.wall + p1.wall) / 2) - 1))
            cpu.append(100 * (p.cpu / ((p0.cpu + p1.cpu) / 2) - 1))
            stall.append(1e3 * med(cb.stalls))
            scpu.append(1e3 * med(cb.stall_cpu))
            beyond.append(1e3 * (p.cpu - (p0.cpu + p1.cpu) / 2) / n)
            daemon.append(1e3 * p.daemon / n)
            steady.append(1e3 * (clock.steady() - (k0.steady() + k1.steady()) / 2))
            end.append(1e3 * cb.end_wait)
            for g in THREAD_GROUPS:
                groups[g].append(1e3 * (p.groups[g] - (p0.groups[g] + p1.groups[g]) / 2) / n)
        # The stall's own CPU is the training thread's, in the callback.
        rest = med(beyond) - med(scpu)
        print(f"    {k:18s} wall {med(wall):+6.1f} % (rounds {', '.join(f'{o:+.1f}' for o in wall)}); "
              f"CPU {med(cpu):+6.1f} % (rounds {', '.join(f'{o:+.1f}' for o in cpu)})")
        print(f"      per save, medians: stall {med(stall):.0f} ms (its CPU {med(scpu):.0f} ms); "
              f"this process's CPU {med(beyond):+.0f} ms beyond the unlogged runs, {rest:+.0f} ms "
              f"beyond the stall's = {rest / med(stall):.1f}x the stall (target < 2x; "
              f"{rest / med(scpu):.1f}x the stall's CPU); daemon "
              f"CPU {med(daemon):.0f} ms; "
              f"each epoch after the first {med(steady):+.0f} ms; wait at train end "
              f"{med(end):.0f} ms")
        print("      that CPU by thread: " + ", ".join(
            f"{g} {med(groups[g]):+.0f} ms" for g in THREAD_GROUPS))
    return logged


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

        # --- 2. whole-run overhead ---
        why = orbax_missing()
        if why:
            print(f"OrbaxCheckpoint: not measured ({why})")
        for k, samples in enumerate(SAMPLES):
            whole_run(model, d, base, samples, ROUNDS,
                      with_orbax=why is None and (k == 0 or ORBAX == "all"))
        print("    (stall per save against get_weights, per backend: bench_stall.py)")

        # --- 3. end-to-end throughput, 100 MB frames ---
        n = int(os.environ.get("BENCH_FRAMES", "5"))
        if n:
            frame = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
            fb = sum(a.nbytes for a in frame.values())
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
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
