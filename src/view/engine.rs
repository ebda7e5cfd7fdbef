//! Statistics for every frame of an archive, computed once and kept.
//!
//! Invariants:
//! - Computed on the calling (blocking) thread — the view calls in from
//!   `spawn_blocking` — never on an async worker, and never in the daemon:
//!   the daemon only serves reads, its writer threads never see the view.
//! - Keyed by what the bytes are, not where they are: a tensor's key is its
//!   record path (which names the frame), dtype, stored size and CRC-32. A
//!   compaction copies entries unchanged, so the stats of the frames it keeps
//!   stay valid; a rewritten frame has new bytes, so a new CRC and new stats.
//!   A pair's key is the two tensors' keys.
//! - Persisted per archive in the user's cache directory
//!   (`$XDG_CACHE_HOME/gtar-logd/view`, else `~/.cache/gtar-logd/view`),
//!   written as a temporary file renamed over the old one, so a crash leaves
//!   the old cache or the new one; a cache that cannot be read is ignored
//!   (and rebuilt). Archives are never written.
//! - One pass at a time per archive (a mutex), so two pages never compute
//!   the same statistics twice.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::source::{Source, TensorMeta};
use super::stats::{self, PairStats, TensorStats};

const FORMAT: &str = "gtar-logd-view/1";
/// A long pass saves what it computed this often, so an interrupted view
/// keeps most of its work.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// The statistics cache directory: `$XDG_CACHE_HOME/gtar-logd/view`, else
/// `~/.cache/gtar-logd/view`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("gtar-logd/view"))
}

fn key(t: &TensorMeta) -> String {
    format!("{}|{}|{}|{:08x}", t.path, t.dtype.name(), t.size, t.crc32)
}

fn pair_key(newer: &str, older: &str) -> String {
    format!("{newer}#{older}")
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    format: String,
    identity: String,
    tensors: HashMap<String, TensorStats>,
    pairs: HashMap<String, Option<PairStats>>,
}

struct ArchiveState {
    file: Option<PathBuf>,
    cache: CacheFile,
    dirty: bool,
    /// Frames whose description needed their bytes read (daemon): kept for
    /// this run of the view.
    metas: HashMap<String, Vec<TensorMeta>>,
    /// Statistics computed since the view started (for tests and the log).
    computed: u64,
}

impl ArchiveState {
    fn load(file: Option<PathBuf>, identity: &str) -> ArchiveState {
        let cache = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok())
            .filter(|c| c.format == FORMAT && c.identity == identity)
            .unwrap_or_else(|| CacheFile {
                format: FORMAT.into(),
                identity: identity.into(),
                ..Default::default()
            });
        ArchiveState {
            file,
            cache,
            dirty: false,
            metas: HashMap::new(),
            computed: 0,
        }
    }

    /// Write the cache: temp file, then rename over the old one.
    fn save(&mut self) {
        let Some(f) = self.file.clone() else { return };
        if !self.dirty {
            return;
        }
        match write_atomically(&f, &serde_json::to_vec(&self.cache).unwrap_or_default()) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!("statistics cache {}: {e:#}", f.display()),
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_data()?;
    std::fs::rename(&tmp.0, path)?;
    Ok(())
}

/// A new file beside `path` (`O_EXCL`, random suffix).
fn tempfile_in(dir: &Path, path: &Path) -> Result<(PathBuf, std::fs::File)> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("random name: {e}"))?;
    let stem = path.file_name().unwrap_or_default().to_string_lossy();
    let p = dir.join(format!(".{stem}.{:016x}.tmp", u64::from_le_bytes(r)));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)?;
    Ok((p, f))
}

/// Tensor bytes a source handed over, by tensor id.
type BytesById = HashMap<String, Arc<Vec<u8>>>;

/// One tensor of one frame with its statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub meta: TensorMeta,
    pub stats: TensorStats,
    /// Against the same tensor in the previous frame that has it.
    pub prev: Option<PairStats>,
    /// Against the same tensor in the first frame that has it (none for
    /// that frame itself).
    pub first: Option<PairStats>,
    pub prev_stats_l2: Option<f64>,
    pub first_stats_l2: Option<f64>,
}

/// Every frame with the statistics of its tensors.
pub struct Series {
    pub frames: Vec<(String, Vec<Cell>)>,
    /// Statistics computed (not found in the cache) by this view so far.
    pub computed: u64,
}

