//! Writing frames: one gRPC `Write` stream per [`FrameWriter`].
//!
//! How it works, and what a reader of this code must not break:
//! * Requests go through a bounded channel into the stream, so a caller that
//!   writes faster than the daemon takes bytes waits in `write` (backpressure)
//!   instead of piling frames up in memory.
//! * A frame is sent whole by one `write` call: `begin`, its tensors (each a
//!   header plus chunks of at most [`CHUNK_BYTES`]), records and scalars, then
//!   `commit`. The daemon drops a frame that is not committed, so a `write`
//!   cancelled halfway leaves the archive untouched, but the stream is then
//!   mid-frame: the writer refuses further use rather than mixing frames.
//! * A background task reads the responses. The daemon acks every commit —
//!   including the implicit one of a record or scalar sent outside a frame —
//!   with `received` (visible to queries) and later `durable` (fsynced), both
//!   in commit order and numbered by `seq` from 0. The task checks that order
//!   and resolves the matching [`FrameHandle`]s; on a stream error every
//!   pending handle gets the error.
//! * Tensor bytes go through the shared memory region when the daemon
//!   attached it (see [`crate::shm`] for its invariants), else in `chunk`s.
//!   A frame that does not fit in the free part of the region waits for the
//!   frames in flight to be durable (which frees their spans); only a frame
//!   bigger than the whole region goes in `chunk`s.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::error::{Error, Result};
use crate::proto::{
    self, logd_client::LogdClient, write_request::Msg as In, write_response::Msg as Out,
    WriteRequest, WriteResponse,
};
use crate::shm::{self, Region, Ring};
use crate::tensor::TensorData;

/// Tensors are sent in chunks of at most this many bytes (the daemon takes
/// messages up to 16 MiB; a few MiB keeps latency and memory low).
pub const CHUNK_BYTES: usize = 4 << 20;

/// Requests buffered between `write` and the network: with 4 MiB chunks at
/// most ~32 MiB are queued before `write` waits.
const QUEUE: usize = 8;

/// What to do with an existing archive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// Add to the archive, creating it if it does not exist. Never removes
    /// anything that is in it.
    #[default]
    Append,
    /// Start a new, empty archive, **deleting** an existing one with that
    /// name: every frame and record in it, of every group, is gone.
    Replace,
}

/// Default size of a writer's shared memory region: 1 GiB, sparse (pages
/// are used only as frames are written, and reused from the start whenever
/// every frame so far is durable).
pub const DEFAULT_SHM_SIZE: u64 = 1 << 30;

/// Options of a write stream: [`append`](OpenOptions::append) (the default:
/// create the archive if missing, else add to it) or
/// [`replace`](OpenOptions::replace) (delete an existing archive and start
/// an empty one), then a group prefix, compression and shared memory.
///
/// There is deliberately no `create()`: in `std::fs` "create" means "create
/// if missing", and earlier versions of this crate used the name for what is
/// now `replace()` (which cost a user an archive), so code written against
/// either meaning has to choose anew.
///
/// ```
/// # use gtar_logd_client::{OpenMode, OpenOptions};
/// let opts = OpenOptions::append().group("run1");
/// assert_eq!(opts.mode, OpenMode::Append);
/// assert_eq!(OpenOptions::default(), OpenOptions::append());
/// assert_eq!(OpenOptions::replace().mode, OpenMode::Replace);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// [`OpenMode::Append`] (default) or [`OpenMode::Replace`].
    pub mode: OpenMode,
    /// Group prefix for everything this stream writes (keras_gtar's `group`),
    /// e.g. `"run1"`; empty = none.
    pub group: String,
    /// 0 = store (fastest, default); 1..=9 = deflate level, done by the daemon
    /// off its writer thread.
    pub compression: u32,
    /// Offer the daemon a shared memory region for tensor bytes (default
    /// true). It takes it on a Unix socket when the daemon runs as the same
    /// user; otherwise (TCP, another user, `--shared-memory false`) bytes go
    /// through the socket and [`Opened::shm_refused`] says why.
    pub shared_memory: bool,
    /// Size of that region in bytes ([`DEFAULT_SHM_SIZE`]): it bounds the
    /// tensor bytes in flight (written, not yet durable); a write waits for
    /// room, and a frame bigger than the region goes through the socket.
    pub shm_size: u64,
    /// Let other streams that also set this write the same archive and group
    /// at the same time (default false: a second live writer of a group is
    /// refused with `FailedPrecondition` naming the holder).
    pub share_group: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            mode: OpenMode::Append,
            group: String::new(),
            compression: 0,
            shared_memory: true,
            shm_size: DEFAULT_SHM_SIZE,
            share_group: false,
        }
    }
}

