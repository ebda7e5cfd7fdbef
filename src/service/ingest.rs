//! The Write stream: validate each message, reassemble frames, and hand the
//! pieces to the archive's writer thread.
//!
//! Invariants:
//! * Nothing reaches the writer before it is validated (names, index, dtype ×
//!   shape × byte count); a bad message fails this stream only.
//! * A frame not committed when the stream ends — client gone, bad message,
//!   shutdown — is aborted by dropping its part channel: the writer truncates
//!   it away and no reader ever sees it.
//! * `received` is sent when the writer reports the frame committed and
//!   visible; `durable` acks follow. Both come from forwarding tasks, in frame
//!   order, and `durable` for a frame always after its `received`. Reading
//!   the stream never waits for an ack: the next frame's bytes flow while the
//!   writer finishes the last one (a wait there left the socket idle for a
//!   queue's worth of writing per frame).
//! * The first frame the writer refuses ends the stream with its error; the
//!   frames already sent after it are aborted unless already committed.
//! * A frame is assembled in the stream while it is small (at most
//!   [`SMALL_FRAME_MAX`] bytes so far) and handed to the writer whole at
//!   `commit`: a client that stalls or trickles inside a small frame holds
//!   nothing but its own stream. A bigger frame streams through to the
//!   writer from the moment it outgrows that (no copy of its bytes), under
//!   the writer's frame deadline; when the writer aborts it, the stream ends
//!   at once with the writer's error, even if the client is silent.
//! * Limits: a stream that sends nothing for the idle limit is ended; the
//!   peer's streams, archives and bytes held are counted ([`crate::peer`]).
//! * One live stream per (archive, group) unless all of them opened it with
//!   `share_group` ([`Lease::claim_group`]).
//! * An error ends the stream only after the stream's lease and claims are
//!   released, so a client that reconnects at once is not refused as its
//!   own rival.
//! * With remote storage, each durable frame is handed to the replicator
//!   (before its ack is sent, so a client that leaves still gets its frames
//!   replicated), and a third task sends `replicated` acks, in frame order,
//!   while the client keeps its request stream open.
//! * Tensor bytes come either in `chunk`s or, when the client attached a
//!   shared memory region at open (see [`crate::shm`]), as `shm_chunk`s that
//!   name a range of it; both are checked the same way against the tensor.
//! * A stream opened with `ranks` is one rank of a job: its frames are built
//!   as [`RankFrame`]s and committed through its [`Seat`] (see
//!   [`crate::assembly`]), which writes a frame once every rank committed it
//!   and answers `aborted` instead when it cannot; this module only
//!   translates. The job, not the stream, holds the archive's lease and the
//!   group's claim, for all its ranks.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::assembly::{
    Ack, FrameDone, FrameError, JobError, JobKey, RankFrame, Seat, Seg, Tickets, WriterSink,
};
use crate::layout::{self, Manifest, ManifestTensor};
use crate::limits::{COMPRESS_MAX, SMALL_FRAME_MAX};
use crate::peer::{BytesQuota, Peer, StreamQuota};
use crate::proto::v1::{
    write_request::Msg as In, write_response::Msg as Out, OpenMode, Opened, WriteRequest,
    WriteResponse,
};
use crate::service::convert;
use crate::service::errors::{bad, remap_decode, status, Kind};
use crate::service::State;
use crate::shm::{self, Region};
use crate::writer::{FrameTicket, Lease, Part, WriterHandle};
use gtar::{Committed, OpenMode as GtarMode, Precompressed};

/// Frames of one stream handed to the writer and not yet committed: the next
/// frame streams in while the last is written, and a fast client is slowed
/// down here (backpressure) rather than filling the archive's queue, which
/// is shared with other streams and answers RESOURCE_EXHAUSTED when full.
pub const FRAMES_IN_FLIGHT: usize = 2;

static STREAM_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

type Tx = mpsc::Sender<Result<WriteResponse, Status>>;

struct Tensor {
    path: String,
    left: u64,
    /// Some when the tensor is being gathered for compression.
    gather: Option<Vec<u8>>,
}

struct Frame {
    index: String,
    /// None while the frame is assembled here (see the module docs).
    ticket: Option<FrameTicket>,
    /// The parts assembled so far, and their bytes counted for the peer.
    held: Vec<Part>,
    held_bytes: BytesQuota,
    /// Held until the writer has committed the frame.
    permit: OwnedSemaphorePermit,
    manifest: Manifest,
    tensor: Option<Tensor>,
    bytes: u64,
    /// Opened only for one chunked record sent outside `begin`/`commit`:
    /// committed as soon as the record's last byte has arrived.
    own_record: bool,
}

type Answer<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Result<T, FrameError>>> + Send>>;

