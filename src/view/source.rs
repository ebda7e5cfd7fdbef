//! Where the view reads archives from: the user's daemon over gRPC, or
//! archive files given on the command line (offline, no daemon).
//!
//! Invariants:
//! - Read-only: nothing here writes, renames or deletes an archive; offline
//!   archives are opened with `gtar::Archive::open`, which repairs a torn
//!   archive in memory only.
//! - Confinement: a daemon source passes names to the daemon, which confines
//!   them as for every RPC (and, under the multi-user service, serves only the
//!   connecting user's archives: the kernel says who we are). An offline
//!   source serves only the files named on the command line and regular
//!   `.zip` files found under the directories named there (symlinks inside
//!   those directories are not followed); a name is looked up in that list,
//!   never joined onto a path.
//! - Every method blocks (file reads, or gRPC calls run to completion on the
//!   runtime's handle): call them from `spawn_blocking`, never from an async
//!   worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use gtar::{Archive, Behavior, Format, RecordPath, Resolution};
use serde::Serialize;

use crate::layout::DType;

/// An archive, frame or tensor the view does not serve (HTTP 404).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// A row of the archives page.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveRow {
    pub name: String,
    pub size: u64,
    pub frames: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    /// A writer has it open right now.
    pub live: bool,
    /// Modification time of the file, seconds since the epoch (offline).
    pub last_write: Option<f64>,
    pub replication: Option<Replication>,
    /// Set when the archive could not be read; the other fields are then
    /// what was known without reading it.
    pub error: Option<String>,
}

/// Remote replication as the daemon reports it (`serve --remote`).
#[derive(Debug, Clone, Serialize)]
pub struct Replication {
    pub remote: String,
    pub durable_bytes: u64,
    pub replicated_bytes: u64,
    pub lagging: bool,
    pub error: String,
}

/// An archive described: its row and its record groups.
#[derive(Debug, Clone, Serialize)]
pub struct Described {
    #[serde(flatten)]
    pub row: ArchiveRow,
    pub groups: Vec<String>,
}

/// One tensor of a frame, without its bytes.
#[derive(Debug, Clone, Serialize)]
pub struct TensorMeta {
    /// The record without its frame: `{group}/{name}`; the same tensor in
    /// every frame.
    pub id: String,
    pub path: String,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Stored bytes.
    pub size: u64,
    /// CRC-32 of the stored bytes (zip's).
    pub crc32: u32,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// A frame's tensors; a source that had to read them to describe them
/// hands the bytes over too.
pub struct FrameTensors {
    pub tensors: Vec<TensorMeta>,
    pub bytes: Option<Vec<Arc<Vec<u8>>>>,
    /// Describing the frame cost a round trip (daemon): the engine keeps the
    /// description for this run of the view.
    pub keep: bool,
}

/// Where a frame stands, as far as a source can tell (`None`: it cannot).
/// Every frame a source lists is received: in the archive and visible to
/// readers (the daemon sends its `received` ack when it commits a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FrameState {
    /// An fsync covered the frame's bytes.
    pub durable: Option<bool>,
    /// The frame is in the committed remote manifest (`serve --remote`).
    pub replicated: Option<bool>,
}

/// One stored metric (a continuous record): its steps and values.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub group: String,
    pub name: String,
    pub steps: Vec<String>,
    pub values: Vec<f64>,
}

