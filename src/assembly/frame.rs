//! One rank's part of a frame ([`RankFrame`]), the checks that the ranks'
//! parts fit together, and the plan that turns them into one ordinary frame
//! for the writer.
//!
//! Invariants:
//! * A [`RankFrame`] only ever holds entries whose byte count matches
//!   dtype × slice shape, and slices inside their tensor ([`RankFrame::tensor`],
//!   [`RankFrame::piece`]).
//! * The plan writes each tensor once, at its usual record path, with the
//!   global tensor's bytes in row-major order: a frame from N ranks is, in the
//!   archive, exactly the frame one process would have written. Bytes pass
//!   to the writer without a copy where a slice's run is long (a row-sharded
//!   tensor is a run per rank); short runs (a column-sharded matrix: a run per
//!   row and rank) are copied together into buffers of at most
//!   [`GATHER_MAX`] bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::bytes::Bytes;

use super::job::list;
use super::slices::Slice;
use crate::error::BadField;
use crate::layout::{self, DType, Manifest, ManifestTensor};
use crate::limits::COMPRESS_MAX;
use crate::shm::Region;
use crate::writer::Part;
use gtar::Precompressed;

/// Runs at least this long go to the writer as they are.
const ZERO_COPY_MIN: u64 = 64 << 10;
/// Shorter runs are copied together into buffers of at most this many bytes.
const GATHER_MAX: usize = 1 << 20;

/// Where a piece of an entry's bytes is.
#[derive(Debug, Clone)]
pub enum Seg {
    Bytes(Bytes),
    /// `len` bytes at `offset` of a client's shared memory region.
    Shm {
        region: Arc<Region>,
        offset: u64,
        len: u64,
    },
}

impl Seg {
    fn len(&self) -> u64 {
        match self {
            Seg::Bytes(b) => b.len() as u64,
            Seg::Shm { len, .. } => *len,
        }
    }
}

#[derive(Debug, Clone)]
pub enum What {
    /// A slice (perhaps all) of a tensor of `shape`.
    Tensor {
        dtype: DType,
        shape: Vec<u64>,
        slice: Slice,
    },
    /// A record's whole bytes (a constant record or a scalar).
    Record,
}

/// One entry of a rank's part: its bytes in pieces, in order.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub what: What,
    pub size: u64,
    segs: Vec<Seg>,
}

impl Entry {
    /// The bytes `[at, at + n)` of the entry, as pieces (no copy).
    fn range(&self, mut at: u64, mut n: u64, out: &mut Vec<Seg>) {
        for s in &self.segs {
            let l = s.len();
            if at >= l {
                at -= l;
                continue;
            }
            let take = n.min(l - at);
            out.push(match s {
                Seg::Bytes(b) => Seg::Bytes(b.slice(at as usize..(at + take) as usize)),
                Seg::Shm { region, offset, .. } => Seg::Shm {
                    region: region.clone(),
                    offset: offset + at,
                    len: take,
                },
            });
            n -= take;
            at = 0;
            if n == 0 {
                return;
            }
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size as usize);
        for s in &self.segs {
            append(&mut v, s);
        }
        v
    }
}

fn append(v: &mut Vec<u8>, s: &Seg) {
    match s {
        Seg::Bytes(b) => v.extend_from_slice(b),
        Seg::Shm {
            region,
            offset,
            len,
        } => region.with_bytes(*offset, *len, |b| v.extend_from_slice(b)),
    }
}

/// What one rank sent between `begin` and `commit`.
#[derive(Debug, Clone)]
pub struct RankFrame {
    pub index: String,
    entries: Vec<Entry>,
    /// Bytes of the entry being received still to come.
    left: u64,
}

impl RankFrame {
    pub fn new(index: String) -> RankFrame {
        RankFrame {
            index,
            entries: Vec::new(),
            left: 0,
        }
    }

    /// Bytes of every entry (as the writer will store them, before any
    /// compression).
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// An entry still missing bytes: `(path, bytes missing)`.
    pub fn incomplete(&self) -> Option<(&str, u64)> {
        (self.left > 0).then(|| (self.entries.last().unwrap().path.as_str(), self.left))
    }

