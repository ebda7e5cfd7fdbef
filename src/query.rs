//! Answers to load queries, computed from an archive's index (synchronous).
//!
//! Dtype and shape of a tensor come from the frame's manifest when there is
//! one (archives we wrote), else from keras_gtar's `shape.u32.uni` next to the
//! record, else the record is 1-D of its libgetar format (see `layout`).

use std::collections::{BTreeSet, HashMap};

use crate::error::{Classify, Kind};
use crate::layout::DType;
use crate::layout::{self, Manifest};
use crate::limits::{RECORD_READ_DEFAULT, RECORD_READ_MAX, RECORD_TEXT_MAX};
use gtar::{group_under, Archive, Behavior, Entry, Format, RecordType, Resolution};

/// Errors of the query layer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {why}")]
    Bad { field: &'static str, why: String },
    #[error(transparent)]
    Format(#[from] gtar::Error),
}

impl Classify for QueryError {
    fn kind(&self) -> Kind {
        match self {
            QueryError::NotFound(_) => Kind::NotFound,
            QueryError::Bad { .. } => Kind::BadInput,
            QueryError::Format(g) => g.kind(),
        }
    }
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::Text => "text",
        Resolution::Uniform => "uni",
        Resolution::Individual => "ind",
    }
}

/// One record type of an archive, as DescribeArchive shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTypeSummary {
    pub group: String,
    pub name: String,
    pub behavior: &'static str,
    pub format: &'static str,
    pub resolution: &'static str,
    pub frame_count: u64,
    pub first_frame: String,
    pub last_frame: String,
    /// The path pattern, e.g. `keras/layer/0/weight/0/frames/*/weight.f32.uni`.
    pub path: String,
}

/// What DescribeArchive answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub archive: String,
    pub size_bytes: u64,
    pub groups: Vec<String>,
    pub records: Vec<RecordTypeSummary>,
    pub frame_count: u64,
    pub first_frame: String,
    pub last_frame: String,
    /// Why the archive was recovered in memory, or empty.
    pub recovered: String,
}

/// DescribeArchive.
pub fn describe(a: &Archive, name: &str, size: u64) -> Description {
    let ix = a.index();
    let mut groups = BTreeSet::new();
    let mut records = Vec::new();
    for rt in ix.record_types() {
        groups.insert(rt.group.clone());
        let frames = ix.frames(rt);
        let path = rt.pattern();
        records.push(RecordTypeSummary {
            group: rt.group.clone(),
            name: rt.name.clone(),
            behavior: rt.behavior.name(),
            format: rt.format.suffix(),
            resolution: resolution_name(rt.resolution),
            frame_count: frames.len() as u64,
            first_frame: frames.first().map(|s| s.to_string()).unwrap_or_default(),
            last_frame: frames.last().map(|s| s.to_string()).unwrap_or_default(),
            path,
        });
    }
    let frames = ix.frames_under(None);
    let recovered = match a.state() {
        gtar::OpenState::Clean => String::new(),
        gtar::OpenState::Recovered(r) => r.reason.clone(),
    };
    Description {
        archive: name.into(),
        size_bytes: size,
        groups: groups.into_iter().collect(),
        records,
        frame_count: frames.len() as u64,
        first_frame: frames.first().cloned().unwrap_or_default(),
        last_frame: frames.last().cloned().unwrap_or_default(),
        recovered,
    }
}

