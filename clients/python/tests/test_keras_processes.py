"""GTARLogger, unchanged, under a Keras 3 distribution spanning 4 JAX
processes (2 CPU devices each, `ModelParallel` with column- and row-sharded
kernels): each process sends only its addressable shards (replica 0 of
each), the daemon stores every frame once all 4 sent theirs, and every
frame equals bit for bit the weights gathered from all processes at that
epoch; the daemon and libgetar read the frames as whole tensors.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import run_oracle
from gtar_logd import Client

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
NPROCS = 4
EPOCHS = 3
# Every process must be done by then (JAX start-up, 3 epochs, the saves).
DEADLINE = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(address, archive, out, nprocs=NPROCS, restore=False):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [PKG] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = []
    for r in range(nprocs):
        cfg = dict(port=port, nprocs=nprocs, rank=r, address=address, archive=archive,
                   out=str(out), epochs=EPOCHS, restore=restore)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "keras_mp_run.py"),
                                       json.dumps(cfg)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + DEADLINE
    results, failed = [], []
    try:
        for r, p in enumerate(procs):
            try:
                o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed.append(f"process {r}: still running after {DEADLINE:.0f} s")
                continue
            if p.returncode != 0:
                failed.append(f"process {r} exited {p.returncode}:\n{o[-3000:]}\n{e[-6000:]}")
            else:
                results.append(json.loads(o.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not failed, "\n\n".join(failed)
    return sorted(results, key=lambda x: x["rank"])


ORACLE = r'''
import json, sys
import numpy as np
import gtar
path, names, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with gtar.GTAR(path, 'r') as h:
    arrays = {n: np.asarray(h.readPath(n)) for n in names}
np.savez(out, **{str(k): a for k, a in enumerate(arrays.values())})
'''


def test_keras_model_parallel_on_four_processes_saves_whole_frames(own_daemon, tmp_path):
    archive = "mp/keras.zip"
    out = tmp_path / "gathered"
    out.mkdir()
    results = run_processes(own_daemon.address, archive, out)
    # One job, every process in it, every frame durable on every process.
    assert [r["rank"] for r in results] == list(range(NPROCS))
    assert len({r["job"] for r in results}) == 1 and results[0]["job"], results
    for r in results:
        assert r["saved"] == [str(e) for e in range(EPOCHS)], r
        assert r["stats"]["durable"] >= EPOCHS, r
    # Each shard was sent by exactly one process: replicas sent once.
    d1_kernel = sorted(o for r in results for o in r["shards"]["0/0"])
    assert d1_kernel == [[0, 0], [0, 4], [0, 8], [0, 12]], d1_kernel
    d2_bias = [o for r in results for o in r["shards"]["1/1"]]
    assert d2_bias == [[0]], d2_bias

    weights = [(0, 0, (12, 16)), (0, 1, (16,)), (1, 0, (16, 8)), (1, 1, (8,))]
    with Client(own_daemon.address) as c:
        assert c.list_frames(archive) == [str(e) for e in range(EPOCHS)]
        for e in range(EPOCHS):
            _, ts = c.get_frame(archive, str(e), names=["weight"])
            got = {info.group: a for info, a in ts}
            for i, j, shape in weights:
                want = np.load(out / f"{e}-{i}-{j}.npy")
                a = got[f"keras/layer/{i}/weight/{j}"]
                assert a.shape == shape == want.shape and a.dtype == want.dtype
                assert a.tobytes() == want.tobytes(), f"epoch {e}: layer {i} weight {j} differs"
            # Optimizer state: every slot, sharded as its variable, whole.
            _, ts = c.get_frame(archive, str(e), group="gtar_logd/optimizer")
            got = {info.group: a for info, a in ts}
            n_opt = results[0]["optimizer_variables"]
            assert len(got) == n_opt, sorted(got)
            for k in range(n_opt):
                want = np.load(out / f"opt-{e}-{k}.npy")
                a = got[f"gtar_logd/optimizer/{k}"]
                assert a.shape == want.shape and a.tobytes() == want.tobytes(), \
                    f"epoch {e}: optimizer variable {k} differs"
        # The frames differ from epoch to epoch (training happened).
        a0 = c.read_record(archive, "keras/layer/0/weight/0/frames/0/weight.f32.uni")
        a2 = c.read_record(archive, "keras/layer/0/weight/0/frames/2/weight.f32.uni")
        assert a0 != a2
        assert c.read_record(archive, "keras/model.json").startswith(b"{")

    # Restored on 2 processes and on 1 (resharded: 4 and 2 devices), each
    # process reading only its shards: every weight and optimizer variable
    # equals the last frame's, bit for bit.
    last = EPOCHS - 1
    for n in (2, 1):
        rdir = tmp_path / f"restored{n}"
        rdir.mkdir()
        res = run_processes(own_daemon.address, archive, rdir, nprocs=n, restore=True)
        assert [r["epoch"] for r in res] == [EPOCHS] * n, res
        for i, j, _ in weights:
            a, want = np.load(rdir / f"restored-{i}-{j}.npy"), np.load(out / f"{last}-{i}-{j}.npy")
            assert a.tobytes() == want.tobytes(), f"{n} processes: layer {i} weight {j}"
        for k in range(results[0]["optimizer_variables"]):
            a = np.load(rdir / f"restored-opt-{k}.npy")
            want = np.load(out / f"opt-{last}-{k}.npy")
            assert a.tobytes() == want.tobytes(), f"{n} processes: optimizer variable {k}"

    assert own_daemon.stop() == 0
    names = [f"keras/layer/{i}/weight/{j}/frames/{e}/weight.f32.uni"
             for e in range(EPOCHS) for i, j, _ in weights]
    npz = tmp_path / "oracle.npz"
    run_oracle(ORACLE, own_daemon.path(archive), json.dumps(names), npz)
    got = np.load(npz)
    for k, n in enumerate(names):
        e, i, j = int(n.split("/")[6]), int(n.split("/")[2]), int(n.split("/")[4])
        want = np.load(out / f"{e}-{i}-{j}.npy")
        assert got[str(k)].tobytes() == want.tobytes(), f"libgetar: {n}"