impl OpenOptions {
    /// Add to the archive, creating it if it does not exist. Frames, records
    /// and groups already in it stay; see
    /// [`Opened::existing_frames`] for how many frames the group has.
    pub fn append() -> OpenOptions {
        OpenOptions::default()
    }

    /// Start a new, empty archive, **deleting** any existing archive of that
    /// name with everything in it (all frames, records and groups, not only
    /// this stream's group). Use it for a run that must start from scratch;
    /// [`append`](OpenOptions::append) is the safe choice otherwise.
    pub fn replace() -> OpenOptions {
        OpenOptions {
            mode: OpenMode::Replace,
            ..OpenOptions::default()
        }
    }

    /// Set the group prefix.
    pub fn group(mut self, group: impl Into<String>) -> OpenOptions {
        self.group = group.into();
        self
    }

    /// Set the deflate level (0 = store).
    pub fn compression(mut self, level: u32) -> OpenOptions {
        self.compression = level;
        self
    }

    /// Offer shared memory (true, the default) or always use the socket.
    pub fn shared_memory(mut self, on: bool) -> OpenOptions {
        self.shared_memory = on;
        self
    }

    /// Set the size of the shared memory region.
    pub fn shm_size(mut self, bytes: u64) -> OpenOptions {
        self.shm_size = bytes;
        self
    }
}

/// The daemon's answer to opening a write stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The archive, as named in the request.
    pub archive: String,
    /// Frames already in the archive under the stream's group.
    pub existing_frames: u64,
    /// Set when the archive had to be repaired on open: what was done.
    pub repaired: Option<String>,
    /// Tensor bytes go through shared memory.
    pub shm_attached: bool,
    /// Why the daemon refused the shared memory region offered (`None` when
    /// it attached it, or none was offered).
    pub shm_refused: Option<String>,
    /// The daemon replicates to remote storage (`serve --remote`):
    /// [`FrameHandle::replicated`] resolves once a frame is in the store.
    pub replicating: bool,
}

/// An acknowledgement of one commit: a frame, or a record or scalar sent
/// outside a frame (then `index` is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The frame index (empty for a record or scalar sent outside a frame).
    pub index: String,
    /// Sequence number of the commit within this stream, from 0.
    pub seq: u64,
    /// Bytes the commit took in the archive.
    pub bytes: u64,
}

impl From<proto::FrameAck> for Ack {
    fn from(a: proto::FrameAck) -> Ack {
        Ack {
            index: a.index,
            seq: a.seq,
            bytes: a.bytes,
        }
    }
}

enum Item<'a> {
    Tensor {
        group: String,
        name: String,
        data: TensorData<'a>,
    },
    Record {
        path: String,
        data: Vec<u8>,
    },
    Scalar {
        group: String,
        name: String,
        index: String,
        value: f64,
    },
}

/// A frame to write: tensors, records and scalars under one frame index,
/// committed atomically. It borrows the arrays it was given (see
/// [`TensorData`]) until it is written.
///
/// ```
/// # use gtar_logd_client::{NewFrame};
/// let w = ndarray::Array2::<f32>::zeros((3, 4));
/// let frame = NewFrame::new("7")
///     .tensor("layer/0", "weight", &w)
///     .scalar("metrics", "loss", 0.25);
/// ```
pub struct NewFrame<'a> {
    index: String,
    items: Vec<Item<'a>>,
}

