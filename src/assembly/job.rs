//! Frames written together by the ranks of one job.
//!
//! Invariants (a reader must not break them):
//! * Nothing of a frame reaches the sink (the archive's writer) before every
//!   rank of the world has committed its part and the parts were checked to
//!   agree: same dtype and global shape per tensor, slices inside it, no two
//!   slices sharing an element, every element covered, a record sent by
//!   several ranks byte-identical. Then the frame goes to the sink whole, as
//!   one ordinary frame (one transaction), so readers see all of it or none.
//! * A frame is aborted — for every rank, each told which ranks had not
//!   committed it — when a rank's stream ends after beginning it and before
//!   committing it (its [`Seat`] drops; frames it had not begun wait for
//!   the rank to rejoin, under the deadline), when the frame deadline passes (counted from the first
//!   rank's `begin`, plus the same per-byte credit the writer grants), or
//!   when the parts disagree. Nothing is written then; frames already stored
//!   are not touched; the next frame proceeds.
//! * A rank that commits an aborted frame late (it was still sending when
//!   another rank died) is told at its commit ([`Tomb`]), never left waiting.
//! * One seat per rank: a second live stream for a rank is refused; a rank
//!   whose stream ended may rejoin (a restarted process).
//! * The job's lock is held only for bookkeeping, never across an await or
//!   a copy of tensor bytes; planning a frame's parts (which may copy small
//!   runs together) runs on a blocking thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::frame::{plan, RankFrame};
use super::{Abort, FrameError, Tickets};
use crate::error::{Classify, Kind};
use crate::limits::FRAME_DEADLINE_CREDIT;
use crate::writer::{FrameTicket, Lease, Part, WriterError, WriterHandle};

/// Where a job's assembled frames go. A trait so the assembler is tested
/// without a writer thread.
pub trait Sink: Send + Sync + 'static {
    /// Queue a whole frame (parts ending with [`Part::Commit`]).
    fn submit(&self, parts: Vec<Part>) -> Result<FrameTicket, WriterError>;
}

/// The archive's writer, leased for the job's lifetime (its group claimed
/// once for all the job's ranks).
pub struct WriterSink {
    pub handle: WriterHandle,
    /// The writer orders frames by stream: the job is one stream.
    pub stream: u64,
    pub _lease: Lease,
}

impl Sink for WriterSink {
    fn submit(&self, parts: Vec<Part>) -> Result<FrameTicket, WriterError> {
        self.handle.submit_frame(self.stream, parts)
    }
}

/// A stream's place in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    pub job: String,
    pub rank: u32,
    pub world: u32,
}

/// Ranks in a job at most.
pub const MAX_WORLD: u32 = 4096;

/// Which job a stream joins: the same job name in another archive, group or
/// (on the Unix socket) of another user is another job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub uid: Option<u32>,
    pub archive: String,
    pub group: String,
    pub job: String,
}

/// Why a stream could not join a job or commit to it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Conflict(String),
    /// Opening the archive for the job failed.
    #[error("{msg}")]
    Open { kind: Kind, msg: String },
}

impl JobError {
    pub fn open(e: &impl Classify) -> JobError {
        JobError::Open {
            kind: e.kind(),
            msg: e.to_string(),
        }
    }
}

impl Classify for JobError {
    fn kind(&self) -> Kind {
        match self {
            JobError::Bad(_) => Kind::BadInput,
            JobError::Conflict(_) => Kind::Conflict,
            JobError::Open { kind, .. } => *kind,
        }
    }
}

/// Every job of the daemon.
pub struct Jobs<S> {
    deadline: Duration,
    jobs: Mutex<HashMap<JobKey, Weak<Job<S>>>>,
}

