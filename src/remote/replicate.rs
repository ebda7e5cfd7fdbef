//! Replication: after frames are durable locally, upload them and commit the
//! remote manifest; then `replicated` acks go out.
//!
//! One tokio task per archive (not the writer thread) keeps the remote copy
//! caught up with the durable end of the local file. Each round uploads
//! everything durable and not yet remote as one segment (so a backlog is
//! caught up in few, large requests), read back from the local file with
//! pread on blocking threads, then commits the manifest. Its watermark
//! ("replicated up to byte N of the local file") is what `replicated` acks
//! wait for.
//!
//! Invariants:
//! * A segment ends at a durable commit point, and the manifest is put only
//!   after its segments are: whatever kills the daemon, the remote archive is
//!   the last committed manifest, whole frames only. A replicated ack follows
//!   the put that listed its frame.
//! * Nothing here blocks the writer or `durable` acks: the store being slow,
//!   unreachable or refusing only makes the watermark wait. Errors are kept
//!   (health, DescribeArchive, one log line per change) and retried with
//!   backoff; the backlog is the local file, so it costs no memory. Beyond
//!   `backlog_bytes` the archive is reported *lagging*; frames keep being
//!   accepted and acked durable, and replication catches up from the file.
//! * A remote archive is only ever extended by a local file that continues
//!   it (same entries at the same offsets below the manifest's end). When
//!   the local archive was replaced in this daemon (a stream opened it with
//!   CREATE), a new generation is uploaded from offset 0 and replaces the
//!   manifest; any other mismatch (an archive of the same name created here
//!   while the store was unreachable, an offline compaction) is an error
//!   shown in health and DescribeArchive, never an overwrite. Segments no manifest lists (a crash between a segment's
//!   upload and its manifest, an old generation) are deleted when the task
//!   starts and after a new generation is committed.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, UpdateVersion, WriteMultipart};
use tokio::sync::watch;

use super::manifest::{Manifest, RemoteEntry};
use super::{Remote, RemoteError, SEGMENTS};
use crate::limits::{REMOTE_PART, REMOTE_SINGLE_PUT_MAX};

/// Replication state of one archive, as health and DescribeArchive show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Durable bytes of the local file.
    pub durable: u64,
    /// Of those, bytes in the committed remote manifest.
    pub replicated: u64,
    /// More than the backlog limit waits.
    pub lagging: bool,
    /// The last error, cleared by the next successful upload.
    pub error: Option<String>,
}

struct Track {
    /// The local archive's durable end (the target) and a view to read it.
    want: watch::Sender<u64>,
    view: Mutex<Option<gtar::Archive>>,
    /// Replicated watermark, in local offsets.
    done: watch::Sender<u64>,
    status: Mutex<Status>,
    /// Set when the local archive was replaced (CREATE): check it against
    /// the manifest before the next upload.
    recheck: std::sync::atomic::AtomicBool,
}

/// The replicators of every archive of the daemon.
pub struct Replicator {
    remote: Arc<Remote>,
    backlog_bytes: u64,
    tracks: Mutex<HashMap<String, Arc<Track>>>,
}

