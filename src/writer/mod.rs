//! The writer pipeline: one owner per open archive, on an OS thread of its own.
//!
//! Invariants:
//! * Exactly one [`ArchiveWriter`] per archive path in this process, owned by
//!   one dedicated thread; async code only sends it jobs over a bounded queue
//!   (`try_send`: a full queue is `RESOURCE_EXHAUSTED`, never unbounded memory).
//! * Frames are serialized: the thread takes one frame job at a time and
//!   drains that frame's own bounded part channel, so two clients appending to
//!   one archive never interleave, and memory per frame in flight is bounded by
//!   the part channel's capacity × chunk size.
//! * Ack order: `received` once the frame is committed (visible to readers
//!   through the shared index); `durable` once an fsync covering it returned.
//!   Group commit runs on a thread of its own ([`syncer`]): one fdatasync
//!   covers every frame committed while the previous one ran, and the writer
//!   never waits for the disk between frames.
//! * A frame whose parts stop (client gone, stream error, timeout) is aborted:
//!   truncated away, never visible.
//! * Bounded delay for other writers of an archive: while the thread waits
//!   for a frame's next part, every other frame of the archive waits too, so
//!   a frame may keep the thread waiting for its client at most
//!   [`Limits::frame_deadline`] in total, plus one second per
//!   [`FRAME_DEADLINE_CREDIT`] bytes it delivered (a big frame from a client
//!   slower than the disk is not cut off); then it is aborted
//!   ([`WriterError::Deadline`]). Frames that arrive whole (the service
//!   assembles small frames apart, [`WriterHandle::submit_frame`]) never
//!   make it wait, and go before queued streaming frames of other streams:
//!   a whole frame waits for at most the one frame in progress (one
//!   deadline), not for every stalled frame queued. A stream's own frames
//!   keep their order.
//! * Two live streams claim one (archive, group) only when both asked to
//!   share it ([`Lease::claim_group`]); the refusal names the holder.
//! * A full disk fails the frame, not the writer, and shows in health until
//!   a frame commits again ([`Registry::problems`]).
//! * A writer that hits an error it cannot recover from (failed fsync, panic)
//!   marks itself failed (see [`WriterState`]), fails every later job and
//!   says why in the log; other archives are unaffected.
//! * Shutdown: [`Registry::shutdown`] closes every writer: in-progress frames
//!   are aborted, then the central directory is written and fsynced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{is_disk_full, Classify, Kind};
use crate::limits::FRAME_DEADLINE_CREDIT;
use crate::peer::Peer;

use gtar::{Archive, ArchiveWriter, Committed, OpenMode, Precompressed, ScanReport};

mod syncer;
use syncer::Syncer;

/// Errors of the writer layer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum WriterError {
    #[error("{0}")]
    Format(String),
    #[error("disk full while writing {0}")]
    DiskFull(String),
    #[error("too many frames queued for {0}; retry later")]
    QueueFull(String),
    #[error("the writer for {path} failed earlier: {why}")]
    Failed { path: String, why: String },
    #[error("frame aborted: {0}")]
    Aborted(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is open for writing by another process")]
    Locked(String),
    #[error("{0} is being written by another stream; CREATE would replace it")]
    Busy(String),
    #[error(
        "frame aborted: the client kept the writer of {path} waiting {waited_s:.1} s for its data \
         (limit: {limit_s} s plus 1 s per 64 MiB sent), and every other writer of the archive \
         waited with it; nothing of the frame was kept. Send the frame faster (or in one piece: \
         frames up to 4 MiB are assembled apart) or raise --frame-deadline \
         (GTAR_LOGD_FRAME_DEADLINE)"
    )]
    Deadline {
        path: String,
        waited_s: f64,
        limit_s: u64,
    },
    #[error(
        "{path} group {group:?} is being written by another live stream ({holder}); two streams \
         may write one group only when both open it with share_group = true"
    )]
    Held {
        path: String,
        group: String,
        holder: String,
    },
}

impl Classify for WriterError {
    fn kind(&self) -> Kind {
        match self {
            WriterError::Format(_) | WriterError::Failed { .. } => Kind::Internal,
            WriterError::DiskFull(_) | WriterError::QueueFull(_) => Kind::Exhausted,
            WriterError::Aborted(_) | WriterError::Invalid(_) => Kind::BadInput,
            WriterError::ShuttingDown => Kind::ShuttingDown,
            WriterError::Locked(_) | WriterError::Busy(_) | WriterError::Held { .. } => {
                Kind::Conflict
            }
            WriterError::Deadline { .. } => Kind::TimedOut,
        }
    }
}