impl<S: Sink> Jobs<S> {
    /// `deadline`: how long a frame may wait for its last rank (plus a
    /// credit per byte delivered), as the writer's `--frame-deadline`.
    pub fn new(deadline: Duration) -> Arc<Jobs<S>> {
        Arc::new(Jobs {
            deadline,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    /// Take `spec.rank`'s seat in the job `key`, starting the job with
    /// `make_sink` if no rank holds it. `level`: the stream's compression.
    /// Blocking when it starts a job (`make_sink` may open and repair the
    /// archive): call off the async workers.
    pub fn join(
        &self,
        key: JobKey,
        spec: &RankSpec,
        level: u32,
        make_sink: impl FnOnce() -> Result<S, JobError>,
    ) -> Result<Seat<S>, JobError> {
        if spec.world == 0 || spec.world > MAX_WORLD {
            return Err(JobError::Bad(format!(
                "ranks.world_size: {} is not in 1..={MAX_WORLD}",
                spec.world
            )));
        }
        if spec.rank >= spec.world {
            return Err(JobError::Bad(format!(
                "ranks.rank: {} is not below ranks.world_size {} (ranks count from 0)",
                spec.rank, spec.world
            )));
        }
        if spec.job.is_empty() || spec.job.len() > 255 {
            return Err(JobError::Bad(
                "ranks.job: must be 1 to 255 bytes, the same for every rank of the job".into(),
            ));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.retain(|_, j| j.strong_count() > 0);
        let job = match jobs.get(&key).and_then(Weak::upgrade) {
            Some(j) => j,
            None => {
                let j = Arc::new(Job {
                    name: key.job.clone(),
                    archive: key.archive.clone(),
                    prefix: key.group.clone(),
                    world: spec.world,
                    level,
                    deadline: self.deadline,
                    sink: make_sink()?,
                    state: Mutex::new(JobState {
                        seats: vec![false; spec.world as usize],
                        frames: HashMap::new(),
                        tombs: HashMap::new(),
                        next_gen: 0,
                    }),
                });
                jobs.insert(key, Arc::downgrade(&j));
                j
            }
        };
        drop(jobs);
        job.seat(spec, level)
    }
}

/// One job: its ranks' seats and the frames being assembled.
pub struct Job<S> {
    name: String,
    archive: String,
    /// The streams' group: the manifest goes under it.
    prefix: String,
    world: u32,
    level: u32,
    deadline: Duration,
    sink: S,
    state: Mutex<JobState>,
}

struct JobState {
    /// Which ranks have a live stream.
    seats: Vec<bool>,
    /// Frames some rank has begun and not all have committed.
    frames: HashMap<String, Open>,
    /// Aborted frames some rank may still commit.
    tombs: HashMap<String, Tomb>,
    next_gen: u64,
}

/// A frame being assembled.
struct Open {
    /// Tells this frame from a later one with the same index (deadline).
    gen: u64,
    started: Instant,
    /// Bytes delivered so far by all ranks (for the deadline's credit).
    bytes: u64,
    /// Ranks that sent `begin` for it.
    began: BTreeSet<u32>,
    committed: BTreeMap<u32, Committing>,
}

struct Committing {
    frame: RankFrame,
    waiter: Waiter,
}

struct Waiter {
    received: oneshot::Sender<Result<gtar::Committed, FrameError>>,
    durable: oneshot::Sender<Result<(), FrameError>>,
}

impl Waiter {
    fn new() -> (Waiter, Tickets) {
        let (rtx, rrx) = oneshot::channel();
        let (dtx, drx) = oneshot::channel();
        (
            Waiter {
                received: rtx,
                durable: dtx,
            },
            Tickets {
                received: rrx,
                durable: drx,
            },
        )
    }
}

/// An aborted frame and the ranks that have not been told yet (they had
/// not committed it).
struct Tomb {
    abort: Abort,
    unseen: BTreeSet<u32>,
}

/// Aborted frames remembered for late ranks, at most.
const MAX_TOMBS: usize = 1024;

impl<S: Sink> Job<S> {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seat(self: Arc<Self>, spec: &RankSpec, level: u32) -> Result<Seat<S>, JobError> {
        let mut st = self.lock();
        let held: Vec<u32> = (0..self.world).filter(|&r| st.seats[r as usize]).collect();
        if spec.world != self.world {
            return Err(JobError::Bad(format!(
                "ranks.world_size: {} disagrees with job {:?} on {}, whose connected ranks ({}) \
                 opened it with world_size {}; every rank must give the same",
                spec.world,
                self.name,
                self.archive,
                list(&held),
                self.world
            )));
        }
        if level != self.level {
            return Err(JobError::Bad(format!(
                "open.compression: {level} disagrees with job {:?}'s {}; every rank must give the same",
                self.name, self.level
            )));
        }
        if st.seats[spec.rank as usize] {
            return Err(JobError::Conflict(format!(
                "rank {} of job {:?} on {} is already connected by another live stream; each rank \
                 opens one stream (are two processes given the same rank?)",
                spec.rank, self.name, self.archive
            )));
        }
        st.seats[spec.rank as usize] = true;
        drop(st);
        Ok(Seat {
            job: self,
            rank: spec.rank,
        })
    }

    /// Abort `index` (under the lock): every rank that committed it is told
    /// now, the others when they commit it.
    fn abort_locked(&self, st: &mut JobState, index: &str, reason: String, bad_input: bool) {
        let Some(f) = st.frames.remove(index) else {
            return;
        };
        let missing: Vec<u32> = (0..self.world)
            .filter(|r| !f.committed.contains_key(r))
            .collect();
        let abort = Abort {
            index: index.to_string(),
            reason,
            missing: missing.clone(),
            bad_input,
        };
        tracing::warn!(job = %self.name, archive = %self.archive, frame = %index, reason = %abort.reason, "multi-rank frame aborted");
        for (_, c) in f.committed {
            let _ = c
                .waiter
                .received
                .send(Err(FrameError::Aborted(abort.clone())));
        }
        let unseen: BTreeSet<u32> = missing
            .into_iter()
            .filter(|&r| st.seats[r as usize])
            .collect();
        if !unseen.is_empty() {
            if st.tombs.len() >= MAX_TOMBS {
                st.tombs.clear();
            }
            st.tombs.insert(index.to_string(), Tomb { abort, unseen });
        }
    }

    fn leave(&self, rank: u32) {
        let mut st = self.lock();
        st.seats[rank as usize] = false;
        st.tombs.retain(|_, t| {
            t.unseen.remove(&rank);
            !t.unseen.is_empty()
        });
        // Frames the rank was sending: they cannot be completed. Frames it
        // has not begun wait for a rank that rejoins (a restarted process),
        // under the frame deadline.
        let waiting: Vec<String> = st
            .frames
            .iter()
            .filter(|(_, f)| f.began.contains(&rank) && !f.committed.contains_key(&rank))
            .map(|(i, _)| i.clone())
            .collect();
        for index in waiting {
            let reason = format!(
                "rank {rank} of job {:?} left (its stream ended: the process exited, was killed \
                 or lost the connection) before committing frame {index:?}; nothing of the frame \
                 was kept",
                self.name
            );
            self.abort_locked(&mut st, &index, reason, false);
        }
    }
}

/// A rank's seat in a job; leaving it (drop) aborts the frames the rank
/// has not committed.
pub struct Seat<S: Sink> {
    job: Arc<Job<S>>,
    rank: u32,
}

impl<S: Sink> Drop for Seat<S> {
    fn drop(&mut self) {
        self.job.leave(self.rank);
    }
}

impl<S: Sink> Seat<S> {
    pub fn sink(&self) -> &S {
        &self.job.sink
    }

    /// The rank starts frame `index`: the frame's deadline runs from the
    /// first rank's begin. Call from a tokio runtime (it starts a timer).
    pub fn begin(&self, index: &str) {
        let job = &self.job;
        let mut st = job.lock();
        if st
            .tombs
            .get(index)
            .is_some_and(|t| t.unseen.contains(&self.rank))
        {
            return; // aborted already; the rank is told at its commit
        }
        if let Some(f) = st.frames.get_mut(index) {
            f.began.insert(self.rank);
            return;
        }
        let gen = st.next_gen;
        st.next_gen += 1;
        let started = Instant::now();
        st.frames.insert(
            index.to_string(),
            Open {
                gen,
                started,
                bytes: 0,
                began: BTreeSet::from([self.rank]),
                committed: BTreeMap::new(),
            },
        );
        drop(st);
        tokio::spawn(watch_deadline(
            Arc::downgrade(job),
            index.to_string(),
            gen,
            started + job.deadline,
        ));
    }

    /// `n` more bytes of frame `index` arrived from this rank (they extend
    /// the frame's deadline like the writer's credit).
    pub fn delivered(&self, index: &str, n: u64) {
        if let Some(f) = self.job.lock().frames.get_mut(index) {
            f.bytes += n;
        }
    }

    /// The rank's part of `frame` is complete. The tickets resolve when the
    /// frame is written (or aborted) for every rank.
    pub fn commit(&self, frame: RankFrame) -> Result<Tickets, JobError> {
        let job = self.job.clone();
        let rank = self.rank;
        let index = frame.index.clone();
        let (waiter, tickets) = Waiter::new();
        let mut st = job.lock();
        if let Some(t) = st.tombs.get_mut(&index) {
            if t.unseen.remove(&rank) {
                let abort = t.abort.clone();
                if t.unseen.is_empty() {
                    st.tombs.remove(&index);
                }
                let _ = waiter.received.send(Err(FrameError::Aborted(abort)));
                return Ok(tickets);
            }
        }
        if !st.frames.contains_key(&index) {
            // `begin` always comes first; the frame was completed by the
            // other ranks meanwhile (this rank begun it twice), or the
            // rank rejoined: start it afresh.
            drop(st);
            self.begin(&index);
            st = job.lock();
        }
        let f = st.frames.get_mut(&index).expect("begun");
        if f.committed.contains_key(&rank) {
            return Err(JobError::Bad(format!(
                "commit: rank {rank} already committed frame {index:?} of job {:?}, which waits for \
                 ranks {}; a rank commits each frame once",
                job.name,
                list(
                    &(0..job.world)
                        .filter(|r| !f.committed.contains_key(r))
                        .collect::<Vec<_>>()
                )
            )));
        }
        let others = f.committed.iter().map(|(r, c)| (*r, &c.frame));
        if let Err(why) = super::frame::check_against(rank, &frame, others) {
            let reason = format!(
                "frame {index:?} of job {:?}: {why}; nothing of the frame was kept",
                job.name
            );
            f.committed.insert(rank, Committing { frame, waiter });
            job.abort_locked(&mut st, &index, reason, true);
            return Ok(tickets);
        }
        f.committed.insert(rank, Committing { frame, waiter });
        if f.committed.len() < job.world as usize {
            return Ok(tickets);
        }
        if let Err(why) = super::frame::check_cover(f.committed.iter().map(|(r, c)| (*r, &c.frame)))
        {
            let reason = format!(
                "frame {index:?} of job {:?}: {why}; nothing of the frame was kept",
                job.name
            );
            job.abort_locked(&mut st, &index, reason, true);
            return Ok(tickets);
        }
        let f = st.frames.remove(&index).expect("present");
        drop(st);
        tokio::spawn(complete(job, index, f));
        Ok(tickets)
    }
}

/// Write a frame every rank committed, and tell every rank.
async fn complete<S: Sink>(job: Arc<Job<S>>, index: String, f: Open) {
    let mut frames = Vec::new();
    let mut waiters = Vec::new();
    for (r, c) in f.committed {
        frames.push((r, c.frame));
        waiters.push(c.waiter);
    }
    let (level, prefix) = (job.level, job.prefix.clone());
    let planned = tokio::task::spawn_blocking(move || plan(&prefix, &index, frames, level)).await;
    let ticket = match planned {
        Ok(parts) => job.sink.submit(parts),
        Err(e) => Err(WriterError::Format(format!(
            "planning the frame failed: {e}"
        ))),
    };
    let ticket = match ticket {
        Ok(t) => t,
        Err(e) => {
            for w in waiters {
                let _ = w.received.send(Err(FrameError::Writer(e.clone())));
            }
            return;
        }
    };
    let received = ticket
        .received
        .await
        .unwrap_or(Err(WriterError::ShuttingDown));
    let mut durables = Vec::with_capacity(waiters.len());
    for w in waiters {
        let _ = w
            .received
            .send(received.clone().map_err(FrameError::Writer));
        durables.push(w.durable);
    }
    if received.is_err() {
        return;
    }
    let durable = ticket
        .durable
        .await
        .unwrap_or(Err(WriterError::ShuttingDown));
    for d in durables {
        let _ = d.send(durable.clone().map_err(FrameError::Writer));
    }
}

/// Abort frame `index` (generation `gen`) if not every rank committed it by
/// `until`, extended by the bytes delivered meanwhile.
async fn watch_deadline<S: Sink>(job: Weak<Job<S>>, index: String, gen: u64, mut until: Instant) {
    loop {
        tokio::time::sleep_until(until).await;
        let Some(job) = job.upgrade() else { return };
        let mut st = job.lock();
        let Some(f) = st.frames.get(&index).filter(|f| f.gen == gen) else {
            return;
        };
        let due = f.started + job.deadline + Duration::from_secs(f.bytes / FRAME_DEADLINE_CREDIT);
        if Instant::now() < due {
            until = due;
            continue;
        }
        let late: Vec<u32> = (0..job.world)
            .filter(|r| !f.committed.contains_key(r))
            .collect();
        let waited = f.started.elapsed().as_secs_f64();
        let reason = format!(
            "frame {index:?} of job {:?}: rank{} {} did not commit it within {waited:.1} s of the \
             first rank's begin (--frame-deadline {} s, plus 1 s per 64 MiB sent); nothing of \
             the frame was kept",
            job.name,
            if late.len() == 1 { "" } else { "s" },
            list(&late),
            job.deadline.as_secs()
        );
        job.abort_locked(&mut st, &index, reason, false);
        return;
    }
}

/// "0, 1, 2" (at most 16 named).
pub(crate) fn list(ranks: &[u32]) -> String {
    if ranks.is_empty() {
        return "none".into();
    }
    let mut s: Vec<String> = ranks.iter().take(16).map(|r| r.to_string()).collect();
    if ranks.len() > 16 {
        s.push(format!("… ({} in all)", ranks.len()));
    }
    s.join(", ")
}
