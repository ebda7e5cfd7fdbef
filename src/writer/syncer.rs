//! Group commit off the writer thread.
//!
//! The writer thread pushes a frame's durable-ack sender here right after the
//! frame's bytes are written; this thread takes every ack waiting, calls
//! `fdatasync` once on a duplicate of the archive's file descriptor, and then
//! answers them all. While one fsync runs, the writer keeps writing the next
//! frames, and their acks collect for the next fsync: batches grow with load,
//! and an idle archive is synced at once.
//!
//! Invariant: an ack is pushed only after its frame's bytes were written, and
//! an fsync only answers acks it took before it started, so every ack it
//! answers `Ok` covers bytes that were on disk when fdatasync returned.
//! The fsync goes through the writer's [`gtar::Checkpoints`], which records
//! the frames it covered in the recovery checkpoint after it returns.
//! A failed fsync fails the archive for good: the kernel may have dropped the
//! dirty pages, so nothing written since the last good fsync can be trusted.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::handle::Shared;
use super::{WriterError, WriterState};

pub(super) type Ack = oneshot::Sender<Result<(), WriterError>>;

#[derive(Default)]
struct Queue {
    /// Acks, each with the end of the commit it answers for (0: none).
    waiting: Vec<(Ack, u64)>,
    closed: bool,
}

pub(super) struct Syncer {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(super) fn start(
        file: File,
        checkpoints: gtar::Checkpoints,
        path: PathBuf,
        shared: Arc<Shared>,
    ) -> std::io::Result<Syncer> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("gtar-fsync".into())
            .spawn(move || run(file, checkpoints, path, shared, q))?;
        Ok(Syncer {
            queue,
            thread: Some(thread),
        })
    }

    /// Ask for an fsync covering everything written so far, the commit
    /// ending at `end` included.
    pub(super) fn push(&self, ack: Ack, end: u64) {
        let (m, cv) = &*self.queue;
        m.lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .push((ack, end));
        cv.notify_one();
    }

    /// Block until everything written so far is synced (or failed).
    pub(super) fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        self.push(tx, 0);
        let _ = rx.blocking_recv();
    }

    /// Sync what is waiting, then stop the thread.
    pub(super) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (m, cv) = &*self.queue;
        m.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    file: File,
    checkpoints: gtar::Checkpoints,
    path: PathBuf,
    shared: Arc<Shared>,
    queue: Arc<(Mutex<Queue>, Condvar)>,
) {
    let (m, cv) = &*queue;
    loop {
        let batch = {
            let mut q = m.lock().unwrap_or_else(|p| p.into_inner());
            while q.waiting.is_empty() && !q.closed {
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.waiting.is_empty() {
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let failed = match &*shared.state.lock().unwrap_or_else(|p| p.into_inner()) {
            WriterState::Failed(why) => Some(why.clone()),
            WriterState::Ok => None,
        };
        let result = match failed {
            Some(why) => Err(why),
            None => {
                shared
                    .sync_since_ms
                    .store(shared.now_ms(), Ordering::SeqCst);
                let r = checkpoints.sync(&file);
                shared.sync_since_ms.store(0, Ordering::SeqCst);
                r.map_err(|e| {
                    let why = format!("fsync failed: {e}");
                    tracing::error!(archive = %path.display(), error = %why, "writer failed; no more frames are accepted for this archive");
                    shared.set_failed(why.clone());
                    why
                })
            }
        };
        if result.is_ok() {
            let end = batch.iter().map(|(_, end)| *end).max().unwrap_or(0);
            shared.durable_end.fetch_max(end, Ordering::SeqCst);
        }
        for (ack, _) in batch {
            let _ = ack.send(result.clone().map_err(|why| WriterError::Failed {
                path: path.display().to_string(),
                why,
            }));
        }
    }
}