impl Replicator {
    pub fn new(remote: Arc<Remote>, backlog_bytes: u64) -> Arc<Replicator> {
        Arc::new(Replicator {
            remote,
            backlog_bytes,
            tracks: Mutex::new(HashMap::new()),
        })
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    fn track(self: &Arc<Self>, name: &str) -> Arc<Track> {
        let mut t = self.tracks.lock().unwrap();
        if let Some(x) = t.get(name) {
            return x.clone();
        }
        let track = Arc::new(Track {
            want: watch::channel(0).0,
            view: Mutex::new(None),
            done: watch::channel(0).0,
            status: Mutex::new(Status::default()),
            recheck: std::sync::atomic::AtomicBool::new(false),
        });
        t.insert(name.to_string(), track.clone());
        let me = self.clone();
        let (n, tr) = (name.to_string(), track.clone());
        self.remote
            .runtime()
            .spawn(async move { me.run(n, tr).await });
        track
    }

    /// Bytes `..end` of archive `name` (read through `view`) are durable.
    pub fn durable(self: &Arc<Self>, name: &str, view: &gtar::Archive, end: u64) {
        let t = self.track(name);
        *t.view.lock().unwrap() = Some(view.clone());
        t.want.send_if_modified(|w| {
            let more = end > *w;
            *w = (*w).max(end);
            more
        });
    }

    /// The local archive `name` was replaced by an empty one.
    pub fn replaced(self: &Arc<Self>, name: &str) {
        let t = self.track(name);
        t.recheck.store(true, std::sync::atomic::Ordering::SeqCst);
        t.want.send_replace(0);
        t.done.send_replace(0);
    }

    /// Resolves once bytes `..end` of `name` are in a committed manifest.
    pub async fn replicated(self: &Arc<Self>, name: &str, end: u64) {
        let mut rx = self.track(name).done.subscribe();
        let _ = rx.wait_for(|d| *d >= end).await;
    }

    /// Status of every archive replicated by this daemon.
    pub fn statuses(&self) -> Vec<(String, Status)> {
        let t = self.tracks.lock().unwrap();
        let mut v: Vec<_> = t
            .iter()
            .map(|(n, tr)| (n.clone(), tr.status.lock().unwrap().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn status(&self, name: &str) -> Option<Status> {
        let t = self.tracks.lock().unwrap();
        t.get(name).map(|tr| tr.status.lock().unwrap().clone())
    }

    async fn run(self: Arc<Self>, name: String, t: Arc<Track>) {
        let mut want = t.want.subscribe();
        let mut state: Option<(Manifest, Option<UpdateVersion>)> = None;
        let mut backoff = Duration::from_millis(200);
        let mut cleaned = false;
        // The local archive was replaced in this daemon (CREATE): a remote
        // archive it does not continue may be replaced too.
        let mut may_replace = false;
        loop {
            let target = *want.borrow_and_update();
            let view = t.view.lock().unwrap().clone();
            let res = async {
                if t.recheck.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    may_replace = true;
                    state = None;
                }
                if state.is_none() {
                    state = Some(self.load(&name).await?);
                }
                let (m, _) = state.as_ref().expect("loaded");
                let Some(view) = view else { return Ok(()) };
                if !cleaned {
                    self.clean(&name, m).await?;
                    cleaned = true;
                }
                let local_matches = prefix_matches(&view, m, target);
                if !local_matches && !may_replace {
                    // Never overwrite frames in the store we cannot account
                    // for (e.g. an archive created here while the store was
                    // unreachable, with the same name as a remote one).
                    return Err(RemoteError::Conflict(format!(
                        "remote archive {name} in {} is not a prefix of the local one; not \
                         replacing it (rename one of them, or write the local one with mode CREATE)",
                        self.remote.describe()
                    )));
                }
                if !local_matches {
                    // Replaced locally: start a new generation from 0.
                    tracing::info!(archive = %name, "the local archive no longer continues the remote one; uploading it again as a new generation");
                    let (_, v) = state.take().expect("loaded");
                    state = Some((Manifest::new(new_generation()), v));
                    cleaned = false;
                }
                let (m, v) = state.as_mut().expect("loaded");
                if target > m.end {
                    let (nm, nv) = self.upload(&name, &view, m, v.clone(), target).await?;
                    *m = nm;
                    *v = Some(nv);
                    may_replace = false;
                }
                Ok::<_, RemoteError>(())
            }
            .await;
            let replicated = state.as_ref().map_or(0, |s| s.0.end);
            {
                let mut st = t.status.lock().unwrap();
                st.durable = target;
                st.replicated = replicated.min(target);
                st.lagging = target.saturating_sub(replicated) > self.backlog_bytes;
                match &res {
                    Ok(()) => {
                        if st.error.take().is_some() {
                            tracing::info!(archive = %name, "replication works again");
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if st.error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(archive = %name, error = %msg, backlog_bytes = target.saturating_sub(replicated), "replication failed; retrying (durable acks go on)");
                        }
                        st.error = Some(msg);
                    }
                }
            }
            match res {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    if replicated >= target {
                        t.done.send_if_modified(|d| {
                            let more = target > *d;
                            *d = (*d).max(target);
                            more
                        });
                    }
                    if *want.borrow() <= replicated && want.changed().await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    // Not waiting for the next frame: an archive nobody writes
                    // any more must catch up all the same.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if matches!(
                        res,
                        Err(RemoteError::Corrupt { .. } | RemoteError::Conflict(_))
                    ) {
                        state = None;
                    }
                }
            }
        }
    }

    async fn load(&self, name: &str) -> Result<(Manifest, Option<UpdateVersion>), RemoteError> {
        Ok(match self.remote.manifest(name).await? {
            Some((m, v)) => (m, Some(v)),
            None => (Manifest::new(new_generation()), None),
        })
    }

    /// Delete segments the committed manifest does not list.
    async fn clean(&self, name: &str, m: &Manifest) -> Result<(), RemoteError> {
        let dir = self.remote.key_of(name, SEGMENTS);
        let store = self.remote.store();
        let listed: Vec<_> = store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.remote.err(e))?;
        for o in listed {
            let rel = o.location.as_ref().rsplit('/').next().unwrap_or_default();
            let keep = m.segments.iter().any(|s| s.key.ends_with(rel));
            if !keep {
                tracing::info!(archive = %name, object = %o.location, "deleting a segment no manifest lists");
                if let Err(e) = store.delete(&o.location).await {
                    tracing::warn!(archive = %name, error = %e, "could not delete an orphan segment");
                }
            }
        }
        Ok(())
    }

