//! Names → files under the data directory, and nothing more: confinement,
//! the set of known archives kept fresh by a `notify` watcher, and a cache
//! of read views. (Live writers are the registry's; `archives` joins the two.)
//!
//! Invariants:
//! * Every archive name from a request goes through [`Catalog::resolve`]: it
//!   must be a relative path of plain components ending in `.zip`, and its
//!   canonical location (symlinks followed) must stay inside the canonical
//!   data directory. Nothing outside the data dir is opened or created.
//! * Read views are opened read-only and cached until the file's size or
//!   mtime changes (another program appended) or the watcher reports a
//!   change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use notify::{RecursiveMode, Watcher};

use crate::error::{io_kind, Classify, Kind};

use gtar::Archive;

/// Errors of the catalog layer.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("archive name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("archive name {name:?} leads outside the data directory {root}: archive names are paths relative to it, like runs/model.zip")]
    Outside { name: String, root: String },
    #[error("no archive {0:?} in the data directory")]
    NotFound(String),
    /// A `~user/` name the caller may not use that way (multi-user service).
    #[error("archive name {name:?}: {why}")]
    Forbidden { name: String, why: String },
    #[error("{name}: {source}")]
    Format { name: String, source: gtar::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Classify for CatalogError {
    fn kind(&self) -> Kind {
        match self {
            CatalogError::BadName { .. } => Kind::BadInput,
            CatalogError::Outside { .. } => Kind::Outside,
            CatalogError::NotFound(_) => Kind::NotFound,
            CatalogError::Forbidden { .. } => Kind::Forbidden,
            CatalogError::Format { source, .. } => source.kind(),
            CatalogError::Io(io) => io_kind(io),
        }
    }
}

/// One archive found under the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
}

/// Read-only archives kept open at once.
const MAX_CACHED: usize = 128;

/// An archive opened for reading, valid while the file keeps this size and
/// modification time.
struct Cached {
    size: u64,
    mtime: Option<SystemTime>,
    archive: Archive,
}

/// Archive names → files under one data directory (module docs).
pub struct Catalog {
    /// The data directory, canonical: every resolved path must lie under it.
    root: PathBuf,
    /// Names of the archives known to exist (`.zip` files under `root`),
    /// kept fresh by the watcher: what `ListArchives` answers from without
    /// walking the directory. Shared with the watcher's callback.
    known: Arc<Mutex<BTreeMap<String, ()>>>,
    /// Read views by canonical path, reused while the file is unchanged, so
    /// a query does not re-read a central directory it already has.
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// Keeps `known` fresh; `None` where no watcher could be set up (then
    /// lookups check the file system).
    _watcher: Option<notify::RecommendedWatcher>,
}

/// The data directory is filled in by [`Catalog::resolve`].
fn outside(name: &str) -> CatalogError {
    CatalogError::Outside {
        name: name.to_string(),
        root: String::new(),
    }
}

/// Check an archive name's shape (no I/O).
pub fn check_name(name: &str) -> Result<(), CatalogError> {
    let bad = |why: &str| {
        Err(CatalogError::BadName {
            name: name.to_string(),
            why: why.to_string(),
        })
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 4096 {
        return bad("is longer than 4096 bytes");
    }
    if name.contains('\0') || name.chars().any(|c| c.is_control()) {
        return bad("contains a NUL or control character");
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(outside(name));
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err(outside(name)),
            _ => return bad("must be a plain relative path like runs/model.zip"),
        }
    }
    if name.ends_with('/') || !name.ends_with(".zip") {
        return bad("must name a .zip file");
    }
    Ok(())
}

