"""The framework-agnostic client: queries, and frames of named numpy arrays.

`Client` wraps one gRPC channel to the daemon. `Client.writer()` opens a
background `Writer` (see `_writer.py`) that streams frames without blocking
the caller; `Client.write_frame()` / `read_frame()` are the simple
synchronous forms for a dict of arrays (a PyTorch state_dict via `.numpy()`,
a flattened JAX pytree, ...).
"""
from __future__ import annotations

import os
import zlib

import grpc
import numpy as np

from . import dtypes
from ._address import resolve, token_for, why_unreachable
from ._proto import logd_pb2 as pb
from ._proto import logd_pb2_grpc as pb_grpc
from ._slices import Box, box_of, byte_runs
from ._names import DEFAULT_COLLECTION, VALUE_NAME, group_to_key, join, key_to_group
from ._writer import Writer
from .errors import DaemonUnavailable, GtarLogdError, NotFound

# The daemon's messages are at most a few MiB; leave room.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _wrap(e: grpc.RpcError, address: str, what: str):
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return DaemonUnavailable(address, why_unreachable(address) or e.details() or "")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {e.details()}")
    return GtarLogdError(f"{what} failed: {code.name}: {e.details()}")


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = d.wait_for_ready
        self.compression = getattr(d, "compression", None)