/// What the view reads.
pub trait Source: Send + Sync {
    /// How the page names where it reads from.
    fn describe_self(&self) -> String;
    fn list(&self) -> Result<Vec<ArchiveRow>>;
    fn describe(&self, name: &str) -> Result<Described>;
    /// Frame indices in GETAR order.
    fn frames(&self, name: &str) -> Result<Vec<String>>;
    /// Frame indices in GETAR order, each with its state.
    fn frame_states(&self, name: &str) -> Result<Vec<(String, FrameState)>>;
    /// What this source can tell of frames' states, for the page.
    fn states_note(&self) -> &'static str;
    fn frame(&self, name: &str, index: &str) -> Result<FrameTensors>;
    fn read(&self, name: &str, index: &str, t: &TensorMeta) -> Result<Vec<u8>>;
    fn metrics(&self, name: &str) -> Result<Vec<Metric>>;
    /// A constant record's bytes, `None` if the archive has none at `path`.
    fn record(&self, name: &str, path: &str) -> Result<Option<Vec<u8>>>;
    /// A stable identity of the archive for the statistics cache.
    fn cache_identity(&self, name: &str) -> String;
}

/// A text record (manifests, notes) is not a tensor.
fn is_text(path: &str) -> bool {
    RecordPath::parse(path).rtype.resolution == Resolution::Text
}

fn id_of(group: &str, name: &str) -> String {
    if group.is_empty() {
        name.to_string()
    } else {
        format!("{group}/{name}")
    }
}

/// The first element of a scalar record as f64.
fn scalar(format: Format, bytes: &[u8]) -> Option<f64> {
    let d = DType::of_format(format);
    crate::view::stats::decode(d, bytes).ok()?.first().copied()
}

// ------------------------------------------------------------------ offline

/// Archive files and directories given on the command line.
pub struct Offline {
    roots: Vec<PathBuf>,
    open: Mutex<HashMap<PathBuf, Opened>>,
}

struct Opened {
    len: u64,
    mtime: SystemTime,
    archive: Arc<Archive>,
}