impl<'a> NewFrame<'a> {
    /// An empty frame with this index (e.g. the epoch, `"12"`). Frames order
    /// shorter-first, then bytewise, as libgetar orders them.
    pub fn new(index: impl Into<String>) -> NewFrame<'a> {
        NewFrame {
            index: index.into(),
            items: Vec::new(),
        }
    }

    /// The frame index.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// Add a tensor: stored at `{stream group/}{group/}frames/{index}/{name}.{fmt}.uni`.
    /// `group` may be empty; `name` has no `/` and no `.`.
    pub fn tensor(
        mut self,
        group: impl Into<String>,
        name: impl Into<String>,
        data: impl Into<TensorData<'a>>,
    ) -> NewFrame<'a> {
        self.push_tensor(group, name, data);
        self
    }

    /// Add a tensor (by `&mut`, for loops).
    pub fn push_tensor(
        &mut self,
        group: impl Into<String>,
        name: impl Into<String>,
        data: impl Into<TensorData<'a>>,
    ) {
        self.items.push(Item::Tensor {
            group: group.into(),
            name: name.into(),
            data: data.into(),
        });
    }

    /// Add a record at a path of its own inside the stream's group, e.g.
    /// `"keras/model.json"`, committed with this frame.
    pub fn record(mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> NewFrame<'a> {
        self.items.push(Item::Record {
            path: path.into(),
            data: data.into(),
        });
        self
    }

    /// Add a scalar (continuous GETAR record) at this frame's index: stored at
    /// `{group}/vars/{name}.f64.uni/{index}`.
    pub fn scalar(
        self,
        group: impl Into<String>,
        name: impl Into<String>,
        value: f64,
    ) -> NewFrame<'a> {
        self.scalar_at(group, name, "", value)
    }

    /// Add a scalar at another step index (e.g. a batch number).
    pub fn scalar_at(
        mut self,
        group: impl Into<String>,
        name: impl Into<String>,
        index: impl Into<String>,
        value: f64,
    ) -> NewFrame<'a> {
        self.items.push(Item::Scalar {
            group: group.into(),
            name: name.into(),
            index: index.into(),
            value,
        });
        self
    }
}

type AckTx = oneshot::Sender<Result<Ack>>;

struct Waiter {
    seq: u64,
    index: String,
    received: Option<AckTx>,
    durable: Option<AckTx>,
}

#[derive(Default)]
struct Progress {
    /// Commits sent.
    committed: u64,
    /// `received` acks seen.
    received: u64,
    /// `durable` acks seen.
    durable: u64,
    /// `replicated` acks seen.
    replicated: u64,
    /// Why the stream failed.
    failed: Option<Error>,
    /// The response stream is over.
    ended: bool,
}

struct Shared {
    progress: watch::Sender<Progress>,
    waiters: Mutex<VecDeque<Waiter>>,
    /// Who waits for a commit's `replicated` ack, by seq (kept apart from
    /// `waiters`, which are done at `durable`).
    replicated: Mutex<std::collections::HashMap<u64, AckTx>>,
    /// Spans of the shared memory region still in use (empty without one).
    ring: Mutex<Ring>,
}

impl Shared {
    fn fail_now(&self) -> Option<Error> {
        self.progress.borrow().failed.as_ref().map(Error::duplicate)
    }

    fn on_received(&self, a: proto::FrameAck) -> Result<()> {
        let (expect, committed) = {
            let p = self.progress.borrow();
            (p.received, p.committed)
        };
        if a.seq != expect || a.seq >= committed {
            return Err(Error::Protocol(format!(
                "`received` ack for seq {} (frame {:?}); expected seq {expect} ({committed} commits sent)",
                a.seq, a.index
            )));
        }
        let mut ws = self.waiters.lock().expect("waiters lock");
        let w = ws
            .iter_mut()
            .find(|w| w.seq == a.seq)
            .expect("a waiter per commit");
        if w.index != a.index {
            return Err(Error::Protocol(format!(
                "`received` ack seq {} names frame {:?}; that commit was frame {:?}",
                a.seq, a.index, w.index
            )));
        }
        if let Some(tx) = w.received.take() {
            let _ = tx.send(Ok(a.into()));
        }
        drop(ws);
        self.progress.send_modify(|p| p.received += 1);
        Ok(())
    }