/// The statistics of the archives one source serves.
pub struct Engine {
    source: Arc<dyn Source>,
    cache_dir: Option<PathBuf>,
    states: Mutex<HashMap<String, Arc<Mutex<ArchiveState>>>>,
}

impl Engine {
    pub fn new(source: Arc<dyn Source>, cache_dir: Option<PathBuf>) -> Engine {
        Engine {
            source,
            cache_dir,
            states: Mutex::new(HashMap::new()),
        }
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    fn state(&self, name: &str) -> Arc<Mutex<ArchiveState>> {
        let mut s = self.states.lock().unwrap();
        s.entry(name.to_string())
            .or_insert_with(|| {
                let identity = self.source.cache_identity(name);
                let file = self.cache_dir.as_ref().map(|d| {
                    let tail: String = name
                        .rsplit('/')
                        .next()
                        .unwrap_or("archive")
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '.' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    d.join(format!(
                        "{tail}-{:08x}.json",
                        crc32fast::hash(identity.as_bytes())
                    ))
                });
                Arc::new(Mutex::new(ArchiveState::load(file, &identity)))
            })
            .clone()
    }

    /// The cache file of `name` (for tests and the README).
    pub fn cache_file(&self, name: &str) -> Option<PathBuf> {
        self.state(name).lock().unwrap().file.clone()
    }

    /// A frame's tensors and, where the source had to read them, bytes.
    fn metas(
        &self,
        st: &mut ArchiveState,
        name: &str,
        index: &str,
    ) -> Result<(Vec<TensorMeta>, BytesById)> {
        if let Some(m) = st.metas.get(index) {
            return Ok((m.clone(), HashMap::new()));
        }
        let f = self.source.frame(name, index)?;
        let mut bytes = HashMap::new();
        if f.keep || f.bytes.is_some() {
            st.metas.insert(index.to_string(), f.tensors.clone());
        }
        if let Some(b) = f.bytes {
            for (t, b) in f.tensors.iter().zip(b) {
                bytes.insert(t.id.clone(), b);
            }
        }
        Ok((f.tensors, bytes))
    }

    /// The tensors of one frame (no statistics).
    pub fn frame(&self, name: &str, index: &str) -> Result<Vec<TensorMeta>> {
        let st = self.state(name);
        let mut st = st.lock().unwrap();
        Ok(self.metas(&mut st, name, index)?.0)
    }

    /// Every frame's statistics, computing what the cache lacks.
    pub fn series(&self, name: &str) -> Result<Series> {
        let st = self.state(name);
        let mut st = st.lock().unwrap();
        let res = self.pass(&mut st, name);
        st.save();
        res
    }

    fn pass(&self, st: &mut ArchiveState, name: &str) -> Result<Series> {
        let frames = self.source.frames(name)?;
        let mut prev_of: HashMap<String, (String, TensorMeta)> = HashMap::new();
        let mut first_of: HashMap<String, (String, TensorMeta)> = HashMap::new();
        // Bytes read for the previous frame and the first frames, so each
        // tensor is read once in a cold pass.
        // id -> (record path, bytes): the path says which frame they are of.
        type Held = HashMap<String, (String, Arc<Vec<u8>>)>;
        let mut held_prev: Held = HashMap::new();
        let mut held_first: Held = HashMap::new();
        let mut out = Vec::with_capacity(frames.len());
        let mut last_save = Instant::now();
        for f in frames {
            let (metas, mut have) = self.metas(st, name, &f)?;
            let mut cells = Vec::with_capacity(metas.len());
            let mut read_now: Held = HashMap::new();
            for t in metas {
                let k = key(&t);
                let older = |m: &HashMap<String, (String, TensorMeta)>| {
                    m.get(&t.id)
                        .filter(|(_, o)| o.dtype == t.dtype && o.path != t.path)
                        .cloned()
                };
                let prev = older(&prev_of);
                let first = older(&first_of);
                let need_stats = !st.cache.tensors.contains_key(&k);
                let need = |o: &Option<(String, TensorMeta)>| {
                    o.as_ref()
                        .is_some_and(|(_, o)| !st.cache.pairs.contains_key(&pair_key(&k, &key(o))))
                };
                let (need_prev, need_first) = (need(&prev), need(&first));
                if need_stats || need_prev || need_first {
                    let bytes = match have.remove(&t.id) {
                        Some(b) => b,
                        None => Arc::new(self.source.read(name, &f, &t)?),
                    };
                    if need_stats {
                        let s = stats::tensor(t.dtype, &bytes)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", t.path))?;
                        st.cache.tensors.insert(k.clone(), s);
                        st.computed += 1;
                    }
                    for (o, held, needed) in [
                        (&prev, &held_prev, need_prev),
                        (&first, &held_first, need_first),
                    ] {
                        let (Some((of, om)), true) = (o, needed) else {
                            continue;
                        };
                        let ob = match held.get(&t.id) {
                            Some((p, b)) if *p == om.path => b.clone(),
                            _ => Arc::new(self.source.read(name, of, om)?),
                        };
                        let p = stats::pair(t.dtype, &bytes, &ob)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", t.path))?;
                        st.cache.pairs.insert(pair_key(&k, &key(om)), p);
                    }
                    st.dirty = true;
                    read_now.insert(t.id.clone(), (t.path.clone(), bytes));
                }
                let pair_of = |o: &Option<(String, TensorMeta)>| {
                    o.as_ref()
                        .and_then(|(_, om)| st.cache.pairs.get(&pair_key(&k, &key(om))).cloned())
                        .flatten()
                };
                let l2_of = |o: &Option<(String, TensorMeta)>| {
                    o.as_ref()
                        .and_then(|(_, om)| st.cache.tensors.get(&key(om)).map(|s| s.l2))
                };
                let cell = Cell {
                    stats: st.cache.tensors[&k].clone(),
                    prev: pair_of(&prev),
                    first: pair_of(&first),
                    prev_stats_l2: l2_of(&prev),
                    first_stats_l2: l2_of(&first),
                    meta: t.clone(),
                };
                if !first_of.contains_key(&t.id) {
                    first_of.insert(t.id.clone(), (f.clone(), t.clone()));
                    if let Some(b) = read_now.get(&t.id) {
                        held_first.insert(t.id.clone(), b.clone());
                    }
                }
                prev_of.insert(t.id.clone(), (f.clone(), t));
                cells.push(cell);
            }
            // Only this frame's bytes can serve as the next frame's previous.
            held_prev = read_now;
            out.push((f, cells));
            if st.dirty && last_save.elapsed() > SAVE_EVERY {
                st.save();
                last_save = Instant::now();
            }
        }
        Ok(Series {
            frames: out,
            computed: st.computed,
        })
    }

    /// Frame `a` against frame `b`, tensor by tensor (by id): `‖a − b‖`,
    /// `max |a − b|`, the changed fraction. Tensors only one frame has, or
    /// with another dtype or size, get `None`.
    pub fn diff(
        &self,
        name: &str,
        a: &str,
        b: &str,
    ) -> Result<Vec<(TensorMeta, Option<PairStats>)>> {
        let st = self.state(name);
        let mut st = st.lock().unwrap();
        let (ma, mut ba) = self.metas(&mut st, name, a)?;
        let (mb, mut bb) = self.metas(&mut st, name, b)?;
        let by_id: HashMap<&str, &TensorMeta> = mb.iter().map(|t| (t.id.as_str(), t)).collect();
        let mut out = Vec::new();
        for t in &ma {
            let Some(o) = by_id.get(t.id.as_str()).filter(|o| o.dtype == t.dtype) else {
                out.push((t.clone(), None));
                continue;
            };
            let pk = pair_key(&key(t), &key(o));
            if !st.cache.pairs.contains_key(&pk) {
                let x = match ba.remove(&t.id) {
                    Some(x) => x,
                    None => Arc::new(self.source.read(name, a, t)?),
                };
                let y = match bb.remove(&o.id) {
                    Some(y) => y,
                    None => Arc::new(self.source.read(name, b, o)?),
                };
                let p =
                    stats::pair(t.dtype, &x, &y).map_err(|e| anyhow::anyhow!("{}: {e}", t.path))?;
                st.cache.pairs.insert(pk.clone(), p);
                st.dirty = true;
            }
            out.push((t.clone(), st.cache.pairs[&pk].clone()));
        }
        st.save();
        Ok(out)
    }
}
