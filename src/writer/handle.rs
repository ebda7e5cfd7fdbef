//! What the rest of the daemon holds of a writer: a [`WriterHandle`] to
//! queue frames and read through, a [`Lease`] per stream with its group
//! claim, and the state the handle shares with the writer thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::peer::Peer;

use gtar::{Archive, Committed, Precompressed, ScanReport};

use super::*;

/// A piece of a frame, in order.
#[derive(Debug)]
pub enum Part {
    /// Start a stored entry of `size` bytes; `Data` parts follow.
    Start {
        path: String,
        size: u64,
    },
    Data(bytes::Bytes),
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

pub(super) enum Job {
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

pub(super) struct Shared {
    /// Ok, or failed for good (and why).
    pub(super) state: Mutex<WriterState>,
    /// Set while the thread is busy with a job (ms since `epoch`).
    pub(super) busy_since_ms: AtomicU64,
    /// Set while an fsync runs (ms since `epoch`).
    pub(super) sync_since_ms: AtomicU64,
    /// The registry's start: every writer's timestamps share it.
    pub(super) epoch: Instant,
    /// Live streams holding a [`Lease`]: an idle writer retires only at
    /// zero, and `Recreate` is refused while another stream is live.
    pub(super) streams: AtomicU64,
    /// Groups being written by live streams: group → claims.
    pub(super) claims: Mutex<HashMap<String, Vec<Claim>>>,
    /// The last frame failed on a full disk (cleared by the next commit).
    pub(super) disk_full: std::sync::atomic::AtomicBool,
    /// The registry's failure count, bumped when this writer fails, so the
    /// health service learns of it at once (published, not polled).
    pub(super) failures: Arc<watch::Sender<u64>>,
    /// A reader that sees every committed frame: replaced when a compaction
    /// puts a new file in place (readers already holding the old one keep
    /// a consistent view: the old file with its own, no longer growing, index).
    pub(super) reader: std::sync::RwLock<Archive>,
    /// Every commit ending at or before this offset of the current file is
    /// durable (an fsync covering it returned): the committed length when
    /// the file was opened, then the end of the last commit each fsync
    /// covered. Commits are contiguous and never rewritten, so a frame is
    /// durable iff its last entry starts before it.
    pub(super) durable_end: AtomicU64,
}

impl Shared {
    /// Mark the writer failed (for good) and publish it.
    pub(super) fn set_failed(&self, why: String) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = WriterState::Failed(why);
        self.failures.send_modify(|n| *n += 1);
    }
}

impl Shared {
    /// Milliseconds since `epoch`, never 0 (0 means "not busy").
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// A live stream's claim on one group of an archive.
#[derive(Debug, Clone)]
pub(super) struct Claim {
    /// Unique per claim (`CLAIM_IDS`): what a lease releases on drop.
    id: u64,
    /// Who holds it, for the refusal's message.
    holder: Peer,
    /// The holder agreed to share the group with others who agree too.
    share: bool,
}

static CLAIM_IDS: AtomicU64 = AtomicU64::new(1);

/// A handle on one archive's writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    /// The archive's canonical path.
    pub(super) path: PathBuf,
    /// The writer's bounded job queue (`try_send`: full is QueueFull).
    pub(super) tx: mpsc::Sender<Job>,
    /// State shared with the writer thread.
    pub(super) shared: Arc<Shared>,
    /// Capacity of each frame's part channel ([`Limits::parts_per_frame`]).
    pub(super) parts_cap: usize,
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

    /// See [`Shared::durable_end`]: commits of the file [`Self::reader`]
    /// reads that end at or before this offset are durable.
    pub fn durable_end(&self) -> u64 {
        self.shared.durable_end.load(Ordering::SeqCst)
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

    pub(super) fn check_ok(&self) -> Result<(), WriterError> {
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
    pub(super) claim: Option<(String, u64)>,
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