impl WriterError {
    fn from_gtar(path: &Path, e: gtar::Error) -> WriterError {
        match e {
            gtar::Error::Io(io) if is_disk_full(&io) => {
                WriterError::DiskFull(path.display().to_string())
            }
            gtar::Error::Invalid(s) => WriterError::Invalid(s),
            gtar::Error::Locked => WriterError::Locked(path.display().to_string()),
            e => WriterError::Format(format!("{}: {e}", path.display())),
        }
    }
}

/// Tunables of the pipeline.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Frames that may wait for one archive's writer.
    pub queue_frames: usize,
    /// Parts (chunks) buffered per frame in flight.
    pub parts_per_frame: usize,
    /// How long in total a frame may keep the writer waiting for its data
    /// (plus a credit for the bytes it sent; module docs); then it is
    /// aborted so other writers of the archive go on.
    pub frame_deadline: Duration,
    /// Write the central directory after this long without frames, so other
    /// zip readers can open the archive while the daemon keeps it.
    pub idle_tail: Duration,
    /// Write large entries with O_DIRECT (see `gtar::writer`): far less CPU
    /// taken from the training job, no page-cache churn. Falls back to the
    /// page cache by itself where the file system refuses it.
    pub direct_io: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            queue_frames: 64,
            parts_per_frame: 4,
            frame_deadline: crate::limits::DEFAULT_FRAME_DEADLINE,
            idle_tail: Duration::from_secs(2),
            direct_io: true,
        }
    }
}

/// A piece of a frame, in order.
#[derive(Debug)]
pub enum Part {
    /// Start a stored entry of `size` bytes; `Data` parts follow.
    Start {
        path: String,
        size: u64,
    },
    Data(prost::bytes::Bytes),
    /// The next `len` bytes of the started entry, at `offset` of a client's
    /// shared memory region (checked to lie inside it). Written from there
    /// by the writer thread: with direct I/O, whole blocks without a copy.
    Shm {
        region: Arc<crate::shm::Region>,
        offset: u64,
        len: u64,
    },
    /// A whole stored entry.
    Whole {
        path: String,
        data: Vec<u8>,
    },
    /// A whole entry compressed off the writer thread.
    Compressed {
        path: String,
        data: Precompressed,
    },
    /// All parts sent: commit the frame.
    Commit,
}

/// What the service gets back for a frame.
pub struct FrameTicket {
    pub parts: mpsc::Sender<Part>,
    pub received: oneshot::Receiver<Result<Committed, WriterError>>,
    pub durable: oneshot::Receiver<Result<(), WriterError>>,
}

enum Job {
    Frame {
        /// All parts are queued already (an assembled frame).
        whole: bool,
        /// The stream that sent it (its frames keep their order).
        stream: u64,
        parts: mpsc::Receiver<Part>,
        received: oneshot::Sender<Result<Committed, WriterError>>,
        durable: oneshot::Sender<Result<(), WriterError>>,
    },
    /// Replace the archive with an empty one (OpenMode::Create).
    Recreate(oneshot::Sender<Result<(), WriterError>>),
    /// Work that needs the archive to itself, run between two frames
    /// (a live compaction's last step; see [`WriterHandle::between`]).
    Between(Between, oneshot::Sender<Result<(), WriterError>>),
    Close,
}

/// Work run on the writer thread between two frames (see
/// [`WriterHandle::between`]). It gets the index of every committed frame
/// (all of them durable: pending acks are fsynced first) and returns whether
/// it put a new file in place of the archive; the writer then reopens the
/// archive's path. Dropped unrun when the writer has failed or is closing.
pub type Between = Box<dyn FnOnce(&gtar::Index) -> bool + Send>;

/// Health of one writer, for the health service and the watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterState {
    Ok,
    Failed(String),
}

struct Shared {
    state: Mutex<WriterState>,
    /// Set while the thread is busy with a job (ms since `epoch`).
    busy_since_ms: AtomicU64,
    /// Set while an fsync runs (ms since `epoch`).
    sync_since_ms: AtomicU64,
    /// The registry's start: every writer's timestamps share it.
    epoch: Instant,
    streams: AtomicU64,
    /// Groups being written by live streams: group → claims.
    claims: Mutex<HashMap<String, Vec<Claim>>>,
    /// The last frame failed on a full disk (cleared by the next commit).
    disk_full: std::sync::atomic::AtomicBool,
    /// The registry's failure count, bumped when this writer fails, so the
    /// health service learns of it at once (published, not polled).
    failures: Arc<watch::Sender<u64>>,
    /// A reader that sees every committed frame: replaced when a compaction
    /// puts a new file in place (readers already holding the old one keep
    /// a consistent view: the old file with its own, no longer growing, index).
    reader: std::sync::RwLock<Archive>,
}

