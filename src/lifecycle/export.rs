//! `gtar-logd export`: one frame's tensors as a safetensors or npz file.
//!
//! Bit-exact: every tensor's bytes are copied as stored (little-endian),
//! with the dtype and shape GetFrame reports for it (`query::frame_tensors`:
//! the frame's manifest, else keras_gtar's `shape.u32.uni`, else 1-D of the
//! record's libgetar type), so f16, bf16, bool, i8, i16 and u16 keep theirs.
//! Text records of the frame (manifests, progress notes) are not tensors and
//! are left out.
//!
//! Names are the ones the user knows (see [`tensor_names`]): the dict keys
//! of the generic client's frames, Keras variable paths for `GTARLogger`'s
//! (from the archive's weights description), `layer/{i}/weight/{j}` for
//! keras_gtar's, and the record's group and name otherwise.
//!
//! npz has no bfloat16: like `np.savez` of an `ml_dtypes.bfloat16` array, it
//! is stored as 2-byte void (`'<V2'`); `arr.view(ml_dtypes.bfloat16)` gets it
//! back. The output is written beside OUT, fsynced and renamed over it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gtar::{Archive, Entry};
use serde_json::Value;

use super::Progress;
use crate::layout::DType;
use crate::query::{self, TensorRef};

/// The file formats `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face safetensors (`safetensors.safe_open`, `load_file`).
    Safetensors,
    /// NumPy `.npz` (`np.load`): a zip of one `.npy` per tensor.
    Npz,
}

/// What `export` wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub frame: String,
    /// (name, record path) of every tensor written.
    pub tensors: Vec<(String, String)>,
    pub bytes: u64,
}

/// One tensor to write.
struct Item {
    name: String,
    entry: Entry,
    dtype: DType,
    shape: Vec<u64>,
    size: u64,
}

/// safetensors dtype, npy `descr` and element size of a dtype.
fn dtype_info(d: DType) -> (safetensors::Dtype, &'static str, u64) {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => (S::F32, "<f4", 4),
        DType::F64 => (S::F64, "<f8", 8),
        DType::I32 => (S::I32, "<i4", 4),
        DType::I64 => (S::I64, "<i8", 8),
        DType::U8 => (S::U8, "|u1", 1),
        DType::U32 => (S::U32, "<u4", 4),
        DType::U64 => (S::U64, "<u8", 8),
        DType::F16 => (S::F16, "<f2", 2),
        DType::BF16 => (S::BF16, "<V2", 2),
        DType::I8 => (S::I8, "|i1", 1),
        DType::I16 => (S::I16, "<i2", 2),
        DType::U16 => (S::U16, "<u2", 2),
        DType::Bool => (S::BOOL, "|b1", 1),
    }
}

/// npy's `descr` of a dtype (bfloat16: `<V2`, see the module docs).
pub(crate) fn npy_descr(d: DType) -> &'static str {
    dtype_info(d).1
}

/// `{prefix}` and the numbers of a group ending in `keras/layer/{i}/weight/{j}`.
fn keras_weight(group: &str) -> Option<(String, u64, u64)> {
    let c: Vec<&str> = group.split('/').collect();
    let n = c.len();
    if n >= 5 && c[n - 5] == "keras" && c[n - 4] == "layer" && c[n - 2] == "weight" {
        return Some((
            c[..n - 5].join("/"),
            c[n - 3].parse().ok()?,
            c[n - 1].parse().ok()?,
        ));
    }
    None
}

/// `{prefix}` and the number of a group ending in `gtar_logd/optimizer/{k}`.
fn optimizer_var(group: &str) -> Option<(String, u64)> {
    let c: Vec<&str> = group.split('/').collect();
    let n = c.len();
    if n >= 3 && c[n - 3] == "gtar_logd" && c[n - 2] == "optimizer" {
        return Some((c[..n - 3].join("/"), c[n - 1].parse().ok()?));
    }
    None
}

/// The dict key of a generic client's tensor group `{P/}tensors/{key}`
/// (`_names.py`: `key_to_group` / `group_to_key`).
fn dict_key(rel: &str) -> Option<String> {
    let rest = rel.strip_prefix("tensors/")?;
    if rest.is_empty() {
        return None;
    }
    if let Some(hex) = rest.strip_prefix('~').filter(|_| !rest.contains('/')) {
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        return String::from_utf8(bytes?).ok();
    }
    Some(rest.to_string())
}

