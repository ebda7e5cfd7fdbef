"""The multi-user service (`serve --multi-user`) with real throwaway users.

Needs root (creates users with useradd, removes them afterwards, also on
failure). Client code runs as those users through `runuser`, from a copy of
the client package in a temp directory the users can read.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import BIN, ORACLE

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: creates users and runs the system service")

HERE = pathlib.Path(__file__).resolve().parent
CLIENT_PKG = HERE.parent / "gtar_logd"


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def _user_python(user: str, venv_python: str):
    """An interpreter the user may run with the venv's packages: the venv's own
    if the user can reach it, else the system python of the same version
    with the venv's site-packages on PYTHONPATH (a venv under /root)."""
    r = _run(["runuser", "-u", user, "--", venv_python, "-c", "import numpy, grpc"])
    if r.returncode == 0:
        return venv_python, []
    info = json.loads(_run([venv_python, "-c",
                            "import json, site, sys; print(json.dumps([site.getsitepackages(),"
                            " sys.version_info[:2]]))"]).stdout)
    sp, (major, minor) = info
    cand = shutil.which(f"python{major}.{minor}", path="/usr/local/bin:/usr/bin:/bin")
    assert cand is not None, f"no interpreter other users can run with {venv_python}'s packages"
    return cand, sp


def _pids_of(uid: int) -> list[int]:
    out = []
    for p in pathlib.Path("/proc").iterdir():
        try:
            if p.name.isdigit() and p.stat().st_uid == uid:
                out.append(int(p.name))
        except OSError:
            pass
    return out


class Users:
    def __init__(self, base: pathlib.Path):
        self.base = base
        self.names = []

    def add(self, tag: str) -> str:
        name = f"gtl{tag}{os.getpid() % 100000}"
        home = self.base / f"home-{name}"
        r = _run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                  "/usr/sbin/nologin", "--user-group", name])
        assert r.returncode == 0, r.stderr
        self.names.append(name)
        home.mkdir()
        shutil.chown(home, name, name)
        return name

    def remove(self):
        import pwd
        for n in self.names:
            uid = pwd.getpwnam(n).pw_uid
            for pid in _pids_of(uid):  # leftovers of a failed test, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            subprocess.run(["userdel", n], capture_output=True)
            # The user's own daemon's runtime directory (the TCP test).
            shutil.rmtree(f"/tmp/gtar-logd-{uid}", ignore_errors=True)


UNIT = HERE.parents[2] / "systemd" / "gtar-logd.service"


