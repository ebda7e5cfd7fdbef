//! The one door the service uses to reach archives: read one, lease one for
//! writing, list them. Behind it, the catalog maps names to files
//! under the data directory and the writer registry owns the live writers;
//! neither knows the other.
//!
//! Invariants:
//! * Every name goes through the catalog's confinement first: nothing
//!   outside the data directory is opened, created or leased.
//! * A read of an archive with a live writer uses that writer's shared
//!   index, so every committed frame is visible at once; other archives are
//!   read through the catalog's cache.
//! * A lease does all the bookkeeping a lease implies (the parent directory,
//!   the writer, the catalog learning the name) in one call.
//! * In a worker of the multi-user service ([`Others`]), names starting with
//!   `~` are another user's: `~alice/runs/model.zip` is `runs/model.zip` in
//!   alice's data directory. They are read-only, and only for a worker that
//!   serves root or the admin group; any write under `~` is refused
//!   (`Kind::Forbidden`). This is a convenience on top of the kernel's
//!   check, not instead of it: a worker runs as its user, so it can open
//!   another user's file only if that user's directory lets it (the admin
//!   group's read bits, or root).
//! * With remote storage (`--remote`), an archive missing locally is read
//!   from the object store (see [`crate::remote`]); leasing one for
//!   appending first materializes it locally, so the local file stays the
//!   write-ahead tier and replication continues the remote archive.
//! * Every method may touch the disk or the store: call them off the async
//!   workers (`spawn_blocking`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gtar::{Archive, OpenMode};

use crate::catalog::{Catalog, CatalogError};
use crate::error::{Classify, Kind};
use crate::lifecycle::live::{self, LiveCompact, LiveError, LiveOutcome, Snapped};
use crate::remote::replicate::Replicator;
use crate::remote::RemoteError;
use crate::writer::{Lease, Registry, WriterError};

/// Why a lease was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Name(#[from] CatalogError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl Classify for LeaseError {
    fn kind(&self) -> Kind {
        match self {
            LeaseError::Name(e) => e.kind(),
            LeaseError::Writer(e) => e.kind(),
            LeaseError::Remote(e) => e.kind(),
        }
    }
}

/// Why a compaction or snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Name(#[from] CatalogError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error(transparent)]
    Live(#[from] LiveError),
}

impl Classify for LifecycleError {
    fn kind(&self) -> Kind {
        match self {
            LifecycleError::Name(e) => e.kind(),
            LifecycleError::Writer(e) => e.kind(),
            LifecycleError::Live(e) => e.kind(),
        }
    }
}

/// One archive as `ListArchives` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    /// A stream is writing it now.
    pub writing: bool,
    /// It exists only in remote storage (this node has no local copy).
    pub remote_only: bool,
}

/// Why a read view could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Local(#[from] CatalogError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl Classify for ReadError {
    fn kind(&self) -> Kind {
        match self {
            ReadError::Local(e) => e.kind(),
            ReadError::Remote(e) => e.kind(),
        }
    }
}

/// Where a read view comes from.
pub enum Origin {
    Local,
    /// The object store only; the size of the materialized archive.
    Remote {
        size: u64,
    },
}

pub struct Archives {
    /// This user's archive names → files (confinement, read cache).
    catalog: Catalog,
    /// The live writers: reads of an archive being written go through its
    /// writer's index, so every acked frame is visible at once.
    writers: Arc<Registry>,
    /// Other users' archives (`~USER/` names), read-only: only in a worker
    /// of the multi-user service.
    others: Option<Others>,
    /// With `--remote`: uploads durable frames and serves remote-only
    /// archives.
    replicator: Option<Arc<Replicator>>,
}

/// Other users' data directories, as a worker of the multi-user service
/// sees them (see the module docs).
pub struct Others {
    /// `<data-dir>/users`: one directory per user, named like the user.
    users_dir: PathBuf,
    /// Whether this worker's user is root or in the admin group.
    admin: bool,
    /// One catalog per user looked at so far, by user name.
    catalogs: Mutex<HashMap<String, Arc<Catalog>>>,
}

impl Others {
    pub fn new(users_dir: PathBuf, admin: bool) -> Others {
        Others {
            users_dir,
            admin,
            catalogs: Mutex::new(HashMap::new()),
        }
    }