/// Reads the JSON descriptions (`weights.json`, `optimizer.json`) of each
/// writer prefix once.
struct Descriptions<'a> {
    a: &'a Archive,
    cache: HashMap<String, Option<Value>>,
}

impl Descriptions<'_> {
    fn get(&mut self, path: String) -> Option<&Value> {
        let a = self.a;
        self.cache
            .entry(path)
            .or_insert_with_key(|p| {
                a.read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            })
            .as_ref()
    }
}

fn by_index(list: Option<&Value>, i: u64) -> Option<&Value> {
    list?
        .as_array()?
        .iter()
        .find(|v| v.get("index").and_then(Value::as_u64) == Some(i))
}

fn join(p: &str, rest: &str) -> String {
    if p.is_empty() {
        rest.to_string()
    } else {
        format!("{p}/{rest}")
    }
}

/// The names the user knows for the tensors `refs` of a frame read under
/// `group` (module docs). Names are unique: tensors whose names would clash
/// are named by their record paths instead.
pub fn tensor_names(a: &Archive, group: &str, refs: &[TensorRef]) -> Vec<String> {
    let mut docs = Descriptions {
        a,
        cache: HashMap::new(),
    };
    let mut names: Vec<String> = refs
        .iter()
        .map(|r| {
            let g = r.info.group.as_str();
            let n = r.info.name.as_str();
            if n == "weight" {
                if let Some((p, i, j)) = keras_weight(g) {
                    let w = docs.get(join(&p, "gtar_logd/keras/weights.json"));
                    let layer = by_index(w.and_then(|w| w.get("layers")), i);
                    let weight = by_index(layer.and_then(|l| l.get("weights")), j);
                    if let Some(path) = weight.and_then(|w| w.get("path")).and_then(Value::as_str) {
                        return path.to_string();
                    }
                    return format!("layer/{i}/weight/{j}");
                }
            }
            if n == "value" {
                if let Some((p, k)) = optimizer_var(g) {
                    let o = docs.get(join(&p, "gtar_logd/keras/optimizer.json"));
                    let var = by_index(o.and_then(|o| o.get("variables")), k);
                    return match var.and_then(|v| v.get("path")).and_then(Value::as_str) {
                        Some(path) => format!("optimizer/{path}"),
                        None => format!("optimizer/{k}"),
                    };
                }
            }
            let rel = if group.is_empty() {
                g
            } else if g == group {
                ""
            } else {
                g.strip_prefix(group)
                    .and_then(|r| r.strip_prefix('/'))
                    .unwrap_or(g)
            };
            if n == "value" {
                // The generic client's dict keys, under any writer prefix.
                let mut at = Some(rel);
                while let Some(r) = at {
                    if let Some(k) = dict_key(r) {
                        return k;
                    }
                    at = r.split_once('/').map(|(_, rest)| rest);
                }
            }
            join(rel, n)
        })
        .collect();
    let mut count: HashMap<String, usize> = HashMap::new();
    for n in &names {
        *count.entry(n.clone()).or_default() += 1;
    }
    for (n, r) in names.iter_mut().zip(refs) {
        if count[n.as_str()] > 1 || n.is_empty() || n == "__metadata__" {
            *n = r.info.path.clone();
        }
    }
    names
}

/// The npy header (format 1.0, or 2.0 for a header over 64 KiB) of an array.
/// Hand-written: it is one formatted line (numpy's `format.py` documents
/// it), while the npy crates want typed arrays and know no bfloat16.
pub(crate) fn npy_header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic + version + length field + dict + padding + '\n' is a multiple
    // of 64, so the data is aligned (as numpy writes it).
    let v1 = dict.len() + 1 + 10 <= u16::MAX as usize;
    let pre = if v1 { 10 } else { 12 };
    let total = (pre + dict.len() + 1).div_ceil(64) * 64;
    dict.extend(std::iter::repeat_n(' ', total - pre - dict.len() - 1));
    dict.push('\n');
    let mut h = b"\x93NUMPY".to_vec();
    if v1 {
        h.extend_from_slice(&[1, 0]);
        h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        h.extend_from_slice(&[2, 0]);
        h.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    h.extend_from_slice(dict.as_bytes());
    h
}

