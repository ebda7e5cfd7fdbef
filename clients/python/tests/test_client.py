"""The framework-agnostic client against the real daemon."""
import os
import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

import gtar_logd
from gtar_logd import Client, DaemonUnavailable, GtarLogdError, NotFound
from gtar_logd.client import group_to_key, key_to_group

HERE = __import__("pathlib").Path(__file__).resolve().parent


def test_committed_stubs_match_the_proto():
    """Regenerate the gRPC stubs and fail on any drift from the committed ones."""
    tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version
    if version("grpcio-tools") != "1.85.1":
        pytest.skip(f"stubs are generated with grpcio-tools 1.85.1, not {version('grpcio-tools')}")
    r = subprocess.run([sys.executable, str(HERE.parent / "tools" / "gen_proto.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _all_dtypes():
    rng = np.random.default_rng(7)
    f16 = rng.integers(0, 2**16, size=(3, 5), dtype=np.uint16)
    f16[0, :3] = [0x7C01, 0xFE00, 0x8000]  # signalling NaN payload, quiet NaN, -0
    bf16 = rng.integers(0, 2**16, size=(4, 3, 2), dtype=np.uint16)
    bf16[0, 0, :] = [0x7F81, 0xFFC1]
    return {
        "f32": rng.standard_normal((7, 9)).astype(np.float32),
        "f64": rng.standard_normal(11),
        "i32": np.array([np.iinfo(np.int32).min, -1, 0, np.iinfo(np.int32).max], np.int32),
        "i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64),
        "u8": np.arange(256, dtype=np.uint8).reshape(16, 16),
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "u64": np.array([0, 2**64 - 1], np.uint64),
        "f16": f16.view(np.float16),
        "bf16": bf16.view(ml_dtypes.bfloat16),
        "i8": np.array([-128, -1, 0, 127], np.int8),
        "i16": np.array([[-32768, 32767]], np.int16),
        "u16": np.array([0, 65535], np.uint16),
        "bool": np.array([[True, False], [False, True]]),
        "scalar0d": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "bigendian": np.arange(10, dtype=">i4"),
    }


def _bits(a):
    a = np.asarray(a)
    return a.dtype.name, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes()


def test_every_dtype_round_trips_bit_exactly(client, archive):
    data = _all_dtypes()
    client.write_frame(archive, 0, data)
    back = client.read_frame(archive, "0")
    assert set(back) == set(data)
    for k, a in data.items():
        assert _bits(back[k]) == _bits(a), k
        assert back[k].dtype == np.asarray(a).dtype.newbyteorder("=")


def test_multi_chunk_tensor_and_positions(client, archive):
    big = np.random.default_rng(1).standard_normal((3, 1 << 20)).astype(np.float32)  # 12 MiB
    client.write_frame(archive, 5, {"big": big, "small": np.ones(3, np.int64)})
    client.write_frame(archive, 10, {"big": big * 2, "small": np.zeros(3, np.int64)})
    assert client.list_frames(archive) == ["5", "10"]
    assert np.array_equal(client.read_frame(archive, position=-1)["big"], big * 2)
    assert np.array_equal(client.read_frame(archive, position=0)["big"], big)
    assert np.array_equal(client.read_frame(archive, "5")["small"], np.ones(3, np.int64))
    with pytest.raises(NotFound):
        client.read_frame(archive, 7)


def test_state_dict_and_pytree_keys(client, archive):
    keys = ["layers.0.weight", "layers.0.bias", "params/dense/kernel", "params/dense/bias",
            "weird//key", "frames", "../up", "tab\tkey", "~tilde", "ünï"]
    data = {k: np.full((2,), i, np.float32) for i, k in enumerate(keys)}
    client.write_frame(archive, "3", data, group="run1", collection="state")
    back = client.read_frame(archive, position=-1, group="run1", collection="state")
    assert sorted(back) == sorted(keys)
    for k in keys:
        assert np.array_equal(back[k], data[k])
        assert group_to_key(key_to_group(k)) == k
    # Readable names stay readable in the archive.
    assert key_to_group("layers.0.weight") == "layers.0.weight"


def test_a_frame_number_means_the_same_to_write_and_read(client, archive):
    steps = [1000, 2000, 3000]
    for s in steps:
        client.write_frame(archive, s, {"w": np.full(2, s, np.int64)})
    assert client.list_frames(archive) == ["1000", "2000", "3000"]
    # An int is the frame index as written, whatever the frame's place.
    assert client.read_frame(archive, 2000)["w"].tolist() == [2000, 2000]
    assert client.read_frame(archive, "2000")["w"].tolist() == [2000, 2000]
    assert client.read_frame(archive, np.int64(3000))["w"].tolist() == [3000, 3000]
    # Places are position=; no argument is the last frame.
    assert client.read_frame(archive, position=0)["w"].tolist() == [1000, 1000]
    assert client.read_frame(archive, position=-2)["w"].tolist() == [2000, 2000]
    assert client.read_frame(archive)["w"].tolist() == [3000, 3000]
    with pytest.raises(NotFound, match="'1'"):
        client.read_frame(archive, 1)
    with pytest.raises(NotFound, match=r"position=-1"):
        client.read_frame(archive, -1)
    with pytest.raises(NotFound, match="position 5"):
        client.read_frame(archive, position=5)
    with pytest.raises(TypeError):
        client.read_frame(archive, 2000, position=0)
    with pytest.raises(TypeError):
        client.read_frame(archive, 2.0)


def test_tensor_history_by_the_key_written(client, archive):
    keys = ["layer1.bias", "params/dense/kernel", "weird//key"]
    for s in (10, 20, 30):
        client.write_frame(archive, s, {k: np.full(3, s + i, np.float32)
                                        for i, k in enumerate(keys)})
        client.write_frame(archive, s, {"layer1.bias": np.full(2, -s, np.int16)}, group="g",
                           collection="state")
    for i, k in enumerate(keys):
        hist = client.tensor_history(archive, k)
        assert [idx for idx, _ in hist] == ["10", "20", "30"], k
        for (idx, a), s in zip(hist, (10, 20, 30)):
            assert np.array_equal(a, np.full(3, s + i, np.float32)), (k, idx)
    hist = client.tensor_history(archive, "layer1.bias", group="g", collection="state")
    assert [a.tolist() for _, a in hist] == [[-10, -10], [-20, -20], [-30, -30]]
    assert [idx for idx, _ in client.tensor_history(archive, "layer1.bias", start=-2)] \
        == ["20", "30"]
    with pytest.raises(NotFound, match="no tensor 'layer1.weight'"):
        client.tensor_history(archive, "layer1.weight")
    # The record as stored, for anything else.
    raw = client.record_history(archive, "tensors/layer1.bias", "value")
    assert [idx for idx, _ in raw] == ["10", "20", "30"]


def test_read_only_trajectory_of_a_missing_archive_names_it(daemon, archive):
    from gtar_logd import Trajectory
    with pytest.raises(NotFound, match=f"no archive {archive!r}"):
        Trajectory(archive, address=daemon.address).frames
    # Appending creates it: nothing there yet is not an error.
    with Trajectory(archive, "a", address=daemon.address) as t:
        assert t.frames == []


def test_tcp_address_works(daemon, archive):
    with Client(daemon.tcp_address) as c:
        c.write_frame(archive, 1, {"x": np.arange(3, dtype=np.int16)})
        assert c.read_frame(archive)["x"].tolist() == [0, 1, 2]


def test_unreachable_daemon_says_how_to_start_it(tmp_path):
    with Client("unix:" + str(tmp_path / "nobody.sock")) as c:
        with pytest.raises(DaemonUnavailable) as e:
            c.ping(timeout=1.0)
    assert "gtar-logd serve" in str(e.value)


def test_default_address_follows_the_daemon(monkeypatch):
    monkeypatch.delenv("GTAR_LOGD_ADDRESS", raising=False)
    monkeypatch.delenv("GTAR_LOGD_UDS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert gtar_logd.resolve_address() == "unix:/run/user/1234/gtar-logd/gtar-logd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    import os
    assert gtar_logd.resolve_address() == f"unix:/tmp/gtar-logd-{os.getuid()}/gtar-logd.sock"
    monkeypatch.setenv("GTAR_LOGD_UDS", "/x/y.sock")
    assert gtar_logd.resolve_address() == "unix:/x/y.sock"
    assert gtar_logd.resolve_address("127.0.0.1:9") == "127.0.0.1:9"


def test_full_budget_blocks_with_a_warning_and_drops_nothing(client, archive):
    arrays = [np.full((256, 1024), i, np.float32) for i in range(8)]  # 1 MiB each
    with client.writer(archive, max_pending_bytes=1 << 20) as w:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, a in enumerate(arrays):
                w.write_tensors(str(i), {"a": a})
        w.flush(60)
        stages = w.stages
    assert any("blocking" in str(c.message) for c in caught)
    # With shared memory (the region is the budget's size) a full budget
    # waits for room in it: every frame still goes through it, none falls
    # back to a private copy.
    if stages:
        assert w.shm_bytes == sum(a.nbytes for a in arrays)
    assert client.list_frames(archive) == [str(i) for i in range(8)]
    for i, a in enumerate(arrays):
        assert np.array_equal(client.read_frame(archive, str(i))["a"], a)


def test_refused_write_raises(client, archive):
    from gtar_logd import WriteFailed
    w = client.writer(archive)
    w.write_frame("bad/index", [("g", "x", np.zeros(1))])
    with pytest.raises(WriteFailed, match="INVALID_ARGUMENT"):
        w.flush(30)
    w.abort()


def test_hand_encoded_chunk_matches_protobuf():
    from gtar_logd._proto import logd_pb2 as pb
    from gtar_logd._writer import chunk_message

    for n in (0, 1, 127, 128, 16383, 16384, 2 << 20):
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        want = pb.WriteRequest(chunk=pb.Chunk(data=data))
        got = chunk_message(memoryview(data))
        assert pb.WriteRequest.FromString(got) == want, n
        if n:  # protobuf omits an empty bytes field; we don't need to
            assert got == want.SerializeToString(), n


def _write_all(w, frames):
    for i, f in enumerate(frames):
        w.write_tensors(str(i), f)
    w.flush(60)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_shared_memory_carries_the_bytes_on_the_unix_socket(client, archive, shared_memory):
    rng = np.random.default_rng(3)
    frames = [dict(_all_dtypes(), big=rng.standard_normal((3, 1 << 20)).astype(np.float32))
              for _ in range(3)]
    with client.writer(archive, shared_memory=shared_memory) as w:
        _write_all(w, frames)
    total = sum(np.asarray(a).nbytes for f in frames for a in f.values())
    assert w.shm_refused is None
    assert w.shm_bytes == (total if shared_memory is None else 0)
    for i, f in enumerate(frames):
        back = client.read_frame(archive, str(i))
        for k, a in f.items():
            assert _bits(back[k]) == _bits(a), (i, k)


def test_shared_memory_over_tcp_is_refused_and_bytes_flow(daemon, archive):
    frames = [{"a": np.arange(1 << 18, dtype=np.float32) + i} for i in range(3)]
    with Client(daemon.tcp_address) as c:
        with c.writer(archive, shared_memory=True) as w:
            _write_all(w, frames)
        assert "Unix socket" in w.shm_refused and w.shm_bytes == 0
        for i, f in enumerate(frames):
            assert np.array_equal(c.read_frame(archive, str(i))["a"], f["a"])


def test_region_spans_never_overlap_and_restart_at_zero():
    from gtar_logd._writer import _Region
    rng = np.random.default_rng(5)
    r = _Region(1 << 16)
    try:
        live, next_id = [], 0
        for _ in range(5000):
            if live and (rng.random() < 0.45 or len(live) > 6):
                r.free(live.pop(0))  # durable in order, as on a stream
            else:
                n = int(rng.integers(1, 1 << 15))
                at = r.alloc(next_id, n)
                if at is None:  # refused only when no free stretch of the ring fits
                    spans = list(r.spans.values())  # oldest first
                    head, tail = spans[0][0], spans[-1][1]
                    if tail > head:
                        assert n > r.size - tail and n > head, (spans, n)
                    else:
                        assert n > head - tail, (spans, n)
                    continue
                spans = sorted(r.spans.values())
                assert 0 <= at and at + n <= r.size
                assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
                live.append(next_id)
                next_id += 1
            if not live:
                assert not r.spans
        for uid in live:
            r.free(uid)
        assert r.alloc(next_id, 10) == 0  # empty: from the start again
        assert r.alloc(next_id + 1, 1 << 16) is None  # more than what is free
    finally:
        r.close()


def test_ring_exactly_full_after_wrapping_has_no_room():
    from gtar_logd._writer import _Region
    r = _Region(3 * 4096)
    try:
        assert [r.alloc(i, 4096) for i in range(3)] == [0, 4096, 8192]
        r.free(0)
        assert r.alloc(3, 4096) == 0  # wraps into the freed start
        # Full again, tail == head: units 1 and 2 are still in flight.
        assert r.alloc(4, 4096) is None
        r.free(1)
        assert r.alloc(6, 4096) == 4096
    finally:
        r.close()


def test_a_full_region_never_overwrites_frames_in_flight(client, archive):
    # A budget of exactly three page-aligned frames: the ring fills exactly,
    # wraps and fills again while frames are in flight.
    frames = [np.full((1024, 1024), i, np.float32) for i in range(12)]  # 4 MiB each
    with client.writer(archive, max_pending_bytes=3 * frames[0].nbytes) as w:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, a in enumerate(frames):
                w.write_tensors(str(i), {"a": a})
        w.flush(60)
    for i, a in enumerate(frames):
        assert np.array_equal(client.read_frame(archive, str(i))["a"], a), i


@pytest.mark.parametrize("shared_memory", [None, False])
def test_arrays_may_change_as_soon_as_write_returns(client, archive, shared_memory):
    """A state_dict's .numpy() views change as training goes on: each frame
    must hold the values at the time of its write."""
    live = np.zeros((1 << 20,), np.float32)  # 4 MiB, updated in place
    with client.writer(archive, shared_memory=shared_memory) as w:
        for i in range(5):
            live[:] = i
            w.write_tensors(str(i), {"p": live})
        live[:] = -1
        w.flush(60)
    for i in range(5):
        assert np.all(client.read_frame(archive, str(i))["p"] == i), i


def test_a_40_mib_record_round_trips_binary_and_utf8(client, archive):
    """Records bigger than one gRPC message go in chunks and come back in
    ranges: bit-exact, inside a frame."""
    n = 40 << 20
    binary = ((np.arange(n, dtype=np.uint64) * 2654435761) >> 13).astype(np.uint8).tobytes()
    text = ("ünïcødé → 模型 ✓ " * (n // 30)).encode()
    w = client.writer(archive)
    w.write_frame("1", [("t", "x", np.ones(3, np.float32))],
                  records=[("big/binary.u8.uni", binary), ("big/text.json", text)])
    w.flush(120)
    w.close()
    assert client.read_record(archive, "big/binary.u8.uni") == binary
    assert client.read_record(archive, "big/text.json") == text


def test_located_reads_match_streamed_reads_and_are_checked(daemon, client, archive):
    """On the Unix socket the owner reads stored tensors from the archive file
    itself; the arrays are the ones the streamed path returns. A file replaced
    under the location (compaction) is refused, and verify=True catches bytes
    that do not match their CRC."""
    from gtar_logd import Client
    from gtar_logd._proto import logd_pb2 as pb
    from gtar_logd.client import _Files
    from gtar_logd.errors import GtarLogdError
    data = _all_dtypes()
    data["big"] = np.random.default_rng(2).standard_normal((5, 1 << 20)).astype(np.float32)
    client.write_frame(archive, 0, data)
    client.write_frame(archive, 1, {"big": data["big"] * 3})
    # The daemon located every tensor for us (we own the file) ...
    req = pb.GetFrameRequest(archive=archive, index="0", locate=True)
    infos = [m.tensor for m in client.stub.GetFrame(req) if m.WhichOneof("msg") == "tensor"]
    assert infos and all(i.HasField("location") for i in infos)
    assert all(i.location.length == i.size_bytes for i in infos)
    # ... but not over TCP (no identity), nor when not asked.
    with Client(daemon.tcp_address) as tcp:
        tcp_infos = [m.tensor for m in tcp.stub.GetFrame(req) if m.WhichOneof("msg") == "tensor"]
        assert tcp_infos and not any(i.HasField("location") for i in tcp_infos)
        streamed = tcp.read_frame(archive, "0")
    req.locate = False
    assert not any(m.tensor.HasField("location") for m in client.stub.GetFrame(req)
                   if m.WhichOneof("msg") == "tensor")
    located = client.read_frame(archive, "0")
    assert set(located) == set(streamed) == set(data)
    for k in data:
        assert _bits(located[k]) == _bits(streamed[k]) == _bits(data[k]), k
    with Client(daemon.address, verify=True) as v:
        assert np.array_equal(v.tensor_history(archive, "big")[1][1], data["big"] * 3)
    big = next(i for i in infos if i.path.endswith("big/value.f32.uni") or "big" in i.group)
    loc = big.location
    # A flipped byte: verify=True refuses it.
    with open(loc.file, "r+b") as f:
        f.seek(loc.offset + 7)
        b = f.read(1)
        f.seek(loc.offset + 7)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(GtarLogdError, match="CRC-32 mismatch"):
        _Files("test").read_array(big, verify=True)
    # The file replaced by a copy (a new inode, as compaction leaves it).
    tmp = loc.file + ".new"
    with open(loc.file, "rb") as src, open(tmp, "wb") as dst:
        dst.write(src.read())
    os.replace(tmp, loc.file)
    with pytest.raises(GtarLogdError, match="was replaced"):
        _Files("test").read_array(big, verify=False)


def test_batched_located_frames_arrive_in_order_and_match_the_streamed_ones(
        daemon, client, archive):
    """With `batch`, located frames come many to a message; the client's
    arrays (small ones sharing a block per batch) equal the streamed ones,
    frame by frame, in the archive's order."""
    from gtar_logd import Client
    from gtar_logd._proto import logd_pb2 as pb
    n = 300  # several batches: 16, 32, 64, 128, then the rest
    with client.writer(archive) as w:
        for i in range(n):
            w.write_tensors(i, {"a": np.arange(3, dtype=np.float64) * i,
                                "m": np.array([[i % 2 == 0, True], [False, i % 3 == 0]]),
                                "s": np.float32(i), "e": np.zeros((0, 3), np.float16)})
        w.flush(120)
    group = "tensors/a"
    req = pb.TensorHistoryRequest(archive=archive, group=group, name="value", locate=True,
                                  batch=True)
    msgs = list(client.stub.TensorHistory(req))
    assert {m.WhichOneof("msg") for m in msgs} == {"located"}
    sizes = [len(m.located.frames) for m in msgs]
    assert sizes[:4] == [16, 32, 64, 128] and sum(sizes) == n, sizes
    assert [f.frame for m in msgs for f in m.located.frames] == client.list_frames(archive)
    req.batch = False
    assert {m.WhichOneof("msg") for m in client.stub.TensorHistory(req)} == {"frame", "tensor"}
    with Client(daemon.tcp_address) as tcp:
        for key in ("a", "m", "s", "e"):
            got, want = client.tensor_history(archive, key), tcp.tensor_history(archive, key)
            assert [i for i, _ in got] == [i for i, _ in want] == [str(i) for i in range(n)]
            for (_, x), (_, y) in zip(got, want):
                assert x.dtype == y.dtype and x.shape == y.shape and _bits(x) == _bits(y), key
            got[5][1][...] = 0  # a view into a shared block: writable, and alone
            assert _bits(got[6][1]) == _bits(want[6][1])
        frame = client.read_frame(archive, 7)
        assert set(frame) == {"a", "m", "s", "e"}
        for k, v in tcp.read_frame(archive, 7).items():
            assert _bits(frame[k]) == _bits(v), k


def test_a_second_writer_of_the_same_group_is_refused_naming_the_first_unless_both_share(
        client, archive):
    x = np.arange(4, dtype=np.float32)
    with client.writer(archive) as w1:
        w1.write_tensors(0, {"w": x})
        w1.flush(timeout=30)
        # Refused when it opens, naming the process that holds the group.
        with pytest.raises(GtarLogdError) as e:
            client.writer(archive)
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "share" in msg, msg
    # Two writers that both share may write the same group at once.
    with client.writer(archive, share_group=True) as a, \
            client.writer(archive, share_group=True) as b:
        a.write_tensors(2, {"w": x})
        b.write_tensors(3, {"w": x + 1})
        a.flush(timeout=30)
        b.flush(timeout=30)
    assert client.list_frames(archive) == ["0", "2", "3"]