/// Frames under a group prefix; NOT_FOUND for a group with no records.
pub fn frames(a: &Archive, group: &str) -> Result<Vec<String>, QueryError> {
    let ix = a.index();
    let prefix = (!group.is_empty()).then_some(group);
    if prefix.is_some() && !ix.record_types().any(|rt| group_under(&rt.group, prefix)) {
        let groups: BTreeSet<&str> = ix
            .record_types()
            .map(|rt| rt.group.split('/').next().unwrap_or(""))
            .collect();
        let keras = ix
            .record_types()
            .any(|rt| rt.group.split('/').any(|c| c == "keras"));
        return Err(QueryError::NotFound(format!(
            "no group {group:?} in this archive; its groups are: {}{}",
            if groups.is_empty() {
                "none (it is empty)".to_string()
            } else {
                groups
                    .iter()
                    .map(|g| format!("{g:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            if keras {
                ". It holds Keras frames (GTARLogger): read them with gtar_logd.Trajectory, \
                 or with group='keras' (the group's name before 'keras/' if the run had one)"
            } else {
                ""
            }
        )));
    }
    Ok(ix.frames_under(prefix).into_iter().collect())
}

/// Pick a frame by Python-style position.
pub fn at_position(frames: &[String], pos: i64) -> Result<String, QueryError> {
    let n = frames.len() as i64;
    let i = if pos < 0 { n + pos } else { pos };
    if i < 0 || i >= n {
        return Err(QueryError::NotFound(format!(
            "position {pos} is out of range: there are {n} frames"
        )));
    }
    Ok(frames[i as usize].clone())
}

/// What a tensor is, as GetFrame and TensorHistory describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The record's path in the archive.
    pub path: String,
    pub group: String,
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub size_bytes: u64,
    /// CRC-32 (zip's) of the stored bytes, from the central directory.
    pub crc32: u32,
}

/// Where a stored tensor's bytes lie in the archive file, for a client that
/// reads them itself (GetFrame/TensorHistory `locate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
    pub device: u64,
    pub inode: u64,
}

/// Whether a peer with `uid` may be told where an archive's bytes are: it
/// owns the file (it could open it with libgetar anyway) or is root. The
/// kernel still decides whether the client's own `open` succeeds.
pub fn may_locate(a: &Archive, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.file_metadata().is_ok_and(|m| uid == 0 || m.uid() == uid)
}

/// Where an archive's stored entries lie: its file's absolute path,
/// device and inode, found once per request (not once per tensor).
pub struct Locator {
    file: String,
    device: u64,
    inode: u64,
}

impl Locator {
    pub fn new(a: &Archive) -> Result<Locator, QueryError> {
        use std::os::unix::fs::MetadataExt;
        let m = a.file_metadata()?;
        let file = std::path::absolute(a.path()).map_err(gtar::Error::Io)?;
        Ok(Locator {
            file: file.to_string_lossy().into_owned(),
            device: m.dev(),
            inode: m.ino(),
        })
    }

    /// The location of `e`'s bytes, or `None` if they are compressed (those
    /// are streamed). The entry is committed: its bytes are never rewritten
    /// in place.
    pub fn locate(&self, a: &Archive, e: &Entry) -> Result<Option<Location>, QueryError> {
        if e.cd.method != 0 {
            return Ok(None);
        }
        Ok(Some(Location {
            file: self.file.clone(),
            offset: a.data_offset(e)?,
            length: e.cd.compressed_size,
            crc32: e.cd.crc32,
            device: self.device,
            inode: self.inode,
        }))
    }
}

/// A tensor to send back: what it is and where its bytes are.
pub struct TensorRef {
    pub info: TensorMeta,
    pub entry: Entry,
}

fn manifests_at(
    a: &Archive,
    prefix: Option<&str>,
    index: &str,
) -> HashMap<String, (DType, Vec<u64>)> {
    let found: Vec<Entry> = {
        let ix = a.index();
        ix.records_at(prefix, index)
            .filter(|(rt, _)| layout::is_manifest(rt))
            .map(|(_, e)| e.clone())
            .collect()
    };
    let mut out = HashMap::new();
    for e in found {
        let Ok(bytes) = a.read_small(&e) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        for t in m.tensors {
            if let Some(d) = DType::from_name(&t.dtype) {
                out.insert(t.path, (d, t.shape));
            }
        }
    }
    out
}

/// keras_gtar's shape record next to a weight record, if consistent.
fn keras_shape(a: &Archive, rt: &RecordType, elements: u64) -> Option<Vec<u64>> {
    let shape_rt = RecordType {
        group: rt.group.clone(),
        name: "shape".into(),
        behavior: Behavior::Constant,
        format: Format::U32,
        resolution: Resolution::Uniform,
    };
    let e = a.index().record(&shape_rt, "").cloned()?;
    if e.size() > 4 * 64 {
        return None;
    }
    let bytes = a.read_small(&e).ok()?;
    let shape: Vec<u64> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
        .collect();
    (shape.iter().product::<u64>() == elements).then_some(shape)
}

