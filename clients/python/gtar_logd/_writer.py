"""The background writer: one Write stream, resent across daemon restarts.

Invariants a reader must not break:

* The caller's thread only builds a `Unit` (a snapshot of its arrays, see
  `stage`, or for GTARLogger host copies; no serialization) and appends it
  to `_pending`; everything else happens on
  other threads: gRPC's request thread runs `_requests()` (which turns units
  into messages lazily, chunk by chunk) and our thread `_run()` reads the
  daemon's acks.
* A unit stays in `_pending`, and its bytes count against
  `max_pending_bytes`, until the daemon acks it *durable*. A full budget
  blocks the caller (with a warning), it never drops anything.
* Acks carry the unit's sequence number on the current stream; the stream
  generation (`_gen`) tells old acks from new.
* When the stream breaks (daemon killed or restarted), we reopen it in
  APPEND mode, ask ListFrames which frames made it into the archive, drop
  those units (they were received, so they are on disk) and resend the rest
  in their original order. A frame index that already existed before this
  writer started is not taken as proof, so it is resent. No frame is lost,
  none is written twice (unless the index pre-existed).
* Shared memory (Unix socket only): the writer has one memfd (`_Region`),
  offered to the daemon on every (re)open. `stage()` copies a unit's tensors
  into a span of it in the caller's thread -- a snapshot, so the caller's
  arrays may change right after, and no reference to them is kept (with JAX
  a kept reference stops XLA from reusing the buffer in place, which cost
  training ~5 %). Streams the daemon attached the region to send only the
  span (`shm_chunk`); others send the span's bytes. A span is freed only when
  its unit is durable (or found in the archive), so bytes a daemon may still
  be reading never change. Refused at the first open: no region, `chunk`s.
* An outage is logged in one line when the stream breaks and one when it is
  back (with what is resent), at most once per `OUTAGE_LOG_INTERVAL`;
  retries in between are silent. User-facing text says "frame", not "unit".
* A writer opened with `job`/`rank`/`world_size` is one rank of a job: the
  daemon writes frame F once every rank committed its part of F (whole
  tensors, or `Shard`s of global tensors). An `aborted` answer (a rank died,
  the frame deadline passed) drops the unit -- nothing of the frame was
  stored, on any rank -- and is kept in `aborted`; one that says the parts
  disagree (`bad_input`: overlapping slices, holes, shapes) fails the writer
  like any refused write.
"""
from __future__ import annotations

import collections
import fcntl
import itertools
import logging
import mmap
import os
import threading
import time
import warnings

import grpc
import numpy as np

from . import dtypes
from ._proto import logd_pb2 as pb
from ._names import DEFAULT_COLLECTION, VALUE_NAME, join, key_to_group
from .errors import DaemonUnavailable, DurabilityTimeout, GtarLogdError, NotFound, WriteFailed

log = logging.getLogger("gtar_logd")

# Under the 4 MiB message limit common to gRPC stacks, with room for the envelope.
DEFAULT_CHUNK_BYTES = 2 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def record_messages(path, data, step):
    """The messages that write one constant record: inline when it fits in
    one chunk, else a header with its size and the bytes in chunks, so
    records of any size travel (a message is limited to a few MiB)."""
    mv = memoryview(data).cast("B")
    if len(mv) <= step:
        yield pb.WriteRequest(record=pb.ConstRecord(path=path, data=bytes(mv)))
        return
    yield pb.WriteRequest(record=pb.ConstRecord(path=path, size=len(mv)))
    for off in range(0, len(mv), step):
        yield chunk_message(mv[off:off + step])


def chunk_message(data) -> bytes:
    """`WriteRequest{chunk: Chunk{data}}` encoded by hand.

    Building it through protobuf copies the payload three times (bytes(),
    the message, SerializeToString) and ran at ~0.5 GB/s; this is one copy
    (~7 GB/s). Field numbers: WriteRequest.chunk = 4, Chunk.data = 1, both
    length-delimited (wire type 2). A test checks it against protobuf.
    """
    inner = b"\x0a" + _varint(len(data))
    return b"".join((b"\x22", _varint(len(inner) + len(data)), inner, data))
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
}
_ids = itertools.count()

# Tensors start on a page boundary in a shared memory region, so the daemon
# writes whole blocks straight from it (O_DIRECT wants aligned memory).
_SHM_ALIGN = 4096