    /// Start a tensor (or, with `slice`, a slice of one) at `path`, whose
    /// `bytes` follow in pieces. `field` names the header in errors.
    pub fn tensor(
        &mut self,
        path: String,
        dtype: DType,
        shape: Vec<u64>,
        slice: Option<Slice>,
        max_bytes: u64,
    ) -> Result<(), BadField> {
        self.no_open("tensor")?;
        layout::tensor_bytes(dtype, &shape, max_bytes).map_err(|e| bad("tensor.shape", e))?;
        let slice = slice.unwrap_or_else(|| Slice::whole(&shape));
        slice
            .check_in(&shape)
            .map_err(|e| bad("tensor.slice", format!("{path}: {e}")))?;
        let size = slice.elems() * dtype.storage().0 as u64;
        for e in &self.entries {
            if let What::Tensor {
                dtype: d,
                shape: s,
                slice: other,
            } = &e.what
            {
                if e.path != path {
                    continue;
                }
                if *d != dtype || *s != shape {
                    return Err(bad(
                        "tensor.shape",
                        format!("{path}: sent twice with different dtypes or global shapes"),
                    ));
                }
                if other.overlaps(&slice) {
                    return Err(bad(
                        "tensor.slice",
                        format!("{path}: slice {slice} overlaps slice {other} of this rank"),
                    ));
                }
            }
        }
        self.entries.push(Entry {
            path,
            what: What::Tensor {
                dtype,
                shape,
                slice,
            },
            size,
            segs: Vec::new(),
        });
        self.left = size;
        Ok(())
    }

    /// A whole record (or scalar) at `path`.
    pub fn record(&mut self, path: String, data: Vec<u8>) -> Result<(), BadField> {
        self.start_record(path, data.len() as u64)?;
        self.piece("record.data", Seg::Bytes(Bytes::from(data)))
    }

    /// A record of `size` bytes whose bytes follow in pieces.
    pub fn start_record(&mut self, path: String, size: u64) -> Result<(), BadField> {
        self.no_open("record")?;
        if self.entries.iter().any(|e| e.path == path) {
            return Err(bad(
                "record.path",
                format!("{path} is already in this frame"),
            ));
        }
        self.entries.push(Entry {
            path,
            what: What::Record,
            size,
            segs: Vec::new(),
        });
        self.left = size;
        Ok(())
    }

    /// The next bytes of the open entry.
    pub fn piece(&mut self, field: &str, seg: Seg) -> Result<(), BadField> {
        let n = seg.len();
        let Some(e) = self.entries.last_mut().filter(|_| self.left > 0 || n == 0) else {
            return Err(bad(field, "no tensor is open; send `tensor` first"));
        };
        if n > self.left {
            return Err(bad(
                field,
                format!(
                    "tensor {} got {} bytes more than its dtype × shape",
                    e.path,
                    n - self.left
                ),
            ));
        }
        self.left -= n;
        if n > 0 {
            e.segs.push(seg);
        }
        Ok(())
    }

