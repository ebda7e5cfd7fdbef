"""Reading a box of a tensor (`Client.read_tensor(..., slice=)`, `get_frame`,
`read_frame`): numpy-style keys, only the box's bytes read -- streamed by the
daemon or read from the archive file (located) -- equal to numpy's slicing of
the whole tensor, for many random boxes over dtypes and ranks; a box that
does not fit is an error naming the tensor, its shape and the box.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from gtar_logd import Box, Client, GtarLogdError
from gtar_logd._slices import box_of, byte_runs

SHAPES = [(), (97,), (5, 7, 9), (3, 1, 64)]
DTYPES = [np.float32, np.float64, np.int64, np.uint8, np.float16, np.bool_]


def arrays():
    rng = np.random.default_rng(24)
    out = {}
    for i, shape in enumerate(SHAPES):
        for dt in DTYPES:
            n = int(np.prod(shape))
            if dt is np.bool_:
                a = rng.integers(0, 2, n).astype(bool)
            elif np.issubdtype(dt, np.floating):
                a = rng.standard_normal(n).astype(dt)
            else:
                a = rng.integers(0, 200, n).astype(dt)
            out[f"t{i}/{np.dtype(dt).name}"] = a.reshape(shape)
    return out


def random_key(rnd: random.Random, shape):
    """A numpy basic-indexing key that fits `shape` without clipping."""
    key = []
    for n in shape:
        c = rnd.randrange(4)
        if c == 0 and n > 0:
            i = rnd.randrange(n)
            key.append(i - n if rnd.random() < 0.5 else i)
        elif c == 1:
            key.append(slice(None))
        else:
            a = rnd.randrange(n + 1)
            b = rnd.randrange(a, n + 1)
            start = a - n if (a < n and rnd.random() < 0.3) else a
            stop = None if (b == n and rnd.random() < 0.5) else b
            key.append(slice(start, stop))
    # Sometimes fewer indices than dimensions, or '...' in front.
    if key and rnd.random() < 0.2:
        key = key[:rnd.randrange(len(key))]
    elif key and rnd.random() < 0.2:
        key = [Ellipsis] + key[rnd.randrange(1, len(key) + 1):]
    return tuple(key)


@pytest.fixture(scope="module")
def written(daemon):
    arrs = arrays()
    with Client(daemon.address) as c:
        c.write_frame("slices.zip", 0, arrs, mode="create")
    return arrs


@pytest.mark.parametrize("located", [True, False], ids=["located", "streamed"])
def test_random_boxes_equal_numpy_slicing(daemon, written, located):
    rnd = random.Random(7)
    with Client(daemon.address, read_files=located) as c:
        for key_name, a in written.items():
            for _ in range(15):
                key = random_key(rnd, a.shape)
                got = c.read_tensor("slices.zip", key_name, 0, slice=key)
                want = a[key]
                assert got.dtype == want.dtype and got.shape == want.shape, (key_name, key)
                assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (key_name, key)
        # The box as (offsets, shape) reads the same, with no shape asked first.
        a = written["t2/float32"]
        got = c.read_tensor("slices.zip", "t2/float32", 0, slice=Box((1, 0, 2), (3, 7, 4)))
        assert np.array_equal(got, a[1:4, :, 2:6])


def test_read_frame_applies_one_box_to_each_tensor(daemon):
    a = np.arange(60, dtype=np.int32).reshape(3, 4, 5)
    b = -np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    with Client(daemon.address) as c:
        c.write_frame("slices-frame.zip", 3, {"a": a, "b": b}, mode="create")
        for located in (True, False):
            c.read_files = located
            got = c.read_frame("slices-frame.zip", 3, slice=np.s_[1:, -2:, 2])
            assert set(got) == {"a", "b"}
            assert np.array_equal(got["a"], a[1:, -2:, 2]) and got["a"].shape == (2, 2)
            assert np.array_equal(got["b"], b[1:, -2:, 2])


@pytest.mark.parametrize("located", [True, False], ids=["located", "streamed"])
def test_a_box_that_does_not_fit_names_tensor_shape_and_box(daemon, written, located):
    with Client(daemon.address, read_files=located) as c:
        # Explicit boxes go to the daemon as they are: it names what is wrong.
        with pytest.raises(GtarLogdError) as e:
            c.read_tensor("slices.zip", "t2/int64", 0, slice=Box((0, 5, 0), (5, 3, 9)))
        msg = str(e.value)
        assert "INVALID_ARGUMENT" in msg and "value.i64.uni" in msg, msg
        assert "[5, 7, 9]" in msg and "dimension 1: 5:8 is outside 0:7" in msg, msg
        with pytest.raises(GtarLogdError, match="2 dimensions, the tensor 1"):
            c.read_tensor("slices.zip", "t1/uint8", 0, slice=Box((0, 0), (1, 1)))
        # numpy keys are checked here against the tensor's shape (numpy
        # would clip; a box read never does).
        with pytest.raises(IndexError) as e:
            c.read_tensor("slices.zip", "t1/float32", 0, slice=np.s_[90:100])
        msg = str(e.value)
        assert "[90:100]" in msg and "shape [97]" in msg and "outside 0:97" in msg, msg
        with pytest.raises(IndexError, match="index -6 is outside dimension 0 of size 5"):
            c.read_tensor("slices.zip", "t2/float32", 0, slice=np.s_[-6, :])
        with pytest.raises(IndexError, match="3 indices for 1 dimensions"):
            c.read_tensor("slices.zip", "t1/float32", 0, slice=np.s_[0, 0, 0])
        with pytest.raises(IndexError, match="step 2"):
            c.read_tensor("slices.zip", "t1/float32", 0, slice=np.s_[::2])


def test_keys_become_boxes_as_numpy_reads_them():
    shape = (4, 5, 6)
    assert box_of(np.s_[1:3], shape) == Box((1, 0, 0), (2, 5, 6))
    assert box_of(np.s_[..., -1], shape) == Box((0, 0, 5), (4, 5, 1), (2,))
    assert box_of(np.s_[2, 1:, :-2], shape) == Box((2, 1, 0), (1, 4, 4), (0,))
    assert box_of((), ()) == Box((), ())
    assert box_of(np.s_[3:1], (5,)) == Box((3,), (0,))
    # Runs: whole inner dimensions merge into one run per outer index.
    assert byte_runs(Box((1, 0, 0), (2, 5, 6)), shape, 4) == [(120, 240)]
    assert byte_runs(Box((0, 1, 0), (2, 2, 6)), shape, 1) == [(6, 12), (36, 12)]
    assert byte_runs(Box((0, 0, 2), (1, 2, 3)), shape, 2) == [(4, 6), (16, 6)]
    assert byte_runs(Box((), ()), (), 8) == [(0, 8)]
    assert byte_runs(Box((0,), (0,)), (3,), 8) == []