/// `e` as a tensor: dtype and shape from its manifest entry if it has one,
/// else from the record type (and keras_gtar's shape record).
fn tensor_ref(
    a: &Archive,
    rt: &RecordType,
    e: &Entry,
    manifest: Option<(DType, Vec<u64>)>,
) -> TensorRef {
    let size = e.size();
    let (dtype, shape) = match manifest {
        Some(m) => m,
        None => {
            let d = if rt.resolution == Resolution::Text {
                DType::U8
            } else {
                DType::of_format(rt.format)
            };
            let item = rt.format.size() as u64;
            let elements = size / item;
            let shape = keras_shape(a, rt, elements).unwrap_or_else(|| vec![elements]);
            (d, shape)
        }
    };
    TensorRef {
        info: TensorMeta {
            path: e.name().to_string(),
            group: rt.group.clone(),
            name: rt.name.clone(),
            dtype,
            shape,
            size_bytes: size,
            crc32: e.cd.crc32,
        },
        entry: e.clone(),
    }
}

/// For each frame under `group`, the offset of its last entry's local
/// header: a frame lies wholly before a commit boundary iff this is below it.
pub fn frame_last_offsets(a: &Archive, group: &str) -> HashMap<String, u64> {
    let ix = a.index();
    let prefix = (!group.is_empty()).then_some(group);
    let mut out: HashMap<String, u64> = HashMap::new();
    for rt in ix.record_types() {
        if rt.behavior != Behavior::Discrete || !group_under(&rt.group, prefix) {
            continue;
        }
        for f in ix.frames(rt) {
            if let Some(e) = ix.record(rt, f) {
                let at = out.entry(f.to_string()).or_insert(0);
                *at = (*at).max(e.cd.local_header_offset);
            }
        }
    }
    out
}

/// The tensors of frame `index` under `group`, optionally only `names`.
pub fn frame_tensors(
    a: &Archive,
    group: &str,
    index: &str,
    names: &[String],
) -> Result<Vec<TensorRef>, QueryError> {
    let prefix = (!group.is_empty()).then_some(group);
    // Manifests sit under the writer's prefix, which may lie above `group`.
    let manifest = manifests_at(a, None, index);
    let picked: Vec<(RecordType, Entry)> = {
        let ix = a.index();
        ix.records_at(prefix, index)
            .filter(|(rt, _)| !layout::is_manifest(rt))
            .filter(|(rt, _)| names.is_empty() || names.contains(&rt.name))
            .map(|(rt, e)| (rt.clone(), e.clone()))
            .collect()
    };
    if picked.is_empty() {
        return Err(QueryError::NotFound(format!(
            "no records at frame {index:?}{}",
            if group.is_empty() {
                String::new()
            } else {
                format!(" in group {group:?}")
            }
        )));
    }
    Ok(picked
        .iter()
        .map(|(rt, e)| tensor_ref(a, rt, e, manifest.get(e.name()).cloned()))
        .collect())
}

/// Records with a history: discrete (per frame) and continuous (`vars/`,
/// per step, e.g. a loss) records.
fn history_kind(rt: &RecordType) -> bool {
    matches!(rt.behavior, Behavior::Discrete | Behavior::Continuous)
}

/// One record's history (TensorHistory): the record types named `name` in
/// `group` and the manifests' record types, found once; then each frame
/// costs a few lookups and the parse of its manifest (whose bytes the
/// archive keeps, see `gtar::Learned`).
pub struct History {
    rts: Vec<RecordType>,
    manifests: Vec<RecordType>,
    group: String,
    name: String,
}

impl History {
    pub fn new(a: &Archive, group: &str, name: &str) -> Result<History, QueryError> {
        let ix = a.index();
        let rts: Vec<RecordType> = ix
            .record_types()
            .filter(|rt| history_kind(rt) && rt.group == group && rt.name == name)
            .cloned()
            .collect();
        if rts.is_empty() {
            return Err(QueryError::NotFound(format!(
                "no discrete or continuous record {name:?} in group {group:?}"
            )));
        }
        let manifests = ix
            .record_types()
            .filter(|rt| layout::is_manifest(rt))
            .cloned()
            .collect();
        Ok(History {
            rts,
            manifests,
            group: group.to_string(),
            name: name.to_string(),
        })
    }