/// The process's umask, read without changing it (`umask(2)` can only set
/// it, and setting it even briefly races other threads' file creation).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A temporary output file beside OUT, removed unless put in place.
struct Output {
    tmp: PathBuf,
    done: bool,
}

impl Output {
    fn new(out: &Path) -> Output {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        Output {
            tmp: out.with_file_name(format!(".{name}.export-tmp-{}", std::process::id())),
            done: false,
        }
    }

    /// Fsync, give the file the mode any new file of the user gets (0666
    /// less the umask, as Python's `Trajectory.export` and `cp` do; the
    /// safetensors writer made it 0600), rename over OUT, fsync the directory.
    fn commit(mut self, out: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let f = File::open(&self.tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()))?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, out)?;
        self.done = true;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A tensor whose bytes are read from the archive only when the safetensors
/// writer asks for them (one tensor in memory at a time). `View::data` cannot
/// fail, so a read error is kept and the export fails after the write.
struct Lazy<'a> {
    a: &'a Archive,
    item: &'a Item,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    failed: &'a RefCell<Option<anyhow::Error>>,
    bar: &'a Progress,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.a.read_entry(&self.item.entry) {
            Ok(b) if b.len() as u64 == self.item.size => {
                self.bar.inc(self.item.size);
                Cow::Owned(b)
            }
            res => {
                let e = match res {
                    Ok(b) => anyhow::anyhow!("{} bytes, expected {}", b.len(), self.item.size),
                    Err(e) => e.into(),
                };
                self.failed.borrow_mut().get_or_insert(e.context(format!(
                    "reading {} ({})",
                    self.item.name,
                    self.item.entry.name()
                )));
                Cow::Owned(vec![0; self.item.size as usize])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.item.size as usize
    }
}

