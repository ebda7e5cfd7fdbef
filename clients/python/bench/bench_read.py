"""Benchmark: loading frames and tensor histories, against a plain read of the
same bytes from the same file and against libgetar in-process, in one run.

    GTAR_LOGD_BIN=target/release/gtar-logd \\
    GTAR_ORACLE_PYTHON=.venv-oracle/bin/python \\
        .venv-client/bin/python clients/python/bench/bench_read.py

Starts its own daemon on a temp socket. Prints medians over BENCH_ROUNDS
(default 5) interleaved rounds and ratios; asserts nothing.

1. `Client.read_frame` of a 100 MB frame (one float32 tensor), with the
   client reading the archive file itself (`read_files`, the default on the
   Unix socket) and streamed through gRPC (`read_files=False`), against a
   plain `os.preadv` of the same bytes into a fresh buffer (the anchor), warm
   and cold (cold: `echo 3 > /proc/sys/vm/drop_caches` before each timed
   read; root only, else skipped), and libgetar's in-process `getRecord`
   (timed inside the oracle interpreter, start-up excluded).
   ratio = plain-read time / our time (>= 0.8 is the target); /empty: the
   same against the plain read into `np.empty` buffers.
2. `Client.tensor_history` of one 100 KB tensor across BENCH_HISTORY_FRAMES
   (default 1000) frames against plain preads of those bytes (one per frame,
   one descriptor) and libgetar's in-process loop of `getRecord` over the
   record's frames.
"""
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import numpy as np  # noqa: E402

from conftest import Daemon  # noqa: E402
from gtar_logd import Client  # noqa: E402
from gtar_logd._proto import logd_pb2 as pb  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
HISTORY_FRAMES = int(os.environ.get("BENCH_HISTORY_FRAMES", "1000"))
ORACLE = os.environ.get("GTAR_ORACLE_PYTHON")
ORACLE_SCRIPT = pathlib.Path(__file__).resolve().parents[3] / "crates/gtar/tests/oracle/gtar_oracle.py"


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def locations(c, archive, req):
    return [m.tensor.location for m in c.stub.GetFrame(req) if m.WhichOneof("msg") == "tensor"]


def plain_read(locs, empty=False):
    """The anchor: open the file, pread each tensor's bytes into a new buffer:
    a `bytearray` (zeroed) or, with `empty`, an `np.empty` one (not zeroed,
    and large ones faulted in by huge pages, as the client reads)."""
    fd = os.open(locs[0].file, os.O_RDONLY)
    try:
        out = []
        for loc in locs:
            buf = np.empty(loc.length, np.uint8) if empty else bytearray(loc.length)
            mv = memoryview(buf)
            done = 0
            while done < loc.length:
                done += os.preadv(fd, [mv[done:]], loc.offset + done)
            out.append(np.frombuffer(buf, np.uint8))
        return out
    finally:
        os.close(fd)