impl Shared {
    /// Mark the writer failed (for good) and publish it.
    fn set_failed(&self, why: String) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = WriterState::Failed(why);
        self.failures.send_modify(|n| *n += 1);
    }
}

impl Shared {
    /// Milliseconds since `epoch`, never 0 (0 means "not busy").
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// A live stream's claim on one group of an archive.
#[derive(Debug, Clone)]
struct Claim {
    id: u64,
    holder: Peer,
    share: bool,
}

static CLAIM_IDS: AtomicU64 = AtomicU64::new(1);

/// A handle on one archive's writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    parts_cap: usize,
}

impl WriterHandle {
    /// A reader that sees every committed frame at once.
    pub fn reader(&self) -> Archive {
        self.shared
            .reader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `work` on the writer thread between two frames (queued behind
    /// the frames already waiting) and wait until it ran and, if it replaced
    /// the file, the writer reopened it (so every read after this returns
    /// sees the new file). Blocking: call from `spawn_blocking`. Frames of
    /// other streams wait meanwhile, so `work` must be short.
    pub fn between(&self, work: Between) -> Result<(), WriterError> {
        self.check_ok()?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .blocking_send(Job::Between(work, tx))
            .map_err(|_| WriterError::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| WriterError::ShuttingDown)?
    }

    pub fn state(&self) -> WriterState {
        self.shared.state.lock().unwrap().clone()
    }

    fn check_ok(&self) -> Result<(), WriterError> {
        match self.state() {
            WriterState::Ok => Ok(()),
            WriterState::Failed(why) => Err(WriterError::Failed {
                path: self.path.display().to_string(),
                why,
            }),
        }
    }

    /// Queue a frame of stream `stream`; feed its parts through the ticket.
    pub fn begin_frame(&self, stream: u64) -> Result<FrameTicket, WriterError> {
        self.queue_frame(stream, Vec::new())
    }

    /// Queue a frame whose parts are all here (ending with [`Part::Commit`]):
    /// the writer never waits for it. Its ticket's `parts` sender is unused.
    pub fn submit_frame(&self, stream: u64, parts: Vec<Part>) -> Result<FrameTicket, WriterError> {
        self.queue_frame(stream, parts)
    }

    fn queue_frame(&self, stream: u64, first: Vec<Part>) -> Result<FrameTicket, WriterError> {
        self.check_ok()?;
        let whole = !first.is_empty();
        let (ptx, prx) = mpsc::channel(self.parts_cap.max(first.len()));
        for p in first {
            ptx.try_send(p)
                .expect("the channel has room for every part given");
        }
        let (rtx, rrx) = oneshot::channel();
        let (dtx, drx) = oneshot::channel();
        let job = Job::Frame {
            whole,
            stream,
            parts: prx,
            received: rtx,
            durable: dtx,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(FrameTicket {
                parts: ptx,
                received: rrx,
                durable: drx,
            }),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(WriterError::QueueFull(self.path.display().to_string()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(WriterError::ShuttingDown),
        }
    }
}

/// A stream's claim on a writer; released on drop.
pub struct Lease {
    pub handle: WriterHandle,
    pub repaired: Option<ScanReport>,
    /// (group, claim id) once [`Lease::claim_group`] succeeded.
    claim: Option<(String, u64)>,
}

impl Lease {
    /// Claim `group` of the archive for this stream. Refused, naming the
    /// holder, while another live stream holds it, unless both share.
    pub fn claim_group(
        &mut self,
        group: &str,
        holder: Peer,
        share: bool,
    ) -> Result<(), WriterError> {
        let mut claims = self.handle.shared.claims.lock().unwrap();
        let held = claims.entry(group.to_string()).or_default();
        if let Some(other) = held.iter().find(|c| !(c.share && share)) {
            return Err(WriterError::Held {
                path: self.handle.path.display().to_string(),
                group: group.to_string(),
                holder: other.holder.to_string(),
            });
        }
        let id = CLAIM_IDS.fetch_add(1, Ordering::Relaxed);
        held.push(Claim { id, holder, share });
        self.claim = Some((group.to_string(), id));
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some((group, id)) = self.claim.take() {
            let mut claims = self
                .handle
                .shared
                .claims
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(v) = claims.get_mut(&group) {
                v.retain(|c| c.id != id);
                if v.is_empty() {
                    claims.remove(&group);
                }
            }
        }
        self.handle.shared.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Slot {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
}

/// All writers of the daemon, by canonical archive path.
pub struct Registry {
    limits: Limits,
    runtime: tokio::runtime::Handle,
    slots: Mutex<HashMap<PathBuf, Slot>>,
    started: Instant,
    /// Set (under `slots`' lock) when shutdown starts: no writer starts after.
    closed: std::sync::atomic::AtomicBool,
    /// Threads of writers that retired while idle and may still be closing
    /// their archive: shutdown joins them, so the process never exits
    /// before their last central directory and fsync are done.
    retired: Mutex<Vec<JoinHandle<()>>>,
    /// Counts writer failures; see [`Registry::watch_failures`].
    failures: Arc<watch::Sender<u64>>,
}

impl Registry {
    pub fn new(limits: Limits, runtime: tokio::runtime::Handle) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            runtime,
            slots: Mutex::new(HashMap::new()),
            started: Instant::now(),
            closed: std::sync::atomic::AtomicBool::new(false),
            retired: Mutex::new(Vec::new()),
            failures: Arc::new(watch::channel(0).0),
        })
    }

    /// Changes whenever a writer fails; then [`Registry::failed`] says which.
    pub fn watch_failures(&self) -> watch::Receiver<u64> {
        self.failures.subscribe()
    }

    /// The live writer of `path`, if any (for readers).
    pub fn get(&self, path: &Path) -> Option<WriterHandle> {
        self.slots
            .lock()
            .unwrap()
            .get(path)
            .map(|s| s.handle.clone())
    }

    /// Is a writer open on `path`?
    pub fn is_writing(&self, path: &Path) -> bool {
        self.slots.lock().unwrap().contains_key(path)
    }

    /// Claim the writer of `path`, starting it (and repairing the archive)
    /// if needed. Blocking: call from `spawn_blocking`.
    pub fn acquire(self: &Arc<Self>, path: &Path, mode: OpenMode) -> Result<Lease, WriterError> {
        let mut slots = self.slots.lock().unwrap();
        // Checked under the lock shutdown drains the slots with, so no writer
        // can start after shutdown has collected the ones to close.
        if self.closed.load(Ordering::SeqCst) {
            return Err(WriterError::ShuttingDown);
        }
        if let Some(slot) = slots.get(path) {
            let h = slot.handle.clone();
            h.check_ok()?;
            if mode == OpenMode::Create {
                if h.shared.streams.load(Ordering::SeqCst) > 0 {
                    return Err(WriterError::Busy(path.display().to_string()));
                }
                let (tx, rx) = oneshot::channel();
                h.tx.try_send(Job::Recreate(tx))
                    .map_err(|_| WriterError::QueueFull(path.display().to_string()))?;
                drop(slots);
                rx.blocking_recv()
                    .map_err(|_| WriterError::ShuttingDown)??;
                slots = self.slots.lock().unwrap();
            }
            h.shared.streams.fetch_add(1, Ordering::SeqCst);
            drop(slots);
            return Ok(Lease {
                handle: h,
                repaired: None,
                claim: None,
            });
        }
        // Another process (or a writer of ours that is still closing) may hold
        // the file lock for a moment: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut writer, report) = loop {
            match ArchiveWriter::open(path, mode) {
                Ok(x) => break x,
                Err(gtar::Error::Locked) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(WriterError::from_gtar(path, e)),
            }
        };
        if self.limits.direct_io {
            writer.enable_direct_io();
        }
        if let Some(rep) = &report {
            tracing::warn!(
                archive = %path.display(),
                reason = %rep.reason,
                kept_entries = rep.entries.len(),
                kept_commits = rep.txns_kept,
                dropped_entries = rep.entries_dropped,
                dropped_bytes = rep.bytes_dropped,
                "repaired archive on open"
            );
        }
        let reader = writer
            .reader()
            .map_err(|e| WriterError::from_gtar(path, e))?;
        let (tx, rx) = mpsc::channel(self.limits.queue_frames);
        let shared = Arc::new(Shared {
            state: Mutex::new(WriterState::Ok),
            busy_since_ms: AtomicU64::new(0),
            sync_since_ms: AtomicU64::new(0),
            epoch: self.started,
            streams: AtomicU64::new(1),
            claims: Mutex::new(HashMap::new()),
            disk_full: std::sync::atomic::AtomicBool::new(false),
            failures: self.failures.clone(),
            reader: std::sync::RwLock::new(reader),
        });
        let reader_index = shared
            .reader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .shared_index();
        let handle = WriterHandle {
            path: path.to_path_buf(),
            tx,
            shared: shared.clone(),
            parts_cap: self.limits.parts_per_frame,
        };
        let actor = Actor {
            path: path.to_path_buf(),
            writer: Some(writer),
            rx,
            limits: self.limits.clone(),
            rt: self.runtime.clone(),
            shared,
            registry: Arc::downgrade(self),
            reader_index,
            syncer: None,
            backlog: std::collections::VecDeque::new(),
        };
        let name = format!(
            "gtar-writer-{}",
            path.file_name()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        );
        let thread = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || actor.run())
            .map_err(|e| WriterError::Format(format!("cannot start a writer thread: {e}")))?;
        slots.insert(
            path.to_path_buf(),
            Slot {
                handle: handle.clone(),
                thread: Some(thread),
            },
        );
        Ok(Lease {
            handle,
            repaired: report,
            claim: None,
        })
    }

    /// Failed writers, for the health service: (path, why).
    pub fn failed(&self) -> Vec<(PathBuf, String)> {
        self.slots
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(p, s)| match s.handle.state() {
                WriterState::Failed(w) => Some((p.clone(), w)),
                WriterState::Ok => None,
            })
            .collect()
    }

