//! Every writer of the daemon by archive path: starting one (repairing
//! the archive), health and watchdog queries, retiring idle writers, and
//! the shutdown that closes them all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use gtar::{ArchiveWriter, OpenMode};

use super::actor::Actor;
use super::handle::{Job, Shared};
use super::*;

/// One open writer: the handle streams clone, and its thread (taken when
/// joined).
struct Slot {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
}

/// All writers of the daemon, by canonical archive path.
pub struct Registry {
    /// Every writer's tunables.
    limits: Limits,
    /// The runtime writer threads resolve acks on (they are not its workers).
    runtime: tokio::runtime::Handle,
    /// The open writers, by canonical archive path: at most one per path.
    slots: Mutex<HashMap<PathBuf, Slot>>,
    /// The epoch of every writer's busy/sync timestamps (watchdog).
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
            durable_end: AtomicU64::new(writer.committed_len()),
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
    pub(super) fn retire_if_idle(
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