    fn on_durable(&self, a: proto::FrameAck) -> Result<()> {
        let (expect, received) = {
            let p = self.progress.borrow();
            (p.durable, p.received)
        };
        if a.seq != expect || a.seq >= received {
            return Err(Error::Protocol(format!(
                "`durable` ack for seq {} (frame {:?}); expected seq {expect} ({received} commits received)",
                a.seq, a.index
            )));
        }
        let mut ws = self.waiters.lock().expect("waiters lock");
        let w = ws.pop_front().expect("a waiter per commit");
        debug_assert_eq!(w.seq, a.seq);
        drop(ws);
        if w.index != a.index {
            return Err(Error::Protocol(format!(
                "`durable` ack seq {} names frame {:?}; that commit was frame {:?}",
                a.seq, a.index, w.index
            )));
        }
        // The daemon is done with the frame's bytes before it acks durable.
        self.ring.lock().expect("ring lock").free_through(a.seq);
        if let Some(tx) = w.durable {
            let _ = tx.send(Ok(a.into()));
        }
        self.progress.send_modify(|p| p.durable += 1);
        Ok(())
    }

    fn on_replicated(&self, a: proto::FrameAck) -> Result<()> {
        let (expect, durable) = {
            let p = self.progress.borrow();
            (p.replicated, p.durable)
        };
        if a.seq != expect || a.seq >= durable {
            return Err(Error::Protocol(format!(
                "`replicated` ack for seq {} (frame {:?}); expected seq {expect} ({durable} commits durable)",
                a.seq, a.index
            )));
        }
        if let Some(tx) = self.replicated.lock().expect("lock").remove(&a.seq) {
            let _ = tx.send(Ok(a.into()));
        }
        self.progress.send_modify(|p| p.replicated += 1);
        Ok(())
    }

    fn finish(&self, outcome: Result<()>) {
        let outcome = outcome.and_then(|()| {
            let p = self.progress.borrow();
            if p.durable < p.committed {
                Err(Error::Protocol(format!(
                    "the Write stream ended after {} of {} commits were acked durable",
                    p.durable, p.committed
                )))
            } else {
                Ok(())
            }
        });
        // Record the failure before waking waiters, so a caller woken by an
        // error sees the writer failed too.
        let failure = outcome.as_ref().err().map(Error::duplicate);
        self.progress.send_modify(|p| {
            p.ended = true;
            if let Err(e) = outcome {
                p.failed.get_or_insert(e);
            }
        });
        let waiters: Vec<Waiter> = self
            .waiters
            .lock()
            .expect("waiters lock")
            .drain(..)
            .collect();
        let replicated: Vec<AckTx> = self
            .replicated
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, tx)| tx)
            .collect();
        if let Some(e) = failure {
            for w in waiters {
                for tx in [w.received, w.durable].into_iter().flatten() {
                    let _ = tx.send(Err(e.duplicate()));
                }
            }
            for tx in replicated {
                let _ = tx.send(Err(e.duplicate()));
            }
        }
    }
}

/// Read the response stream to its end, resolving handles.
async fn pump(mut resp: Streaming<WriteResponse>, shared: Arc<Shared>) {
    let outcome = loop {
        let r = match resp.message().await {
            Ok(Some(WriteResponse {
                msg: Some(Out::Received(a)),
            })) => shared.on_received(a),
            Ok(Some(WriteResponse {
                msg: Some(Out::Durable(a)),
            })) => shared.on_durable(a),
            Ok(Some(WriteResponse {
                msg: Some(Out::Replicated(a)),
            })) => shared.on_replicated(a),
            Ok(Some(WriteResponse {
                msg: Some(Out::Opened(_)),
            })) => Err(Error::Protocol("a second `opened` on one stream".into())),
            // Only streams opened with `ranks` are told of aborted frames;
            // this writer never opens one.
            Ok(Some(WriteResponse {
                msg: Some(Out::Aborted(a)),
            })) => Err(Error::Protocol(format!(
                "frame {:?} aborted on a stream of one rank: {}",
                a.index, a.reason
            ))),
            Ok(Some(WriteResponse { msg: None })) => {
                Err(Error::Protocol("an empty WriteResponse".into()))
            }
            Ok(None) => break Ok(()),
            Err(s) => Err(s.into()),
        };
        if let Err(e) = r {
            break Err(e);
        }
    };
    shared.finish(outcome);
}

