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
//!   shown in health and DescribeArchive, never an overwrite. Segments and
//!   packs no manifest lists (a crash between an upload and its manifest, an
//!   old generation) are deleted when the task starts and after a new
//!   generation is committed; packs a merge replaced, one commit later.
//! * A multipart upload is journaled before its first part is sent
//!   ([`super::journal`]) and aborted at the next start if a crash left it.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::path::Path;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use tokio::sync::watch;

use super::journal::{Journal, Pending};
use super::manifest::{Manifest, RemoteEntry, PACKS};
use super::{Remote, RemoteError, SEGMENTS};
use crate::limits::{REMOTE_PART, REMOTE_PARTS_IN_FLIGHT, REMOTE_SINGLE_PUT_MAX};

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
        let mut to_delete: Vec<String> = Vec::new();
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
                    self.clean(&name, m, view.path()).await?;
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
                    let (nm, nv, retired) =
                        self.upload(&name, &view, m, v.clone(), target).await?;
                    *m = nm;
                    *v = Some(nv);
                    may_replace = false;
                    // Packs merged a commit ago: a reader of that manifest
                    // has had a round to read them.
                    let old = std::mem::replace(&mut to_delete, retired);
                    self.delete_retired(&name, old).await;
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

    /// Abort the multipart uploads the journal of the local archive at
    /// `local` lists (a crash left them), then delete segments and packs the
    /// committed manifest does not list.
    async fn clean(&self, name: &str, m: &Manifest, local: &Path) -> Result<(), RemoteError> {
        let journal = Journal::of(local);
        let j = journal.clone();
        let pending = tokio::task::spawn_blocking(move || j.read())
            .await
            .map_err(|e| self.remote.err(e))?
            .map_err(|e| {
                self.remote
                    .err(format!("{}: {e}", journal.path().display()))
            })?;
        for p in pending {
            let key = object_store::path::Path::from(p.key.as_str());
            match self.remote.multipart().abort_multipart(&key, &p.id).await {
                // Gone or refused: completed or aborted already (servers
                // answer 404 or 403 for an unknown upload id).
                Ok(())
                | Err(object_store::Error::NotFound { .. })
                | Err(object_store::Error::PermissionDenied { .. }) => {
                    tracing::info!(archive = %name, object = %key, upload = %p.id, "aborted a multipart upload a crash left");
                    self.unjournal(&journal, &p.id).await;
                }
                Err(e) => {
                    return Err(self.remote.err(format!(
                        "aborting the multipart upload {} of {key}: {e}",
                        p.id
                    )))
                }
            }
        }
        let store = self.remote.store();
        // The objects the manifest lists, by their last key component: one
        // set, not a scan of the manifest per listed object (thousands of
        // segments at start-up).
        let last = |k: &str| k.rsplit('/').next().unwrap_or_default().to_string();
        let listed_keys: std::collections::HashSet<String> = m
            .segments
            .iter()
            .map(|s| last(&s.key))
            .chain(m.packs.iter().map(|p| last(&p.key)))
            .collect();
        for dir in [SEGMENTS, PACKS] {
            let dir = self.remote.key_of(name, dir);
            let listed: Vec<_> = store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| self.remote.err(e))?;
            for o in listed {
                if !listed_keys.contains(&last(o.location.as_ref())) {
                    tracing::info!(archive = %name, object = %o.location, "deleting an object no manifest lists");
                    if let Err(e) = store.delete(&o.location).await {
                        tracing::warn!(archive = %name, error = %e, "could not delete an orphan object");
                    }
                }
            }
        }
        Ok(())
    }

    async fn unjournal(&self, journal: &Journal, id: &str) {
        let (j, id) = (journal.clone(), id.to_string());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || j.remove(&id)).await {
            tracing::warn!(journal = %journal.path().display(), error = %e, "could not update the upload journal");
        }
    }

    /// Delete packs a manifest committed before the last one listed.
    async fn delete_retired(&self, name: &str, keys: Vec<String>) {
        for k in keys {
            let key = self.remote.key_of(name, &k);
            if let Err(e) = self.remote.store().delete(&key).await {
                tracing::warn!(archive = %name, object = %key, error = %e, "could not delete a merged pack (deleted at the next start)");
            }
        }
    }

    /// Upload bytes `from..target` of the local file at `path` as the
    /// object `key`: one PUT, or a multipart upload (journaled) with up to
    /// [`REMOTE_PARTS_IN_FLIGHT`] parts read and sent at once. Each part
    /// is read straight into the buffer the request sends (no copy).
    async fn put_segment(
        &self,
        path: &Path,
        key: &object_store::path::Path,
        from: u64,
        target: u64,
    ) -> Result<(), RemoteError> {
        let p = path.to_path_buf();
        let file = Arc::new(
            tokio::task::spawn_blocking(move || std::fs::File::open(&p))
                .await
                .map_err(|e| self.remote.err(e))?
                .map_err(|e| self.remote.err(format!("reading the local archive: {e}")))?,
        );
        let read = |at: u64, n: usize| {
            let f = file.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut b = vec![0u8; n];
                    f.read_exact_at(&mut b, at).map(|_| Bytes::from(b))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
            }
        };
        let local = |e: std::io::Error| self.remote.err(format!("reading the local archive: {e}"));
        let len = target - from;
        let store = self.remote.store();
        if len <= REMOTE_SINGLE_PUT_MAX {
            let b = read(from, len as usize).await.map_err(local)?;
            store
                .put(key, PutPayload::from(b))
                .await
                .map_err(|e| self.remote.err(e))?;
            return Ok(());
        }
        let mp = self.remote.multipart();
        let id = mp
            .create_multipart(key)
            .await
            .map_err(|e| self.remote.err(e))?;
        let journal = Journal::of(path);
        let (j, entry) = (
            journal.clone(),
            Pending {
                key: key.to_string(),
                id: id.clone(),
            },
        );
        let journaled = tokio::task::spawn_blocking(move || j.add(&entry))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(e) = journaled {
            let _ = mp.abort_multipart(key, &id).await;
            return Err(self
                .remote
                .err(format!("{}: {e}", journal.path().display())));
        }
        let parts = len.div_ceil(REMOTE_PART as u64) as usize;
        let res: Result<Vec<_>, RemoteError> = futures::stream::iter(0..parts)
            .map(|i| {
                let at = from + (i * REMOTE_PART) as u64;
                let n = ((target - at) as usize).min(REMOTE_PART);
                let (id, read) = (&id, &read);
                async move {
                    let b = read(at, n).await.map_err(local)?;
                    mp.put_part(key, id, i, PutPayload::from(b))
                        .await
                        .map_err(|e| self.remote.err(e))
                }
            })
            .buffered(REMOTE_PARTS_IN_FLIGHT)
            .try_collect()
            .await;
        let done = match res {
            Ok(parts) => mp
                .complete_multipart(key, &id, parts)
                .await
                .map(|_| ())
                .map_err(|e| self.remote.err(e)),
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => {
                self.unjournal(&journal, &id).await;
                Ok(())
            }
            Err(e) => {
                // Left in the journal if the abort fails too: the next start
                // aborts it.
                if mp.abort_multipart(key, &id).await.is_ok() {
                    self.unjournal(&journal, &id).await;
                }
                Err(e)
            }
        }
    }

    /// Upload bytes `m.end..target` of the local file as one segment, then
    /// the packs and the manifest listing it (see [`Manifest::push`]).
    async fn upload(
        &self,
        name: &str,
        view: &gtar::Archive,
        m: &Manifest,
        version: Option<UpdateVersion>,
        target: u64,
    ) -> Result<(Manifest, UpdateVersion, Vec<String>), RemoteError> {
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
        let t0 = std::time::Instant::now();
        self.put_segment(view.path(), &key, from, target).await?;
        let segment_secs = t0.elapsed().as_secs_f64();
        let mut next = m.clone();
        let commit = next.push(rel, target - from, entries, &new_generation());
        let store = self.remote.store();
        futures::stream::iter(commit.packs)
            .map(|(k, body)| {
                let key = self.remote.key_of(name, &k);
                async move { store.put(&key, PutPayload::from(body)).await }
            })
            .buffer_unordered(4)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.remote.err(e))?;
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let put = store
            .put_opts(
                &self.remote.key_of(name, super::MANIFEST),
                PutPayload::from(commit.manifest),
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
        tracing::debug!(archive = %name, from, len = target - from, segment_secs, commit_secs = t0.elapsed().as_secs_f64() - segment_secs, "replicated");
        Ok((
            next,
            UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            },
            commit.retired,
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

/// A name never used before by this daemon or (practically) any other:
/// seconds, pid and a counter.
fn new_generation() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{:05x}{n:x}", t.as_secs(), std::process::id() & 0xfffff)
}