def oracle(*args):
    # The daemon writes an archive's central directory once it is idle;
    # until then libgetar cannot open a live archive: retry for a while.
    for _ in range(60):
        r = subprocess.run([ORACLE, str(ORACLE_SCRIPT), *args], capture_output=True, text=True)
        if r.returncode == 0:
            return {ln.split("\t")[0]: ln.split("\t")[1]
                    for ln in r.stdout.splitlines() if "\t" in ln}
        time.sleep(0.5)
    raise RuntimeError(f"libgetar {args}: {r.stderr}")


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run_rounds(cases, cold):
    """cases: {name: fn}; interleaved rounds; returns {name: median seconds}."""
    times = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for k, f in cases.items():
            if cold:
                drop_caches()
            else:
                f()  # warm: the bytes are in the page cache
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    base = pathlib.Path(tempfile.mkdtemp(prefix="gtar-bench-read-"))
    d = Daemon(base)
    d.start()
    cold_ok = drop_caches()
    print(f"daemon: {os.environ.get('GTAR_LOGD_BIN', 'target/debug/gtar-logd')}; "
          f"rounds {ROUNDS}; cold runs {'on' if cold_ok else 'skipped (not root)'}")
    try:
        with Client(d.address) as c, Client(d.address, read_files=False) as streamed, \
                Client(d.address, verify=True) as verified:
            # --- 1. one 100 MB frame ---
            w = np.random.default_rng(0).standard_normal(25_000_000).astype(np.float32)
            c.write_frame("frame.zip", 0, {"w": w})
            locs = locations(c, "frame.zip", pb.GetFrameRequest(archive="frame.zip", index="0",
                                                                locate=True))
            nbytes = sum(loc.length for loc in locs)
            assert np.array_equal(c.read_frame("frame.zip", 0)["w"], w)
            print(f"\n1. read_frame of a {nbytes / 1e6:.0f} MB frame "
                  f"(ratio = plain read time / ours; target >= 0.8)")
            print(f"   {'cache':<5} {'plain ms':>9} {'empty ms':>9} {'located':>9} {'ratio':>6} "
                  f"{'/empty':>6} {'+verify':>9} "
                  f"{'ratio':>6} {'streamed':>9} {'ratio':>6} {'libgetar':>9} {'ratio':>6}")
            cases = {
                "plain": lambda: plain_read(locs),
                "empty": lambda: plain_read(locs, empty=True),
                "located": lambda: c.read_frame("frame.zip", 0),
                "verify": lambda: verified.read_frame("frame.zip", 0),
                "streamed": lambda: streamed.read_frame("frame.zip", 0),
            }
            for cold in ([False, True] if cold_ok else [False]):
                m = run_rounds(cases, cold)
                lg = float("nan")
                if ORACLE:
                    lgs = []
                    for _ in range(min(ROUNDS, 3)):
                        if cold:
                            drop_caches()
                        lgs.append(float(oracle("bench-read", str(d.data_dir / "frame.zip"),
                                                "--index", "0")["read_s"]))
                    lg = statistics.median(lgs)
                p = m["plain"]
                print(f"   {'cold' if cold else 'warm':<5} {p * 1e3:9.1f} {m['empty'] * 1e3:9.1f} "
                      f"{m['located'] * 1e3:9.1f} {p / m['located']:6.2f} "
                      f"{m['empty'] / m['located']:6.2f} "
                      f"{m['verify'] * 1e3:9.1f} {p / m['verify']:6.2f} "
                      f"{m['streamed'] * 1e3:9.1f} {p / m['streamed']:6.2f} "
                      f"{lg * 1e3:9.1f} {p / lg:6.2f}")

            # --- 2. one tensor over many frames ---
            t0 = time.perf_counter()
            rng = np.random.default_rng(1)
            with c.writer("hist.zip", mode="create") as wr:
                for i in range(HISTORY_FRAMES):
                    wr.write_tensors(str(i), {"b": rng.standard_normal(25_000).astype(np.float32)})
            print(f"\n2. tensor_history of one 100 KB tensor over {HISTORY_FRAMES} frames "
                  f"(written in {time.perf_counter() - t0:.1f} s)")
            group = "tensors/b"
            req = pb.TensorHistoryRequest(archive="hist.zip", group=group, name="value",
                                          locate=True)
            hlocs = [m.tensor.location for m in c.stub.TensorHistory(req)
                     if m.WhichOneof("msg") == "tensor"]
            assert len(hlocs) == HISTORY_FRAMES and all(loc.length for loc in hlocs)
            got = c.tensor_history("hist.zip", "b")
            assert len(got) == HISTORY_FRAMES
            print(f"   {'cache':<5} {'plain ms':>9} {'empty ms':>9} {'located':>9} {'ratio':>6} "
                  f"{'/empty':>6} {'streamed':>9} {'ratio':>6} {'libgetar':>9} {'ratio':>6}")
            cases = {
                "plain": lambda: plain_read(hlocs),
                "empty": lambda: plain_read(hlocs, empty=True),
                "located": lambda: c.tensor_history("hist.zip", "b"),
                "streamed": lambda: streamed.tensor_history("hist.zip", "b"),
            }
            for cold in ([False, True] if cold_ok else [False]):
                m = run_rounds(cases, cold)
                lg = float("nan")
                if ORACLE:
                    lgs = []
                    for _ in range(min(ROUNDS, 3)):
                        if cold:
                            drop_caches()
                        lgs.append(float(oracle("bench-history", str(d.data_dir / "hist.zip"),
                                                "--group", group, "--name", "value")["read_s"]))
                    lg = statistics.median(lgs)
                p = m["plain"]
                print(f"   {'cold' if cold else 'warm':<5} {p * 1e3:9.1f} {m['empty'] * 1e3:9.1f} "
                      f"{m['located'] * 1e3:9.1f} {p / m['located']:6.2f} "
                      f"{m['empty'] / m['located']:6.2f} "
                      f"{m['streamed'] * 1e3:9.1f} {p / m['streamed']:6.2f} "
                      f"{lg * 1e3:9.1f} {p / lg:6.2f}")
    finally:
        d.stop()
        d.cleanup()


if __name__ == "__main__":
    main()