impl Catalog {
    /// Open the catalog over `root` (created if missing) and start watching.
    pub fn new(root: &Path) -> Result<Catalog, CatalogError> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let known = Arc::new(Mutex::new(BTreeMap::new()));
        for name in scan_dir(&root) {
            known.lock().unwrap().insert(name, ());
        }
        let watcher = {
            let known = known.clone();
            let root2 = root.clone();
            let w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                use notify::EventKind;
                let Ok(ev) = ev else { return };
                // Only changes to the set of files matter. Access events in
                // particular must be ignored: our own directory scans open
                // directories, and reacting to that would feed back forever.
                if !matches!(
                    ev.kind,
                    EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(_)
                ) || matches!(
                    ev.kind,
                    EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                ) {
                    return;
                }
                for p in ev.paths {
                    let Ok(rel) = p.strip_prefix(&root2) else {
                        continue;
                    };
                    let Some(name) = rel.to_str().filter(|n| !n.is_empty()) else {
                        continue;
                    };
                    if name.ends_with(".zip")
                        && known.lock().unwrap().contains_key(name)
                        && p.is_file()
                    {
                        continue; // a write to an archive we already list
                    }
                    let mut k = known.lock().unwrap();
                    if p.is_file() {
                        if name.ends_with(".zip") {
                            k.insert(name.to_string(), ());
                        }
                    } else if !p.exists() {
                        // A removed directory takes its archives along.
                        let dir = format!("{name}/");
                        k.retain(|n, _| n != name && !n.starts_with(&dir));
                    } else if p.is_dir()
                        && matches!(
                            ev.kind,
                            EventKind::Create(_)
                                | EventKind::Modify(notify::event::ModifyKind::Name(_))
                        )
                    {
                        // A directory created or moved in: pick up what it holds.
                        drop(k);
                        let found = scan_dir(&p);
                        let mut k = known.lock().unwrap();
                        for n in found {
                            k.insert(format!("{name}/{n}"), ());
                        }
                    }
                }
            });
            match w {
                Ok(mut w) => match w.watch(&root, RecursiveMode::Recursive) {
                    Ok(()) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the data directory; new archives appear on the next listing rescan");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "no file watcher available");
                    None
                }
            }
        };
        Ok(Catalog {
            root,
            known,
            cache: Mutex::new(HashMap::new()),
            _watcher: watcher,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Map an archive name to its path, creating parent directories when
    /// `create` is set. Refuses anything that would leave the data dir.
    pub fn resolve(&self, name: &str, create: bool) -> Result<PathBuf, CatalogError> {
        self.resolve_inner(name, create).map_err(|e| match e {
            CatalogError::Outside { name, .. } => CatalogError::Outside {
                name,
                root: self.root.display().to_string(),
            },
            e => e,
        })
    }

    fn resolve_inner(&self, name: &str, create: bool) -> Result<PathBuf, CatalogError> {
        check_name(name)?;
        let joined = self.root.join(name);
        let parent = joined.parent().unwrap_or(&self.root);
        // Walk the parents without following anything out of the root.
        if create {
            let mut cur = self.root.clone();
            let rel_parent = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
            for c in rel_parent.components() {
                cur.push(c);
                match std::fs::symlink_metadata(&cur) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // Another stream may create it between our look and
                        // this call; what is there is checked by `confine`.
                        match std::fs::create_dir(&cur) {
                            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                                return Err(e.into())
                            }
                            _ => {}
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                self.confine(name, &cur)?;
            }
        }
        let real_parent = match parent.canonicalize() {
            Ok(p) => p,
            Err(_) => return Err(CatalogError::NotFound(name.to_string())),
        };
        if !real_parent.starts_with(&self.root) {
            return Err(outside(name));
        }
        let file = real_parent.join(joined.file_name().unwrap_or_default());
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.file_type().is_symlink() => {
                self.confine(name, &file)?;
                Ok(file.canonicalize()?)
            }
            Ok(m) if !m.is_file() => Err(CatalogError::BadName {
                name: name.to_string(),
                why: "is not a regular file".into(),
            }),
            _ => Ok(file),
        }
    }

    fn confine(&self, name: &str, p: &Path) -> Result<(), CatalogError> {
        match p.canonicalize() {
            Ok(real) if real.starts_with(&self.root) => Ok(()),
            Ok(_) => Err(outside(name)),
            // A dangling symlink: refuse rather than create through it.
            Err(_) => Err(outside(name)),
        }
    }

    /// Archives under the data directory whose name starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<Listed> {
        let names: Vec<String> = self
            .known
            .lock()
            .unwrap()
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for name in names {
            let p = self.root.join(&name);
            if let Ok(m) = std::fs::metadata(&p) {
                if m.is_file() {
                    out.push(Listed {
                        name,
                        size: m.len(),
                    });
                }
            } else {
                self.known.lock().unwrap().remove(&name);
            }
        }
        out
    }

    /// A read view of an existing archive; sees every acked frame.
    pub fn open_read(&self, name: &str, path: &Path) -> Result<Archive, CatalogError> {
        let path = path.to_path_buf();
        let meta =
            std::fs::metadata(&path).map_err(|_| CatalogError::NotFound(name.to_string()))?;
        let (size, mtime) = (meta.len(), meta.modified().ok());
        if let Some(c) = self.cache.lock().unwrap().get(&path) {
            if c.size == size && c.mtime == mtime {
                return Ok(c.archive.clone());
            }
        }
        // Open outside the lock: a damaged archive may take a while to scan,
        // and queries on other archives must not wait for it.
        let archive = Archive::open(&path).map_err(|source| CatalogError::Format {
            name: name.to_string(),
            source,
        })?;
        self.known.lock().unwrap().insert(name.to_string(), ());
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED && !cache.contains_key(&path) {
            // Each cached archive holds a file descriptor: stay bounded.
            if let Some(k) = cache.keys().next().cloned() {
                cache.remove(&k);
            }
        }
        cache.insert(
            path,
            Cached {
                size,
                mtime,
                archive: archive.clone(),
            },
        );
        Ok(archive)
    }

    /// Note that an archive exists (created by one of our writers).
    pub fn note(&self, name: &str) {
        self.known.lock().unwrap().insert(name.to_string(), ());
    }
}