def unit_settings(unit: pathlib.Path = UNIT) -> dict[str, list[str]]:
    """`Key=Value` lines of the [Service] section of a unit file, in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def unit_launch(binary: str, data: pathlib.Path, uds: str, admin_group: str | None):
    """How systemd starts the shipped system service, for a test: the unit's
    `ExecStart=` arguments (the binary, data directory and admin group
    swapped for the test's; `--uds`, since the test binds its own socket
    where the unit is socket-activated), its `UMask=`, a data directory made
    with `StateDirectoryMode=`'s mode, and only the capabilities
    `CapabilityBoundingSet=` leaves (with `NoNewPrivileges=`), through
    setpriv. Read from the unit file, so a change to the unit changes the test.
    Returns (argv, umask)."""
    import shlex
    u = unit_settings()
    exec_start = shlex.split(u["ExecStart"][-1])
    assert exec_start[0] == "/usr/bin/gtar-logd", exec_start
    state = "/var/lib/" + u["StateDirectory"][-1]
    args = [binary]
    rest = exec_start[1:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--data-dir":
            assert rest[i + 1] == state, (rest[i + 1], state)
            args += [a, str(data)]
            i += 2
        elif a == "--admin-group":
            if admin_group:
                args += [a, admin_group]
            i += 2
        else:
            args.append(a)
            i += 1
    args += ["--uds", uds]
    data.mkdir(mode=0o700)
    os.chmod(data, int(u["StateDirectoryMode"][-1], 8))
    caps = u["CapabilityBoundingSet"][-1].split()
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to start the service with the unit's capabilities"
    prefix = [setpriv, "--bounding-set",
              "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps),
              "--inh-caps", "-all"]
    if u.get("NoNewPrivileges", ["no"])[-1] == "yes":
        prefix.append("--no-new-privs")
    return prefix + ["--"] + args, int(u["UMask"][-1], 8)


class Service:
    """The shipped system service (`serve --multi-user`, as `unit_launch`
    reads it from systemd/gtar-logd.service) on a temp socket and data dir."""

    def __init__(self, base: pathlib.Path, admin_group: str | None = None, tag: str = "",
                 extra=(), env=None):
        self.base = base
        self.data = base / f"data{tag}"
        self.uds = str(base / f"s{tag}.sock")
        self.log_path = base / f"dispatcher{tag}.log"
        args, umask = unit_launch(str(base / "gtar-logd"), self.data, self.uds, admin_group)
        args += ["--log", "info", *extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, **(env or {})),
                                         preexec_fn=lambda: os.umask(umask))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.uds):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    @property
    def address(self):
        return "unix:" + self.uds

    def log(self):
        return self.log_path.read_text(errors="replace")[-6000:]

    def worker_pids(self, user: str) -> list[int]:
        """Pids of this service's `gtar-logd worker` processes running as `user`."""
        import pwd
        uid = pwd.getpwnam(user).pw_uid
        out = []
        for p in pathlib.Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if p.stat().st_uid != uid:
                    continue
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(cmd) > 1 and cmd[1] == b"worker" and str(self.data).encode() in b" ".join(cmd):
                out.append(int(p.name))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def world():
    """Users A and B (and an admin group with user C), the client and the
    daemon binary where they can read them, and the service."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="gtl-mu-", dir="/tmp"))
    os.chmod(base, 0o711)
    users = Users(base)
    group = f"gtladm{os.getpid() % 100000}"
    svc = None
    try:
        a, b, c = users.add("a"), users.add("b"), users.add("c")
        assert _run(["groupadd", group]).returncode == 0
        assert _run(["usermod", "-aG", group, c]).returncode == 0
        shutil.copytree(CLIENT_PKG, base / "py" / "gtar_logd")
        shutil.copy(HERE / "multi_user_agent.py", base / "py" / "agent.py")
        shutil.copy(BIN, base / "gtar-logd")
        for d, _, files in os.walk(base / "py"):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        venv_py = os.environ.get("GTAR_CLIENT_PYTHON", sys.executable)
        py, extra = _user_python(a, venv_py)
        svc = Service(base, admin_group=group)
        yield {"base": base, "a": a, "b": b, "c": c, "svc": svc, "py": py,
               "pythonpath": ":".join([str(base / "py"), *extra]), "group": group}
    finally:
        if svc is not None:
            rc = svc.stop()
            print(svc.log())
        users.remove()
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    assert rc == 0, f"dispatcher exited with {rc}"


def as_user(w, user, action, args, address=None, env=None):
    e = {"HOME": str(w["base"] / f"home-{user}"), "PYTHONPATH": w["pythonpath"],
         "PATH": "/usr/bin:/bin", "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
         **(env or {})}
    r = _run(["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in e.items()],
              w["py"], str(w["base"] / "py" / "agent.py"), address or w["svc"].address, action,
              json.dumps(args)])
    assert r.returncode == 0, f"{user} {action}: {r.stdout}\n{r.stderr}\n{w['svc'].log()}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_each_user_has_their_own_archives_and_shared_memory(world):
    w = world
    ra = as_user(w, w["a"], "write", {"archive": "runs/model.zip", "frames": [0, 1], "value": 1.0})
    rb = as_user(w, w["b"], "write", {"archive": "runs/model.zip", "frames": [0], "value": 2.0})
    # Shared memory attached for both (the worker is the user).
    assert ra["shm_refused"] is None and ra["shm_bytes"] >= 2 * 4 * (1 << 16), ra
    assert rb["shm_refused"] is None and rb["shm_bytes"] >= 4 * (1 << 16), rb
    # Same name, different archives.
    ga = as_user(w, w["a"], "read", {"archive": "runs/model.zip"})
    gb = as_user(w, w["b"], "read", {"archive": "runs/model.zip"})
    assert ga == {"archives": ["runs/model.zip"], "frames": ["0", "1"], "last": 1.0}, ga
    assert gb == {"archives": ["runs/model.zip"], "frames": ["0"], "last": 2.0}, gb
    # On disk: the user's own file, nobody else's to read.
    fa = w["svc"].data / "users" / w["a"] / "runs" / "model.zip"
    st = fa.stat()
    import pwd
    assert st.st_uid == pwd.getpwnam(w["a"]).pw_uid
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)


RUST_EXAMPLE = BIN.parent / "examples" / "shm_write"


def test_the_rust_client_attaches_shared_memory_for_every_user(world):
    """The project's Rust client (examples/shm_write.rs), as A and as B."""
    w = world
    if not RUST_EXAMPLE.exists():
        pytest.fail(f"{RUST_EXAMPLE} not built: cargo build --workspace --all-targets")
    exe = w["base"] / "shm_write"
    if not exe.exists():
        shutil.copy(RUST_EXAMPLE, exe)
        os.chmod(exe, 0o755)
    for user in (w["a"], w["b"]):
        r = _run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", str(exe),
                  w["svc"].address, "rust/shm.zip", "4", "2"])
        assert r.returncode == 0, r.stdout + r.stderr + w["svc"].log()
        got = json.loads(r.stdout)
        assert got["shm_attached"] and got["shm_refused"] is None, got
        assert got["shm_bytes"] == 2 * (4 << 20), got
        got = as_user(w, user, "read", {"archive": "rust/shm.zip", "last": False})
        assert got["frames"] == ["0", "1"], got


