//! Where the daemon puts tensors inside an archive, and how it records what
//! the GETAR format itself cannot say (dtype beyond libgetar's seven, shape).
//!
//! * A tensor (group `G`, name `N`, dtype `D`) of frame `F`, written by a
//!   stream with group prefix `P`, is the record `{P/}{G/}frames/{F}/{N}.{fmt}.uni`.
//!   `fmt` is the libgetar type for f32 f64 i32 i64 u8 u32 u64; the other
//!   dtypes (f16, bf16, i8, i16, u16, bool) are stored as their raw
//!   little-endian bytes in a `u8` record, so libgetar reads them as bytes and
//!   our clients restore them bit-exactly.
//! * Each frame gets one text record `{P/}gtar_logd/frames/{F}/manifest.json`
//!   listing every tensor's path, dtype and shape. libgetar and keras_gtar see
//!   it as one more discrete text record and ignore it.
//! * Archives without a manifest (written by libgetar or keras_gtar) are read
//!   with the dtype of the record's format and the shape from keras_gtar's
//!   `{group}/shape.u32.uni` when present and consistent, else 1-D.
//!
//! Synchronous, no I/O: pure naming and validation.

use serde::{Deserialize, Serialize};

use gtar::check_component;

use crate::error::BadField;
use crate::limits::{MAX_COMPONENT_BYTES, MAX_RANK};
use gtar::{Format, RecordType};

/// Group of the manifest record (below the stream's prefix).
/// gtar's frame marker: a rewritten frame index replaces the old frame as a
/// whole (see `gtar::FRAME_MARKER_GROUP`).
pub const MANIFEST_GROUP: &str = gtar::FRAME_MARKER_GROUP;
pub const MANIFEST_NAME: &str = "manifest.json";

/// Element types, as the daemon knows them (the wire's enum is converted to
/// this at the edge, in `service::convert`). The seven libgetar types are
/// stored as themselves; the others as raw little-endian bytes in a `.u8`
/// record, their true dtype kept in the frame's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
    U8,
    U32,
    U64,
    F16,
    BF16,
    I8,
    I16,
    U16,
    Bool,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F64,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U32,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::Bool,
    ];

    /// Element size and the GETAR format it is stored as.
    pub fn storage(self) -> (usize, Format) {
        match self {
            DType::F32 => (4, Format::F32),
            DType::F64 => (8, Format::F64),
            DType::I32 => (4, Format::I32),
            DType::I64 => (8, Format::I64),
            DType::U8 => (1, Format::U8),
            DType::U32 => (4, Format::U32),
            DType::U64 => (8, Format::U64),
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => (2, Format::U8),
            DType::I8 | DType::Bool => (1, Format::U8),
        }
    }

    /// The dtype a record of format `f` holds when nothing else is known.
    pub fn of_format(f: Format) -> DType {
        match f {
            Format::F32 => DType::F32,
            Format::F64 => DType::F64,
            Format::I32 => DType::I32,
            Format::I64 => DType::I64,
            Format::U8 => DType::U8,
            Format::U32 => DType::U32,
            Format::U64 => DType::U64,
        }
    }

    /// Name used for dtypes in manifests (numpy's spelling).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// Byte size of a tensor, or why the shape is unacceptable.
pub fn tensor_bytes(d: DType, shape: &[u64], max_bytes: u64) -> Result<u64, String> {
    let (item, _) = d.storage();
    if shape.len() > MAX_RANK {
        return Err(format!(
            "rank {} exceeds the limit of {MAX_RANK}",
            shape.len()
        ));
    }
    let mut n: u64 = item as u64;
    for &dim in shape {
        n = n
            .checked_mul(dim)
            .ok_or_else(|| format!("shape {shape:?} overflows 64 bits"))?;
    }
    if n > max_bytes {
        return Err(format!(
            "shape {shape:?} is {n} bytes, over the daemon's limit of {max_bytes} \
             (serve --max-tensor-bytes / GTAR_LOGD_MAX_TENSOR_BYTES)"
        ));
    }
    Ok(n)
}

/// Validate one name component: what libgetar allows in a path component,
/// and at most [`MAX_COMPONENT_BYTES`].
fn check_part(what: &str, s: &str) -> Result<(), BadField> {
    if s.len() > MAX_COMPONENT_BYTES {
        let head: String = s.chars().take(32).collect();
        return Err(BadField::new(
            what,
            format!(
                "{what} {head:?}… is {} bytes long, over the limit of {MAX_COMPONENT_BYTES}",
                s.len()
            ),
        ));
    }
    check_component(what, s).map_err(|why| BadField::new(what, why))
}

/// Validate a group path (components separated by '/', may be empty).
pub fn check_group(what: &str, g: &str) -> Result<(), BadField> {
    if g.is_empty() {
        return Ok(());
    }
    for c in g.split('/') {
        check_part(what, c)?;
        if c == "frames" || c == "vars" {
            return Err(BadField::new(
                what,
                format!("{what} {g:?} uses the reserved component {c:?}"),
            ));
        }
    }
    Ok(())
}