    /// Archives whose health is not SERVING, for the health service:
    /// (path, why) for failed writers and for those whose last frame hit a
    /// full disk (until a frame commits again).
    pub fn problems(&self) -> Vec<(PathBuf, String)> {
        self.slots
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(p, s)| match s.handle.state() {
                WriterState::Failed(w) => Some((p.clone(), w)),
                WriterState::Ok if s.handle.shared.disk_full.load(Ordering::SeqCst) => {
                    Some((p.clone(), "the disk is full".to_string()))
                }
                WriterState::Ok => None,
            })
            .collect()
    }

    /// True when every working writer thread is alive and none has been
    /// stuck in disk work for longer than `stuck`: what the systemd watchdog
    /// pings on. Writers that failed are reported through health instead (one
    /// failing archive must not get the whole daemon restarted), and time
    /// spent waiting for a slow client's data does not count as stuck.
    pub fn healthy(&self, stuck: Duration) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.slots.lock().unwrap().values().all(|s| {
            if s.handle.state() != WriterState::Ok {
                return true;
            }
            let alive = s.thread.as_ref().is_some_and(|t| !t.is_finished());
            let ok =
                |since: u64| since == 0 || now.saturating_sub(since) < stuck.as_millis() as u64;
            let sh = &s.handle.shared;
            alive
                && ok(sh.busy_since_ms.load(Ordering::SeqCst))
                && ok(sh.sync_since_ms.load(Ordering::SeqCst))
        })
    }

    /// Close every writer: abort frames in progress, write central
    /// directories, fsync, join the threads. Blocking.
    pub fn shutdown(&self) {
        let slots: Vec<(PathBuf, Slot)> = {
            let mut slots = self.slots.lock().unwrap();
            self.closed.store(true, Ordering::SeqCst);
            slots.drain().collect()
        };
        for (_, s) in &slots {
            // A full queue still closes: dropping every sender ends the loop too.
            let _ = s.handle.tx.try_send(Job::Close);
        }
        for (path, mut s) in slots {
            drop(s.handle);
            if let Some(t) = s.thread.take() {
                if t.join().is_err() {
                    tracing::error!(archive = %path.display(), "writer thread panicked during shutdown");
                }
            }
        }
        let retired = std::mem::take(&mut *self.retired.lock().unwrap());
        for t in retired {
            if t.join().is_err() {
                tracing::error!("a retired writer thread panicked while closing");
            }
        }
    }

    /// Remove an idle writer (no streams, nothing queued). Called by the
    /// writer thread itself, which exits (closing the archive) when this
    /// returns true. Holding the registry lock means no stream can claim the
    /// writer in between.
    fn retire_if_idle(
        &self,
        path: &Path,
        shared: &Arc<Shared>,
        queue_empty: impl Fn() -> bool,
    ) -> bool {
        let mut slots = self.slots.lock().unwrap();
        let ours = slots
            .get(path)
            .is_some_and(|s| Arc::ptr_eq(&s.handle.shared, shared));
        if ours && shared.streams.load(Ordering::SeqCst) == 0 && queue_empty() {
            let thread = slots.remove(path).and_then(|mut s| s.thread.take());
            let mut retired = self.retired.lock().unwrap();
            retired.retain(|t| !t.is_finished());
            retired.extend(thread);
            return true;
        }
        false
    }
}

