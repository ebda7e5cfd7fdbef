"""Boxes of tensors: numpy-style keys to (offsets, shape), and the byte runs
a box occupies in a row-major tensor (for reading only those).

Pure functions, no I/O. A key follows numpy's basic indexing -- a tuple of
`slice`s and ints, `...` allowed, missing trailing dimensions whole -- with
two differences: a step other than 1 is refused, and a bound past the
tensor's end is an error (numpy clips it silently), so a box that does not
fit is never read as a smaller one.
"""
from __future__ import annotations

import numbers


class Box:
    """A box inside a tensor: `offsets` where it starts and `shape` its
    extent, one entry per dimension; `squeeze`: dimensions indexed by an
    int (dropped from the array read, as numpy drops them)."""

    __slots__ = ("offsets", "shape", "squeeze")

    def __init__(self, offsets, shape, squeeze=()):
        self.offsets = tuple(int(o) for o in offsets)
        self.shape = tuple(int(n) for n in shape)
        self.squeeze = tuple(squeeze)
        if len(self.offsets) != len(self.shape):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.shape)} dimensions")

    def __eq__(self, other):
        return isinstance(other, Box) and (self.offsets, self.shape, self.squeeze) == (
            other.offsets, other.shape, other.squeeze)

    def __repr__(self):
        return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(self.offsets, self.shape)) + "]"

    @property
    def elems(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def box_of(key, shape, what: str = "tensor") -> Box:
    """The box numpy's `a[key]` reads from an array of `shape`.

    `key`: a `Box`, a `slice`, an int, `...`, or a tuple of those. Raises
    IndexError naming `what`, its shape and the key when it does not fit.
    """
    shape = tuple(int(n) for n in shape)
    if isinstance(key, Box):
        return key
    parts = key if isinstance(key, tuple) else (key,)

    def bad(why):
        return IndexError(f"slice {_show(key)} of {what} of shape {list(shape)}: {why}")

    if sum(p is Ellipsis for p in parts) > 1:
        raise bad("more than one '...'")
    if any(p is None for p in parts):
        raise bad("np.newaxis (None) adds a dimension; read the box, then add it")
    n_index = sum(p is not Ellipsis for p in parts)
    if n_index > len(shape):
        raise bad(f"{n_index} indices for {len(shape)} dimensions")
    if Ellipsis in parts:
        i = parts.index(Ellipsis)
        parts = parts[:i] + (slice(None),) * (len(shape) - n_index) + parts[i + 1:]
    else:
        parts = parts + (slice(None),) * (len(shape) - n_index)
    offsets, extent, squeeze = [], [], []
    for d, (p, n) in enumerate(zip(parts, shape)):
        if isinstance(p, numbers.Integral) and not isinstance(p, bool):
            i = int(p) + n if p < 0 else int(p)
            if not 0 <= i < n:
                raise bad(f"index {int(p)} is outside dimension {d} of size {n}")
            offsets.append(i)
            extent.append(1)
            squeeze.append(d)
        elif isinstance(p, slice):
            if p.step not in (None, 1):
                raise bad(f"dimension {d}: step {p.step}; only contiguous boxes (step 1) "
                          f"are read")
            start = _bound(p.start, 0, n, d, bad)
            stop = _bound(p.stop, n, n, d, bad)
            if start > n or stop > n:
                raise bad(f"dimension {d}: {start}:{stop} is outside 0:{n}")
            offsets.append(start)
            extent.append(max(0, stop - start))
        else:
            raise bad(f"dimension {d}: {p!r} is not a slice or an int")
    return Box(offsets, extent, squeeze)


def _bound(v, default, n, d, bad):
    if v is None:
        return default
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise bad(f"dimension {d}: bound {v!r} is not an int")
    v = int(v)
    if v < 0:
        v += n
        if v < 0:
            raise bad(f"dimension {d}: bound {v - n} is before the start of size {n}")
    return v


def _show(key) -> str:
    parts = key if isinstance(key, tuple) else (key,)

    def one(p):
        if isinstance(p, slice):
            s = f"{'' if p.start is None else p.start}:{'' if p.stop is None else p.stop}"
            return s + (f":{p.step}" if p.step is not None else "")
        return "..." if p is Ellipsis else repr(p)
    return "[" + ", ".join(one(p) for p in parts) + "]"


def byte_runs(box: Box, shape, item: int) -> list:
    """[(byte offset in the tensor, bytes)] of the box's contiguous runs in a
    row-major tensor of `shape`, in the box's own row-major order: the
    innermost dimensions the box covers whole are merged into one run."""
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if box.elems == 0:
        return []
    if nd == 0:
        return [(0, item)]
    k = 0
    for d in range(nd - 1, -1, -1):
        if box.offsets[d] != 0 or box.shape[d] != shape[d]:
            k = d
            break
    strides = [1] * nd
    for d in range(nd - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    run = item
    for n in box.shape[k:]:
        run *= n
    count = 1
    for n in box.shape[:k]:
        count *= n
    runs = []
    for r in range(count):
        rest, at = r, box.offsets[k] * strides[k]
        for d in range(k - 1, -1, -1):
            at += (box.offsets[d] + rest % box.shape[d]) * strides[d]
            rest //= box.shape[d]
        runs.append((at * item, run))
    return runs