    fn no_open(&self, next: &str) -> Result<(), BadField> {
        match self.incomplete() {
            Some((p, n)) => Err(bad(next, format!("tensor {p} is missing {n} bytes"))),
            None => Ok(()),
        }
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> BadField {
    BadField::new(field, format!("{field}: {why}"))
}

/// Check `rank`'s part against the parts other ranks committed: the same
/// dtype and global shape per tensor, no two slices sharing an element, a
/// record sent twice byte-identical. The error names the tensor and ranks.
pub fn check_against<'a>(
    rank: u32,
    mine: &RankFrame,
    others: impl Iterator<Item = (u32, &'a RankFrame)>,
) -> Result<(), String> {
    for (r, theirs) in others {
        for a in &mine.entries {
            for b in theirs.entries.iter().filter(|b| b.path == a.path) {
                match (&a.what, &b.what) {
                    (
                        What::Tensor {
                            dtype: da,
                            shape: sa,
                            slice: xa,
                        },
                        What::Tensor {
                            dtype: db,
                            shape: sb,
                            slice: xb,
                        },
                    ) => {
                        if da != db || sa != sb {
                            return Err(format!(
                                "tensor {}: rank {rank} sent it as {} {:?}, rank {r} as {} {:?}; \
                                 every rank must give the same dtype and global shape",
                                a.path,
                                da.name(),
                                sa,
                                db.name(),
                                sb
                            ));
                        }
                        if xa.overlaps(xb) {
                            return Err(format!(
                                "tensor {}: rank {rank}'s slice {xa} overlaps rank {r}'s slice \
                                 {xb}; every element must come from exactly one rank (send a \
                                 replicated tensor from one rank only)",
                                a.path
                            ));
                        }
                    }
                    (What::Record, What::Record) => {
                        if a.size != b.size || a.bytes() != b.bytes() {
                            return Err(format!(
                                "record {}: ranks {r} and {rank} sent different bytes",
                                a.path
                            ));
                        }
                    }
                    _ => {
                        return Err(format!(
                            "{}: a tensor for one rank, a record for another",
                            a.path
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// With every rank's part in (and pairwise checked): every element of
/// every tensor is covered.
pub fn check_cover<'a>(parts: impl Iterator<Item = (u32, &'a RankFrame)>) -> Result<(), String> {
    // path → (global elements, covered elements, ranks that sent slices)
    let mut seen: BTreeMap<&str, (u64, u64, Vec<u32>)> = BTreeMap::new();
    for (r, f) in parts {
        for e in &f.entries {
            if let What::Tensor { shape, slice, .. } = &e.what {
                let s =
                    seen.entry(e.path.as_str())
                        .or_insert((shape.iter().product(), 0, Vec::new()));
                s.1 += slice.elems();
                if !s.2.contains(&r) {
                    s.2.push(r);
                }
            }
        }
    }
    for (path, (total, got, ranks)) in seen {
        if got != total {
            return Err(format!(
                "tensor {path}: the slices sent by rank{} {} cover {got} of its {total} elements, \
                 leaving a hole; every element must come from exactly one rank",
                if ranks.len() == 1 { "" } else { "s" },
                list(&ranks)
            ));
        }
    }
    Ok(())
}

/// The parts of the frame the ranks' checked parts make: each tensor once,
/// global row-major, each record once, then the manifest and the commit.
/// Blocking (it may copy short runs and read shared memory).
/// `prefix`: the streams' group, under which the manifest goes.
pub fn plan(prefix: &str, index: &str, parts: Vec<(u32, RankFrame)>, level: u32) -> Vec<Part> {
    // First appearance order, ranks ascending: deterministic.
    let mut order: Vec<String> = Vec::new();
    let mut by_path: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for (_, f) in parts {
        for e in f.entries {
            let v = by_path.entry(e.path.clone()).or_default();
            if v.is_empty() {
                order.push(e.path.clone());
            }
            v.push(e);
        }
    }
    let mut out = Vec::new();
    let mut manifest = Manifest::new(index);
    for path in order {
        let mut pieces = by_path.remove(&path).expect("listed");
        match pieces[0].what.clone() {
            What::Record => {
                // Checked byte-identical: the first is the record.
                let e = pieces.swap_remove(0);
                out.push(Part::Start {
                    path: e.path.clone(),
                    size: e.size,
                });
                push_segs(&mut out, e.segs);
            }
            What::Tensor { dtype, shape, .. } => {
                let item = dtype.storage().0 as u64;
                let size = shape.iter().product::<u64>() * item;
                manifest.tensors.push(ManifestTensor {
                    path: path.clone(),
                    dtype: dtype.name().into(),
                    shape: shape.clone(),
                });
                tensor_parts(&mut out, path, &shape, item, size, &pieces, level);
            }
        }
    }
    if !index.is_empty() {
        manifest.written_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64);
        out.push(Part::Whole {
            path: layout::manifest_path(prefix, index),
            data: serde_json::to_vec(&manifest).expect("manifest serializes"),
        });
    }
    out.push(Part::Commit);
    out
}

fn push_segs(out: &mut Vec<Part>, segs: Vec<Seg>) {
    for s in segs {
        out.push(match s {
            Seg::Bytes(b) => Part::Data(b),
            Seg::Shm {
                region,
                offset,
                len,
            } => Part::Shm {
                region,
                offset,
                len,
            },
        });
    }
}

/// One global tensor from its slices: its runs in global order.
fn tensor_parts(
    out: &mut Vec<Part>,
    path: String,
    shape: &[u64],
    item: u64,
    size: u64,
    pieces: &[Entry],
    level: u32,
) {
    // (global byte, piece, local byte, bytes), sorted by global byte.
    let mut runs: Vec<(u64, usize, u64, u64)> = Vec::new();
    for (k, e) in pieces.iter().enumerate() {
        if let What::Tensor { slice, .. } = &e.what {
            for r in slice.runs(shape) {
                runs.push((r.global * item, k, r.local * item, r.len * item));
            }
        }
    }
    runs.sort_unstable_by_key(|r| r.0);
    let mut segs = Vec::new();
    for &(_, k, at, n) in &runs {
        pieces[k].range(at, n, &mut segs);
    }
    if level > 0 && size <= COMPRESS_MAX {
        let mut v = Vec::with_capacity(size as usize);
        for s in &segs {
            append(&mut v, s);
        }
        out.push(Part::Compressed {
            path,
            data: Precompressed::deflate(&v, level),
        });
        return;
    }
    out.push(Part::Start { path, size });
    let mut buf: Vec<u8> = Vec::new();
    let flush = |buf: &mut Vec<u8>, out: &mut Vec<Part>| {
        if !buf.is_empty() {
            out.push(Part::Data(Bytes::from(std::mem::take(buf))));
        }
    };
    for s in segs {
        if s.len() >= ZERO_COPY_MIN {
            flush(&mut buf, out);
            push_segs(out, vec![s]);
        } else {
            if buf.is_empty() {
                buf.reserve(GATHER_MAX);
            }
            append(&mut buf, &s);
            if buf.len() >= GATHER_MAX {
                flush(&mut buf, out);
            }
        }
    }
    flush(&mut buf, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of every entry in planned parts: path → bytes.
    pub(crate) fn written(parts: &[Part]) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut cur: Option<String> = None;
        for p in parts {
            match p {
                Part::Start { path, .. } => {
                    out.insert(path.clone(), Vec::new());
                    cur = Some(path.clone());
                }
                Part::Data(d) => out
                    .get_mut(cur.as_ref().unwrap())
                    .unwrap()
                    .extend_from_slice(d),
                Part::Whole { path, data } => {
                    out.insert(path.clone(), data.clone());
                }
                Part::Commit => {}
                other => panic!("unexpected part {other:?}"),
            }
        }
        out
    }

    fn matrix(rows: u64, cols: u64) -> Vec<u8> {
        (0..rows * cols)
            .flat_map(|i| (i as u32).to_le_bytes())
            .collect()
    }

    /// Rank `r`'s part: the given boxes of a u32 matrix, sent in chunks of
    /// `chunk` bytes.
    fn part(r: u32, boxes: &[Slice], rows: u64, cols: u64, chunk: usize) -> RankFrame {
        let m = matrix(rows, cols);
        let mut f = RankFrame::new("7".into());
        for b in boxes {
            f.tensor(
                "w/frames/7/weight.u32.uni".into(),
                DType::U32,
                vec![rows, cols],
                Some(b.clone()),
                u64::MAX,
            )
            .unwrap();
            let mut bytes = Vec::new();
            for run in b.runs(&[rows, cols]) {
                let s = (run.global * 4) as usize;
                bytes.extend_from_slice(&m[s..s + run.len as usize * 4]);
            }
            for c in bytes.chunks(chunk) {
                f.piece("chunk.data", Seg::Bytes(Bytes::copy_from_slice(c)))
                    .unwrap();
            }
        }
        assert!(f.incomplete().is_none());
        let _ = r;
        f
    }

    fn cols(n: u32, rows: u64, cols: u64) -> Vec<(u32, RankFrame)> {
        let w = cols / n as u64;
        (0..n)
            .map(|r| {
                let b = Slice {
                    offsets: vec![0, r as u64 * w],
                    shape: vec![rows, w],
                };
                (r, part(r, &[b], rows, cols, 7))
            })
            .collect()
    }

    #[test]
    fn column_and_row_shards_plan_to_the_global_tensor() {
        let (rows, c) = (16, 8);
        let parts = cols(4, rows, c);
        check_cover(parts.iter().map(|(r, f)| (*r, f))).unwrap();
        let planned = plan("w", "7", parts, 0);
        let got = written(&planned);
        assert_eq!(got["w/frames/7/weight.u32.uni"], matrix(rows, c));
        let m: Manifest =
            serde_json::from_slice(&got["w/gtar_logd/frames/7/manifest.json"]).unwrap();
        assert_eq!(m.tensors[0].shape, vec![16, 8]);
        // Rows: one zero-copy piece per rank, in rank order (reversed here).
        let parts: Vec<(u32, RankFrame)> = (0..4u32)
            .rev()
            .map(|r| {
                let b = Slice {
                    offsets: vec![r as u64 * 4096, 0],
                    shape: vec![4096, 8],
                };
                (r, part(r, &[b], 16384, 8, 1 << 20))
            })
            .collect();
        let planned = plan("w", "7", parts, 0);
        let data = planned
            .iter()
            .filter(|p| matches!(p, Part::Data(_)))
            .count();
        assert_eq!(data, 4, "a row shard is one run: passed on without a copy");
        assert_eq!(
            written(&planned)["w/frames/7/weight.u32.uni"],
            matrix(16384, 8)
        );
    }

    #[test]
    fn overlaps_holes_and_disagreements_name_the_tensor_and_ranks() {
        let half = |o: u64| Slice {
            offsets: vec![0, o],
            shape: vec![4, 4],
        };
        let a = part(0, &[half(0)], 4, 8, 5);
        let b = part(1, &[half(2)], 4, 8, 5);
        let e = check_against(1, &b, [(0, &a)].into_iter()).unwrap_err();
        assert!(
            e.contains("rank 1's slice [0:4, 2:6] overlaps rank 0's slice [0:4, 0:4]"),
            "{e}"
        );
        assert!(e.contains("weight.u32.uni"), "{e}");
        let hole = [(0u32, &a)];
        let e = check_cover(hole.into_iter()).unwrap_err();
        assert!(e.contains("rank 0 cover 16 of its 32 elements"), "{e}");
        let mut c = RankFrame::new("7".into());
        c.tensor(
            "w/frames/7/weight.u32.uni".into(),
            DType::U32,
            vec![4, 9],
            Some(Slice {
                offsets: vec![0, 4],
                shape: vec![4, 4],
            }),
            u64::MAX,
        )
        .unwrap();
        let e = check_against(2, &c, [(0, &a)].into_iter()).unwrap_err();
        assert!(
            e.contains("rank 2 sent it as uint32 [4, 9], rank 0 as uint32 [4, 8]"),
            "{e}"
        );
        // Inside one rank: an overlap, a slice outside, too many bytes.
        let mut d = part(0, &[half(0)], 4, 8, 64);
        let e = d
            .tensor(
                "w/frames/7/weight.u32.uni".into(),
                DType::U32,
                vec![4, 8],
                Some(half(3)),
                u64::MAX,
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("overlaps slice [0:4, 0:4] of this rank"),
            "{e}"
        );
        let e = d
            .tensor(
                "x/frames/7/b.u32.uni".into(),
                DType::U32,
                vec![4],
                Some(Slice {
                    offsets: vec![2],
                    shape: vec![3],
                }),
                u64::MAX,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("dimension 0: 2:5 is outside 0:4"),
            "{e}"
        );
        d.tensor(
            "y/frames/7/b.u8.uni".into(),
            DType::U8,
            vec![2],
            None,
            u64::MAX,
        )
        .unwrap();
        let e = d
            .piece("chunk.data", Seg::Bytes(Bytes::from_static(b"abc")))
            .unwrap_err();
        assert!(e.to_string().contains("1 bytes more"), "{e}");
    }

    #[test]
    fn records_sent_by_several_ranks_must_agree_and_are_written_once() {
        let mut a = RankFrame::new("1".into());
        a.record("g/vars/loss.f64.uni/1".into(), vec![1; 8])
            .unwrap();
        let mut b = a.clone();
        check_against(1, &b, [(0, &a)].into_iter()).unwrap();
        let planned = plan("g", "1", vec![(0, a.clone()), (1, b.clone())], 0);
        assert_eq!(written(&planned)["g/vars/loss.f64.uni/1"], vec![1; 8]);
        b = RankFrame::new("1".into());
        b.record("g/vars/loss.f64.uni/1".into(), vec![2; 8])
            .unwrap();
        let e = check_against(1, &b, [(0, &a)].into_iter()).unwrap_err();
        assert!(e.contains("ranks 0 and 1 sent different bytes"), "{e}");
    }
}