/// How long a frame may still keep the writer waiting (module docs).
struct Budget {
    limit: Duration,
    waited: Duration,
    delivered: u64,
}

impl Budget {
    fn left(&self) -> Duration {
        let credit = Duration::from_secs(self.delivered / FRAME_DEADLINE_CREDIT);
        (self.limit + credit).saturating_sub(self.waited)
    }
}

/// The writer thread's state.
struct Actor {
    path: PathBuf,
    writer: Option<ArchiveWriter>,
    rx: mpsc::Receiver<Job>,
    limits: Limits,
    rt: tokio::runtime::Handle,
    shared: Arc<Shared>,
    registry: std::sync::Weak<Registry>,
    reader_index: Arc<std::sync::RwLock<gtar::Index>>,
    /// Started with the first frame; stopped (after a last fsync) on close.
    syncer: Option<Syncer>,
    /// Jobs taken off the queue, to pick whole frames first (module docs).
    backlog: std::collections::VecDeque<Job>,
}

enum Next {
    Job(Job),
    Idle,
    Closed,
}

impl Actor {
    fn run(mut self) {
        let path = self.path.clone();
        let shared = self.shared.clone();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.main_loop()));
        if res.is_err() {
            tracing::error!(archive = %path.display(), "writer thread panicked; archive marked failed");
            shared.set_failed("the writer thread panicked".into());
            shared.busy_since_ms.store(0, Ordering::SeqCst);
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(archive = %self.path.display(), error = %why, "writer failed; no more frames are accepted for this archive");
        self.shared.set_failed(why);
    }

    fn failed(&self) -> Option<WriterError> {
        match &*self.shared.state.lock().unwrap() {
            WriterState::Ok => None,
            WriterState::Failed(why) => Some(WriterError::Failed {
                path: self.path.display().to_string(),
                why: why.clone(),
            }),
        }
    }

    fn next(&mut self) -> Next {
        while let Ok(j) = self.rx.try_recv() {
            self.backlog.push_back(j);
        }
        if !self.backlog.is_empty() {
            return Next::Job(self.pick());
        }
        let wait = self.limits.idle_tail;
        let rx = &mut self.rx;
        match self
            .rt
            .block_on(async { tokio::time::timeout(wait, rx.recv()).await })
        {
            Ok(Some(j)) => Next::Job(j),
            Ok(None) => Next::Closed,
            Err(_) => Next::Idle,
        }
    }

    /// The first whole frame whose stream has nothing queued before it, and
    /// that no other kind of job (recreate, close) precedes; else the oldest.
    fn pick(&mut self) -> Job {
        let mut seen = Vec::new();
        let mut at = 0;
        for (i, j) in self.backlog.iter().enumerate() {
            match j {
                Job::Frame {
                    whole: true,
                    stream,
                    ..
                } if !seen.contains(stream) => {
                    at = i;
                    break;
                }
                Job::Frame { stream, .. } => seen.push(*stream),
                _ => break,
            }
        }
        self.backlog.remove(at).expect("the backlog is not empty")
    }

    fn main_loop(&mut self) {
        let mut tail_written = true;
        loop {
            match self.next() {
                Next::Job(Job::Frame {
                    parts,
                    received,
                    durable,
                    ..
                }) => {
                    self.busy(true);
                    self.frame(parts, received, durable);
                    tail_written = false;
                    self.busy(false);
                }
                Next::Job(Job::Between(work, done)) => {
                    self.busy(true);
                    let _ = done.send(self.between(work));
                    // A reopened file has its central directory written.
                    tail_written = false;
                    self.busy(false);
                }
                Next::Job(Job::Recreate(done)) => {
                    self.busy(true);
                    self.stop_syncer();
                    let res = self.recreate();
                    let _ = done.send(res);
                    self.busy(false);
                }
                Next::Idle => {
                    if !tail_written {
                        self.busy(true);
                        self.write_tail();
                        tail_written = true;
                        self.busy(false);
                    }
                    if let Some(reg) = self.registry.upgrade() {
                        let rx = &self.rx;
                        if reg.retire_if_idle(&self.path, &self.shared, || rx.is_empty()) {
                            self.close();
                            return;
                        }
                    }
                }
                Next::Job(Job::Close) | Next::Closed => {
                    self.close();
                    return;
                }
            }
        }
    }

    fn busy(&self, on: bool) {
        let v = if on { self.shared.now_ms() } else { 0 };
        self.shared.busy_since_ms.store(v, Ordering::SeqCst);
    }

    fn recreate(&mut self) -> Result<(), WriterError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        // The fsync thread holds the old writer's checkpoint chain: stop it
        // (after a last fsync) before the new writer starts a new chain.
        self.stop_syncer();
        drop(self.writer.take()); // releases the lock
                                  // Keep the index handle readers already share; the new writer fills it.
        let index = self.reader_index.clone();
        match ArchiveWriter::open_shared(&self.path, OpenMode::Create, index) {
            Ok((mut w, _)) => {
                if self.limits.direct_io {
                    w.enable_direct_io();
                }
                self.writer = Some(w);
                Ok(())
            }
            Err(e) => {
                let err = WriterError::from_gtar(&self.path, e);
                self.fail(err.to_string());
                Err(err)
            }
        }
    }

    /// Run `work` with the archive to itself (see [`Between`]); reopen the
    /// path if it replaced the file.
    fn between(&mut self, work: Between) -> Result<(), WriterError> {
        if let Some(e) = self.failed() {
            return Err(e); // `work` is dropped unrun
        }
        if self.writer.is_none() {
            return Err(WriterError::ShuttingDown);
        }
        // Acks waiting for an fsync of the old file get it now, and the
        // fsync thread lets go of the old file.
        self.stop_syncer();
        let replaced = {
            let ix = self.reader_index.read().unwrap_or_else(|p| p.into_inner());
            work(&ix)
        };
        if !replaced {
            return Ok(());
        }
        // A fresh index for the new file: readers of the old one keep theirs.
        let index = Arc::new(std::sync::RwLock::new(gtar::Index::new()));
        let opened = ArchiveWriter::open_shared(&self.path, OpenMode::Append, index.clone())
            .and_then(|(w, rep)| Ok((w.reader()?, w, rep)));
        match opened {
            Ok((reader, mut w, rep)) => {
                if let Some(rep) = rep {
                    // The new file was fsynced whole before the rename.
                    tracing::warn!(archive = %self.path.display(), reason = %rep.reason, "the compacted file needed recovery");
                }
                if self.limits.direct_io {
                    w.enable_direct_io();
                }
                // The old writer writes its tail to the old (unlinked) file
                // and lets go of its lock.
                drop(self.writer.replace(w));
                self.reader_index = index;
                *self
                    .shared
                    .reader
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = reader;
                Ok(())
            }
            Err(e) => {
                let err = WriterError::from_gtar(&self.path, e);
                self.fail(format!("reopening after compaction: {err}"));
                Err(err)
            }
        }
    }

    fn frame(
        &mut self,
        mut parts: mpsc::Receiver<Part>,
        received: oneshot::Sender<Result<Committed, WriterError>>,
        durable: oneshot::Sender<Result<(), WriterError>>,
    ) {
        if let Some(e) = self.failed() {
            let _ = received.send(Err(e.clone()));
            let _ = durable.send(Err(e));
            return;
        }
        let res = self.write_frame(&mut parts);
        // A full disk shows in health until a frame commits again.
        let full = matches!(res, Err(WriterError::DiskFull(_)));
        if self.shared.disk_full.swap(full, Ordering::SeqCst) != full {
            self.shared.failures.send_modify(|n| *n += 1);
        }
        match res {
            Ok(c) => {
                let _ = received.send(Ok(c));
                match self.syncer() {
                    Ok(s) => s.push(durable),
                    Err(e) => {
                        self.fail(format!("cannot start the fsync thread: {e}"));
                        let _ = durable.send(Err(self.failed().expect("just failed")));
                    }
                }
            }
            Err(e) => {
                if let WriterError::Format(why) = &e {
                    // An I/O error mid-frame: the frame was truncated away, but
                    // the file may be in an unknown state. Stop accepting.
                    self.fail(why.clone());
                }
                let _ = received.send(Err(e.clone()));
                let _ = durable.send(Err(e));
            }
        }
    }

    /// The frame's next part, charging the wait to its [`Budget`].
    fn recv_part(
        &self,
        parts: &mut mpsc::Receiver<Part>,
        budget: &mut Budget,
    ) -> Result<Part, WriterError> {
        // Parts already queued cost no wait (and no clock read).
        let got = match parts.try_recv() {
            Ok(p) => Ok(Some(p)),
            Err(mpsc::error::TryRecvError::Disconnected) => Ok(None),
            Err(mpsc::error::TryRecvError::Empty) => {
                let left = budget.left();
                let t0 = Instant::now();
                let r = self
                    .rt
                    .block_on(async { tokio::time::timeout(left, parts.recv()).await });
                budget.waited += t0.elapsed();
                r
            }
        };
        match got {
            Ok(Some(p)) => {
                budget.delivered += match &p {
                    Part::Data(d) => d.len() as u64,
                    Part::Shm { len, .. } => *len,
                    _ => 0,
                };
                Ok(p)
            }
            Ok(None) => Err(WriterError::Aborted(
                "the client stopped before committing".into(),
            )),
            Err(_) => Err(WriterError::Deadline {
                path: self.path.display().to_string(),
                waited_s: budget.waited.as_secs_f64(),
                limit_s: budget.limit.as_secs(),
            }),
        }
    }

    fn write_frame(&mut self, parts: &mut mpsc::Receiver<Part>) -> Result<Committed, WriterError> {
        let path = self.path.clone();
        let g = |e| WriterError::from_gtar(&path, e);
        let mut writer = self.writer.take().ok_or(WriterError::ShuttingDown)?;
        let mut budget = Budget {
            limit: self.limits.frame_deadline,
            waited: Duration::ZERO,
            delivered: 0,
        };
        let budget = &mut budget;
        let res = (|| {
            let mut txn = writer.begin().map_err(g)?;
            loop {
                match self.recv_part(parts, budget)? {
                    Part::Start { path: p, size } => {
                        let mut e = txn.start_entry(&p, size).map_err(g)?;
                        let mut left = size;
                        while left > 0 {
                            match self.recv_part(parts, budget)? {
                                Part::Data(d) => {
                                    e.write(&d).map_err(g)?;
                                    left -= d.len() as u64;
                                }
                                Part::Shm {
                                    region,
                                    offset,
                                    len,
                                } => {
                                    region
                                        .with_bytes(offset, len, |b| e.write_unstaged(b))
                                        .map_err(g)?;
                                    left -= len;
                                }
                                _ => {
                                    return Err(WriterError::Invalid(format!(
                                        "{p}: {left} bytes missing"
                                    )))
                                }
                            }
                        }
                        e.finish().map_err(g)?;
                    }
                    Part::Data(_) | Part::Shm { .. } => {
                        return Err(WriterError::Invalid("data outside a tensor".into()))
                    }
                    Part::Whole { path: p, data } => {
                        txn.add(&p, &data, gtar::Compression::Stored).map_err(g)?
                    }
                    Part::Compressed { path: p, data } => {
                        txn.add_precompressed(&p, &data).map_err(g)?
                    }
                    Part::Commit => return txn.commit().map_err(g),
                }
            }
        })();
        self.writer = Some(writer);
        res
    }

    /// The fsync thread, started on first use.
    fn syncer(&mut self) -> std::io::Result<&Syncer> {
        if self.syncer.is_none() {
            let (file, checkpoints) = match self.writer.as_ref() {
                Some(w) => (
                    w.sync_handle().map_err(std::io::Error::other)?,
                    w.checkpoints(),
                ),
                None => return Err(std::io::Error::other("no archive open")),
            };
            self.syncer = Some(Syncer::start(
                file,
                checkpoints,
                self.path.clone(),
                self.shared.clone(),
            )?);
        }
        Ok(self.syncer.as_ref().expect("just started"))
    }

    /// Sync what is waiting and stop the fsync thread.
    fn stop_syncer(&mut self) {
        if let Some(s) = self.syncer.take() {
            s.stop();
        }
    }

    fn write_tail(&mut self) {
        // Acks still waiting are answered first: their frames come before the tail.
        if let Some(s) = &self.syncer {
            s.drain();
        }
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.write_tail() {
                tracing::warn!(archive = %self.path.display(), error = %e, "could not write the central directory");
            }
        }
    }

    fn close(&mut self) {
        // Frames still queued are refused; their senders see the drop.
        self.rx.close();
        while let Ok(j) = self.rx.try_recv() {
            self.backlog.push_back(j);
        }
        for job in self.backlog.drain(..) {
            if let Job::Frame {
                received, durable, ..
            } = job
            {
                let _ = received.send(Err(WriterError::ShuttingDown));
                let _ = durable.send(Err(WriterError::ShuttingDown));
            }
        }
        self.stop_syncer();
        if let Some(w) = self.writer.take() {
            if let Err(e) = w.close() {
                tracing::error!(archive = %self.path.display(), error = %e, "closing the archive failed");
            }
        }
    }
}