fn write_safetensors(
    a: &Archive,
    items: &[Item],
    frame: &str,
    tmp: &Path,
    bar: &Progress,
) -> Result<()> {
    let failed = RefCell::new(None);
    let mut views = Vec::with_capacity(items.len());
    for it in items {
        let (dtype, _, _) = dtype_info(it.dtype);
        let shape = it
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()?;
        views.push((
            it.name.clone(),
            Lazy {
                a,
                item: it,
                dtype,
                shape,
                failed: &failed,
                bar,
            },
        ));
    }
    let meta = HashMap::from([
        ("format".to_string(), "gtar-logd-export/1".to_string()),
        ("frame".to_string(), frame.to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), tmp)
        .map_err(|e| anyhow::anyhow!("writing safetensors: {e}"))?;
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    Ok(())
}

fn write_npz(a: &Archive, items: &[Item], tmp: &Path, bar: &Progress) -> Result<()> {
    use zip::write::SimpleFileOptions;
    let file = File::create(tmp)?;
    let mut z = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
    let mut buf = vec![0u8; 1 << 20];
    for it in items {
        let (_, descr, _) = dtype_info(it.dtype);
        let header = npy_header(descr, &it.shape);
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(it.size + header.len() as u64 >= u32::MAX as u64);
        z.start_file(format!("{}.npy", it.name), opts)?;
        z.write_all(&header)?;
        let mut r = a.entry_reader(&it.entry)?;
        let mut n = 0u64;
        loop {
            let k = r
                .read(&mut buf)
                .with_context(|| format!("reading {} ({})", it.name, it.entry.name()))?;
            if k == 0 {
                break;
            }
            z.write_all(&buf[..k])?;
            n += k as u64;
            bar.inc(k as u64);
        }
        if n != it.size {
            bail!("{}: {n} bytes read, expected {}", it.entry.name(), it.size);
        }
    }
    z.finish()?.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// Export frame `frame` (default: the last) of the records under `group` of
/// the archive file `path` to `out` in `format`.
pub fn export(
    path: &Path,
    group: Option<&str>,
    frame: Option<&str>,
    format: ExportFormat,
    out: &Path,
) -> Result<Exported> {
    let a = crate::cli::open_file(path)?;
    let group = group.unwrap_or("");
    let what = |e: query::QueryError| anyhow::anyhow!("{}: {e}", path.display());
    let frames = query::frames(&a, group).map_err(what)?;
    let frame = match frame {
        Some(f) if frames.iter().any(|x| x == f) => f.to_string(),
        Some(f) => bail!(
            "{}: no frame {f:?}{} (there are {} frames{}; `gtar-logd frames` lists them)",
            path.display(),
            if group.is_empty() {
                String::new()
            } else {
                format!(" in group {group:?}")
            },
            frames.len(),
            match (frames.first(), frames.last()) {
                (Some(a), Some(b)) => format!(", {a:?} to {b:?}"),
                _ => String::new(),
            }
        ),
        None => match frames.last() {
            Some(f) => f.clone(),
            None => bail!("{}: no frames to export", path.display()),
        },
    };
    let refs: Vec<TensorRef> = query::frame_tensors(&a, group, &frame, &[])
        .map_err(what)?
        .into_iter()
        .filter(|r| {
            gtar::RecordPath::parse(&r.info.path).rtype.resolution != gtar::Resolution::Text
        })
        .collect();
    if refs.is_empty() {
        bail!(
            "{}: frame {frame:?} has no tensors (only text records)",
            path.display()
        );
    }
    let names = tensor_names(&a, group, &refs);
    let mut items = Vec::with_capacity(refs.len());
    for (r, name) in refs.into_iter().zip(names) {
        let dtype = r.info.dtype;
        let (_, _, item) = dtype_info(dtype);
        let elements = r.info.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if elements.and_then(|n| n.checked_mul(item)) != Some(r.info.size_bytes) {
            bail!(
                "{}: {}: {} bytes do not make a {} tensor of shape {:?}",
                path.display(),
                r.info.path,
                r.info.size_bytes,
                dtype.name(),
                r.info.shape
            );
        }
        items.push(Item {
            name,
            dtype,
            shape: r.info.shape.clone(),
            size: r.info.size_bytes,
            entry: r.entry,
        });
    }
    let bytes: u64 = items.iter().map(|i| i.size).sum();
    let output = Output::new(out);
    let bar = Progress::bytes(bytes, "exporting");
    match format {
        ExportFormat::Safetensors => write_safetensors(&a, &items, &frame, &output.tmp, &bar),
        ExportFormat::Npz => write_npz(&a, &items, &output.tmp, &bar),
    }
    .with_context(|| format!("exporting frame {frame:?} of {}", path.display()))?;
    bar.finish();
    output
        .commit(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(Exported {
        frame,
        tensors: items
            .into_iter()
            .map(|i| (i.name, i.entry.name().to_string()))
            .collect(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_are_what_numpy_writes() {
        // np.save of a float32 array of shape (3,) and of a scalar.
        // (Bytes from numpy 2.4: `np.save(f, np.zeros(3, "<f4"))`.)
        let mut want = b"\x93NUMPY\x01\x00v\x00".to_vec();
        want.extend_from_slice(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }");
        want.extend_from_slice(&[b' '; 60]);
        want.push(b'\n');
        assert_eq!(npy_header("<f4", &[3]), want);
        assert!(String::from_utf8_lossy(&npy_header("|b1", &[])).contains("'shape': (), }"));
        assert!(String::from_utf8_lossy(&npy_header("<V2", &[2, 5])).contains("(2, 5)"));
    }

    #[test]
    fn group_names_decode_as_the_python_client_encodes_them() {
        assert_eq!(dict_key("tensors/layer1.weight").unwrap(), "layer1.weight");
        assert_eq!(dict_key("tensors/a/b").unwrap(), "a/b");
        // key_to_group("frames/x") == "~" + hex
        assert_eq!(
            dict_key(&format!("tensors/~{}", "6672616d65732f78")).unwrap(),
            "frames/x"
        );
        assert_eq!(dict_key("other/x"), None);
        assert_eq!(
            keras_weight("run/keras/layer/3/weight/1"),
            Some(("run".into(), 3, 1))
        );
        assert_eq!(
            keras_weight("keras/layer/0/weight/0"),
            Some(("".into(), 0, 0))
        );
        assert_eq!(optimizer_var("gtar_logd/optimizer/7"), Some(("".into(), 7)));
        assert_eq!(keras_weight("keras/layer/x/weight/0"), None);
    }
}