/// A frame handed to the writer (or to its job), waiting for its acks.
struct Pending {
    permit: OwnedSemaphorePermit,
    /// An assembled frame's bytes stay counted until it is written.
    _held: BytesQuota,
    index: String,
    seq: u64,
    bytes: u64,
    /// `None`: the writer (or the job) went away without answering.
    received: Answer<Committed>,
    durable: Answer<()>,
}

impl Pending {
    fn answers(ticket: FrameTicket) -> (Answer<Committed>, Answer<()>) {
        let (r, d) = (ticket.received, ticket.durable);
        (
            Box::pin(async move { r.await.ok().map(|x| x.map_err(FrameError::Writer)) }),
            Box::pin(async move { d.await.ok().map(|x| x.map_err(FrameError::Writer)) }),
        )
    }

    fn job_answers(t: Tickets) -> (Answer<Committed>, Answer<()>) {
        let (r, d) = (t.received, t.durable);
        (
            Box::pin(async move { r.await.ok() }),
            Box::pin(async move { d.await.ok() }),
        )
    }
}

/// A rank's frame being received (streams opened with `ranks`).
struct RankPart {
    frame: RankFrame,
    permit: OwnedSemaphorePermit,
    /// Its bytes received in `chunk`s, counted for the peer until written.
    held: BytesQuota,
}

/// Where the bytes of a tensor piece are.
enum Piece {
    Bytes(prost::bytes::Bytes),
    /// At `offset` of the stream's shared memory region.
    Shm {
        region: Arc<Region>,
        offset: u64,
    },
}

struct Stream {
    /// What every handler shares (archives, registry, limits, quotas).
    state: Arc<State>,
    // Field order is drop order: the claim on the group goes before the
    // peer's count of streams.
    /// The stream's claim on its archive group (one writer per group); None
    /// for a rank of a job: the job holds the lease.
    _lease: Option<Lease>,
    /// A rank's seat in its job (module docs).
    seat: Option<Seat<WriterSink>>,
    /// A rank's part of the frame being received, until its `commit`.
    rank_frame: Option<RankPart>,
    /// The archive's writer actor, which orders, writes and syncs frames.
    writer: WriterHandle,
    /// The peer's count of open streams, released when the stream ends.
    quota: StreamQuota,
    /// This stream's number, for the writer's ordering of frames.
    id: u64,
    /// The client's shared memory region, when `shm_chunk`s may come.
    shm: Option<Arc<Region>>,
    /// The group every record path of the stream goes under.
    prefix: String,
    /// Deflate level asked for at open (0: entries are stored).
    level: u32,
    /// The frame being received (between `begin` and `commit`).
    frame: Option<Frame>,
    /// Commits so far: the `seq` of the next frame's acks.
    seq: u64,
    /// Committed frames whose acks the ack task sends, in order.
    acks: mpsc::UnboundedSender<Pending>,
    /// Frames handed to the writer and not yet committed, at most
    /// [`FRAMES_IN_FLIGHT`]: a client that outruns the disk waits here.
    in_flight: Arc<Semaphore>,
    /// Cancelled when a frame failed; the error is in `failure`.
    failed: CancellationToken,
    /// The error that ended the stream from an ack task (see [`Failure`]).
    failure: Failure,
    /// Cancels the stream's `ended` token when the stream is done reading.
    _ended: tokio_util::sync::DropGuard,
}

/// What the ack tasks need to replicate a stream's frames.
struct Replicate {
    replicator: Arc<crate::remote::replicate::Replicator>,
    name: String,
    view: gtar::Archive,
    /// Cancelled when the request stream is over: replicated acks stop.
    ended: CancellationToken,
}

/// The error that ended a stream from an ack task, sent by the stream's own
/// task after it has released its lease (module docs).
type Failure = Arc<Mutex<Option<Status>>>;