def test_another_user_can_do_nothing_to_my_archives(world):
    w = world
    as_user(w, w["a"], "write", {"archive": "runs/keep.zip", "frames": [0], "value": 5.0})
    for name, prefix in [(f"~{w['a']}/runs/keep.zip", f"~{w['a']}/"),
                         (f"../{w['a']}/runs/keep.zip", f"../{w['a']}/")]:
        got = as_user(w, w["b"], "attack", {"archive": name, "prefix": prefix})
        for op, code in got.items():
            if op == "list" and not prefix.startswith("~"):
                # A prefix is not a path: it matches nothing of B's own.
                assert code == "OK", got
                continue
            assert code == "PERMISSION_DENIED", (name, op, code, got)
    # A's archive is untouched.
    ga = as_user(w, w["a"], "read", {"archive": "runs/keep.zip"})
    assert ga["frames"] == ["0"] and ga["last"] == 5.0, ga


def test_admin_group_and_root_read_under_the_user_prefix(world):
    w = world
    as_user(w, w["a"], "write", {"archive": "runs/adm.zip", "frames": [3], "value": 7.0})
    name = f"~{w['a']}/runs/adm.zip"
    got = as_user(w, w["c"], "read", {"archive": name, "prefix": f"~{w['a']}/runs/adm"})
    assert got == {"archives": [name], "frames": ["3"], "last": 7.0}, got
    # Read-only, even for admins.
    att = as_user(w, w["c"], "attack", {"archive": name, "prefix": f"~{w['a']}/"})
    assert att["append"] == "PERMISSION_DENIED" and att["create"] == "PERMISSION_DENIED", att
    # Root (this process), through the client.
    from gtar_logd import Client
    with Client(w["svc"].address) as c:
        assert c.list_frames(name) == ["3"]
        assert float(c.read_frame(name)["w"][0]) == 7.0


def test_the_user_reads_their_archive_with_libgetar_and_nobody_else_can(world):
    w = world
    if not ORACLE:
        pytest.skip("GTAR_ORACLE_PYTHON is not set (test.sh sets it)")
    as_user(w, w["a"], "write", {"archive": "runs/lib.zip", "frames": [0, 1], "value": 1.5})
    path = w["svc"].data / "users" / w["a"] / "runs" / "lib.zip"
    # A worker stopped with SIGTERM closes its archives (central directory
    # written); the next connection gets a new one.
    for pid in w["svc"].worker_pids(w["a"]):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    py, extra = _user_python(w["a"], ORACLE)
    script = ("import sys, gtar\n"
              "try:\n"
              "    with gtar.GTAR(sys.argv[1], 'r') as t:\n"
              "        print('opened', len(t.getRecordTypes()))\n"
              "except (PermissionError, OSError, RuntimeError) as e:\n"
              "    print('DENIED', e)\n")
    env = ["env", "-i", f"PYTHONPATH={':'.join(extra)}", "PATH=/usr/bin:/bin"]
    ra = _run(["runuser", "-u", w["a"], "--", *env, py, "-c", script, str(path)])
    rb = _run(["runuser", "-u", w["b"], "--", *env, py, "-c", script, str(path)])
    assert ra.returncode == 0 and "opened" in ra.stdout, ra.stdout + ra.stderr
    assert "DENIED" in rb.stdout or "Permission denied" in rb.stderr, rb.stdout + rb.stderr
    # And A's worker serves again.
    got = as_user(w, w["a"], "read", {"archive": "runs/lib.zip"})
    assert got["frames"] == ["0", "1"], got


