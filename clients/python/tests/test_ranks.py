"""Many processes, one frame, from the generic numpy client: 8 processes
(ranks) write column- and row-sharded tensors (`Shard`) with
`Writer(job=, rank=, world_size=)`; frames are stored whole or not at all,
also when a rank is `kill -9`ed mid-frame (a chaos loop, with a reader
checking every frame it can see meanwhile); libgetar reads the frames as
global tensors; bad combinations fail with errors that name what is wrong,
and nothing stored is lost.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import run_oracle
from gtar_logd import Client, Shard, WriteFailed
from rank_writer import expected, shards

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
WORLD = 8


def spawn(address, archive, job, rank, world, frames, stall_at=None):
    cfg = dict(address=address, archive=archive, job=job, rank=rank, world=world,
               frames=list(frames), stall_at=stall_at)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [PKG] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rank_writer.py"),
                             json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def result(p, timeout=180):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"rank process failed ({p.returncode}):\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def check_frame(client, archive, f, world=WORLD):
    """Frame `f` reads back through the daemon as the global tensors."""
    got = {info.group: a for info, a in client.get_frame(archive, f)[1]}
    want = expected(f, world)
    assert set(want) <= set(got), f"frame {f}: {sorted(got)}"
    for k, a in want.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, (f, k, got[k].shape)
        assert np.array_equal(got[k], a), f"frame {f}: {k} differs"


ORACLE = r'''
import json, sys
import numpy as np
import gtar
path, frames, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
arrays = {}
with gtar.GTAR(path, 'r') as h:
    for f in frames:
        for name, t in (("kernel", "f32"), ("proj", "f64"), ("bias", "f32")):
            arrays[f"{f}/{name}"] = np.asarray(h.readPath(f"{name}/frames/{f}/weight.{t}.uni"))
np.savez(out, **arrays)
print(json.dumps(sorted(arrays)))
'''


def oracle_check(path, frames, tmp_path, world=WORLD):
    """libgetar reads every frame as the global tensors (flat, as GETAR stores them)."""
    out = tmp_path / "oracle.npz"
    run_oracle(ORACLE, path, json.dumps([str(f) for f in frames]), out)
    got = np.load(out)
    for f in frames:
        for k, a in expected(f, world).items():
            assert np.array_equal(got[f"{f}/{k}"], a.ravel()), f"libgetar: frame {f} {k}"


def test_eight_ranks_write_sharded_frames_read_back_whole_by_the_daemon_and_libgetar(
        own_daemon, tmp_path):
    archive = "ranks/eight.zip"
    procs = [spawn(own_daemon.address, archive, "job8", r, WORLD, range(3)) for r in range(WORLD)]
    for p in procs:
        res = result(p)
        assert res == {"durable": 3, "aborted": []}, res
    with Client(own_daemon.address) as c:
        assert c.list_frames(archive) == ["0", "1", "2"]
        for f in range(3):
            check_frame(c, archive, f)
    assert own_daemon.stop() == 0  # the central directory written
    oracle_check(own_daemon.path(archive), range(3), tmp_path)


class Watcher(threading.Thread):
    """Reads every frame it can see, over and over, until stopped: each must
    be whole (the global tensors of its index), never part of a frame."""

    def __init__(self, address, archive):
        super().__init__(daemon=True)
        self.address, self.archive = address, archive
        self.stop = threading.Event()
        self.checked = 0
        self.error = None

    def run(self):
        from gtar_logd import NotFound
        with Client(self.address) as c:
            while not self.stop.is_set():
                try:
                    frames = c.list_frames(self.archive)
                except NotFound:
                    frames = []
                try:
                    for f in frames:
                        check_frame(c, self.archive, int(f))
                        self.checked += 1
                except Exception as e:  # reported by the test
                    self.error = e
                    return
                self.stop.wait(0.05)


def test_chaos_a_rank_killed_mid_frame_aborts_only_that_frame_for_all(own_daemon, tmp_path):
    archive = "ranks/chaos.zip"
    rng = random.Random(24)
    watcher = Watcher(own_daemon.address, archive)
    watcher.start()
    stored = []
    try:
        for it in range(3):
            base = 10 * it
            frames = [base + k for k in range(5)]
            victim, bad = rng.randrange(WORLD), base + rng.randrange(1, 4)
            procs = {r: spawn(own_daemon.address, archive, "chaos", r, WORLD, frames,
                              stall_at=bad if r == victim else None) for r in range(WORLD)}
            # Wait (with a deadline) until the victim is mid-frame, then kill it.
            line = procs[victim].stdout.readline()
            assert line.strip() == f"STALLED {bad}", (line, procs[victim].stderr.read())
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(30)
            # A restarted process takes the rank back for the frames after.
            procs[victim] = spawn(own_daemon.address, archive, "chaos", victim, WORLD,
                                  [f for f in frames if f > bad])
            for r, p in procs.items():
                res = result(p)
                if r == victim:
                    assert res == {"durable": len([f for f in frames if f > bad]),
                                   "aborted": []}, res
                    continue
                assert res["durable"] == 4, res
                assert [a[0] for a in res["aborted"]] == [str(bad)], res
                index, reason, missing = res["aborted"][0]
                assert victim in missing, res
                assert f"rank {victim} of job \"chaos\" left" in reason, reason
            stored += [f for f in frames if f != bad]
            with Client(own_daemon.address) as c:
                assert sorted(map(int, c.list_frames(archive))) == stored
    finally:
        watcher.stop.set()
        watcher.join(30)
    assert watcher.error is None, f"a reader saw a partial frame: {watcher.error!r}"
    assert watcher.checked > 0
    with Client(own_daemon.address) as c:
        for f in stored:
            check_frame(c, archive, f)
    assert own_daemon.stop() == 0
    oracle_check(own_daemon.path(archive), stored, tmp_path)


def _writer(c, archive, rank, world, job="bad"):
    return c.writer(archive, job=job, rank=rank, world_size=world)


def test_bad_combinations_fail_clearly_and_nothing_stored_is_lost(daemon, archive):
    with Client(daemon.address) as c:
        # A good frame first, from two ranks.
        ws = [_writer(c, archive, r, 2) for r in range(2)]
        for r, w in enumerate(ws):
            w.write_frame("0", shards(0, r, 2))
        for w in ws:
            w.flush(60)

        # Mismatched world size, a rank twice: refused at open, naming them.
        with pytest.raises(WriteFailed, match=r"world_size: 3 disagrees with job \"bad\""):
            _writer(c, archive, 1, 3)
        with pytest.raises(WriteFailed, match=r"FAILED_PRECONDITION: rank 1 of job \"bad\""):
            _writer(c, archive, 1, 2)
        with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
            _writer(c, archive, 2, 2)
        with pytest.raises(ValueError, match=r"dimension 1: 6:10 is outside 0:8"):
            Shard(np.zeros((2, 4)), (0, 6), (2, 8))

        # Overlapping slices: both ranks' writers fail, naming tensor and ranks.
        k = expected(1, 2)["kernel"]
        for w in ws:
            w.write_frame("1", [("kernel", "weight", Shard(k[:, 0:4], (0, 0), k.shape))])
        for w in ws:
            with pytest.raises(WriteFailed, match=r"tensor kernel/frames/1/weight.f32.uni: "
                                                  r"rank \d's slice \[0:64, 0:4\] overlaps "
                                                  r"rank \d's slice \[0:64, 0:4\]"):
                w.flush(60)
            w.abort()

        # A global shape that disagrees between ranks (another archive: the
        # job above may hold this one's group until its streams are gone).
        other = archive.replace(".zip", "-b.zip")
        ws = [_writer(c, other, r, 2) for r in range(2)]
        ws[0].write_frame("2", [("kernel", "weight", Shard(k[:, 0:4], (0, 0), k.shape))])
        ws[1].write_frame("2", [("kernel", "weight",
                                 Shard(np.zeros((64, 4), np.float32), (0, 4), (64, 12)))])
        for w in ws:
            with pytest.raises(WriteFailed, match=r"rank \d sent it as float32 \[64, \d+\], "
                                                  r"rank \d as float32 \[64, \d+\]"):
                w.flush(60)
            w.abort()

        # Nothing stored was lost; nothing partial appeared.
        assert c.list_frames(archive) == ["0"]
        assert c.list_frames(other) == []
        check_frame(c, archive, 0, world=2)