class Client:
    """A connection to the gtar-logd daemon.

    :param address: gRPC target, `unix:/path/to.sock` or `host:port`; default:
        $GTAR_LOGD_ADDRESS, else the daemon's default socket.
    :param timeout: deadline in seconds for each query.
    :param read_files: on the Unix socket, ask the daemon where stored tensors
        lie in the archive file and read them from the file directly (one
        `pread` into the array's memory, no copies through gRPC). The daemon
        grants it only to the file's owner (or root); otherwise, and for
        compressed records, the bytes are streamed as before.
    :param verify: check the CRC-32 of tensors read from the file. Off by
        default: the daemon locates only committed entries, the file is
        checked to be the one it located them in (device and inode), and the
        bytes come through the same kernel path the daemon's own reads take;
        what a check would add is detecting bit rot on the disk, at the cost
        of `zlib.crc32` (~2 GB/s, about doubling a warm load). Streamed
        tensors are always checked by the daemon.
    """

    def __init__(self, address: str | None = None, timeout: float = 60.0, *,
                 read_files: bool = True, verify: bool = False):
        self.address = resolve(address)
        self.timeout = timeout
        self.read_files = read_files and self.address.startswith("unix:")
        self.verify = verify
        options = list(_CHANNEL_OPTIONS)
        if self.address.startswith("unix:"):
            # grpc-core sends the socket path as :authority, which the daemon's
            # HTTP/2 stack (h2) rejects with RST_STREAM(PROTOCOL_ERROR).
            options.append(("grpc.default_authority", "localhost"))
        self._raw_channel = grpc.insecure_channel(self.address, options=options)
        self._channel = self._raw_channel
        token = token_for(self.address)
        if token:
            # TCP carries no identity: the daemon wants its token on every call.
            self._channel = grpc.intercept_channel(self._raw_channel, _Bearer(token))
        self.stub = pb_grpc.LogdStub(self._channel)
        # Write takes pre-encoded messages (bytes) as well as protobuf objects,
        # so tensor chunks are encoded with one copy (see _writer.chunk_message).
        self.write_stream = self._channel.stream_stream(
            "/gtar.logd.v1.Logd/Write",
            request_serializer=_encode,
            response_deserializer=pb.WriteResponse.FromString,
        )

    # ------------------------------------------------------------ plumbing
    def close(self):
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ping(self, timeout: float = 5.0) -> None:
        """Raise DaemonUnavailable unless the daemon answers within `timeout`.

        A missing socket file or a refused connection raise at once; a daemon
        that accepted the connection gets the whole `timeout` to answer.
        """
        why = why_unreachable(self.address, timeout=min(timeout, 1.0))
        if why:
            raise DaemonUnavailable(self.address, why)
        try:
            self.stub.ListArchives(pb.ListArchivesRequest(prefix="\x00none"),
                                   timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DaemonUnavailable(self.address, f"no answer within {timeout:g} s") from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise DaemonUnavailable(self.address, e.details() or e.code().name) from None
            # Any other answer means someone is listening.

    def _unary(self, method: str, request, what: str):
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e, self.address, what) from None

    # ------------------------------------------------------------ queries
    def list_archives(self, prefix: str = "") -> list:
        """[{'archive', 'size_bytes', 'writing'}] of archives under the data dir."""
        r = self._unary("ListArchives", pb.ListArchivesRequest(prefix=prefix), "ListArchives")
        return [{"archive": a.archive, "size_bytes": a.size_bytes, "writing": a.writing}
                for a in r.archives]

    def describe(self, archive: str) -> pb.DescribeArchiveResponse:
        return self._unary("DescribeArchive", pb.DescribeArchiveRequest(archive=archive),
                           f"DescribeArchive({archive!r})")

    # ------------------------------------------------------------ lifecycle
    def compact(self, archive: str, *, keep_last: int | None = None,
                keep_every: int | None = None, keep_best: str | None = None,
                keep_newer_than: float | None = None, group: str | None = None,
                dry_run: bool = False, drop_best: bool = False,
                timeout: float | None = None) -> dict:
        """Apply a keep policy to `archive` while writers go on (the daemon's
        Compact): frames of records under `group` that no policy keeps are
        dropped; the newest frame never is. A frame kept by any policy is kept.

        :param keep_last: the last N frames
        :param keep_every: every K-th frame (indices that are multiples of K)
        :param keep_best: 'METRIC:min|max:N', e.g. 'val_loss:min:3' -- the best N
            by a metric GTARLogger stored per epoch
        :param keep_newer_than: frames written less than this many seconds ago
        :param dry_run: only say what would be kept and dropped
        :param drop_best: the frame GTARLogger(monitor=...) recorded as the best
            is kept unless this is set; then it may be dropped, with its record
        :returns: {'kept', 'dropped' (frame indices), 'old_size', 'new_size',
            'bytes_reclaimed', 'written'}
        """
        keep = pb.KeepPolicy(best=keep_best or "", drop_best=bool(drop_best))
        if keep_last is not None:
            keep.last = int(keep_last)
        if keep_every is not None:
            keep.every = int(keep_every)
        if keep_newer_than is not None:
            keep.newer_than_seconds = max(1, int(round(keep_newer_than)))
        req = pb.CompactRequest(archive=archive, group=group or "", keep=keep, dry_run=dry_run)
        try:
            r = self.stub.Compact(req, timeout=timeout or max(self.timeout, 3600.0))
        except grpc.RpcError as e:
            raise _wrap(e, self.address, f"Compact({archive!r})") from None
        return {"kept": list(r.kept), "dropped": list(r.dropped), "old_size": r.old_size_bytes,
                "new_size": r.new_size_bytes, "bytes_reclaimed": r.bytes_reclaimed,
                "written": r.written}

    def snapshot(self, archive: str, destination: str, timeout: float | None = None) -> dict:
        """A consistent copy of `archive` under the new name `destination` in
        the daemon's data directory, holding every frame acknowledged before
        the call (a reflink where the file system has one), while writers go on.

        :returns: {'destination', 'size', 'frames', 'reflinked_bytes'}
        """
        req = pb.SnapshotRequest(archive=archive, destination=destination)
        try:
            r = self.stub.Snapshot(req, timeout=timeout or max(self.timeout, 3600.0))
        except grpc.RpcError as e:
            raise _wrap(e, self.address, f"Snapshot({archive!r}, {destination!r})") from None
        return {"destination": r.destination, "size": r.size_bytes, "frames": r.frame_count,
                "reflinked_bytes": r.reflinked_bytes}

    def list_frames(self, archive: str, group: str | None = None) -> list:
        """Frame indices (strings, GETAR order) of the archive or of one group."""
        r = self._unary("ListFrames", pb.ListFramesRequest(archive=archive, group=group or ""),
                        f"ListFrames({archive!r}, group={group!r})")
        return list(r.frames)

    def read_record(self, archive: str, path: str) -> bytes:
        """Bytes of one record, e.g. 'keras/model.json', of any size (a record
        larger than one answer is read in ranges)."""
        out = bytearray()
        while True:
            r = self._unary("ReadRecord",
                            pb.ReadRecordRequest(archive=archive, path=path, offset=len(out)),
                            f"ReadRecord({archive!r}, {path!r})")
            out += r.data
            if not r.data or len(out) >= r.size:
                return bytes(out)

    def get_frame(self, archive: str, frame=None, group: str | None = None, names=None, *,
                  position: int | None = None, slice=None):
        """(index, [(TensorInfo, ndarray)]) of one frame.

        `frame` is a frame index as written (int or str: 2000 and "2000" are
        the same frame); `position=` picks by place in the frame list instead
        (0 = first, negative from the end). Neither: the last frame.

        `slice`: only this box of each tensor, as numpy's basic indexing
        takes it -- e.g. `(slice(0, 128), slice(None))`, `np.s_[0:128, :]`,
        `np.s_[..., 3]` -- or a `Box(offsets, shape)`. Only the box's bytes
        are read: streamed by the daemon, or read from the archive file in
        contiguous runs. One box serves every tensor of the answer (pick one
        tensor with `group`/`names`); a key that needs the tensor's shape
        (open ends, negatives, `...`) is resolved against the first tensor's,
        asked for first. Unlike numpy, a bound past the end is an error
        (nothing is clipped), and steps other than 1 are refused.
        """
        req = pb.GetFrameRequest(archive=archive, group=group or "", names=list(names or []),
                                 locate=self.read_files, batch=self.read_files)
        if frame is not None and position is not None:
            raise TypeError("pass a frame index or position=, not both")
        if frame is not None:
            req.index = _index(frame)
            what = f"frame {req.index!r} of {archive!r}"
        else:
            req.position = -1 if position is None else int(position)
            what = f"frame at position {req.position} of {archive!r}"
        if group:
            what += f", group {group!r}"
        try:
            box = None
            if slice is not None:
                box = self._box(req, slice, what)
                req.slice.offsets[:] = box.offsets
                req.slice.shape[:] = box.shape
            frames = _collect(self.stub.GetFrame(req, timeout=self.timeout * 10), what,
                              self.verify)
        except grpc.RpcError as e:
            err = _wrap(e, self.address, what)
            if isinstance(err, NotFound) and isinstance(frame, int) and frame < 0:
                err = NotFound(f"{err} (frame={frame} is a frame index as written; for the "
                               f"last frame pass position={frame})")
            raise err from None
        if not frames:
            raise NotFound(f"{what}: no frame in the answer")
        if box is not None and box.squeeze:
            keep = [n for d, n in enumerate(box.shape) if d not in box.squeeze]
            index, ts = frames[0]
            return index, [(i, a.reshape(keep)) for i, a in ts]
        return frames[0]

    def _box(self, req, key, what) -> Box:
        """`key` as a box; the first tensor's header is asked for when the
        key needs its shape (see `_first_header`)."""
        if isinstance(key, Box):
            return key
        _, info = self._first_header(req, what)
        return box_of(key, info.shape, f"tensor {info.path}")

    def _first_header(self, req, what):
        """(frame index, TensorInfo) of the first tensor `req` answers, without
        its bytes: a located answer is headers only; a streamed one is
        cancelled after the header."""
        probe = pb.GetFrameRequest()
        probe.CopyFrom(req)
        call = self.stub.GetFrame(probe, timeout=self.timeout)
        index, info = None, None
        try:
            for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "frame":
                    index = msg.frame
                elif kind == "tensor":
                    info = msg.tensor
                elif kind == "located" and msg.located.frames and msg.located.frames[0].tensors:
                    index = msg.located.frames[0].frame
                    info = msg.located.frames[0].tensors[0]
                if info is not None or kind == "chunk":
                    break
        finally:
            call.cancel()
        if info is None:
            raise NotFound(f"{what}: no tensor"
                           + (f" named {list(req.names)}" if req.names else ""))
        return index, info

    def tensor_header(self, archive: str, frame=None, group: str | None = None, names=None, *,
                      position: int | None = None):
        """(frame index, TensorInfo) of the first tensor `get_frame` with the
        same arguments would answer -- its path, dtype and shape -- without
        reading its bytes."""
        req = pb.GetFrameRequest(archive=archive, group=group or "", names=list(names or []),
                                 locate=self.read_files, batch=False)
        if frame is not None and position is not None:
            raise TypeError("pass a frame index or position=, not both")
        if frame is not None:
            req.index = _index(frame)
        else:
            req.position = -1 if position is None else int(position)
        what = f"frame {req.index or req.position!r} of {archive!r}"
        try:
            return self._first_header(req, what)
        except grpc.RpcError as e:
            raise _wrap(e, self.address, what) from None

    def record_history(self, archive: str, group: str, name: str, start: int = 0,
                       stop: int | None = None):
        """[(index, ndarray)] of one discrete or continuous record over its frames.

        The record is named as stored: `group` (with any stream group in
        front, e.g. "tensors/layer1.bias") and `name` (e.g. "value").
        `start`/`stop` are positions in the record's frame list, like a
        Python slice (negative from the end).
        """
        req = pb.TensorHistoryRequest(archive=archive, group=group, name=name, start=start,
                                      locate=self.read_files, batch=self.read_files)
        if stop is not None:
            req.stop = stop
        what = f"record {name!r} of group {group!r} in {archive!r}"
        try:
            frames = _collect(self.stub.TensorHistory(req, timeout=self.timeout * 10), what,
                              self.verify)
        except grpc.RpcError as e:
            raise _wrap(e, self.address, what) from None
        return [(idx, ts[0][1] if ts else None) for idx, ts in frames]

    def tensor_history(self, archive: str, key: str, *, group: str | None = None,
                       collection: str = DEFAULT_COLLECTION, start: int = 0,
                       stop: int | None = None):
        """[(index, ndarray)] of the array written as `tensors[key]` by
        `write_frame` (same `group` and `collection`), over its frames.

        `start`/`stop` are positions in that tensor's frame list, like a
        Python slice (negative from the end). For any other record, see
        `record_history`.
        """
        base = join(group, collection, key_to_group(key))
        try:
            return self.record_history(archive, base, VALUE_NAME, start, stop)
        except NotFound as e:
            raise NotFound(f"no tensor {key!r} in {archive!r}"
                           + (f" (group {group!r})" if group else "")
                           + f": {e}") from None

    # ------------------------------------------------------------ writing
    def writer(self, archive: str, mode: str = "append", group: str | None = None, **kw):
        """A background `Writer` streaming to `archive` (mode 'append' or 'create')."""
        return Writer(self, archive, mode=mode, group=group, **kw)

    def write_frame(self, archive: str, frame, tensors: dict, *, group: str | None = None,
                    collection: str = DEFAULT_COLLECTION, records: dict | None = None,
                    mode: str = "append", timeout: float = 300.0) -> None:
        """Write one frame of named arrays and wait until it is durable.

        `frame` is the frame's index (int or str: 2000 and "2000" name the
        same frame; `read_frame(archive, 2000)` reads it back). Each array
        `tensors[key]` becomes the record
        `{group/}{collection}/{key}/frames/{frame}/value.{fmt}.uni` (see
        `key_to_group`); dtype and shape are kept by the daemon's manifest.
        `records` maps extra constant-record paths to bytes.
        """
        with self.writer(archive, mode=mode, group=group) as w:
            w.write_tensors(_index(frame), tensors, collection=collection, records=records)
            w.flush(timeout)

    def read_frame(self, archive: str, frame=None, *, position: int | None = None,
                   group: str | None = None, collection: str = DEFAULT_COLLECTION,
                   slice=None) -> dict:
        """The dict `write_frame` wrote as frame `frame`.

        `frame` is the frame index as written (int or str, as `write_frame`
        takes it). To pick by place instead, pass `position=` (0 = first,
        -1 = last, negative from the end). Neither: the last frame.
        `slice`: only this box of every tensor (see `get_frame`; for one
        tensor, `read_tensor`).
        """
        base = join(group, collection)
        _, tensors = self.get_frame(archive, frame, group=base, names=[VALUE_NAME],
                                    position=position, slice=slice)
        out = {}
        for info, arr in tensors:
            g = info.group
            if g == base:
                continue
            if g.startswith(base + "/"):
                g = g[len(base) + 1:]
            out[group_to_key(g)] = arr
        return out

    def read_tensor(self, archive: str, key: str, frame=None, *, slice=None,
                    position: int | None = None, group: str | None = None,
                    collection: str = DEFAULT_COLLECTION) -> np.ndarray:
        """The array written as `tensors[key]` by `write_frame` in frame
        `frame` (or at `position`; neither: the last frame), or only its box
        `slice` (numpy's basic indexing, e.g. `np.s_[0:128, :]`, or a
        `Box`): then only the box's bytes are read. A box that does not fit
        the tensor raises, naming the tensor, its shape and the box."""
        g = join(group, collection, key_to_group(key))
        _, ts = self.get_frame(archive, frame, group=g, names=[VALUE_NAME],
                               position=position, slice=slice)
        for info, arr in ts:
            if info.group == g:
                return arr
        raise NotFound(f"no tensor {key!r} in {archive!r}" + (f" (group {group!r})" if group
                                                                else ""))