def test_keras_run_by_a_user_goes_through_shared_memory(world):
    w = world
    script = w["base"] / "py" / "keras_run.py"
    script.write_text(
        "import json, sys\nimport numpy as np, keras\nfrom gtar_logd.keras import GTARLogger\n"
        "m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64), keras.layers.Dense(1)])\n"
        "m.compile('adam', 'mse')\n"
        "cb = GTARLogger('runs/keras.zip', address=sys.argv[1])\n"
        "m.fit(np.ones((32, 8)), np.ones((32, 1)), epochs=2, verbose=0, callbacks=[cb])\n"
        "print(json.dumps(cb.stats))\n")
    os.chmod(script, 0o644)
    e = {"HOME": str(w["base"] / f"home-{w['a']}"), "PYTHONPATH": w["pythonpath"],
         "PATH": "/usr/bin:/bin", "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    r = _run(["runuser", "-u", w["a"], "--", "env", "-i", *[f"{k}={v}" for k, v in e.items()],
              w["py"], str(script), w["svc"].address])
    assert r.returncode == 0, r.stdout + r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["shm_refused"] is None and stats["shm_bytes"] > 0, stats
    assert stats["durable"] >= 2, stats


def test_kill9_of_a_worker_loses_nothing_durable_and_the_next_connection_gets_a_new_one(world):
    w = world
    svc = w["svc"]
    as_user(w, w["b"], "write", {"archive": "runs/crash.zip", "frames": [0, 1, 2], "value": 3.0})
    before = svc.worker_pids(w["b"])
    assert len(before) == 1, before
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{before[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    got = as_user(w, w["b"], "read", {"archive": "runs/crash.zip"})
    assert got["frames"] == ["0", "1", "2"] and got["last"] == 3.0, got
    after = svc.worker_pids(w["b"])
    assert len(after) == 1 and after != before, (before, after)
    as_user(w, w["b"], "write", {"archive": "runs/crash.zip", "frames": [3], "value": 4.0})
    got = as_user(w, w["b"], "read", {"archive": "runs/crash.zip"})
    assert got["frames"] == ["0", "1", "2", "3"] and got["last"] == 4.0, got


def test_an_idle_worker_exits_and_the_next_connection_starts_a_new_one(world):
    w = world
    svc = Service(w["base"], tag="-idle", extra=("--worker-idle", "2"))
    try:
        as_user(w, w["a"], "write", {"archive": "runs/idle.zip", "frames": [0, 1], "value": 5.0},
                address=svc.address)
        first = svc.worker_pids(w["a"])
        assert len(first) == 1, first
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{first[0]}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{first[0]}"), "the idle worker did not exit\n" + svc.log()
        assert "no connection for a while" in svc.log(), svc.log()
        # The archive was closed in order, and a new worker serves A.
        got = as_user(w, w["a"], "read", {"archive": "runs/idle.zip"}, address=svc.address)
        assert got["frames"] == ["0", "1"] and got["last"] == 5.0, got
        again = svc.worker_pids(w["a"])
        assert len(again) == 1 and again != first, (first, again)
    finally:
        assert svc.stop() == 0, svc.log()


def test_multi_user_refuses_tcp(world):
    r = _run([str(world["base"] / "gtar-logd"), "serve", "--multi-user", "--uds",
              str(world["base"] / "x.sock"), "--data-dir", str(world["base"] / "x"),
              "--tcp", "127.0.0.1:0"])
    assert r.returncode != 0 and "TCP carries no identity" in r.stderr, r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_needs_the_token_of_the_daemons_user(world):
    """A's own daemon on loopback TCP: B (anonymous) sees and changes nothing;
    A's client finds the token itself; grpcurl works with it."""
    w = world
    port = _free_port()
    home = w["base"] / f"home-{w['a']}"
    env = ["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin"]
    proc = subprocess.Popen(["runuser", "-u", w["a"], "--", *env, str(w["base"] / "gtar-logd"),
                             "serve", "--uds", "none", "--tcp", f"127.0.0.1:{port}",
                             "--data-dir", str(home / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import pwd
        uid = pwd.getpwnam(w["a"]).pw_uid
        token_file = pathlib.Path(f"/tmp/gtar-logd-{uid}/tcp-{port}.token")
        deadline = time.monotonic() + 30
        while not token_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        st = token_file.stat()
        assert st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600
        addr = f"127.0.0.1:{port}"
        a = as_user(w, w["a"], "write", {"archive": "runs/tcp.zip", "frames": [0], "value": 9.0},
                    address=addr)
        assert a["shm_bytes"] == 0  # no shared memory over TCP
        got = as_user(w, w["a"], "read", {"archive": "runs/tcp.zip"}, address=addr)
        assert got["frames"] == ["0"], got
        att = as_user(w, w["b"], "attack", {"archive": "runs/tcp.zip", "prefix": ""},
                      address=addr)
        assert set(att.values()) == {"UNAUTHENTICATED"}, att
        assert as_user(w, w["b"], "code", {}, address=addr,
                       env={"GTAR_LOGD_TOKEN": "wrong"})["list"] == "UNAUTHENTICATED"
        # grpcurl (as root, which may read the file) with and without the header.
        grpcurl = pathlib.Path(ORACLE or sys.executable).parent / "grpcurl"
        if grpcurl.exists():
            tok = token_file.read_text().strip()
            ok = _run([str(grpcurl), "-plaintext", "-H", f"authorization: Bearer {tok}",
                       "-d", "{}", addr, "gtar.logd.v1.Logd/ListArchives"])
            assert ok.returncode == 0 and "runs/tcp.zip" in ok.stdout, ok.stdout + ok.stderr
            no = _run([str(grpcurl), "-plaintext", "-d", "{}", addr,
                       "gtar.logd.v1.Logd/ListArchives"])
            assert no.returncode != 0 and "Unauthenticated" in no.stderr, no.stderr
            assert str(token_file) in no.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not token_file.exists()


def test_remote_storage_per_user_prefix_and_node_loss(world, tmp_path):
    """`serve --multi-user --remote s3://ckpt/gpu01`: each worker replicates to
    gpu01/users/NAME/ with the service's AWS environment; after the node's
    disk is gone, a new service serves the user's archive from the store."""
    from s3 import S3Server
    w = world
    s3 = S3Server(tmp_path / "s3")
    s3.bucket("ckpt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env())
    svcs = []
    try:
        svc = Service(w["base"], tag="-remote", extra=["--remote", "s3://ckpt/gpu01"], env=env)
        svcs.append(svc)
        sw = dict(w, svc=svc)
        as_user(sw, w["a"], "write", {"archive": "runs/r.zip", "frames": [0, 1], "value": 3.0,
                                      "replicated": True})
        as_user(sw, w["b"], "write", {"archive": "runs/r.zip", "frames": [0], "value": 4.0,
                                      "replicated": True})
        for user in (w["a"], w["b"]):
            m = s3.root / "ckpt" / "gpu01" / "users" / user / "runs" / "r.zip" / "@manifest.json"
            assert m.exists(), sorted(str(p) for p in (s3.root / "ckpt").rglob("*"))
        # The service's credentials reach the worker, not its user: they are
        # not in its environment, and its user can't read its memory.
        secret = env["AWS_SECRET_ACCESS_KEY"]
        pids = svc.worker_pids(w["a"])
        assert pids, svc.log()
        for pid in pids:
            assert secret.encode() not in pathlib.Path(f"/proc/{pid}/environ").read_bytes()
            for f in ("environ", "mem"):
                r = _run(["runuser", "-u", w["a"], "--", "head", "-c", "1", f"/proc/{pid}/{f}"])
                assert r.returncode != 0, (f, r.stdout)
        assert svc.stop() == 0
        # The node's disk is gone: a new service, an empty data dir.
        shutil.rmtree(svc.data)
        svc = Service(w["base"], tag="-remote2", extra=["--remote", "s3://ckpt/gpu01"], env=env)
        svcs.append(svc)
        sw = dict(w, svc=svc)
        ga = as_user(sw, w["a"], "read", {"archive": "runs/r.zip"})
        gb = as_user(sw, w["b"], "read", {"archive": "runs/r.zip"})
        assert ga == {"archives": ["runs/r.zip"], "frames": ["0", "1"], "last": 3.0}, ga
        assert gb == {"archives": ["runs/r.zip"], "frames": ["0"], "last": 4.0}, gb
    finally:
        for svc in svcs:
            svc.stop()
        s3.stop()