/// Run one Write stream to its end, sending responses on `tx`.
/// `ucred`: the client's credentials when it came over the Unix socket.
pub async fn run(
    state: Arc<State>,
    mut inbound: Streaming<WriteRequest>,
    ucred: Option<tokio::net::unix::UCred>,
    peer: Peer,
    tx: Tx,
) {
    let idle = state.stream_idle;
    let silent = move || {
        status(
            Kind::TimedOut,
            format!(
                "no message on this Write stream for {} s; the daemon closed it \
                 (--stream-idle, GTAR_LOGD_STREAM_IDLE); an open frame was dropped",
                idle.as_secs()
            ),
        )
    };
    let res = async {
        let quota = state.quotas.stream(&peer)?;
        let first = tokio::time::timeout(idle, inbound.message())
            .await
            .map_err(|_| silent())?;
        let open = match first.map_err(remap_decode)? {
            Some(WriteRequest { msg: Some(In::Open(o)) }) => o,
            Some(_) => return Err(bad("open", "the first message of a Write stream must be `open`")),
            None => return Ok(()),
        };
        let mut s = Stream::open(state.clone(), open, ucred, peer, quota, &tx).await?;
        let failed = s.failed.clone();
        loop {
            let writer_gave_up = async {
                match s.frame.as_mut().and_then(|f| f.ticket.as_mut()) {
                    // Resolves before `commit` only if the writer aborted
                    // the frame (its deadline): the client may be silent.
                    Some(t) => Some((&mut t.received).await),
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                m = tokio::time::timeout(idle, inbound.message()) => {
                    m.map_err(|_| silent())?.map_err(remap_decode)?
                }
                _ = state.shutdown.cancelled() => {
                    return Err(status(Kind::ShuttingDown, "the daemon is shutting down; uncommitted frame dropped"));
                }
                // An ack task failed; an open frame is dropped.
                _ = failed.cancelled() => return Err(s.failure()),
                r = writer_gave_up => {
                    s.frame = None;
                    return Err(match r {
                        Some(Ok(Err(e))) => e.into(),
                        _ => status(Kind::Internal, "the archive writer stopped"),
                    });
                }
            };
            match msg {
                None => {
                    if let Some(f) = &s.frame {
                        tracing::info!(index = %f.index, "stream ended inside a frame; frame dropped");
                    }
                    return Ok(());
                }
                Some(WriteRequest { msg: None }) => return Err(bad("msg", "empty message")),
                Some(WriteRequest { msg: Some(m) }) => {
                    tokio::select! {
                        r = s.handle(m) => r?,
                        _ = failed.cancelled() => {}
                    }
                    if failed.is_cancelled() {
                        return Err(s.failure());
                    }
                }
            }
        }
    }
    .await;
    // `s` (its lease, claim and quota) is dropped by now.
    if let Err(st) = res {
        let _ = tx.send(Err(st)).await;
    }
}

impl Stream {
    fn failure(&self) -> Status {
        self.failure
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| status(Kind::Internal, "the stream failed"))
    }

    async fn open(
        state: Arc<State>,
        o: crate::proto::v1::OpenArchive,
        ucred: Option<tokio::net::unix::UCred>,
        peer: Peer,
        mut quota: StreamQuota,
        tx: &Tx,
    ) -> Result<Stream, Status> {
        layout::check_group("open.group", &o.group)?;
        if o.compression > 9 {
            return Err(bad(
                "open.compression",
                format!("{} is not a level 0..9", o.compression),
            ));
        }
        let mode = match OpenMode::try_from(o.mode) {
            Ok(OpenMode::Append) => GtarMode::Append,
            Ok(OpenMode::Create) => GtarMode::Create,
            Err(_) => return Err(bad("open.mode", format!("unknown mode {}", o.mode))),
        };
        let st = state.clone();
        let name = o.archive.clone();
        let group = o.group.clone();
        let describe = |r: &gtar::ScanReport| {
            format!(
                "{}; kept {} entries, dropped {} entries and {} bytes",
                r.reason,
                r.entries.len(),
                r.entries_dropped,
                r.bytes_dropped
            )
        };
        let count = move |w: &WriterHandle| {
            let r = w.reader();
            let ix = r.index();
            ix.frames_under((!group.is_empty()).then_some(group.as_str()))
                .len() as u64
        };
        let (lease, seat, writer, existing, repaired) = match o.ranks.clone() {
            None => {
                // Leasing may open and repair the file; counting the group's
                // frames sorts every index under the index lock: both off
                // the async workers.
                let (mut lease, existing) = tokio::task::spawn_blocking(move || {
                    let lease = st.archives.lease(&name, mode)?;
                    let existing = count(&lease.handle);
                    Ok::<_, crate::archives::LeaseError>((lease, existing))
                })
                .await
                .map_err(|e| status(Kind::Internal, e.to_string()))??;
                lease.claim_group(&o.group, peer, o.share_group)?;
                let repaired = lease.repaired.as_ref().map(describe).unwrap_or_default();
                let w = lease.handle.clone();
                (Some(lease), None, w, existing, repaired)
            }
            Some(r) => {
                let spec = convert::rank_spec(r);
                let key = JobKey {
                    uid: ucred.map(|c| c.uid()),
                    archive: o.archive.clone(),
                    group: o.group.clone(),
                    job: spec.job.clone(),
                };
                let level = o.compression;
                let jobs = state.jobs.clone();
                let claim = o.group.clone();
                // The first rank starts the job: it leases the archive (in
                // the stream's mode) and claims the group for all ranks.
                let (seat, existing, repaired) = tokio::task::spawn_blocking(move || {
                    let mut repaired = String::new();
                    let seat = jobs.join(key, &spec, level, || {
                        let mut lease = st
                            .archives
                            .lease(&name, mode)
                            .map_err(|e| JobError::open(&e))?;
                        lease
                            .claim_group(&claim, peer, false)
                            .map_err(|e| JobError::open(&e))?;
                        repaired = lease.repaired.as_ref().map(describe).unwrap_or_default();
                        Ok(WriterSink {
                            handle: lease.handle.clone(),
                            stream: STREAM_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                            _lease: lease,
                        })
                    })?;
                    let existing = count(&seat.sink().handle);
                    Ok::<_, JobError>((seat, existing, repaired))
                })
                .await
                .map_err(|e| status(Kind::Internal, e.to_string()))??;
                let w = seat.sink().handle.clone();
                (None, Some(seat), w, existing, repaired)
            }
        };
        quota.archive(writer.path())?;
        let offer = match o.shm.as_ref() {
            None => None,
            Some(_) if !state.shared_memory => Some(Err(
                "shared memory is turned off in the daemon (--shared-memory false)".to_string(),
            )),
            // Opening and mapping a client's descriptor are file-system
            // calls: off the async workers (see `shm`).
            Some(m) => {
                let (fd, size) = (m.fd, m.size);
                Some(
                    tokio::task::spawn_blocking(move || shm::attach(ucred, fd, size))
                        .await
                        .map_err(|e| status(Kind::Internal, e.to_string()))?,
                )
            }
        };
        let (shm, shm_refused) = match offer {
            None => (None, String::new()),
            Some(Ok(r)) => (Some(Arc::new(r)), String::new()),
            Some(Err(why)) => {
                tracing::debug!(archive = %o.archive, %why, "shared memory not attached");
                (None, why)
            }
        };
        send(
            tx,
            Out::Opened(Opened {
                archive: o.archive.clone(),
                existing_frames: existing,
                repaired,
                shm_attached: shm.is_some(),
                shm_refused,
                replicating: state.archives.replicator().is_some(),
            }),
        )
        .await?;
        let (acks, pending) = mpsc::unbounded_channel();
        let failed = CancellationToken::new();
        let failure = Failure::default();
        let ended = CancellationToken::new();
        let repl = state.archives.replicator().map(|r| Replicate {
            replicator: r.clone(),
            name: o.archive.clone(),
            view: writer.reader(),
            ended: ended.clone(),
        });
        tokio::spawn(forward_acks(
            pending,
            tx.clone(),
            failed.clone(),
            failure.clone(),
            repl,
        ));
        Ok(Stream {
            state,
            _lease: lease,
            seat,
            rank_frame: None,
            writer,
            quota,
            failure,
            id: STREAM_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shm,
            prefix: o.group,
            level: o.compression,
            frame: None,
            seq: 0,
            acks,
            in_flight: Arc::new(Semaphore::new(FRAMES_IN_FLIGHT)),
            failed,
            _ended: ended.drop_guard(),
        })
    }

    async fn begin(&mut self, index: String) -> Result<(), Status> {
        if let Some(f) = &self.frame {
            return Err(bad(
                "begin",
                format!("frame {:?} is still open; commit it first", f.index),
            ));
        }
        layout::check_index("begin.index", &index)?;
        self.open_frame(index).await
    }

    async fn open_frame(&mut self, index: String) -> Result<(), Status> {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| status(Kind::Internal, "stream closed"))?;
        self.frame = Some(Frame {
            permit,
            manifest: Manifest::new(&index),
            index,
            ticket: None,
            held: Vec::new(),
            held_bytes: self.quota.bytes(),
            tensor: None,
            bytes: 0,
            own_record: false,
        });
        Ok(())
    }

    fn frame(&mut self, what: &str) -> Result<&mut Frame, Status> {
        self.frame
            .as_mut()
            .ok_or_else(|| bad(what, "no frame is open; send `begin` first"))
    }

    /// The next part of the open frame: kept while the frame is small,
    /// else sent on to the writer (module docs).
    async fn part(&mut self, p: Part) -> Result<(), Status> {
        let handle = self.writer.clone();
        let id = self.id;
        let f = self.frame("frame")?;
        if f.ticket.is_none() {
            let n = part_bytes(&p);
            if f.held_bytes.held() + n <= SMALL_FRAME_MAX {
                f.held_bytes.grow(n)?;
                f.held.push(p);
                return Ok(());
            }
            // Too big to assemble: stream it through from here on.
            f.ticket = Some(handle.begin_frame(id)?);
            for q in std::mem::take(&mut f.held) {
                self.send_part(q).await?;
            }
            if let Some(f) = self.frame.as_mut() {
                f.held_bytes.clear();
            }
        }
        self.send_part(p).await
    }

    async fn send_part(&mut self, p: Part) -> Result<(), Status> {
        let f = self.frame("frame")?;
        let t = f.ticket.as_mut().expect("a streaming frame");
        if t.parts.send(p).await.is_err() {
            // The writer gave the frame up; its reason comes on `received`.
            let f = self.frame.take().unwrap();
            return Err(match f.ticket.expect("streaming").received.await {
                Ok(Err(e)) => e.into(),
                _ => status(Kind::Internal, "the archive writer stopped"),
            });
        }
        Ok(())
    }

    fn tensor_done(&mut self, next: &str) -> Result<(), Status> {
        if let Some(f) = &self.frame {
            if let Some(t) = &f.tensor {
                if t.left > 0 {
                    return Err(bad(
                        next,
                        format!("tensor {} is missing {} bytes", t.path, t.left),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn handle(&mut self, m: In) -> Result<(), Status> {
        match m {
            In::Open(_) => Err(bad("open", "the stream is already open")),
            In::Begin(b) if self.seat.is_some() => self.rank_begin(b.index).await,
            In::Begin(b) => self.begin(b.index).await,
            In::Tensor(t) if self.rank_frame.is_some() => self.rank_tensor(t),
            In::Tensor(t) => {
                if t.slice.is_some() {
                    return Err(bad(
                        "tensor.slice",
                        "only a stream opened with `ranks` sends slices of a tensor",
                    ));
                }
                self.tensor_done("tensor")?;
                layout::check_group("tensor.group", &t.group)?;
                layout::check_name("tensor.name", &t.name)?;
                let dtype = convert::dtype("tensor.dtype", t.dtype)?;
                let size = layout::tensor_bytes(dtype, &t.shape, self.state.max_tensor_bytes)
                    .map_err(|e| bad("tensor.shape", e))?;
                let prefix = self.prefix.clone();
                let f = self.frame("tensor")?;
                let path = layout::tensor_path(&prefix, &t.group, &t.name, &f.index, dtype);
                if f.manifest.tensors.iter().any(|x| x.path == path) {
                    return Err(bad(
                        "tensor.name",
                        format!("{path} is already in this frame"),
                    ));
                }
                f.manifest.tensors.push(ManifestTensor {
                    path: path.clone(),
                    dtype: dtype.name().into(),
                    shape: t.shape,
                });
                self.start_entry(path, size).await
            }
            In::Chunk(c) if self.rank_frame.is_some() => {
                let n = c.data.len() as u64;
                self.rank_piece("chunk.data", n, Seg::Bytes(c.data))
            }
            In::Chunk(c) => {
                let n = c.data.len() as u64;
                self.piece("chunk.data", n, Piece::Bytes(c.data)).await
            }
            In::ShmChunk(c) => {
                let r = self.shm.as_ref().ok_or_else(|| {
                    bad(
                        "shm_chunk",
                        "no shared memory region is attached to this stream; send `chunk`s",
                    )
                })?;
                if !r.contains(c.offset, c.length) {
                    return Err(bad(
                        "shm_chunk",
                        format!(
                            "bytes {}..{} are outside the {}-byte shared memory region",
                            c.offset,
                            c.offset as u128 + c.length as u128,
                            r.size()
                        ),
                    ));
                }
                if self.rank_frame.is_some() {
                    let seg = Seg::Shm {
                        region: r.clone(),
                        offset: c.offset,
                        len: c.length,
                    };
                    return self.rank_piece("shm_chunk.length", 0, seg);
                }
                let piece = Piece::Shm {
                    region: r.clone(),
                    offset: c.offset,
                };
                self.piece("shm_chunk.length", c.length, piece).await
            }
            In::Record(r) if self.rank_frame.is_some() => {
                layout::check_record_path("record.path", &r.path)?;
                let path = layout::join(&[&self.prefix, &r.path]);
                let max = self.state.max_tensor_bytes;
                let rf = self.rank_frame.as_mut().expect("checked");
                if r.size == 0 {
                    rf.held.grow(r.data.len() as u64)?;
                    return Ok(rf.frame.record(path, r.data)?);
                }
                if !r.data.is_empty() {
                    return Err(bad(
                        "record.size",
                        "set either `data` or `size` (and then send the bytes in `chunk`s), not both",
                    ));
                }
                if r.size > max {
                    return Err(bad(
                        "record.size",
                        format!(
                            "{} bytes is over the daemon's limit of {max} (--max-tensor-bytes)",
                            r.size
                        ),
                    ));
                }
                Ok(rf.frame.start_record(path, r.size)?)
            }
            In::Record(r) => {
                self.tensor_done("record")?;
                layout::check_record_path("record.path", &r.path)?;
                let path = layout::join(&[&self.prefix, &r.path]);
                if r.size == 0 {
                    return self.whole(path, r.data).await;
                }
                self.chunked_record(path, r.size, r.data.is_empty()).await
            }
            In::Scalar(s) => {
                self.tensor_done("scalar")?;
                layout::check_group("scalar.group", &s.group)?;
                layout::check_name("scalar.name", &s.name)?;
                if let Some(rf) = self.rank_frame.as_mut() {
                    let index = if s.index.is_empty() {
                        rf.frame.index.clone()
                    } else {
                        layout::check_index("scalar.index", &s.index)?;
                        s.index
                    };
                    let path = layout::scalar_path(&self.prefix, &s.group, &s.name, &index);
                    rf.held.grow(8)?;
                    return Ok(rf.frame.record(path, s.value.to_le_bytes().to_vec())?);
                }
                let index = if s.index.is_empty() {
                    self.frame
                        .as_ref()
                        .map(|f| f.index.clone())
                        .ok_or_else(|| bad("scalar.index", "required outside a frame"))?
                } else {
                    layout::check_index("scalar.index", &s.index)?;
                    s.index
                };
                let path = layout::scalar_path(&self.prefix, &s.group, &s.name, &index);
                self.whole(path, s.value.to_le_bytes().to_vec()).await
            }
            In::Commit(_) if self.rank_frame.is_some() => self.rank_commit(),
            In::Commit(_) => {
                self.tensor_done("commit")?;
                self.commit().await
            }
        }
    }

    /// `begin` on a rank's stream.
    async fn rank_begin(&mut self, index: String) -> Result<(), Status> {
        if let Some(f) = &self.rank_frame {
            return Err(bad(
                "begin",
                format!("frame {:?} is still open; commit it first", f.frame.index),
            ));
        }
        self.tensor_done("begin")?;
        layout::check_index("begin.index", &index)?;
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| status(Kind::Internal, "stream closed"))?;
        self.seat.as_ref().expect("a rank").begin(&index);
        self.rank_frame = Some(RankPart {
            frame: RankFrame::new(index),
            permit,
            held: self.quota.bytes(),
        });
        Ok(())
    }

    /// A tensor header inside a rank's frame: a whole tensor or a slice.
    fn rank_tensor(&mut self, t: crate::proto::v1::TensorHeader) -> Result<(), Status> {
        layout::check_group("tensor.group", &t.group)?;
        layout::check_name("tensor.name", &t.name)?;
        let dtype = convert::dtype("tensor.dtype", t.dtype)?;
        let slice = t
            .slice
            .map(|s| convert::slice("tensor.slice", s))
            .transpose()?;
        let max = self.state.max_tensor_bytes;
        let rf = self.rank_frame.as_mut().expect("checked");
        let path = layout::tensor_path(&self.prefix, &t.group, &t.name, &rf.frame.index, dtype);
        Ok(rf.frame.tensor(path, dtype, t.shape, slice, max)?)
    }

    /// The next bytes of a rank's open tensor or record; `held`: bytes the
    /// daemon keeps (chunks; shared memory stays the client's).
    fn rank_piece(&mut self, field: &str, held: u64, seg: Seg) -> Result<(), Status> {
        let n = match &seg {
            Seg::Bytes(b) => b.len() as u64,
            Seg::Shm { len, .. } => *len,
        };
        let rf = self.rank_frame.as_mut().expect("checked");
        rf.held.grow(held)?;
        rf.frame.piece(field, seg)?;
        self.seat
            .as_ref()
            .expect("a rank")
            .delivered(&rf.frame.index, n);
        Ok(())
    }

    /// Queue a committed frame's answers for the ack task; the next frame
    /// gets the next sequence number.
    fn push_pending(&mut self, p: Pending) -> Result<(), Status> {
        self.seq += 1;
        self.acks
            .send(p)
            .map_err(|_| status(Kind::Internal, "client went away"))
    }

    /// `commit` on a rank's stream: hand the part to the job; the acks come
    /// when every rank committed the frame (or it was aborted).
    fn rank_commit(&mut self) -> Result<(), Status> {
        let rf = self.rank_frame.as_ref().expect("checked");
        if let Some((path, n)) = rf.frame.incomplete() {
            return Err(bad("commit", format!("tensor {path} is missing {n} bytes")));
        }
        let rf = self.rank_frame.take().expect("checked");
        let (index, bytes) = (rf.frame.index.clone(), rf.frame.bytes());
        let tickets = self.seat.as_ref().expect("a rank").commit(rf.frame)?;
        let (received, durable) = Pending::job_answers(tickets);
        let p = Pending {
            permit: rf.permit,
            _held: rf.held,
            index,
            seq: self.seq,
            bytes,
            received,
            durable,
        };
        self.push_pending(p)
    }

    /// The next `n` bytes of the open tensor.
    async fn piece(&mut self, field: &str, n: u64, piece: Piece) -> Result<(), Status> {
        let f = self.frame(field)?;
        let t = f
            .tensor
            .as_mut()
            .ok_or_else(|| bad(field, "no tensor is open; send `tensor` first"))?;
        if n > t.left {
            return Err(bad(
                field,
                format!(
                    "tensor {} got {} bytes more than its dtype × shape",
                    t.path,
                    n - t.left
                ),
            ));
        }
        t.left -= n;
        let finished = t.left == 0;
        if let Some(g) = t.gather.as_mut() {
            match piece {
                Piece::Bytes(b) => g.extend_from_slice(&b),
                Piece::Shm { region, offset } => {
                    let mut buf = std::mem::take(g);
                    // Up to COMPRESS_MAX bytes: copied off the async threads.
                    *g = tokio::task::spawn_blocking(move || {
                        region.with_bytes(offset, n, |b| buf.extend_from_slice(b));
                        buf
                    })
                    .await
                    .map_err(|e| status(Kind::Internal, e.to_string()))?;
                }
            }
            if finished {
                self.flush_gathered().await?;
            }
        } else if n > 0 {
            self.part(match piece {
                // `Bytes` sliced out of tonic's receive buffer by prost:
                // it reaches the writer thread without a copy.
                Piece::Bytes(b) => Part::Data(b),
                // Written by the writer thread straight from the region.
                Piece::Shm { region, offset } => Part::Shm {
                    region,
                    offset,
                    len: n,
                },
            })
            .await?;
        }
        if finished && self.frame.as_ref().is_some_and(|f| f.own_record) {
            self.commit().await?;
        }
        Ok(())
    }

    /// A record of `size` bytes whose data follows in `chunk`s, like a
    /// tensor's: part of the open frame, or a frame of its own that commits
    /// when its last byte has arrived.
    async fn chunked_record(
        &mut self,
        path: String,
        size: u64,
        no_data: bool,
    ) -> Result<(), Status> {
        if !no_data {
            return Err(bad(
                "record.size",
                "set either `data` or `size` (and then send the bytes in `chunk`s), not both",
            ));
        }
        let max = self.state.max_tensor_bytes;
        if size > max {
            return Err(bad(
                "record.size",
                format!(
                    "{size} bytes is over the daemon's limit of {max} \
                     (serve --max-tensor-bytes / GTAR_LOGD_MAX_TENSOR_BYTES)"
                ),
            ));
        }
        let own = self.frame.is_none();
        if own {
            self.open_frame(String::new()).await?;
        }
        self.frame("record")?.own_record = own;
        self.start_entry(path, size).await
    }

    /// Start an entry of `size` bytes (a tensor's or a chunked record's)
    /// whose data follows in pieces: stored and streamed to the writer, or
    /// gathered for compression when the stream asked for it and it is small
    /// enough.
    async fn start_entry(&mut self, path: String, size: u64) -> Result<(), Status> {
        let level = self.level;
        let f = self.frame("tensor")?;
        f.bytes += size;
        let gather = (level > 0 && size <= COMPRESS_MAX).then(Vec::new);
        let stored = gather.is_none();
        f.tensor = Some(Tensor {
            path: path.clone(),
            left: size,
            gather,
        });
        if stored {
            self.part(Part::Start { path, size }).await
        } else if size == 0 {
            self.flush_gathered().await
        } else {
            Ok(())
        }
    }

    /// A whole record: part of the open frame, or a frame of its own.
    async fn whole(&mut self, path: String, data: Vec<u8>) -> Result<(), Status> {
        let own = self.frame.is_none();
        if own {
            // A record outside a frame is a frame of its own, with no index.
            self.open_frame(String::new()).await?;
        }
        if let Some(f) = self.frame.as_mut() {
            f.bytes += data.len() as u64;
        }
        self.part(Part::Whole { path, data }).await?;
        if own {
            self.commit().await?;
        }
        Ok(())
    }

    async fn flush_gathered(&mut self) -> Result<(), Status> {
        let level = self.level;
        let f = self.frame("chunk")?;
        let t = f.tensor.as_mut().expect("a tensor is open");
        let data = t.gather.take().unwrap_or_default();
        let path = t.path.clone();
        let pc = tokio::task::spawn_blocking(move || Precompressed::deflate(&data, level))
            .await
            .map_err(|e| status(Kind::Internal, e.to_string()))?;
        self.part(Part::Compressed { path, data: pc }).await
    }

    async fn commit(&mut self) -> Result<(), Status> {
        let prefix = self.prefix.clone();
        let f = self.frame("commit")?;
        // Every indexed frame gets its manifest: it is also the frame marker
        // that makes a rewritten index replace the old frame as a whole.
        if !f.index.is_empty() {
            f.manifest.written_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64);
            let path = layout::manifest_path(&prefix, &f.index);
            let json = serde_json::to_vec(&f.manifest).expect("manifest serializes");
            self.part(Part::Whole { path, data: json }).await?;
        }
        let streaming = self.frame("commit")?.ticket.is_some();
        if streaming {
            self.send_part(Part::Commit).await?;
        }
        let mut f = self.frame.take().expect("frame is open");
        let ticket = match f.ticket.take() {
            Some(t) => t,
            None => {
                let mut parts = std::mem::take(&mut f.held);
                parts.push(Part::Commit);
                self.writer.submit_frame(self.id, parts)?
            }
        };
        let (received, durable) = Pending::answers(ticket);
        let p = Pending {
            permit: f.permit,
            _held: f.held_bytes,
            index: f.index,
            seq: self.seq,
            bytes: f.bytes,
            received,
            durable,
        };
        self.push_pending(p)
    }
}

/// Send `received` for each frame as the writer commits it, then hand it to
/// a second task that sends `durable` after the fsync: both in frame order.
async fn forward_acks(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    tx: Tx,
    failed: CancellationToken,
    failure: Failure,
    repl: Option<Replicate>,
) {
    // The first error is kept for the stream's task to send (module docs).
    let fail = move |st: Status| {
        failure.lock().unwrap().get_or_insert(st);
        failed.cancel();
    };
    let fail2 = fail.clone();
    let (dtx, mut drx) = mpsc::unbounded_channel::<(FrameDone, u64, Answer<()>)>();
    let (rtx, mut rrx) = mpsc::unbounded_channel::<(FrameDone, u64)>();
    let tx2 = tx.clone();
    if let Some(r) = &repl {
        let (tx3, r) = (
            tx.clone(),
            (r.replicator.clone(), r.name.clone(), r.ended.clone()),
        );
        tokio::spawn(async move {
            while let Some((ack, end)) = rrx.recv().await {
                tokio::select! {
                    _ = r.0.replicated(&r.1, end) => {}
                    _ = r.2.cancelled() => return,
                }
                if tx3
                    .send(Ok(convert::ack(Ack::Replicated(ack))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some((ack, end, rx)) = drx.recv().await {
            let msg = match rx.await {
                Some(Ok(())) => {
                    if let Some(r) = &repl {
                        r.replicator.durable(&r.name, &r.view, end);
                        let _ = rtx.send((ack.clone(), end));
                    }
                    convert::ack(Ack::Durable(ack))
                }
                Some(Err(FrameError::Writer(e))) => return fail2(Status::from(e)),
                Some(Err(FrameError::Aborted(a))) => {
                    return fail2(status(Kind::Internal, a.reason));
                }
                None => {
                    return fail2(status(
                        Kind::ShuttingDown,
                        "the writer stopped before the frame was durable",
                    ))
                }
            };
            if tx2.send(Ok(msg)).await.is_err() {
                return fail2(status(Kind::Internal, "client went away"));
            }
        }
    });
    while let Some(p) = pending.recv().await {
        let received = p.received.await;
        drop(p.permit); // committed (or failed): the stream may send another
        let committed = match received {
            Some(Ok(c)) => c,
            Some(Err(FrameError::Aborted(abort))) => {
                // A rank's frame: dropped whole; the stream goes on.
                let a = Ack::Aborted { seq: p.seq, abort };
                if tx.send(Ok(convert::ack(a))).await.is_err() {
                    return fail(status(Kind::Internal, "client went away"));
                }
                continue;
            }
            Some(Err(FrameError::Writer(e))) => return fail(e.into()),
            None => return fail(status(Kind::Internal, "the archive writer stopped")),
        };
        let ack = FrameDone {
            index: p.index,
            seq: p.seq,
            bytes: committed.bytes.max(p.bytes),
        };
        if tx
            .send(Ok(convert::ack(Ack::Received(ack.clone()))))
            .await
            .is_err()
        {
            return fail(status(Kind::Internal, "client went away"));
        }
        let _ = dtx.send((ack, committed.txn + committed.bytes, p.durable));
    }
}

async fn send(tx: &Tx, m: Out) -> Result<(), Status> {
    tx.send(Ok(WriteResponse { msg: Some(m) }))
        .await
        .map_err(|_| status(Kind::Internal, "client went away"))
}

/// Bytes a part adds to a frame assembled in the stream.
fn part_bytes(p: &Part) -> u64 {
    match p {
        Part::Data(d) => d.len() as u64,
        Part::Shm { len, .. } => *len,
        Part::Whole { data, .. } => data.len() as u64,
        Part::Compressed { data, .. } => data.deflated.len() as u64,
        Part::Start { path, .. } => path.len() as u64,
        Part::Commit => 0,
    }
}
