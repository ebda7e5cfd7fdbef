//! Remote storage: archives replicated to an S3-compatible object store
//! (`serve --remote s3://BUCKET/PREFIX`) and served from it.
//!
//! Object layout, per archive `NAME` (a path like `runs/model.zip`):
//! * `PREFIX/NAME/@seg/<generation>-<offset, 20 digits>`: immutable segments,
//!   each the exact bytes of the local file between two commit points (one
//!   or more whole frames, never part of one);
//! * `PREFIX/NAME/@pack/<generation>-<end>-<level>-<nonce>`: immutable
//!   packs, each the segment list and central-directory entries of one range
//!   of the archive (see [`manifest`]);
//! * `PREFIX/NAME/@manifest.json`: the commit point: the generation, the end
//!   and the packs in order, replaced only by a conditional put (`If-Match`
//!   the e-tag it replaces, `If-None-Match: *` for the first) once every
//!   segment and pack it lists is uploaded.
//!
//! Invariants:
//! * A reader sees only what a committed manifest lists: never a partial
//!   frame; the archive is materialized as segments ++ the manifest's tail.
//! * Upload cost per frame is its bytes plus its metadata (a small pack,
//!   amortized merges, a manifest of O(log frames) pack references); the local file
//!   is the backlog (read back with pread), so a slow store costs no memory
//!   and never blocks the writer or `durable` acks (see [`replicate`]).
//! * Every call that touches the store from blocking code goes through the
//!   runtime handle (`block_on` on a blocking thread, never an async worker).

pub mod journal;
pub mod manifest;
pub mod replicate;
pub mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::multipart::MultipartStore;
use object_store::path::Path as Key;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, UpdateVersion};

use crate::error::{Classify, Kind};
use manifest::{Manifest, Pack, Stored};
pub use source::RemoteSource;

/// Name of the manifest object in an archive's directory.
pub const MANIFEST: &str = "@manifest.json";
/// Directory of an archive's segments.
pub const SEGMENTS: &str = "@seg";
/// How long a remote archive's index is used before it is revalidated
/// (a conditional GET: no body when it did not change).
const INDEX_TTL: Duration = Duration::from_secs(2);

/// Errors of remote storage; they name the endpoint and bucket.
#[derive(Debug, thiserror::Error, Clone)]
pub enum RemoteError {
    #[error("{0}")]
    Config(String),
    #[error("remote storage {where_}: {why}")]
    Store { where_: String, why: String },
    #[error("{0}: not in remote storage")]
    NotFound(String),
    #[error("remote archive {name}: {why}")]
    Corrupt { name: String, why: String },
    #[error("{0}")]
    Conflict(String),
}

impl Classify for RemoteError {
    fn kind(&self) -> Kind {
        match self {
            RemoteError::Config(_) => Kind::BadInput,
            RemoteError::Store { .. } | RemoteError::Corrupt { .. } => Kind::Internal,
            RemoteError::NotFound(_) => Kind::NotFound,
            RemoteError::Conflict(_) => Kind::Conflict,
        }
    }
}

/// `s3://BUCKET/PREFIX`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub bucket: String,
    pub prefix: String,
}