/// Every `*.zip` below `dir`, as names relative to it (symlinked directories
/// are not followed).
fn scan_dir(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                if let Some(s) = r.to_str() {
                    if s.ends_with(".zip") {
                        out.push(s.to_string());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(cat: &Catalog, want: &[&str]) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let names: Vec<String> = cat.list("").into_iter().map(|l| l.name).collect();
            if want.iter().all(|w| names.iter().any(|n| n == w))
                || std::time::Instant::now() > deadline
            {
                return names;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn the_watcher_sees_archives_other_programs_create_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("before.zip"), b"PK").unwrap();
        let cat = Catalog::new(dir.path()).unwrap();
        assert_eq!(wait_for(&cat, &["before.zip"]), vec!["before.zip"]);
        // A file written directly, a directory moved in with an archive inside.
        std::fs::write(dir.path().join("direct.zip"), b"PK").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("run")).unwrap();
        std::fs::write(outside.path().join("run/moved.zip"), b"PK").unwrap();
        std::fs::rename(outside.path().join("run"), dir.path().join("run")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let names = wait_for(&cat, &["before.zip", "direct.zip", "run/moved.zip"]);
        assert_eq!(names, vec!["before.zip", "direct.zip", "run/moved.zip"]);
        std::fs::remove_file(dir.path().join("direct.zip")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cat.list("").len() != 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(cat.list("run/").len(), 1);
        assert_eq!(cat.list("").len(), 2);
    }

    /// Streams opening archives in a new directory at the same moment all
    /// get it (one of them used to fail with EEXIST from the lost race).
    #[test]
    fn concurrent_opens_create_a_new_directory_once() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let cat = Catalog::new(dir.path()).unwrap();
            let barrier = std::sync::Barrier::new(16);
            std::thread::scope(|s| {
                for i in 0..16 {
                    let (cat, barrier) = (&cat, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        cat.resolve(&format!("new/deep/a{i}.zip"), true)
                            .unwrap_or_else(|e| panic!("round {round}, stream {i}: {e}"));
                    });
                }
            });
            assert!(dir.path().join("new/deep").is_dir());
        }
    }

    #[test]
    fn names_are_confined() {
        assert!(check_name("runs/a.zip").is_ok());
        assert!(matches!(
            check_name("../a.zip"),
            Err(CatalogError::Outside { .. })
        ));
        assert!(matches!(
            check_name("/etc/passwd"),
            Err(CatalogError::Outside { .. })
        ));
        assert!(matches!(
            check_name("a/../../b.zip"),
            Err(CatalogError::Outside { .. })
        ));
        assert!(check_name("a\0.zip").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a.txt").is_err());
        assert!(check_name("./a.zip").is_err());
    }
}
