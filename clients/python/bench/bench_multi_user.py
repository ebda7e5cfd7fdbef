"""Benchmark: a 100 MB frame through the multi-user system service as a user
other than root, against the same frame to a daemon that user runs
themselves; both through shared memory, in the same run, interleaved rounds.

Run as root (creates a throwaway user, removes it):
    GTAR_LOGD_BIN=target/debug/gtar-logd python clients/python/bench/bench_multi_user.py [ROUNDS]

The client is the project's Rust client (`examples/shm_write`, built next to
the daemon binary), so the timing is the daemon's, not Python's. Prints the
median seconds per frame (write until durable) for both and their ratio
(throughput of the service / throughput of the user's own daemon).
"""
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BIN = pathlib.Path(os.environ.get("GTAR_LOGD_BIN", "target/debug/gtar-logd")).resolve()
EXAMPLE = BIN.parent / "examples" / "shm_write"
MIB = 100
FRAMES_PER_ROUND = 3


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates a user and starts the system service")
    base = pathlib.Path(tempfile.mkdtemp(prefix="gtl-bench-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    user = f"gtlbench{os.getpid() % 100000}"
    procs = []
    try:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(base / "home"),
                        "--shell", "/usr/sbin/nologin", "--user-group", user], check=True)
        (base / "home").mkdir()
        shutil.chown(base / "home", user, user)
        for src in (BIN, EXAMPLE):
            shutil.copy(src, base / src.name)
            os.chmod(base / src.name, 0o755)
        svc_sock = base / "svc.sock"
        own_sock = base / "home" / "own.sock"
        procs.append(subprocess.Popen(
            [str(base / "gtar-logd"), "serve", "--multi-user", "--uds", str(svc_sock),
             "--data-dir", str(base / "svc-data"), "--log", "warn"]))
        procs.append(subprocess.Popen(
            ["runuser", "-u", user, "--", "env", "-i", f"HOME={base / 'home'}",
             str(base / "gtar-logd"), "serve", "--uds", str(own_sock),
             "--data-dir", str(base / "home" / "own-data"), "--log", "warn"]))
        deadline = time.monotonic() + 30
        while not (svc_sock.exists() and own_sock.exists()):
            assert time.monotonic() < deadline, "daemons did not come up"
            time.sleep(0.05)

        def one(addr, archive):
            r = subprocess.run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin",
                                str(base / "shm_write"), f"unix:{addr}", archive, str(MIB),
                                str(FRAMES_PER_ROUND)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
            assert got["shm_attached"], got
            return got["seconds"][1:]  # the first frame also pays archive creation

        svc, own = [], []
        one(svc_sock, "warm.zip")
        one(own_sock, "warm.zip")
        for r in range(rounds):
            # Alternate which goes first, so drift in the machine's load
            # affects both the same.
            order = [("svc", svc_sock), ("own", own_sock)]
            if r % 2:
                order.reverse()
            for which, addr in order:
                (svc if which == "svc" else own).extend(one(addr, f"r{r}.zip"))
        ms, mo = statistics.median(svc), statistics.median(own)
        print(f"100 MB frame, write until durable, shared memory, {len(svc)} frames each:")
        print(f"  multi-user service (worker as {user}): median {ms * 1e3:.1f} ms "
              f"({MIB / ms:.0f} MiB/s)")
        print(f"  the user's own daemon:                 median {mo * 1e3:.1f} ms "
              f"({MIB / mo:.0f} MiB/s)")
        print(f"  ratio (service / own throughput): {mo / ms:.2f}x")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


main()