/// Waits for the acks of one committed frame. Awaiting the handle itself waits
/// for `durable`.
pub struct FrameHandle {
    index: String,
    seq: u64,
    received: Option<oneshot::Receiver<Result<Ack>>>,
    received_ack: Option<Ack>,
    durable: oneshot::Receiver<Result<Ack>>,
    replicated: oneshot::Receiver<Result<Ack>>,
}

fn gone() -> Error {
    Error::WriterClosed("the stream ended before the frame was acknowledged".into())
}

impl FrameHandle {
    /// The frame index.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// Sequence number of the commit within its stream.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Wait until the frame is in the archive and visible to queries.
    pub async fn received(&mut self) -> Result<Ack> {
        if let Some(a) = &self.received_ack {
            return Ok(a.clone());
        }
        let rx = self.received.take().ok_or_else(gone)?;
        let a = rx.await.map_err(|_| gone())??;
        self.received_ack = Some(a.clone());
        Ok(a)
    }

    /// Wait until the frame's bytes are fsynced (implies received).
    pub async fn durable(self) -> Result<Ack> {
        self.durable.await.map_err(|_| gone())?
    }

    /// Wait until the frame is in remote storage (a daemon started with
    /// `--remote`; implies durable). Keep the writer open meanwhile: once
    /// the request stream is closed the daemon sends no more `replicated`
    /// acks. An error at once when the daemon does not replicate.
    pub async fn replicated(self) -> Result<Ack> {
        self.replicated.await.map_err(|_| gone())?
    }
}

impl std::fmt::Debug for FrameHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameHandle")
            .field("index", &self.index)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl IntoFuture for FrameHandle {
    type Output = Result<Ack>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Ack>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.durable())
    }
}