impl std::str::FromStr for RemoteUrl {
    type Err = RemoteError;
    fn from_str(s: &str) -> Result<RemoteUrl, RemoteError> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| {
            RemoteError::Config(format!("--remote {s:?}: expected s3://BUCKET/PREFIX"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RemoteError::Config(format!(
                "--remote {s:?}: the bucket is missing (s3://BUCKET/PREFIX)"
            )));
        }
        Ok(RemoteUrl {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
        })
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// What [`Remote::load`] found.
enum Loaded {
    Got(Manifest, UpdateVersion),
    NotModified,
    NotFound,
}

/// One remote archive read view, cached.
struct Cached {
    archive: gtar::Archive,
    manifest: Arc<Manifest>,
    e_tag: Option<String>,
    checked: Instant,
}

/// The object store and what the daemon knows of it.
pub struct Remote {
    pub url: RemoteUrl,
    /// The endpoint, for messages ("the AWS default" when none is set).
    pub endpoint: String,
    store: Arc<dyn ObjectStore>,
    /// The same store, for multipart uploads by id (see [`journal`]).
    multipart: Arc<dyn MultipartStore>,
    rt: tokio::runtime::Handle,
    cache: Mutex<HashMap<String, Cached>>,
    /// Packs read (immutable), by full key.
    packs: Mutex<HashMap<String, Arc<Pack>>>,
    /// Requests made by remote reads (GETs of segments and manifests).
    pub read_requests: Arc<AtomicU64>,
}

impl Remote {
    /// Connect (lazily: nothing is sent) to `url`, configured from the AWS
    /// environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …).
    pub fn from_env(url: RemoteUrl, rt: tokio::runtime::Handle) -> Result<Remote, RemoteError> {
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_else(|_| "the AWS default endpoint".into());
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_retry(retry)
            .build()
            .map_err(|e| {
                RemoteError::Config(format!(
                    "remote storage {url} at {endpoint}: {e} (configured from AWS_* variables)"
                ))
            })?;
        let store = Arc::new(store);
        Ok(Remote {
            url,
            endpoint,
            multipart: store.clone(),
            store,
            rt,
            cache: Mutex::new(HashMap::new()),
            packs: Mutex::new(HashMap::new()),
            read_requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Where the store is, for messages: `s3://bucket/prefix at endpoint`.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.url, self.endpoint)
    }

    fn err(&self, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Store {
            where_: self.describe(),
            why: e.to_string(),
        }
    }

    /// The key of `rel` in archive `name`'s directory.
    fn key(&self, name: &str, rel: &str) -> Key {
        let mut s = String::new();
        if !self.url.prefix.is_empty() {
            s.push_str(&self.url.prefix);
            s.push('/');
        }
        s.push_str(name);
        s.push('/');
        s.push_str(rel);
        Key::from(s)
    }

    /// Check that the bucket answers with these credentials: an error names
    /// the endpoint and the bucket.
    pub async fn probe(&self) -> Result<(), RemoteError> {
        let prefix = (!self.url.prefix.is_empty()).then(|| Key::from(self.url.prefix.as_str()));
        let mut s = self.store.list(prefix.as_ref());
        let r = tokio::time::timeout(Duration::from_secs(30), s.try_next()).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.err(e)),
            Err(_) => Err(self.err("no answer within 30 s")),
        }
    }

    /// The committed manifest of `name` and its version, or None.
    pub async fn manifest(
        &self,
        name: &str,
    ) -> Result<Option<(Manifest, UpdateVersion)>, RemoteError> {
        match self.load(name, None).await? {
            Loaded::Got(m, v) => Ok(Some((m, v))),
            Loaded::NotFound => Ok(None),
            Loaded::NotModified => unreachable!("asked without an e-tag"),
        }
    }

    /// GET `name`'s manifest (unless it still has e-tag `known`) and the
    /// packs it lists (immutable: each fetched once, then cached). A pack
    /// that is gone was merged by a commit since the manifest was read:
    /// read the manifest again.
    async fn load(&self, name: &str, known: Option<String>) -> Result<Loaded, RemoteError> {
        let key = self.key(name, MANIFEST);
        let corrupt = |why| RemoteError::Corrupt {
            name: name.into(),
            why,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let opts = GetOptions {
                if_none_match: known.clone(),
                ..Default::default()
            };
            self.read_requests.fetch_add(1, Ordering::Relaxed);
            let r = match self.store.get_opts(&key, opts).await {
                Ok(r) => r,
                Err(object_store::Error::NotModified { .. }) => return Ok(Loaded::NotModified),
                Err(object_store::Error::NotFound { .. }) => return Ok(Loaded::NotFound),
                Err(e) => return Err(self.err(e)),
            };
            let version = UpdateVersion {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            let body = r.bytes().await.map_err(|e| self.err(e))?;
            let stored = Stored::parse(&body).map_err(corrupt)?;
            let mut packs = Vec::with_capacity(stored.packs.len());
            let mut gone = false;
            for p in &stored.packs {
                let pkey = self.key(name, &p.key);
                let cached = self.packs.lock().unwrap().get(pkey.as_ref()).cloned();
                let pack = match cached {
                    Some(pack) => pack,
                    None => {
                        self.read_requests.fetch_add(1, Ordering::Relaxed);
                        let got = match self.store.get(&pkey).await {
                            Ok(g) => g.bytes().await.map_err(|e| self.err(e))?,
                            Err(object_store::Error::NotFound { .. }) if tries < 5 => {
                                gone = true;
                                break;
                            }
                            Err(e) => return Err(corrupt(format!("pack {}: {e}", p.key))),
                        };
                        let pack = Arc::new(Pack::parse(&got).map_err(corrupt)?);
                        self.packs
                            .lock()
                            .unwrap()
                            .insert(pkey.to_string(), pack.clone());
                        pack
                    }
                };
                packs.push(pack);
            }
            if gone {
                continue;
            }
            {
                // Forget this archive's packs the manifest no longer lists.
                let dir = format!("{}/", self.key(name, manifest::PACKS));
                let listed: std::collections::HashSet<String> = stored
                    .packs
                    .iter()
                    .map(|p| self.key(name, &p.key).to_string())
                    .collect();
                self.packs
                    .lock()
                    .unwrap()
                    .retain(|k, _| !k.starts_with(&dir) || listed.contains(k));
            }
            let refs: Vec<&Pack> = packs.iter().map(|p| p.as_ref()).collect();
            let m = Manifest::assemble(stored, &refs).map_err(corrupt)?;
            return Ok(Loaded::Got(m, version));
        }
    }

    /// Archives under `prefix` that have a committed manifest, in name order,
    /// with their materialized sizes. Blocking.
    pub fn list_blocking(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        self.rt.block_on(self.list(prefix))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        let root = (!self.url.prefix.is_empty()).then(|| Key::from(self.url.prefix.as_str()));
        let metas: Vec<_> = self
            .store
            .list(root.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        let strip = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        let tail = format!("/{MANIFEST}");
        let mut names: Vec<String> = metas
            .iter()
            .filter_map(|m| {
                let k = m.location.as_ref();
                k.strip_prefix(strip.as_str())?
                    .strip_suffix(tail.as_str())
                    .map(str::to_string)
            })
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            if let Some((m, _)) = self.manifest(&n).await? {
                out.push((n, m.size()));
            }
        }
        Ok(out)
    }

    /// A read view of the remote archive `name` (ranged reads; the index is
    /// cached and revalidated after [`INDEX_TTL`]). Blocking.
    pub fn open_read(&self, name: &str) -> Result<(gtar::Archive, Arc<Manifest>), RemoteError> {
        {
            let cache = self.cache.lock().unwrap();
            if let Some(c) = cache.get(name) {
                if c.checked.elapsed() < INDEX_TTL {
                    return Ok((c.archive.clone(), c.manifest.clone()));
                }
            }
        }
        let known = self.cache.lock().unwrap().get(name).and_then(|c| {
            c.e_tag
                .clone()
                .map(|t| (t, c.archive.clone(), c.manifest.clone()))
        });
        let got = self
            .rt
            .block_on(self.load(name, known.as_ref().map(|k| k.0.clone())))?;
        let (manifest, e_tag) = match got {
            Loaded::NotModified => {
                let (_, a, m) = known.expect("asked with an e-tag");
                if let Some(c) = self.cache.lock().unwrap().get_mut(name) {
                    c.checked = Instant::now();
                }
                return Ok((a, m));
            }
            Loaded::NotFound => {
                self.cache.lock().unwrap().remove(name);
                return Err(RemoteError::NotFound(name.into()));
            }
            Loaded::Got(m, v) => (Arc::new(m), v.e_tag),
        };
        let src = RemoteSource::new(
            self.store.clone(),
            self.rt.clone(),
            manifest
                .segments
                .iter()
                .map(|s| (s.offset, s.len, self.key(name, &s.key)))
                .collect(),
            self.read_requests.clone(),
        );
        let archive = gtar::Archive::from_source(
            format!("{}/{name}", self.url).into(),
            Arc::new(src),
            manifest.index(),
        );
        self.cache.lock().unwrap().insert(
            name.into(),
            Cached {
                archive: archive.clone(),
                manifest: manifest.clone(),
                e_tag,
                checked: Instant::now(),
            },
        );
        Ok((archive, manifest))
    }

    /// Write the remote archive `name` as one zip file at `dst` (segments,
    /// then the manifest's tail), reporting bytes done to `progress`.
    /// Written to a temporary file, fsynced, renamed. Blocking.
    pub fn fetch_blocking(
        &self,
        name: &str,
        dst: &std::path::Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, RemoteError> {
        use std::io::Write;
        let (m, _) = self
            .rt
            .block_on(self.manifest(name))?
            .ok_or_else(|| RemoteError::NotFound(name.into()))?;
        let total = m.size();
        let io = |e: std::io::Error| RemoteError::Config(format!("{}: {e}", dst.display()));
        let dir = dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let mut tmp = tempfile_in(dir).map_err(io)?;
        let mut done = 0;
        for s in &m.segments {
            let key = self.key(name, &s.key);
            let r = self
                .rt
                .block_on(self.store.get(&key))
                .map_err(|e| RemoteError::Corrupt {
                    name: name.into(),
                    why: format!("segment {}: {e}", s.key),
                })?;
            let mut stream = r.into_stream();
            let mut got = 0u64;
            while let Some(b) = self
                .rt
                .block_on(stream.try_next())
                .map_err(|e| self.err(e))?
            {
                tmp.1.write_all(&b).map_err(io)?;
                got += b.len() as u64;
                done += b.len() as u64;
                progress(done, total);
            }
            if got != s.len {
                return Err(RemoteError::Corrupt {
                    name: name.into(),
                    why: format!(
                        "segment {} has {got} bytes, the manifest says {}",
                        s.key, s.len
                    ),
                });
            }
        }
        let tail = m.tail();
        tmp.1.write_all(&tail).map_err(io)?;
        progress(total, total);
        tmp.1.sync_all().map_err(io)?;
        std::fs::rename(&tmp.0, dst).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(m)
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub(crate) fn multipart(&self) -> &Arc<dyn MultipartStore> {
        &self.multipart
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Forget the cached read view of `name` (it became local).
    pub fn forget(&self, name: &str) {
        self.cache.lock().unwrap().remove(name);
    }

    pub(crate) fn key_of(&self, name: &str, rel: &str) -> Key {
        self.key(name, rel)
    }
}

/// A new file next to where the result goes (same file system: the rename
/// is atomic), removed if dropped before the rename.
fn tempfile_in(dir: &std::path::Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    for k in 0..100u32 {
        let p = dir.join(format!(".gtar-logd-fetch-{}-{k}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("cannot create a temporary file"))
}