def _align(n: int) -> int:
    return -(-n // _SHM_ALIGN) * _SHM_ALIGN


class _Region:
    """A memfd that tensor bytes go through instead of the socket.

    Sealed against shrinking (the daemon maps it, and refuses a file that
    could shrink under its mapping) and mapped here too: a tensor's bytes
    are one memcpy into pages that stay warm from save to save, and the
    daemon writes them to disk straight from those pages (O_DIRECT).

    A ring of spans, one per unit in flight, freed when the unit is durable.
    When nothing is in flight the next span starts at 0 again, so a run that
    saves one frame at a time touches (and keeps resident) one frame's worth
    of memory, not the whole region.
    """

    def __init__(self, size: int):
        self.fd = os.memfd_create("gtar-logd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.size = size
        # Orders taking views against close(). A view holds an export of the
        # map, which makes close() leave the map alone (BufferError) until
        # the last view is gone, so no copy ever touches unmapped memory.
        self._lock = threading.Lock()
        self.spans = collections.OrderedDict()  # unit id -> (start, end), oldest first

    def alloc(self, uid: int, n: int):
        """Start of a free span of `n` bytes for unit `uid`, or None."""
        if not self.spans:
            at = 0 if n <= self.size else None
        else:
            head = next(iter(self.spans.values()))[0]
            tail = next(reversed(self.spans.values()))[1]
            # Spans are never empty, so tail == head means wrapped and full.
            if tail > head:  # free: [tail, size) and [0, head)
                at = tail if tail + n <= self.size else (0 if n <= head else None)
            else:  # wrapped: free [tail, head)
                at = tail if tail + n <= head else None
        if at is not None and n > 0:  # nothing to hold: no span
            self.spans[uid] = (at, at + n)
        return at

    def free(self, uid: int) -> None:
        self.spans.pop(uid, None)

    def write(self, items) -> list:
        """Copy each (offset, memoryview) into the region; returns the copies
        (uint8 views of the region)."""
        with self._lock:
            if self._map is None:
                raise WriteFailed("gtar-logd: the writer's shared memory region is closed")
            views = [np.frombuffer(self._map, np.uint8, count=len(mv), offset=at)
                     for at, mv in items]
        # One thread: two measured no faster inside a training loop.
        for dst, (_, mv) in zip(views, items):
            np.copyto(dst, np.frombuffer(mv, np.uint8))  # releases the GIL
        return views

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:
                    # Units still hold views (an aborted writer): the map is
                    # unmapped when the last of them goes.
                    pass
                self._map = None
                os.close(self.fd)


class Unit:
    """What goes between BeginFrame and CommitFrame (or loose records)."""

    __slots__ = ("id", "index", "tensors", "records", "scalars", "nbytes",
                 "sent_gen", "received", "t_submit", "parts_done", "place", "repl_left",
                 "slices")

    def __init__(self, index=None, tensors=(), records=(), scalars=(), slices=None):
        self.id = next(_ids)
        self.index = index  # None: loose records/scalars, no frame
        self.tensors = list(tensors)  # (group, name, wire dtype, shape, ndarray)
        # Tensor number -> (offsets, global shape): the tensor is that slice
        # of a global tensor (writers of a job only).
        self.slices = dict(slices or {})
        self.records = list(records)  # (path, bytes)
        self.scalars = list(scalars)  # (group, name, index, value)
        self.nbytes = (sum(t[4].nbytes for t in self.tensors)
                       + sum(len(r[1]) for r in self.records) + 64 * len(self.scalars))
        self.sent_gen = None
        self.received = False
        self.t_submit = time.monotonic()
        # Loose units: the daemon makes each record / scalar a frame of its
        # own (one ack each); parts already durable are not resent.
        self.parts_done = set()
        # Tensor number -> its offset in the writer's shared memory (staged).
        self.place = {}
        # Commits of this unit acked durable and not yet replicated.
        self.repl_left = 0

    def parts(self):
        """Loose units: [(k, kind, item)] not yet durable."""
        out = [(k, "record", r) for k, r in enumerate(self.records)]
        out += [(len(self.records) + k, "scalar", x) for k, x in enumerate(self.scalars)]
        return [p for p in out if p[0] not in self.parts_done]


def _summary(units) -> str:
    """'3 frames ('4', '5', '6')', '1 frame ('2') and 1 record write', ''."""
    units = list(units)
    idx = [u.index for u in units if u.index is not None]
    loose = len(units) - len(idx)
    out = []
    if idx:
        shown = ", ".join(repr(i) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
        out.append(f"{len(idx)} frame{'s' * (len(idx) != 1)} ({shown})")
    if loose:
        out.append(f"{loose} record write{'s' * (loose != 1)}")
    return " and ".join(out)


def _short(why: str, limit: int = 120) -> str:
    why = " ".join(str(why).split())
    return why if len(why) <= limit else why[:limit - 3] + "..."


#: Seconds between two logged stream outages of one writer.
OUTAGE_LOG_INTERVAL = 60.0


class _RateLimit:
    """Allows one event per `interval` seconds and counts the others."""

    def __init__(self, interval: float):
        self.interval = interval
        self.last = None
        self.quiet = 0

    def allow(self, now: float):
        """(allowed, events not allowed since the last allowed one)."""
        if self.last is None or now - self.last >= self.interval:
            quiet, self.quiet, self.last = self.quiet, 0, now
            return True, quiet
        self.quiet += 1
        return False, 0


def tensor(group: str, name: str, array):
    """A tensor entry for `Unit`: numpy array kept as-is when possible."""
    a = dtypes.as_le_array(array)
    return (group, name, dtypes.to_wire(a.dtype), [int(s) for s in a.shape], a)


class Shard:
    """A slice of a global tensor, as one rank of a job sends it: `array` is
    the box of the global tensor (of shape `global_shape`) that starts at
    `offsets`. The slices the ranks send of one tensor must cover it exactly
    once (a replicated tensor is sent by one rank only)."""

    __slots__ = ("array", "offsets", "global_shape")

    def __init__(self, array, offsets, global_shape):
        self.array = array
        self.offsets = [int(o) for o in offsets]
        self.global_shape = [int(n) for n in global_shape]
        shape = np.shape(array)
        if len(self.offsets) != len(shape) or len(self.global_shape) != len(shape):
            raise ValueError(
                f"Shard: offsets {self.offsets} and global_shape {self.global_shape} must have "
                f"one entry per dimension of the array (shape {tuple(shape)})")
        for d, (o, n, g) in enumerate(zip(self.offsets, shape, self.global_shape)):
            if o < 0 or o + n > g:
                raise ValueError(f"Shard: dimension {d}: {o}:{o + n} is outside 0:{g}")

    def __repr__(self):
        box = ", ".join(f"{o}:{o + n}" for o, n in zip(self.offsets, np.shape(self.array)))
        return f"Shard([{box}] of {self.global_shape})"


def unit_tensors(tensors):
    """(group, name, array or Shard) -> (Unit tensors, {number: (offsets, global shape)})."""
    out, slices = [], {}
    for k, (g, n, a) in enumerate(tensors):
        if isinstance(a, Shard):
            slices[k] = (a.offsets, a.global_shape)
            a = a.array
        out.append(tensor(g, n, a))
    return out, slices


class Writer:
    """Streams `Unit`s to one archive in the background.

    :param mode: 'append' (create if missing) or 'create' (replace). After a
        reconnect the stream is always reopened in append mode.
    :param max_pending_bytes: memory budget for data not yet acked durable;
        `submit` blocks (and warns) while it is exceeded.
    :param reconnect_timeout: how long to keep trying to reach a daemon that
        went away before failing.
    :param shared_memory: pass tensor bytes through a memfd instead of the
        socket (fewer copies, less CPU). None (default): when the address is
        a Unix socket; the daemon refuses it (and we send bytes as usual)
        when it runs as another user. False: never. True: also try over TCP
        (it will be refused: for tests).
    :param share_group: let other streams that also ask to share write the
        same archive and group at the same time (e.g. several processes of
        one job). Without it, a second live stream on the same archive and
        group is refused with an error naming the one writing it, so two runs
        can't interleave their frames by accident.
    :param job, rank, world_size: make this writer rank `rank` of the
        `world_size` processes of job `job` (any string all ranks share,
        e.g. a run id): each frame is written once every rank has written its
        part of it, as one frame (see `Shard`); give all three or none.
    """

    def __init__(self, client, archive: str, mode: str = "append", group: str | None = None,
                 compression: int = 0, max_pending_bytes: int = 1 << 30,
                 reconnect_timeout: float = 120.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 open_timeout: float = 10.0, shared_memory: bool | None = None,
                 share_group: bool = False, job: str | None = None, rank: int | None = None,
                 world_size: int | None = None):
        if mode not in ("append", "create"):
            raise ValueError(f"mode must be 'append' or 'create', not {mode!r}")
        given = [x is not None for x in (job, rank, world_size)]
        if any(given) and not all(given):
            raise ValueError("job, rank and world_size go together: give all three or none")
        self.ranks = None
        if all(given):
            if not 0 <= int(rank) < int(world_size):
                raise ValueError(f"rank {rank} is not in 0..{int(world_size) - 1} "
                                 f"(world_size {world_size})")
            self.ranks = pb.RankSpec(job=str(job), rank=int(rank), world_size=int(world_size))
        # Frames of a job dropped whole: (index, reason, missing ranks).
        self.aborted = []
        self.client = client
        self.archive = archive
        self.group = group or ""
        self.mode = mode
        self.compression = compression
        self.share_group = bool(share_group)
        self.max_pending_bytes = int(max_pending_bytes)
        self.reconnect_timeout = reconnect_timeout
        self.chunk_bytes = int(chunk_bytes)
        if shared_memory is None:
            shared_memory = client.address.startswith("unix:")
        self._region = None
        if shared_memory and hasattr(os, "memfd_create"):
            try:
                self._region = _Region(max(self.max_pending_bytes, _SHM_ALIGN))
            except OSError as e:
                log.info("gtar-logd: no shared memory (%s); sending bytes", e)
        self._shm_gen = 0  # the stream generation the daemon attached the region to

        self._cond = threading.Condition()
        self._pending = collections.OrderedDict()  # id -> Unit, in submit order
        self._pending_bytes = 0
        self._to_send = collections.deque()  # units not yet sent on this stream
        self._inflight = {}  # seq -> Unit, for the current generation
        self._gen = 0
        self._opened_gen = 0
        self._error = None
        self._callers_waiting = 0  # callers in _caller_wait (under _cond)
        self._closing = False
        self._closed = False
        self._call = None
        self._resending = ""  # what the last reconnect resends, for its log line
        # One line when a stream breaks and one when it is back; a daemon
        # that flaps must not flood the training job's stderr.
        self._outage_log = _RateLimit(OUTAGE_LOG_INTERVAL)
        # Statistics, for benchmarks and tests.
        self.reconnects = 0  # times the stream came back after breaking
        self.resent = 0  # frames (and record writes) sent again after a reconnect
        self.skipped = 0
        self.durable_count = 0
        self.replicated_count = 0
        # With a daemon started with --remote: (gen, seq) of commits acked
        # durable and not yet replicated, to their unit (counted in
        # replicated_count once every commit of it is, like durable_count);
        # commits whose stream broke before their replicated ack (the daemon
        # still replicates them from its disk).
        self._replicating = False
        self._awaiting_repl = {}
        self._repl_unconfirmed = []
        self.blocked_seconds = 0.0
        self.shm_bytes = 0  # tensor bytes sent through shared memory
        self.shm_refused = None  # the daemon's reason, when it refused a region

        client.ping(timeout=open_timeout)
        self._initial_frames = set() if mode == "create" else set(self._list_frames())
        self._thread = threading.Thread(target=self._run, name="gtar-logd-writer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + open_timeout
        with self._cond:
            while self._opened_gen == 0 and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._caller_wait(left)
            if self._error is not None:
                raise self._error
            if self._opened_gen == 0:
                self._closing = True
                self._cond.notify_all()
                raise DaemonUnavailable(client.address, f"no answer to opening {archive!r} "
                                                        f"within {open_timeout:.0f} s")

    # ----------------------------------------------------------- public API
    @property
    def stages(self) -> bool:
        """Whether `stage` copies into shared memory (else it makes private copies)."""
        return self._region is not None

    def stage(self, unit: Unit) -> None:
        """Snapshot the unit's tensors now, so their arrays may change (or be
        freed) as soon as this returns: into shared memory (waiting, like
        `submit`, while the budget is spent), else -- no region, or a unit
        bigger than it -- into private copies. Call before `submit`."""
        region = self._region
        sizes = [_align(t[4].nbytes) for t in unit.tensors]
        need = sum(sizes)
        at = None
        if region is not None and unit.tensors and need <= region.size:
            # The region is the size of the memory budget, so no room in it
            # means the budget is spent: wait for the daemon, as `submit`
            # would, rather than make a private copy (fresh pages cost
            # several times the copy into warm shared memory).
            got = []

            def room():
                if self._region is not region:  # dropped meanwhile: copy
                    return True
                got.append(region.alloc(unit.id, need))
                return got[-1] is not None

            with self._cond:
                self._wait_for(room)
                self._check()
            at = got[-1] if got else None
        if at is None:
            unit.tensors = [(g, n, c, s, np.array(a, copy=True)) for g, n, c, s, a in unit.tensors]
            return
        items = []
        for k, size in enumerate(sizes):
            unit.place[k] = at
            items.append((at, dtypes.byte_view(unit.tensors[k][4])))
            at += size
        views = region.write(items)
        unit.tensors = [(g, n, c, s, v) for (g, n, c, s, _), v in zip(unit.tensors, views)]

    def submit(self, unit: Unit) -> None:
        """Queue a unit; blocks while the memory budget is exceeded."""
        with self._cond:
            self._check()
            self._wait_for(lambda: self._pending_bytes + unit.nbytes <= self.max_pending_bytes)
            self._check()
            self._pending[unit.id] = unit
            self._pending_bytes += unit.nbytes
            self._to_send.append(unit)
            self._cond.notify_all()

    def write_frame(self, index: str, tensors=(), records=(), scalars=()) -> None:
        """Queue one frame: tensors as (group, name, array), records as (path, bytes).

        The arrays are copied before this returns (into shared memory when the
        daemon takes it), so they may be modified right away: a PyTorch
        `state_dict`'s `.numpy()` views keep changing as training goes on.
        On a writer of a job, an array may be a `Shard` (a slice of a global
        tensor); the frame is stored once every rank wrote its part.
        """
        ts, slices = unit_tensors(tensors)
        if slices and self.ranks is None:
            raise ValueError("a Shard is a slice of a tensor written by several ranks: open the "
                             "writer with job=, rank= and world_size=")
        unit = Unit(str(index), ts, records, scalars, slices)
        self.stage(unit)
        self.submit(unit)

    def write_tensors(self, index: str, arrays: dict, collection: str = DEFAULT_COLLECTION,
                      records: dict | None = None) -> None:
        """Queue a frame holding a dict of arrays (see `Client.write_frame`)."""
        ts = [(join(collection, key_to_group(k)), VALUE_NAME, a) for k, a in arrays.items()]
        self.write_frame(index, ts, list((records or {}).items()))

    def write_records(self, records, scalars=()) -> None:
        """Queue constant records (path, bytes) and scalars outside any frame."""
        self.submit(Unit(None, (), records, scalars))

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes

    def flush(self, timeout: float | None = None, replicated: bool = False) -> None:
        """Wait until everything submitted so far is durable; with
        `replicated=True` also until it is in the daemon's remote storage
        (`gtar-logd serve --remote`), so it survives the loss of this node."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._flush_durable(deadline, timeout)
        if not replicated:
            return
        with self._cond:
            if not self._replicating:
                raise WriteFailed(f"gtar-logd at {self.client.address!r} does not replicate "
                                  f"{self.archive!r}: start it with --remote s3://BUCKET/PREFIX")
            self._wait_while(lambda: self._awaiting_repl, deadline, lambda: (
                f"gtar-logd: {len(self._awaiting_repl)} durable commit(s) of "
                f"{self.archive!r} were not acknowledged as replicated within "
                f"{timeout:.0f} s (is the object store reachable? see the daemon's "
                f"health and log; they stay durable locally and are uploaded when it is)"))
            self._check()
            if self._repl_unconfirmed:
                n, self._repl_unconfirmed = len(self._repl_unconfirmed), []
                raise WriteFailed(
                    f"gtar-logd: the stream to the daemon broke before {n} durable commit(s) of "
                    f"{self.archive!r} were acknowledged as replicated; the daemon uploads them "
                    f"from its disk, but this writer cannot confirm it")

    def _flush_durable(self, deadline, timeout) -> None:
        with self._cond:
            self._wait_while(lambda: self._pending, deadline, lambda: (
                f"gtar-logd: {_summary(self._pending.values())} for {self.archive!r} "
                f"were not acknowledged as durable within {timeout:.0f} s. "
                f"Is the daemon at {self.client.address!r} running and its disk "
                f"writable? (reconnects so far: {self.reconnects})"))
            self._check()

    def _wait_while(self, busy, deadline, timed_out) -> None:
        """With the condition held: wait while `busy()` and no error; past
        `deadline`, raise DurabilityTimeout with the message `timed_out()`."""
        while busy() and self._error is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DurabilityTimeout(timed_out())
            self._caller_wait(1.0 if left is None else min(left, 1.0))

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to `timeout`), then end the stream."""
        if self._closed:
            return
        try:
            if self._error is None:
                self.flush(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._closed = True
                self._cond.notify_all()
            self._thread.join(10.0)
            call = self._call
            if self._thread.is_alive() and call is not None:
                call.cancel()
            with self._cond:
                if self._region is not None:
                    self._region.close()

    def __enter__(self):
        return self

    def __exit__(self, typ, val, tb):
        if typ is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Stop without waiting; pending units are dropped."""
        if self._closed and not self._thread.is_alive():
            return
        with self._cond:
            self._closing = True
            self._closed = True
            self._error = self._error or WriteFailed("writer aborted")
            self._cond.notify_all()
        call = self._call
        if call is not None:
            call.cancel()

    # ----------------------------------------------------------- internals
    def _wait_for(self, room) -> None:
        """With `_cond` held: block, with a warning, while units are pending
        and `room()` is false (nothing pending: go ahead, a unit bigger than
        the budget goes alone)."""
        t0 = None
        while not room():  # asked again after every wake-up, last when nothing is pending
            if not self._pending or self._error is not None:
                break
            if t0 is None:
                t0 = time.monotonic()
                warnings.warn(
                    f"gtar-logd: {self._pending_bytes / 2**20:.0f} MiB in "
                    f"{_summary(self._pending.values())} are waiting for the daemon (budget "
                    f"{self.max_pending_bytes / 2**20:.0f} MiB); blocking until it catches up",
                    RuntimeWarning, stacklevel=4)
            self._caller_wait(1.0)
        if t0 is not None:
            self.blocked_seconds += time.monotonic() - t0

    def _check(self):
        if self._error is not None:
            raise self._error
        if self._closed:
            raise WriteFailed("writer is closed")

    def _list_frames(self):
        try:
            return self.client.list_frames(self.archive, self.group or None)
        except NotFound:
            return []

    def _caller_wait(self, timeout) -> None:
        """`_cond.wait` on the caller's side (counted: see `_fail`)."""
        self._callers_waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._callers_waiting -= 1

    def _fail(self, err):
        with self._cond:
            first = self._error is None
            if first:
                self._error = err
            # A caller blocked in this writer raises the error right away:
            # logging it too would say it twice. Otherwise it is logged now
            # (a training loop may not call the writer again for an epoch).
            raised_now = self._callers_waiting > 0
            self._cond.notify_all()
        if first and not raised_now:
            log.error("%s (the writer's next call raises this)", err)

    def _run(self):
        outage = None  # (monotonic start, why) while the stream is down
        logged = False  # whether this outage's start was logged
        backoff = 0.05
        while True:
            with self._cond:
                if self._closing and not self._pending:
                    return
                self._gen += 1
                gen = self._gen
                self._inflight = {}
            why = None
            try:
                if gen > 1:
                    self._reconcile()
                first = self._opened_gen == 0
                mode = pb.CREATE if (self.mode == "create" and first) else pb.APPEND
                call = self.client.write_stream(self._requests(gen, mode))
                self._call = call
                for resp in call:
                    kind = resp.WhichOneof("msg")
                    if kind == "opened":
                        with self._cond:
                            first = self._opened_gen == 0
                            self._opened_gen = gen
                            self._replicating = resp.opened.replicating
                            # Commits of an older stream cannot be acked now.
                            self._repl_unconfirmed.extend(
                                k for k in self._awaiting_repl if k[0] != gen)
                            self._awaiting_repl = {k: u for k, u in self._awaiting_repl.items()
                                                   if k[0] == gen}
                            if resp.opened.shm_attached:
                                self._shm_gen = gen
                            elif self._region is not None:
                                self.shm_refused = resp.opened.shm_refused or "not supported"
                                log.info("gtar-logd: shared memory not used, sending bytes "
                                         "instead: %s", self.shm_refused)
                                if first:  # nothing is staged yet: do without
                                    self._region.close()
                                    self._region = None
                            self._cond.notify_all()
                        repaired = resp.opened.repaired
                        if outage is not None:
                            # A daemon that was killed repairs the archive on
                            # reopening it: expected, so part of this line.
                            self.reconnects += 1
                            (log.warning if logged else log.debug)(
                                "gtar-logd: reconnected to the daemon after %.1f s, resending "
                                "%s%s", time.monotonic() - outage[0],
                                self._resending or "nothing",
                                "; it repaired the archive on reopening it" if repaired else "")
                            if repaired:
                                log.debug("gtar-logd repaired %s: %s", self.archive, repaired)
                            outage = None
                        elif repaired:
                            log.warning("gtar-logd repaired %s on open: %s",
                                        self.archive, repaired)
                        backoff = 0.05
                    elif kind in ("received", "durable"):
                        self._on_ack(gen, getattr(resp, kind), kind == "durable")
                    elif kind == "aborted":
                        self._on_aborted(gen, resp.aborted)
                    elif kind == "replicated":
                        with self._cond:
                            u = self._awaiting_repl.pop((gen, resp.replicated.seq), None)
                            if u is not None:
                                u.repl_left -= 1
                                if u.repl_left == 0 and u.id not in self._pending:
                                    self.replicated_count += 1
                                self._cond.notify_all()
                with self._cond:
                    if self._closing and not self._pending:
                        return
                why = "the daemon ended the stream"
            except grpc.RpcError as e:
                code = e.code()
                with self._cond:
                    if self._closing and (code == grpc.StatusCode.CANCELLED or not self._pending):
                        return
                if code in _FATAL:
                    self._fail(WriteFailed(
                        f"gtar-logd refused the write to {self.archive!r}: "
                        f"{code.name}: {e.details()}"))
                    return
                why = f"{code.name}: {e.details()}"
            except DaemonUnavailable as e:  # a query during reconnection failed
                why = e.detail or "daemon unavailable"
            except GtarLogdError as e:
                why = str(e)
            except Exception as e:  # pragma: no cover - a bug; surface it
                self._fail(WriteFailed(f"gtar-logd writer crashed: {e!r}"))
                return
            now = time.monotonic()
            if outage is None:
                outage = (now, why)
                logged, quiet = self._outage_log.allow(now)
                if logged:
                    with self._cond:
                        kept = _summary(self._pending.values())
                    at_risk = (f"{kept} not yet stored: held in this process and resent "
                               f"when the daemon is back (lost only if this process ends "
                               f"first)" if kept else
                               "no frame was in flight, so nothing is at risk; frames saved "
                               "meanwhile are held in this process and sent when it is back")
                    log.warning(
                        "gtar-logd: lost the stream to the daemon at %s (%s); reconnecting for "
                        "up to %.0f s; %s%s", self.client.address, _short(why),
                        self.reconnect_timeout, at_risk,
                        f" ({quiet} more brief outage{'s' * (quiet != 1)} not logged)"
                        if quiet else "")
            elif now > outage[0] + self.reconnect_timeout:
                with self._cond:
                    kept = _summary(self._pending.values())
                self._fail(WriteFailed(
                    f"gtar-logd: lost the daemon at {self.client.address!r} ({_short(outage[1])}) "
                    f"and could not reconnect within {self.reconnect_timeout:.0f} s (last "
                    f"attempt: {_short(why)}); {kept} not stored in {self.archive!r}. "
                    f"Is `gtar-logd serve` running?"))
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _reconcile(self):
        """After a reconnect: drop units the archive already has, resend the rest."""
        present = set(self._list_frames()) - self._initial_frames
        with self._cond:
            keep = collections.deque()
            resend = []
            for u in list(self._pending.values()):
                if u.index is not None and u.index in present:
                    self._done(u)
                    self.skipped += 1
                elif u.index is None and self._records_present(u):
                    self._done(u)
                    self.skipped += 1
                else:
                    if u.sent_gen is not None:
                        resend.append(u)
                    keep.append(u)
            self._resending = _summary(resend)
            self._to_send = keep
            self._cond.notify_all()

    def _records_present(self, u):
        """Loose units: mark parts already in the archive as done; True if none is left."""
        import struct
        for k, kind, item in u.parts():
            if kind == "record":
                path, want = item[0], bytes(item[1])
            else:
                g, n, i, v = item
                path = f"{join(g)}/vars/{n}.f64.uni/{i}"
                want = struct.pack("<d", float(v))
            try:
                if self.client.read_record(self.archive, join(self.group, path)) == want:
                    u.parts_done.add(k)
            except NotFound:
                pass
        return not u.parts()

    def _done(self, u):
        if self._region is not None:
            self._region.free(u.id)
        if self._pending.pop(u.id, None) is not None:
            self._pending_bytes -= u.nbytes
            self.durable_count += 1
        self._cond.notify_all()

    def _on_ack(self, gen, ack, durable):
        with self._cond:
            if gen != self._gen:
                return
            entry = self._inflight.get(ack.seq)
            if entry is None:
                log.warning("gtar-logd: ack for unknown seq %d (index %r)", ack.seq, ack.index)
                return
            u, part = entry
            if u.index is not None and ack.index != u.index:
                log.warning("gtar-logd: ack seq %d names frame %r, expected %r",
                            ack.seq, ack.index, u.index)
            if not durable:
                u.received = True
                return
            del self._inflight[ack.seq]
            if self._replicating:
                self._awaiting_repl[(gen, ack.seq)] = u
                u.repl_left += 1
            if part is not None:
                u.parts_done.add(part)
                if u.parts():
                    return
            self._done(u)

    def _on_aborted(self, gen, ab):
        """A frame of a job was dropped whole (module docs)."""
        with self._cond:
            if gen != self._gen:
                return
            entry = self._inflight.pop(ab.seq, None)
            if entry is None:
                log.warning("gtar-logd: abort for unknown seq %d (index %r)", ab.seq, ab.index)
                return
            u = entry[0]
            if self._region is not None:
                self._region.free(u.id)
            if self._pending.pop(u.id, None) is not None:
                self._pending_bytes -= u.nbytes
            self.aborted.append((ab.index, ab.reason, list(ab.missing_ranks)))
            self._cond.notify_all()
        if ab.bad_input:
            self._fail(WriteFailed(f"gtar-logd refused frame {ab.index!r} of {self.archive!r}: "
                                   f"INVALID_ARGUMENT: {ab.reason}"))
        else:
            log.warning("gtar-logd: frame %r of %r was not stored: %s", ab.index, self.archive,
                        ab.reason)

    def _requests(self, gen, mode):
        region = self._region
        shm = None if region is None else pb.SharedMemory(fd=region.fd, size=region.size)
        yield pb.WriteRequest(open=pb.OpenArchive(
            archive=self.archive, mode=mode, group=self.group, compression=self.compression,
            shm=shm, share_group=self.share_group, ranks=self.ranks))
        use_shm = False
        if region is not None:
            # Whether shm_chunks may be sent is in the answer to `open`.
            with self._cond:
                while self._opened_gen != gen and self._gen == gen and self._error is None:
                    self._cond.wait(0.5)
                use_shm = self._shm_gen == gen
        seq = 0
        while True:
            with self._cond:
                while True:
                    if self._gen != gen:
                        return
                    if self._to_send:
                        u = self._to_send.popleft()
                        if u.id not in self._pending:
                            continue
                        break
                    if self._closing and not self._pending:
                        return
                    self._cond.wait(0.5)
                if u.sent_gen is not None:
                    self.resent += 1
                u.sent_gen = gen
                if u.index is None:
                    parts = u.parts()
                    for k, _, _ in parts:
                        self._inflight[seq] = (u, k)
                        seq += 1
                else:
                    parts = None
                    self._inflight[seq] = (u, None)
                    seq += 1
            yield from self._messages(u, parts, use_shm)

    def _messages(self, u, parts=None, use_shm=False):
        W = pb.WriteRequest
        if parts is not None:  # loose records / scalars: one frame each
            for _, kind, item in parts:
                if kind == "record":
                    yield from record_messages(item[0], item[1], self.chunk_bytes)
                else:
                    g, n, i, v = item
                    yield W(scalar=pb.Scalar(group=g, name=n, index=str(i), value=float(v)))
            return
        if u.index is not None:
            yield W(begin=pb.BeginFrame(index=u.index))
        step = self.chunk_bytes
        for k, (group, name, code, shape, arr) in enumerate(u.tensors):
            box = u.slices.get(k)
            if box is None:
                yield W(tensor=pb.TensorHeader(group=group, name=name, dtype=code, shape=shape))
            else:
                yield W(tensor=pb.TensorHeader(
                    group=group, name=name, dtype=code, shape=box[1],
                    slice=pb.TensorSlice(offsets=box[0], shape=shape)))
            mv = dtypes.byte_view(arr)
            at = u.place.get(k) if use_shm else None
            if at is not None:
                if len(mv):
                    self.shm_bytes += len(mv)
                    yield W(shm_chunk=pb.ShmChunk(offset=at, length=len(mv)))
                continue
            for off in range(0, len(mv), step):
                yield chunk_message(mv[off:off + step])
        for path, data in u.records:
            yield from record_messages(path, data, step)
        for group, name, index, value in u.scalars:
            yield W(scalar=pb.Scalar(group=group, name=name, index=str(index), value=float(value)))
        if u.index is not None:
            yield W(commit=pb.CommitFrame())