    /// Upload bytes `m.end..target` of the local file as one segment and
    /// commit the manifest listing it.
    async fn upload(
        &self,
        name: &str,
        view: &gtar::Archive,
        m: &Manifest,
        version: Option<UpdateVersion>,
        target: u64,
    ) -> Result<(Manifest, UpdateVersion), RemoteError> {
        let from = m.end;
        let entries: Vec<RemoteEntry> = view
            .index()
            .entries()
            .iter()
            .filter(|e| (from..target).contains(&e.cd.local_header_offset))
            .map(RemoteEntry::from)
            .collect();
        let rel = format!("{SEGMENTS}/{}-{from:020}", m.generation);
        let key = self.remote.key_of(name, &rel);
        let store = self.remote.store().clone();
        let path = view.path().to_path_buf();
        let file = Arc::new(
            tokio::task::spawn_blocking(move || std::fs::File::open(&path))
                .await
                .map_err(|e| self.remote.err(e))?
                .map_err(|e| self.remote.err(format!("reading the local archive: {e}")))?,
        );
        let len = target - from;
        let read = |at: u64, n: usize| {
            let f = file.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut b = vec![0u8; n];
                    f.read_exact_at(&mut b, at).map(|_| b)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
            }
        };
        let local = |e: std::io::Error| self.remote.err(format!("reading the local archive: {e}"));
        if len <= REMOTE_SINGLE_PUT_MAX {
            let b = read(from, len as usize).await.map_err(local)?;
            store
                .put(&key, Remote::payload(b))
                .await
                .map_err(|e| self.remote.err(e))?;
        } else {
            let up = store
                .put_multipart(&key)
                .await
                .map_err(|e| self.remote.err(e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, REMOTE_PART);
            let mut at = from;
            let res = async {
                while at < target {
                    let n = ((target - at) as usize).min(REMOTE_PART);
                    // Read the next part while earlier ones upload.
                    let (b, cap) = tokio::join!(read(at, n), w.wait_for_capacity(4));
                    cap.map_err(|e| self.remote.err(e))?;
                    w.put(b.map_err(local)?.into());
                    at += n as u64;
                }
                Ok::<_, RemoteError>(())
            }
            .await;
            match res {
                Ok(()) => {
                    w.finish().await.map_err(|e| self.remote.err(e))?;
                }
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e);
                }
            }
        }
        let mut next = m.clone();
        next.push(rel, len, entries);
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let put = store
            .put_opts(
                &self.remote.key_of(name, super::MANIFEST),
                Remote::payload(next.to_json()),
                PutOptions::from(mode),
            )
            .await;
        let r = match put {
            Ok(r) => r,
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(RemoteError::Corrupt {
                    name: name.into(),
                    why: format!(
                    "the manifest in {} changed under this daemon (another writer?); reloading it",
                    self.remote.describe()
                ),
                })
            }
            Err(e) => return Err(self.remote.err(e)),
        };
        tracing::debug!(archive = %name, from, len, "replicated");
        Ok((
            next,
            UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            },
        ))
    }
}

/// Does the local archive (up to `target`) continue the remote one? Its
/// entries below the manifest's end must be the manifest's entries.
fn prefix_matches(view: &gtar::Archive, m: &Manifest, target: u64) -> bool {
    if m.end == 0 {
        return true;
    }
    if target < m.end {
        return false;
    }
    let ix = view.index();
    let mut local = ix
        .entries()
        .iter()
        .filter(|e| e.cd.local_header_offset < m.end);
    let mut remote = m.entries.iter();
    loop {
        match (local.next(), remote.next()) {
            (None, None) => return true,
            (Some(l), Some(r)) if r.same(l) => continue,
            _ => return false,
        }
    }
}

fn new_generation() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}{:05x}", t.as_secs(), std::process::id() & 0xfffff)
}