    /// Frames (or steps) of the record, sliced Python-style by
    /// `start`/`stop`.
    pub fn frames(&self, a: &Archive, start: i64, stop: Option<i64>) -> Vec<String> {
        let mut frames: Vec<String> = {
            let ix = a.index();
            self.rts
                .iter()
                .flat_map(|rt| ix.frames(rt))
                .map(str::to_string)
                .collect()
        };
        frames.sort_by(|x, y| gtar::index_cmp(x, y));
        frames.dedup();
        let n = frames.len() as i64;
        let clamp = |v: i64| if v < 0 { (n + v).max(0) } else { v.min(n) };
        let (s, e) = (clamp(start), clamp(stop.unwrap_or(n)));
        if s < e {
            frames.truncate(e as usize);
            frames.drain(..s as usize);
            frames
        } else {
            Vec::new()
        }
    }

    /// The record at frame `index`.
    pub fn tensor(&self, a: &Archive, index: &str) -> Result<TensorRef, QueryError> {
        let (found, manifests) = {
            let ix = a.index();
            let found = self
                .rts
                .iter()
                .find_map(|rt| ix.record(rt, index).map(|e| (rt, e.clone())));
            // The manifest lives under the writer's prefix, which we don't
            // know here: any manifest at this frame.
            let manifests: Vec<Entry> = self
                .manifests
                .iter()
                .filter_map(|rt| ix.record(rt, index).cloned())
                .collect();
            (found, manifests)
        };
        let (rt, e) = found.ok_or_else(|| {
            QueryError::NotFound(format!(
                "{}/{} has no frame {index:?}",
                self.group, self.name
            ))
        })?;
        let manifest = manifest_entry(a, &manifests, e.name());
        Ok(tensor_ref(a, rt, &e, manifest))
    }
}

/// The dtype and shape that one of `manifests` gives the tensor `path`,
/// parsed borrowing from the manifest's bytes, so a manifest of many
/// tensors costs no allocation per tensor.
fn manifest_entry(a: &Archive, manifests: &[Entry], path: &str) -> Option<(DType, Vec<u64>)> {
    #[derive(serde::Deserialize)]
    struct Lite<'a> {
        #[serde(borrow)]
        tensors: Vec<LiteTensor<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct LiteTensor<'a> {
        #[serde(borrow)]
        path: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        dtype: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        shape: &'a serde_json::value::RawValue,
    }
    manifests.iter().find_map(|e| {
        let bytes = a.read_small(e).ok()?;
        let m = serde_json::from_slice::<Lite>(&bytes).ok()?;
        let t = m.tensors.iter().find(|t| t.path == path)?;
        let d = DType::from_name(&t.dtype)?;
        let shape: Vec<u64> = serde_json::from_str(t.shape.get()).ok()?;
        Some((d, shape))
    })
}

/// A piece of a record, as ReadRecord answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPiece {
    pub data: Vec<u8>,
    /// The record's total size.
    pub size: u64,
    /// Where `data` starts in the record.
    pub offset: u64,
}

impl RecordPiece {
    /// The record as text: only for a whole record of at most
    /// [`RECORD_TEXT_MAX`] bytes that is valid UTF-8.
    pub fn text(&self) -> Option<String> {
        let whole = self.offset == 0 && self.data.len() as u64 == self.size;
        (whole && self.size <= RECORD_TEXT_MAX)
            .then(|| String::from_utf8(self.data.clone()).ok())
            .flatten()
    }
}

/// Bytes `offset ..` of record `path`, at most `max_bytes` of them (0: the
/// default; never more than [`RECORD_READ_MAX`]).
pub fn record_range(
    a: &Archive,
    path: &str,
    offset: u64,
    max_bytes: u64,
) -> Result<RecordPiece, QueryError> {
    let e = a
        .index()
        .get(path)
        .cloned()
        .ok_or_else(|| QueryError::NotFound(format!("no record {path:?}")))?;
    let size = e.size();
    if offset > size {
        return Err(QueryError::Bad {
            field: "offset",
            why: format!("{offset} is past the end of {path} ({size} bytes)"),
        });
    }
    let len = match max_bytes {
        0 => RECORD_READ_DEFAULT,
        n => n.min(RECORD_READ_MAX),
    };
    let data = a.read_range(&e, offset, len)?;
    Ok(RecordPiece { data, size, offset })
}