/// Validate a record name (one component, no '.').
pub fn check_name(what: &str, n: &str) -> Result<(), BadField> {
    check_part(what, n)?;
    if n.contains('.') {
        return Err(BadField::new(
            what,
            format!("{what} {n:?} must not contain '.'"),
        ));
    }
    Ok(())
}

/// Validate a frame index.
pub fn check_index(what: &str, i: &str) -> Result<(), BadField> {
    check_part(what, i)
}

/// Validate a record path relative to a stream's group (`keras/model.json`).
pub fn check_record_path(what: &str, p: &str) -> Result<(), BadField> {
    if p.is_empty() || p.starts_with('/') || p.ends_with('/') {
        return Err(BadField::new(
            what,
            format!("{what} {p:?} is not a relative record path"),
        ));
    }
    p.split('/').try_for_each(|c| check_part(what, c))
}

/// Join group parts, skipping empty ones.
pub fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// Path of a tensor record.
pub fn tensor_path(prefix: &str, group: &str, name: &str, index: &str, d: DType) -> String {
    let fmt = d.storage().1;
    let g = join(&[prefix, group]);
    let mut out = String::new();
    if !g.is_empty() {
        out.push_str(&g);
        out.push('/');
    }
    out.push_str(&format!("frames/{index}/{name}.{}.uni", fmt.suffix()));
    out
}

/// Path of a scalar (continuous f64 record).
pub fn scalar_path(prefix: &str, group: &str, name: &str, index: &str) -> String {
    let g = join(&[prefix, group]);
    if g.is_empty() {
        format!("vars/{name}.f64.uni/{index}")
    } else {
        format!("{g}/vars/{name}.f64.uni/{index}")
    }
}

/// Path of a frame's manifest.
pub fn manifest_path(prefix: &str, index: &str) -> String {
    format!(
        "{}/frames/{index}/{MANIFEST_NAME}",
        join(&[prefix, MANIFEST_GROUP])
    )
}

/// Is this record type a manifest?
pub fn is_manifest(rt: &RecordType) -> bool {
    rt.name == MANIFEST_NAME && (rt.group == MANIFEST_GROUP || rt.group.ends_with("/gtar_logd"))
}

/// One tensor in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestTensor {
    pub path: String,
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// The manifest of one frame.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Format tag, for future changes.
    pub format: String,
    pub frame: String,
    pub tensors: Vec<ManifestTensor>,
    /// When the daemon committed the frame (ms since the Unix epoch): what
    /// `gtar-logd compact --keep-newer-than` judges by. Absent in older
    /// archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_unix_ms: Option<u64>,
}

impl Manifest {
    pub fn new(frame: &str) -> Manifest {
        Manifest {
            format: "gtar-logd/1".into(),
            frame: frame.into(),
            tensors: Vec::new(),
            written_unix_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gtar::{Behavior, RecordPath, Resolution};

    #[test]
    fn paths_parse_as_libgetar_records() {
        let p = tensor_path("run1", "keras/layer/0/weight/1", "weight", "12", DType::F32);
        assert_eq!(p, "run1/keras/layer/0/weight/1/frames/12/weight.f32.uni");
        let r = RecordPath::parse(&p);
        assert_eq!(r.rtype.behavior, Behavior::Discrete);
        assert_eq!(r.rtype.group, "run1/keras/layer/0/weight/1");
        let m = RecordPath::parse(&manifest_path("", "3"));
        assert!(is_manifest(&m.rtype));
        assert_eq!(m.rtype.resolution, Resolution::Text);
        let m = RecordPath::parse(&manifest_path("a/b", "3"));
        assert!(is_manifest(&m.rtype));
        let s = RecordPath::parse(&scalar_path("", "metrics", "loss", "7"));
        assert_eq!(s.rtype.behavior, Behavior::Continuous);
        assert_eq!(s.index, "7");
        assert_eq!(
            tensor_path("", "", "x", "1", DType::BF16),
            "frames/1/x.u8.uni"
        );
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(tensor_bytes(DType::F16, &[3, 4], 1 << 40), Ok(24));
        assert_eq!(tensor_bytes(DType::F64, &[], 1 << 40), Ok(8));
        assert!(tensor_bytes(DType::F32, &[1 << 40, 1 << 40], u64::MAX).is_err());
        assert!(tensor_bytes(DType::F32, &[1; 100], u64::MAX).is_err());
        assert!(tensor_bytes(DType::U8, &[1 << 20], 1000).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_group("group", "a/b").is_ok());
        assert!(check_group("group", "a/../b").is_err());
        assert!(check_group("group", "a//b").is_err());
        assert!(check_group("group", "a/frames").is_err());
        assert!(check_name("name", "w.x").is_err());
        assert!(check_index("index", "1\0").is_err());
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
    }
}