    /// The catalog of `user`'s data directory, for reading.
    fn catalog(&self, name: &str, user: &str) -> Result<Arc<Catalog>, CatalogError> {
        if !self.admin {
            return Err(CatalogError::Forbidden {
                name: name.to_string(),
                why: "another user's archive: only root and the admin group \
                      (--admin-group) read other users' archives"
                    .into(),
            });
        }
        if user.is_empty() || user.starts_with('.') || user.contains(['/', '\0']) {
            return Err(CatalogError::BadName {
                name: name.to_string(),
                why: "~USER/ must name a user, like ~alice/runs/model.zip".into(),
            });
        }
        if let Some(c) = self.catalogs.lock().unwrap().get(user) {
            return Ok(c.clone());
        }
        let dir = self.users_dir.join(user);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(CatalogError::NotFound(format!(
                    "{name} (user {user} has no archives here)"
                )))
            }
        }
        let c = Arc::new(Catalog::new(&dir)?);
        self.catalogs
            .lock()
            .unwrap()
            .insert(user.to_string(), c.clone());
        Ok(c)
    }
}

/// `~user/rest` → `(user, rest)`; `None` for a name of the caller's own.
fn split_foreign(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix('~')?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

impl Archives {
    /// The archives under `root` (created if missing), written by `writers`.
    pub fn new(root: &Path, writers: Arc<Registry>) -> Result<Archives, CatalogError> {
        Ok(Archives {
            catalog: Catalog::new(root)?,
            writers,
            others: None,
            replicator: None,
        })
    }

    /// Replicate to, and read from, remote storage.
    pub fn with_replicator(mut self, r: Arc<Replicator>) -> Archives {
        self.replicator = Some(r);
        self
    }

    pub fn replicator(&self) -> Option<&Arc<Replicator>> {
        self.replicator.as_ref()
    }

    /// Hand every local archive to the replicator: frames written before
    /// `--remote` was turned on (or while the daemon was down) are uploaded
    /// too. Blocking.
    pub fn replicate_existing(&self) {
        let Some(r) = &self.replicator else { return };
        for l in self.catalog.list("") {
            match self.open_read(&l.name) {
                Ok(a) => match committed_end(&a) {
                    Ok(end) => r.durable(&l.name, &a, end),
                    Err(e) => tracing::warn!(archive = %l.name, error = %e, "cannot replicate"),
                },
                Err(e) => tracing::warn!(archive = %l.name, error = %e, "cannot replicate"),
            }
        }
    }

    /// As [`Archives::new`], for a worker of the multi-user service: names
    /// under `~` are other users' (module docs).
    pub fn with_others(
        root: &Path,
        writers: Arc<Registry>,
        others: Others,
    ) -> Result<Archives, CatalogError> {
        let mut a = Archives::new(root, writers)?;
        a.others = Some(others);
        Ok(a)
    }

    /// `Some((catalog, name in it))` for another user's archive.
    fn foreign<'n>(&self, name: &'n str) -> Result<Option<(Arc<Catalog>, &'n str)>, CatalogError> {
        let Some(others) = &self.others else {
            return Ok(None);
        };
        let Some((user, rest)) = split_foreign(name) else {
            return Ok(None);
        };
        Ok(Some((others.catalog(name, user)?, rest)))
    }

    /// The data directory (canonical).
    pub fn root(&self) -> &Path {
        self.catalog.root()
    }

    /// A read view of archive `name`.
    pub fn open_read(&self, name: &str) -> Result<Archive, CatalogError> {
        if let Some((catalog, rest)) = self.foreign(name)? {
            let path = catalog.resolve(rest, false)?;
            return catalog.open_read(rest, &path);
        }
        let path = self.catalog.resolve(name, false)?;
        match self.writers.get(&path) {
            Some(h) => Ok(h.reader()),
            None => self.catalog.open_read(name, &path),
        }
    }

    /// With a writer holding archive `name` open: the offset below which
    /// its commits are durable ([`crate::writer::WriterHandle::durable_end`]).
    /// `None`: no writer of this daemon holds it, so every commit in the
    /// file is as durable as the file (a closed writer synced it).
    pub fn durable_end(&self, name: &str) -> Option<u64> {
        if self.others.is_some() && name.starts_with('~') {
            return None;
        }
        let path = self.catalog.resolve(name, false).ok()?;
        self.writers.get(&path).map(|h| h.durable_end())
    }

    /// A read view of archive `name`, local or else remote.
    pub fn open_any(&self, name: &str) -> Result<(Archive, Origin), ReadError> {
        match self.open_read(name) {
            Ok(a) => Ok((a, Origin::Local)),
            Err(CatalogError::NotFound(_)) if self.replicator.is_some() => {
                let remote = self.replicator.as_ref().expect("checked").remote();
                let (a, m) = remote.open_read(name)?;
                Ok((a, Origin::Remote { size: m.size() }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Lease archive `name` for writing (creating it, and its directory,
    /// when missing; replacing it with [`OpenMode::Create`]).
    pub fn lease(&self, name: &str, mode: OpenMode) -> Result<Lease, LeaseError> {
        if self.others.is_some() && name.starts_with('~') {
            return Err(CatalogError::Forbidden {
                name: name.to_string(),
                why: "names under ~USER/ are other users' archives, and are read-only: \
                      a connection writes only its own user's archives"
                    .into(),
            }
            .into());
        }
        let path = self.catalog.resolve(name, true)?;
        if let Some(r) = &self.replicator {
            if mode == OpenMode::Append && !path.exists() && !self.writers.is_writing(&path) {
                // A remote-only archive: continue it (fetched whole, then
                // appended to and replicated like any other).
                match r.remote().fetch_blocking(name, &path, &mut |_, _| ()) {
                    Ok(m) => {
                        r.remote().forget(name);
                        tracing::info!(
                            archive = name,
                            bytes = m.end,
                            "fetched a remote-only archive to continue it"
                        );
                    }
                    Err(RemoteError::NotFound(_)) => {}
                    // The store is unreachable: the local path goes on; the
                    // replicator will not overwrite a remote archive this
                    // one does not continue (see `remote::replicate`).
                    Err(e) => {
                        tracing::warn!(archive = name, error = %e, "cannot tell whether the archive exists remotely; writing it locally");
                    }
                }
            }
        }
        let lease = self.writers.acquire(&path, mode)?;
        self.catalog.note(name);
        if let Some(r) = &self.replicator {
            if mode == OpenMode::Create {
                r.replaced(name);
            }
        }
        Ok(lease)
    }

    /// Compact archive `name` under a keep policy while streams go on
    /// writing (see [`live`]): leases its writer (starting one if none is
    /// live) for the whole run. The archive must exist.
    pub fn compact(&self, name: &str, args: &LiveCompact) -> Result<LiveOutcome, LifecycleError> {
        let path = self.catalog.resolve(name, false)?;
        if !path.is_file() {
            return Err(CatalogError::NotFound(name.to_string()).into());
        }
        let lease = self.writers.acquire(&path, OpenMode::Append)?;
        Ok(live::compact(&lease, args)?)
    }

    /// Snapshot archive `name` to the new archive `dest` (both confined to
    /// the data directory; `dest` must not exist): every frame committed
    /// when this is called, made while streams go on writing.
    pub fn snapshot(&self, name: &str, dest: &str) -> Result<Snapped, LifecycleError> {
        let src = self.catalog.resolve(name, false)?;
        if !src.is_file() {
            return Err(CatalogError::NotFound(name.to_string()).into());
        }
        // Taken first: the copy then holds every frame acked before the call.
        let live = self.writers.get(&src).map(|h| h.reader());
        let dst = self.catalog.resolve(dest, true)?;
        if dst == src {
            return Err(LifecycleError::Name(CatalogError::BadName {
                name: dest.to_string(),
                why: "is the archive being snapshotted".into(),
            }));
        }
        let s = live::snapshot(live, &src, &dst)?;
        self.catalog.note(dest);
        Ok(s)
    }

    /// Archives whose name starts with `prefix`, in name order.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>, ReadError> {
        if self.others.is_some() && prefix.starts_with('~') {
            let Some((catalog, rest)) = self.foreign(prefix)? else {
                return Ok(Vec::new());
            };
            let user = &prefix[1..prefix.len() - rest.len()];
            let user = user.trim_end_matches('/');
            return Ok(catalog
                .list(rest)
                .into_iter()
                .map(|l| Listed {
                    // Another process writes it, if anyone does.
                    writing: false,
                    name: format!("~{user}/{}", l.name),
                    size: l.size,
                    remote_only: false,
                })
                .collect());
        }
        let mut out: Vec<Listed> = self
            .catalog
            .list(prefix)
            .into_iter()
            .map(|l| Listed {
                writing: self.writers.is_writing(&self.root().join(&l.name)),
                name: l.name,
                size: l.size,
                remote_only: false,
            })
            .collect();
        if let Some(r) = &self.replicator {
            let local: std::collections::HashSet<String> =
                out.iter().map(|l| l.name.clone()).collect();
            for (name, size) in r.remote().list_blocking(prefix)? {
                if !local.contains(&name) && crate::catalog::check_name(&name).is_ok() {
                    out.push(Listed {
                        name,
                        size,
                        writing: false,
                        remote_only: true,
                    });
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(out)
    }
}

/// Where the committed entries of `a` end (its durable length once its
/// writer is closed): the end of the last entry's data.
pub fn committed_end(a: &Archive) -> Result<u64, gtar::Error> {
    let entries: Vec<gtar::Entry> = a.index().entries().to_vec();
    let mut end = 0;
    for e in entries {
        end = end.max(a.data_offset(&e)? + e.cd.compressed_size);
    }
    Ok(end)
}
