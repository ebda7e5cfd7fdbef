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
//! * Every method may touch the disk: call them off the async workers
//!   (`spawn_blocking`).

use std::path::Path;
use std::sync::Arc;

use gtar::{Archive, OpenMode};

use crate::catalog::{Catalog, CatalogError};
use crate::error::{Classify, Kind};
use crate::lifecycle::live::{self, LiveCompact, LiveError, LiveOutcome, Snapped};
use crate::writer::{Lease, Registry, WriterError};

/// Why a lease was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Name(#[from] CatalogError),
    #[error(transparent)]
    Writer(#[from] WriterError),
}

impl Classify for LeaseError {
    fn kind(&self) -> Kind {
        match self {
            LeaseError::Name(e) => e.kind(),
            LeaseError::Writer(e) => e.kind(),
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
}

pub struct Archives {
    catalog: Catalog,
    writers: Arc<Registry>,
}

impl Archives {
    /// The archives under `root` (created if missing), written by `writers`.
    pub fn new(root: &Path, writers: Arc<Registry>) -> Result<Archives, CatalogError> {
        Ok(Archives {
            catalog: Catalog::new(root)?,
            writers,
        })
    }

    /// The data directory (canonical).
    pub fn root(&self) -> &Path {
        self.catalog.root()
    }

    /// The live writers (for health and shutdown).
    pub fn writers(&self) -> &Arc<Registry> {
        &self.writers
    }

    /// A read view of archive `name`.
    pub fn open_read(&self, name: &str) -> Result<Archive, CatalogError> {
        let path = self.catalog.resolve(name, false)?;
        match self.writers.get(&path) {
            Some(h) => Ok(h.reader()),
            None => self.catalog.open_read(name, &path),
        }
    }

    /// Lease archive `name` for writing (creating it, and its directory,
    /// when missing; replacing it with [`OpenMode::Create`]).
    pub fn lease(&self, name: &str, mode: OpenMode) -> Result<Lease, LeaseError> {
        let path = self.catalog.resolve(name, true)?;
        let lease = self.writers.acquire(&path, mode)?;
        self.catalog.note(name);
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
    pub fn list(&self, prefix: &str) -> Vec<Listed> {
        self.catalog
            .list(prefix)
            .into_iter()
            .map(|l| Listed {
                writing: self.writers.is_writing(&self.root().join(&l.name)),
                name: l.name,
                size: l.size,
            })
            .collect()
    }
}