impl Offline {
    /// Checks every path exists now, so a typo fails at start.
    pub fn new(roots: Vec<PathBuf>) -> Result<Offline> {
        for r in &roots {
            let m = std::fs::metadata(r).with_context(|| {
                format!(
                    "{}: no such archive or directory (give .zip files or directories holding them)",
                    r.display()
                )
            })?;
            if !m.is_file() && !m.is_dir() {
                bail!("{}: neither a file nor a directory", r.display());
            }
        }
        Ok(Offline {
            roots,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// (name, path) of every archive served: given files under the name
    /// they were given by, `.zip` files under given directories as
    /// `DIR/relative/path.zip`.
    fn scan(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for r in &self.roots {
            if r.is_file() {
                out.push((r.display().to_string(), r.clone()));
                continue;
            }
            let mut stack = vec![r.clone()];
            while let Some(d) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in rd.flatten() {
                    let Ok(ft) = e.file_type() else { continue };
                    let p = e.path();
                    if ft.is_dir() {
                        stack.push(p);
                    } else if ft.is_file() && p.extension().is_some_and(|x| x == "zip") {
                        out.push((p.display().to_string(), p));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn path_of(&self, name: &str) -> Result<PathBuf> {
        self.scan()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| {
                NotFound(format!(
                    "no archive {name:?} among the files and directories this view was given"
                ))
                .into()
            })
    }

    /// The archive, opened again when the file changed.
    fn archive(&self, name: &str) -> Result<(PathBuf, Arc<Archive>)> {
        let path = self.path_of(name)?;
        let m = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        let mtime = m.modified().unwrap_or(UNIX_EPOCH);
        let mut open = self.open.lock().unwrap();
        if let Some(o) = open.get(&path) {
            if o.len == m.len() && o.mtime == mtime {
                return Ok((path, o.archive.clone()));
            }
        }
        let a = Arc::new(
            Archive::open(&path)
                .with_context(|| format!("{}: cannot open archive", path.display()))?,
        );
        open.insert(
            path.clone(),
            Opened {
                len: m.len(),
                mtime,
                archive: a.clone(),
            },
        );
        Ok((path, a))
    }

    fn row(&self, name: &str, path: &Path) -> ArchiveRow {
        let meta = std::fs::metadata(path).ok();
        let mut row = ArchiveRow {
            name: name.to_string(),
            size: meta.as_ref().map_or(0, |m| m.len()),
            frames: 0,
            first: None,
            last: None,
            live: gtar::is_being_written(path).unwrap_or(false),
            last_write: meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            replication: None,
            error: None,
        };
        match self.archive(name) {
            Ok((_, a)) => {
                let frames = a.index().frames_under(None);
                row.frames = frames.len() as u64;
                row.first = frames.first().cloned();
                row.last = frames.last().cloned();
            }
            Err(e) => row.error = Some(format!("{e:#}")),
        }
        row
    }
}

impl Source for Offline {
    fn describe_self(&self) -> String {
        let r: Vec<String> = self.roots.iter().map(|p| p.display().to_string()).collect();
        format!("files: {}", r.join(", "))
    }

    fn list(&self) -> Result<Vec<ArchiveRow>> {
        Ok(self
            .scan()
            .into_iter()
            .map(|(n, p)| self.row(&n, &p))
            .collect())
    }

    fn describe(&self, name: &str) -> Result<Described> {
        let path = self.path_of(name)?;
        let row = self.row(name, &path);
        let (_, a) = self.archive(name)?;
        let groups = crate::query::describe(&a, name, row.size).groups;
        Ok(Described { row, groups })
    }

    fn frames(&self, name: &str) -> Result<Vec<String>> {
        let (_, a) = self.archive(name)?;
        Ok(crate::query::frames(&a, "")?)
    }

    fn frame_states(&self, name: &str) -> Result<Vec<(String, FrameState)>> {
        let (path, a) = self.archive(name)?;
        // A file no writer holds is as durable as the file system keeps it;
        // one a writer holds may hold frames no fsync covered yet, and only
        // that writer knows which.
        let durable = match gtar::is_being_written(&path) {
            Ok(false) => Some(true),
            _ => None,
        };
        let s = FrameState {
            durable,
            replicated: None,
        };
        Ok(crate::query::frames(&a, "")?
            .into_iter()
            .map(|f| (f, s))
            .collect())
    }

    fn states_note(&self) -> &'static str {
        "offline: every frame listed is in the file; it is durable unless a writer holds the \
         file open (then only that daemon knows); replication is not known without the daemon"
    }

    fn frame(&self, name: &str, index: &str) -> Result<FrameTensors> {
        let (_, a) = self.archive(name)?;
        let refs = crate::query::frame_tensors(&a, "", index, &[])?;
        let tensors = refs
            .into_iter()
            .filter(|r| !is_text(&r.info.path))
            .map(|r| TensorMeta {
                id: id_of(&r.info.group, &r.info.name),
                path: r.info.path,
                dtype: r.info.dtype,
                shape: r.info.shape,
                size: r.info.size_bytes,
                crc32: r.entry.cd.crc32,
            })
            .collect();
        Ok(FrameTensors {
            tensors,
            bytes: None,
            keep: false,
        })
    }

    fn read(&self, name: &str, _index: &str, t: &TensorMeta) -> Result<Vec<u8>> {
        let (path, a) = self.archive(name)?;
        let e = a
            .index()
            .get(&t.path)
            .cloned()
            .ok_or_else(|| anyhow!("{}: no record {}", path.display(), t.path))?;
        a.read_entry(&e)
            .with_context(|| format!("{}: reading {}", path.display(), t.path))
    }

    fn metrics(&self, name: &str) -> Result<Vec<Metric>> {
        let (_, a) = self.archive(name)?;
        let wanted: Vec<(gtar::RecordType, Vec<(String, gtar::Entry)>)> = {
            let ix = a.index();
            ix.record_types()
                .filter(|rt| {
                    rt.behavior == Behavior::Continuous && rt.resolution != Resolution::Text
                })
                .map(|rt| {
                    let steps = ix
                        .frames(rt)
                        .into_iter()
                        .filter_map(|s| Some((s.to_string(), ix.record(rt, s)?.clone())))
                        .collect();
                    (rt.clone(), steps)
                })
                .collect()
        };
        let mut out = Vec::new();
        for (rt, steps) in wanted {
            let mut m = Metric {
                group: rt.group.clone(),
                name: rt.name.clone(),
                steps: Vec::new(),
                values: Vec::new(),
            };
            for (s, e) in steps {
                let v = a.read_small(&e).ok().and_then(|b| scalar(rt.format, &b));
                if let Some(v) = v {
                    m.steps.push(s);
                    m.values.push(v);
                }
            }
            out.push(m);
        }
        Ok(out)
    }

    fn record(&self, name: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let (_, a) = self.archive(name)?;
        let e = a.index().get(path).cloned();
        match e {
            Some(e) => Ok(Some(a.read_entry(&e)?)),
            None => Ok(None),
        }
    }

    fn cache_identity(&self, name: &str) -> String {
        let p = self.path_of(name).unwrap_or_else(|_| PathBuf::from(name));
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        format!("file:{}", p.display())
    }
}

// ------------------------------------------------------------------- daemon

/// The user's daemon, over its socket (or `--address`).
pub struct Daemon {
    client: gtar_logd_client::Client,
    rt: tokio::runtime::Handle,
    /// The last frame read whole: (archive, index, (path, bytes) of its
    /// tensors), so reading its tensors one by one costs one GetFrame.
    last: Mutex<Option<LastFrame>>,
}

type LastFrame = (String, String, Vec<(String, Arc<Vec<u8>>)>);

impl Daemon {
    /// Connects now, so a missing daemon fails at start with the client's
    /// sentence naming the address and how to start a daemon there.
    pub async fn connect(address: &str) -> Result<Daemon> {
        let client = gtar_logd_client::Client::connect(address).await?;
        // One cheap call proves the daemon answers (connect is lazy on TCP).
        client
            .list_archives("")
            .await
            .with_context(|| format!("the daemon at {} did not answer", client.address()))?;
        Ok(Daemon {
            client,
            rt: tokio::runtime::Handle::current(),
            last: Mutex::new(None),
        })
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

fn not_found(e: &gtar_logd_client::Error) -> bool {
    e.code() == Some(gtar_logd_client::Code::NotFound)
}

impl Source for Daemon {
    fn describe_self(&self) -> String {
        format!("daemon at {}", self.client.address())
    }

    fn list(&self) -> Result<Vec<ArchiveRow>> {
        let list = self.block(self.client.list_archives(""))?;
        Ok(list
            .into_iter()
            .map(|i| match self.describe(&i.archive) {
                Ok(d) => d.row,
                Err(e) => ArchiveRow {
                    name: i.archive,
                    size: i.size_bytes,
                    frames: 0,
                    first: None,
                    last: None,
                    live: i.writing,
                    last_write: None,
                    replication: None,
                    error: Some(format!("{e:#}")),
                },
            })
            .collect())
    }

    fn describe(&self, name: &str) -> Result<Described> {
        let d = self.block(self.client.describe(name))?;
        let live = self
            .block(self.client.list_archives(name))
            .ok()
            .and_then(|l| l.into_iter().find(|i| i.archive == name))
            .is_some_and(|i| i.writing);
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Ok(Described {
            row: ArchiveRow {
                name: d.archive,
                size: d.size_bytes,
                frames: d.frame_count,
                first: non_empty(d.first_frame),
                last: non_empty(d.last_frame),
                live,
                last_write: None,
                replication: d.replication.map(|r| Replication {
                    remote: r.remote,
                    durable_bytes: r.durable_bytes,
                    replicated_bytes: r.replicated_bytes,
                    lagging: r.lagging,
                    error: r.error,
                }),
                error: None,
            },
            groups: d.groups,
        })
    }

    fn frames(&self, name: &str) -> Result<Vec<String>> {
        Ok(self.block(self.client.list_frames(name, ""))?)
    }

    fn frame_states(&self, name: &str) -> Result<Vec<(String, FrameState)>> {
        let l = self.block(self.client.list_frame_states(name, ""))?;
        Ok(l.into_iter()
            .map(|(f, s)| {
                (
                    f,
                    FrameState {
                        durable: Some(s.durable),
                        replicated: s.replicated,
                    },
                )
            })
            .collect())
    }

    fn states_note(&self) -> &'static str {
        "from the daemon: every frame listed is received (committed, visible to readers); \
         durable once an fsync covered it; replicated once it is in the remote manifest \
         (only when the daemon runs with --remote)"
    }

    fn frame(&self, name: &str, index: &str) -> Result<FrameTensors> {
        // Headers only: the daemon reads no tensor bytes, and the CRC-32 from
        // the central directory keys the statistics cache.
        let (_, infos) = self.block(
            self.client
                .frame_headers(name, gtar_logd_client::FrameSel::index(index)),
        )?;
        let mut tensors = Vec::new();
        for t in infos.into_iter().filter(|t| !is_text(&t.path)) {
            let dtype = gtar_logd_client::DType::from_proto(t.dtype)
                .and_then(|d| DType::from_name(d.name()))
                .ok_or_else(|| anyhow!("{}: unknown dtype {}", t.path, t.dtype))?;
            tensors.push(TensorMeta {
                id: id_of(&t.group, &t.name),
                path: t.path,
                dtype,
                shape: t.shape,
                size: t.size_bytes,
                crc32: t.crc32,
            });
        }
        Ok(FrameTensors {
            tensors,
            bytes: None,
            keep: true,
        })
    }

    fn read(&self, name: &str, index: &str, t: &TensorMeta) -> Result<Vec<u8>> {
        let hit = |l: &Option<LastFrame>| -> Option<Vec<u8>> {
            let (n, i, ts) = l.as_ref()?;
            if n != name || i != index {
                return None;
            }
            let (_, b) = ts.iter().find(|(p, _)| *p == t.path)?;
            Some(b.as_ref().clone())
        };
        if let Some(b) = hit(&self.last.lock().unwrap()) {
            return Ok(b);
        }
        let f = self.block(
            self.client
                .get_frame(name, gtar_logd_client::FrameSel::index(index)),
        )?;
        let ts: Vec<(String, Arc<Vec<u8>>)> = f
            .tensors
            .into_iter()
            .map(|x| (x.path, Arc::new(x.array.to_le_bytes())))
            .collect();
        let mut last = self.last.lock().unwrap();
        *last = Some((name.to_string(), index.to_string(), ts));
        hit(&last).ok_or_else(|| anyhow!("{name}: frame {index} has no tensor {}", t.path))
    }

    fn metrics(&self, name: &str) -> Result<Vec<Metric>> {
        let d = self.block(self.client.describe(name))?;
        let mut out = Vec::new();
        for r in d
            .records
            .iter()
            .filter(|r| r.behavior == "continuous" && r.resolution != "text")
        {
            let hist = self.block(self.client.tensor_history(name, &r.group, &r.name, 0, None))?;
            let mut m = Metric {
                group: r.group.clone(),
                name: r.name.clone(),
                steps: Vec::new(),
                values: Vec::new(),
            };
            for f in hist {
                let Some(t) = f.tensors.first() else { continue };
                let Some(d) = DType::from_name(t.array.dtype().name()) else {
                    continue;
                };
                if let Some(v) = crate::view::stats::decode(d, &t.array.to_le_bytes())
                    .ok()
                    .and_then(|v| v.first().copied())
                {
                    m.steps.push(f.index);
                    m.values.push(v);
                }
            }
            out.push(m);
        }
        Ok(out)
    }

    fn record(&self, name: &str, path: &str) -> Result<Option<Vec<u8>>> {
        match self.block(self.client.read_record(name, path)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn cache_identity(&self, name: &str) -> String {
        format!("daemon:{}:{name}", self.client.address())
    }
}