/// A write stream into one archive. Made by [`Client::writer`](crate::Client::writer).
///
/// `write` returns once the frame is handed to the stream; the returned
/// [`FrameHandle`] resolves when the daemon acks it. [`close`](Self::close)
/// ends the stream after every frame is durable.
pub struct FrameWriter {
    tx: Option<mpsc::Sender<WriteRequest>>,
    /// The shared memory region, when the daemon attached it.
    region: Option<Region>,
    shm_bytes: u64,
    shared: Arc<Shared>,
    opened: Opened,
    next_seq: u64,
    /// Frames sent (`write` calls that handed a whole frame over).
    frames: u64,
    /// Set while a frame is half sent; stays set if that send was cancelled.
    mid_frame: bool,
    pump: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("opened", &self.opened)
            .field("frames", &self.frames)
            .field("commits", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl FrameWriter {
    pub(crate) async fn open(
        mut client: LogdClient<crate::client::Transport>,
        archive: &str,
        options: OpenOptions,
    ) -> Result<FrameWriter> {
        let (tx, rx) = mpsc::channel(QUEUE);
        // A region we cannot make (no memfd: not Linux, or out of memory)
        // only means bytes go through the socket.
        let region = if options.shared_memory && options.shm_size > 0 {
            Region::new(shm::align(options.shm_size)).ok()
        } else {
            None
        };
        let open = proto::OpenArchive {
            archive: archive.into(),
            mode: match options.mode {
                OpenMode::Append => proto::OpenMode::Append,
                OpenMode::Replace => proto::OpenMode::Create,
            } as i32,
            group: options.group,
            compression: options.compression,
            shm: region.as_ref().map(|r| proto::SharedMemory {
                fd: r.fd() as u32,
                size: r.size(),
            }),
            share_group: options.share_group,
            ..Default::default()
        };
        tx.send(WriteRequest {
            msg: Some(In::Open(open)),
        })
        .await
        .expect("the receiver is alive");
        let mut resp = client.write(ReceiverStream::new(rx)).await?.into_inner();
        let opened = match resp.message().await? {
            Some(WriteResponse {
                msg: Some(Out::Opened(o)),
            }) => Opened {
                archive: o.archive,
                existing_frames: o.existing_frames,
                repaired: (!o.repaired.is_empty()).then_some(o.repaired),
                shm_attached: o.shm_attached,
                shm_refused: (!o.shm_refused.is_empty()).then_some(o.shm_refused),
                replicating: o.replicating,
            },
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "the first Write response was {:?}, expected `opened`",
                    other.msg
                )))
            }
            None => {
                return Err(Error::Protocol(
                    "the Write stream ended without `opened`".into(),
                ))
            }
        };
        // Not attached: drop it (the daemon never mapped it).
        let region = region.filter(|_| opened.shm_attached);
        let shared = Arc::new(Shared {
            progress: watch::Sender::new(Progress::default()),
            waiters: Mutex::new(VecDeque::new()),
            replicated: Mutex::new(Default::default()),
            ring: Mutex::new(Ring::new(region.as_ref().map_or(0, Region::size))),
        });
        let pump = tokio::spawn(pump(resp, shared.clone()));
        Ok(FrameWriter {
            tx: Some(tx),
            region,
            shm_bytes: 0,
            shared,
            opened,
            next_seq: 0,
            frames: 0,
            mid_frame: false,
            pump,
        })
    }

    /// What the daemon said on open.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Tensor bytes sent through shared memory so far (the rest went through
    /// the socket).
    pub fn shm_bytes(&self) -> u64 {
        self.shm_bytes
    }

    /// Frames sent so far: [`write`](Self::write) and
    /// [`write_frame`](Self::write_frame) calls that handed a whole frame to
    /// the stream. Records and scalars sent outside a frame are not frames.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Commits sent so far: frames, plus each record and scalar sent outside
    /// a frame (each is committed, and acked, on its own). The daemon numbers
    /// its acks by commit ([`Ack::seq`]).
    pub fn commits(&self) -> u64 {
        self.next_seq
    }

    fn usable(&self) -> Result<()> {
        // The stream's own failure first: it is why a write stopped midway.
        if let Some(e) = self.shared.fail_now() {
            return Err(e);
        }
        if self.mid_frame {
            return Err(Error::WriterClosed(
                "an earlier write was cancelled in the middle of a frame".into(),
            ));
        }
        if self.tx.is_none() {
            return Err(Error::WriterClosed("the writer is closed".into()));
        }
        Ok(())
    }

    /// Why the stream cannot take more: the recorded failure, once known.
    async fn closed_error(&self) -> Error {
        let mut rx = self.shared.progress.subscribe();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.wait_for(|p| p.ended)).await;
        self.shared
            .fail_now()
            .unwrap_or_else(|| Error::WriterClosed("the daemon closed the Write stream".into()))
    }

    async fn send(&mut self, m: In) -> Result<()> {
        let tx = self.tx.as_ref().expect("checked by usable()");
        let mut progress = self.shared.progress.subscribe();
        let sent = tokio::select! {
            r = tx.send(WriteRequest { msg: Some(m) }) => r.is_ok(),
            // A stream that failed may stop taking requests without closing.
            _ = progress.wait_for(|p| p.ended) => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.closed_error().await)
        }
    }

    /// Register a waiter for the next commit, then send the message that
    /// commits (so an ack can never beat its waiter).
    async fn commit_with(&mut self, index: String, m: In) -> Result<FrameHandle> {
        let seq = self.next_seq;
        let (rtx, rrx) = oneshot::channel();
        let (dtx, drx) = oneshot::channel();
        let (ptx, prx) = oneshot::channel();
        if self.opened.replicating {
            self.shared
                .replicated
                .lock()
                .expect("lock")
                .insert(seq, ptx);
        } else {
            let _ = ptx.send(Err(Error::WriterClosed(
                "the daemon does not replicate (start it with --remote)".into(),
            )));
        }
        self.shared
            .waiters
            .lock()
            .expect("waiters lock")
            .push_back(Waiter {
                seq,
                index: index.clone(),
                received: Some(rtx),
                durable: Some(dtx),
            });
        self.shared.progress.send_modify(|p| p.committed += 1);
        self.next_seq += 1;
        self.send(m).await?;
        Ok(FrameHandle {
            index,
            seq,
            received: Some(rrx),
            received_ack: None,
            durable: drx,
            replicated: prx,
        })
    }

    /// Where the next frame's `need` bytes of tensors go in shared memory:
    /// one span for the frame, freed when its commit (seq `next_seq`) is
    /// durable. With no room while earlier frames are in flight it waits for
    /// their durable acks (backpressure, as the request queue gives on the
    /// socket) rather than send the bytes the costlier way. `None`: no
    /// region, or a frame bigger than the whole region (sent in chunks).
    async fn shm_span(&self, need: u64) -> Result<Option<u64>> {
        let Some(region) = &self.region else {
            return Ok(None);
        };
        if need > region.size() {
            return Ok(None);
        }
        let mut progress = self.shared.progress.subscribe();
        loop {
            let durable = progress.borrow_and_update().durable;
            {
                let mut ring = self.shared.ring.lock().expect("ring lock");
                if let Some(at) = ring.alloc(self.next_seq, need) {
                    return Ok(Some(at));
                }
                if ring.is_empty() {
                    return Ok(None); // cannot happen: need <= size
                }
            }
            // Read what we need and let the guard go in this statement: a
            // guard alive across the next await would make `write`'s future
            // not `Send` (no `tokio::spawn` of a task that writes frames).
            let advanced = progress
                .wait_for(|p| p.durable > durable || p.ended)
                .await
                .map_err(|_| Error::WriterClosed("writer state dropped".into()))?
                .durable
                > durable;
            if !advanced {
                return Err(self.closed_error().await);
            }
        }
    }

    /// Send one frame. Returns when the whole frame is handed to the stream
    /// (waiting if the daemon is slower than the caller); the handle resolves
    /// when the daemon acks it.
    pub async fn write(&mut self, frame: NewFrame<'_>) -> Result<FrameHandle> {
        self.usable()?;
        let NewFrame { index, items } = frame;
        let need = items
            .iter()
            .map(|i| match i {
                Item::Tensor { data, .. } => shm::align(data.bytes().len() as u64),
                _ => 0,
            })
            .sum();
        // Before anything is sent, so a write cancelled while it waits for
        // room leaves the stream usable.
        let mut shm_at = self.shm_span(need).await?;
        self.mid_frame = true;
        self.send(In::Begin(proto::BeginFrame {
            index: index.clone(),
        }))
        .await?;
        for item in items {
            match item {
                Item::Tensor { group, name, data } => {
                    let (dtype, shape, bytes) = data.into_parts();
                    self.send(In::Tensor(proto::TensorHeader {
                        group,
                        name,
                        dtype: dtype.to_proto() as i32,
                        shape,
                        ..Default::default()
                    }))
                    .await?;
                    if let (Some(at), Some(region)) = (shm_at.as_mut(), self.region.as_mut()) {
                        if !bytes.is_empty() {
                            region.write(*at, &bytes);
                            let c = proto::ShmChunk {
                                offset: *at,
                                length: bytes.len() as u64,
                            };
                            *at += shm::align(c.length);
                            self.shm_bytes += c.length;
                            self.send(In::ShmChunk(c)).await?;
                        }
                        continue;
                    }
                    // An owned buffer goes as slices of it; borrowed bytes are
                    // copied a chunk at a time (the stream needs owned
                    // messages), so at most a queue's worth is ever copied.
                    let len = bytes.len();
                    let (owned, borrowed) = match bytes {
                        Cow::Owned(v) => (Some(Bytes::from(v)), &[][..]),
                        Cow::Borrowed(b) => (None, b),
                    };
                    for at in (0..len).step_by(CHUNK_BYTES) {
                        let end = len.min(at + CHUNK_BYTES);
                        let data = match &owned {
                            Some(b) => b.slice(at..end),
                            None => Bytes::copy_from_slice(&borrowed[at..end]),
                        };
                        self.send(In::Chunk(proto::Chunk { data })).await?;
                    }
                }
                Item::Record { path, data } => {
                    for m in record_messages(path, data) {
                        self.send(m).await?;
                    }
                }
                Item::Scalar {
                    group,
                    name,
                    index,
                    value,
                } => {
                    self.send(In::Scalar(proto::Scalar {
                        group,
                        name,
                        index,
                        value,
                    }))
                    .await?
                }
            }
        }
        let h = self
            .commit_with(index, In::Commit(proto::CommitFrame {}))
            .await?;
        self.mid_frame = false;
        self.frames += 1;
        Ok(h)
    }

    /// Send one frame of tensors given as `(group, name, tensor)` triples, e.g.
    /// `[("layer/0", "weight", TensorData::from(&w))]`.
    pub async fn write_frame<'t, I, G, N, T>(
        &mut self,
        index: impl Into<String>,
        tensors: I,
    ) -> Result<FrameHandle>
    where
        I: IntoIterator<Item = (G, N, T)>,
        G: Into<String>,
        N: Into<String>,
        T: Into<TensorData<'t>>,
    {
        let mut f = NewFrame::new(index);
        for (g, n, t) in tensors {
            f.push_tensor(g, n, t);
        }
        self.write(f).await
    }

    /// Write a record outside any frame (e.g. `"keras/model.json"`). It is not
    /// a frame: the daemon commits it on its own and acks it with an empty
    /// index; it counts in [`commits`](Self::commits), not in
    /// [`frames`](Self::frames).
    pub async fn record(
        &mut self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Result<FrameHandle> {
        self.usable()?;
        let mut msgs = record_messages(path.into(), data.into());
        let last = msgs.pop().expect("a record is at least one message");
        for m in msgs {
            self.send(m).await?;
        }
        self.commit_with(String::new(), last).await
    }

    /// Write a scalar outside any frame, at step `index`; committed (and
    /// acked, with an empty index) on its own; not a frame.
    pub async fn scalar(
        &mut self,
        group: impl Into<String>,
        name: impl Into<String>,
        index: impl Into<String>,
        value: f64,
    ) -> Result<FrameHandle> {
        self.usable()?;
        self.commit_with(
            String::new(),
            In::Scalar(proto::Scalar {
                group: group.into(),
                name: name.into(),
                index: index.into(),
                value,
            }),
        )
        .await
    }

    async fn wait(&self, what: &str, done: fn(&Progress) -> u64) -> Result<()> {
        let target = self.next_seq;
        let mut rx = self.shared.progress.subscribe();
        let p = rx
            .wait_for(|p| done(p) >= target || p.failed.is_some() || p.ended)
            .await
            .map_err(|_| Error::WriterClosed("writer state dropped".into()))?;
        if done(&p) >= target {
            return Ok(());
        }
        Err(match &p.failed {
            Some(e) => e.duplicate(),
            None => Error::WriterClosed(format!(
                "the stream ended with {} of {target} commits {what}",
                done(&p)
            )),
        })
    }

    /// Wait until every commit sent so far is received (visible to queries).
    pub async fn wait_received(&self) -> Result<()> {
        self.wait("received", |p| p.received).await
    }

    /// Wait until every commit sent so far is durable (fsynced).
    pub async fn wait_durable(&self) -> Result<()> {
        self.wait("durable", |p| p.durable).await
    }

    /// Wait until every commit sent so far is in remote storage (a daemon
    /// started with `--remote`).
    pub async fn wait_replicated(&self) -> Result<()> {
        if !self.opened.replicating {
            return Err(Error::WriterClosed(
                "the daemon does not replicate (start it with --remote)".into(),
            ));
        }
        self.wait("replicated", |p| p.replicated).await
    }

    /// End the stream and wait for it to finish: every frame durable, or the
    /// error that stopped it.
    pub async fn close(mut self) -> Result<()> {
        let mid_frame = self.mid_frame;
        self.tx = None; // ends the request stream
        let _ = (&mut self.pump).await;
        if let Some(e) = self.shared.fail_now() {
            return Err(e);
        }
        if mid_frame {
            return Err(Error::WriterClosed(
                "a write was cancelled in the middle of a frame; that frame was dropped".into(),
            ));
        }
        Ok(())
    }
}

/// The messages that write one constant record: inline when it fits in one
/// chunk, else a header with its size and the bytes in chunks (slices of one
/// buffer, no copies), so records of any size travel.
fn record_messages(path: String, data: Vec<u8>) -> Vec<In> {
    if data.len() <= CHUNK_BYTES {
        return vec![In::Record(proto::ConstRecord {
            path,
            data,
            size: 0,
        })];
    }
    let size = data.len() as u64;
    let data = Bytes::from(data);
    let mut out = vec![In::Record(proto::ConstRecord {
        path,
        data: Vec::new(),
        size,
    })];
    for at in (0..data.len()).step_by(CHUNK_BYTES) {
        let end = data.len().min(at + CHUNK_BYTES);
        out.push(In::Chunk(proto::Chunk {
            data: data.slice(at..end),
        }));
    }
    out
}