def _index(frame) -> str:
    """A frame index as the archive spells it: ints in decimal."""
    if isinstance(frame, bool) or not isinstance(frame, (int, str, np.integer)):
        raise TypeError(f"a frame index is an int or a str, not {type(frame).__name__}: "
                        f"{frame!r}")
    return str(int(frame)) if not isinstance(frame, str) else frame


def _encode(m) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


class _Files:
    """Archive files opened to read located tensors, each checked once to be
    the file the daemon located them in."""

    def __init__(self, what):
        self.what = what
        self.fds = {}
        self.dtypes = {}

    def read_array(self, info, verify: bool) -> np.ndarray:
        """The located tensor `info`, read from the file straight into its
        array: `np.empty`, so nothing is zeroed first and nothing copied after."""
        dt = self.dtypes.get(info.dtype)
        if dt is None:
            dt = self.dtypes[info.dtype] = dtypes.from_wire(info.dtype)
        loc = info.location
        if info.HasField("slice"):
            return self._read_box(info, dt)
        raw = np.empty(loc.length, np.uint8)
        try:
            arr = raw.view(dt).reshape(tuple(info.shape))
        except ValueError:
            raise GtarLogdError(f"{self.what}: tensor {info.path} is located as {loc.length} "
                                f"bytes, not a {dt.name} tensor of shape "
                                f"{tuple(info.shape)}") from None
        fd = self._fd(loc)
        done = os.preadv(fd, [raw], loc.offset) if loc.length else 0
        while done < loc.length:  # a short read (rare): the rest
            n = os.preadv(fd, [raw[done:]], loc.offset + done)
            if n == 0:
                raise GtarLogdError(f"{self.what}: {loc.file} ends inside a tensor")
            done += n
        if verify and zlib.crc32(raw) != loc.crc32:
            raise GtarLogdError(f"{self.what}: CRC-32 mismatch reading {loc.file} "
                                f"at {loc.offset}")
        return arr if dt.isnative else arr.astype(dt.newbyteorder("="))

    def _read_box(self, info, dt) -> np.ndarray:
        """The box `info.slice` of the located tensor `info`: its contiguous
        runs read from the file one after the other into the array. No CRC
        check: the entry's CRC-32 covers the whole tensor, which this read
        avoids reading."""
        loc = info.location
        box = Box(info.slice.offsets, info.slice.shape)
        if len(box.shape) != len(info.shape) or any(
                o + n > g for o, n, g in zip(box.offsets, box.shape, info.shape)):
            raise GtarLogdError(f"{self.what}: the answer's slice {box} is not a box of "
                                f"tensor {info.path} of shape {list(info.shape)}")
        raw = np.empty(box.elems * dt.itemsize, np.uint8)
        fd = self._fd(loc)
        at = 0
        for off, n in byte_runs(box, info.shape, dt.itemsize):
            done = 0
            while done < n:
                got = os.preadv(fd, [raw[at + done:at + n]], loc.offset + off + done)
                if got == 0:
                    raise GtarLogdError(f"{self.what}: {loc.file} ends inside a tensor")
                done += got
            at += n
        arr = raw.view(dt).reshape(box.shape)
        return arr if dt.isnative else arr.astype(dt.newbyteorder("="))

    def read_frames(self, located, verify: bool) -> list:
        """[(index, [(TensorInfo, ndarray)])] of a `located` batch."""
        read = self.read_array
        return [(f.frame, [(t, read(t, verify)) for t in f.tensors]) for f in located.frames]

    def _fd(self, loc) -> int:
        key = (loc.file, loc.device, loc.inode)
        fd = self.fds.get(key)
        if fd is None:
            fd = os.open(loc.file, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (loc.device, loc.inode):
                os.close(fd)
                raise GtarLogdError(f"{self.what}: {loc.file} was replaced (compacted?) "
                                    f"while it was read; read it again")
            self.fds[key] = fd
        return fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _collect(stream, what, verify=False):
    """Assemble FrameData messages into [(index, [(TensorInfo, ndarray)])];
    tensors that come with a location are read from the archive file."""
    files = _Files(what)
    try:
        return _collect_into(stream, what, verify, files)
    finally:
        files.close()


def _collect_into(stream, what, verify, files):
    frames = []
    cur = None
    info = None
    buf = None
    filled = 0

    def finish():
        nonlocal info, buf
        if info is not None:
            if filled != len(buf):
                raise GtarLogdError(f"{what}: tensor {info.path} got {filled} of {len(buf)} bytes")
            shape = info.slice.shape if info.HasField("slice") else info.shape
            cur[1].append((info, dtypes.from_bytes(buf, info.dtype, shape)))
        info = None
        buf = None

    for msg in stream:
        kind = msg.WhichOneof("msg")
        if kind == "frame":
            finish()
            cur = (msg.frame, [])
            frames.append(cur)
        elif kind == "tensor":
            finish()
            if cur is None:
                cur = ("", [])
                frames.append(cur)
            if msg.tensor.HasField("location"):
                cur[1].append((msg.tensor, files.read_array(msg.tensor, verify)))
            else:
                info = msg.tensor
                size = info.size_bytes
                if info.HasField("slice"):
                    size = dtypes.from_wire(info.dtype).itemsize * int(
                        np.prod(info.slice.shape, dtype=np.int64))
                buf = bytearray(size)
                filled = 0
        elif kind == "located":
            finish()
            frames.extend(files.read_frames(msg.located, verify))
            cur = None
        elif kind == "chunk":
            if info is None:
                raise GtarLogdError(f"{what}: chunk without a tensor header")
            d = msg.chunk.data
            if filled + len(d) > len(buf):
                raise GtarLogdError(f"{what}: tensor {info.path} got more than {len(buf)} bytes")
            buf[filled:filled + len(d)] = d
            filled += len(d)
    finish()
    return frames


__all__ = ["Client", "NotFound", "join", "key_to_group", "group_to_key",
           "DEFAULT_COLLECTION", "VALUE_NAME"]
