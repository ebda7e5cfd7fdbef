//! The writer thread: takes one frame job at a time, writes its parts,
//! commits, hands the fsync to the syncer, and runs `Between` work.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::limits::FRAME_DEADLINE_CREDIT;

use gtar::{ArchiveWriter, Committed, OpenMode};

use super::handle::{Job, Shared};
use super::syncer::Syncer;
use super::*;

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
pub(super) struct Actor {
    /// The archive's canonical path.
    pub(super) path: PathBuf,
    /// The one writer of the archive; `None` once closed (or after a
    /// failed reopen).
    pub(super) writer: Option<ArchiveWriter>,
    /// The job queue [`WriterHandle`]s send to.
    pub(super) rx: mpsc::Receiver<Job>,
    pub(super) limits: Limits,
    /// The runtime the writer blocks on to receive parts.
    pub(super) rt: tokio::runtime::Handle,
    /// State shared with the handles (health, claims, the reader).
    pub(super) shared: Arc<Shared>,
    /// To retire itself when idle; weak, so a writer never keeps the
    /// registry alive.
    pub(super) registry: std::sync::Weak<Registry>,
    /// The index the shared reader sees: updated at each commit, so acked
    /// frames are visible at once.
    pub(super) reader_index: Arc<std::sync::RwLock<gtar::Index>>,
    /// Started with the first frame; stopped (after a last fsync) on close.
    pub(super) syncer: Option<Syncer>,
    /// Jobs taken off the queue, to pick whole frames first (module docs).
    pub(super) backlog: std::collections::VecDeque<Job>,
}

enum Next {
    Job(Job),
    Idle,
    Closed,
}

impl Actor {
    pub(super) fn run(mut self) {
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
                // A new file: offsets start again.
                self.shared
                    .durable_end
                    .store(w.committed_len(), Ordering::SeqCst);
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
                // The new file was fsynced whole before the rename.
                self.shared
                    .durable_end
                    .store(w.committed_len(), Ordering::SeqCst);
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
                    Ok(s) => s.push(durable, c.txn + c.bytes),
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
