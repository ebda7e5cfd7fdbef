//! Reading a box of a stored tensor (GetFrame's `slice`) without reading
//! the rest: which byte ranges of the tensor the box needs, merged into few
//! positioned reads, and its bytes in the box's own row-major order.
//!
//! Protobuf-free: `service/frames.rs` calls [`check`] for every tensor of
//! the answer before anything is sent, then [`read_box`] per tensor.
//!
//! Invariants:
//! * The box lies inside the tensor (checked by [`check`], which names the
//!   tensor, its shape and the box); its bytes come out in the box's
//!   row-major order, exactly what numpy's `a[o0:o0+n0, …]` holds.
//! * A stored entry is read in place: only the ranges the box needs (short
//!   gaps between them are read through rather than paying a read each), so
//!   a quarter of a tensor costs about a quarter of its reads. Those reads
//!   cannot check the entry's CRC-32 (it covers the whole entry). A deflated
//!   entry has no random access: it is decompressed from its start, the
//!   box's bytes picked out on the way, and read to its end so the CRC-32 is
//!   checked as for any whole read.

use std::io::Read;

use crate::assembly::Slice;
use crate::query::{QueryError, TensorMeta};

/// Gaps between needed ranges up to this many bytes are read through: one
/// read of a few KiB costs less than two system calls.
const GAP_READ_THROUGH: u64 = 4 << 10;
/// One positioned read covers at most this many bytes.
const READ_MAX: u64 = 1 << 20;

/// Check that `s` is a box of `t`: as many dimensions, inside its shape.
/// The error names the tensor, its shape and the box.
pub fn check(t: &TensorMeta, s: &Slice) -> Result<(), QueryError> {
    s.check_in(&t.shape).map_err(|why| QueryError::Bad {
        field: "slice",
        why: format!(
            "offsets {:?} shape {:?} ({s}) is not a box of tensor {} of shape {:?}: {why}",
            s.offsets, s.shape, t.path, t.shape
        ),
    })?;
    let want = t
        .shape
        .iter()
        .try_fold(t.dtype.storage().0 as u64, |n, &d| n.checked_mul(d));
    if want != Some(t.size_bytes) {
        return Err(QueryError::Format(gtar::Error::Corrupt(format!(
            "{}: {} bytes stored, not a {} tensor of shape {:?}",
            t.path,
            t.size_bytes,
            t.dtype.name(),
            t.shape
        ))));
    }
    Ok(())
}

/// Bytes of the box `s` of `t`.
pub fn box_bytes(t: &TensorMeta, s: &Slice) -> u64 {
    s.elems() * t.dtype.storage().0 as u64
}

/// One positioned read of the tensor's bytes and the pieces of it the box
/// needs, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read1 {
    /// Byte offset in the tensor (row-major, from its first byte).
    pub at: u64,
    pub len: u64,
    /// (offset within this read, length) of each piece the box needs.
    pub pieces: Vec<(u64, u64)>,
}

/// The reads that fetch box `s` of a tensor of `global` shape and
/// `itemsize`-byte elements, in increasing offset (which is also the box's
/// row-major order): the box's contiguous runs (see [`Slice::runs`]), each
/// split at `max` bytes, merged while the gap between them is at most `gap`
/// and the read stays within `max`.
pub fn plan_reads(s: &Slice, global: &[u64], itemsize: u64, gap: u64, max: u64) -> Vec<Read1> {
    let mut out: Vec<Read1> = Vec::new();
    for run in s.runs(global) {
        let mut start = run.global * itemsize;
        let end = start + run.len * itemsize;
        while start < end {
            let len = (end - start).min(max);
            match out.last_mut() {
                Some(r)
                    if start >= r.at + r.len
                        && start - (r.at + r.len) <= gap
                        && start + len - r.at <= max =>
                {
                    r.pieces.push((start - r.at, len));
                    r.len = start + len - r.at;
                }
                _ => out.push(Read1 {
                    at: start,
                    len,
                    pieces: vec![(0, len)],
                }),
            }
            start += len;
        }
    }
    out
}

/// Read box `s` of tensor `t` (stored as `e` in `a`; [`check`]ed first) and
/// hand its bytes, in the box's row-major order, to `emit` in pieces of at
/// most `chunk` bytes. `emit` returning `false` stops the read (the client
/// went away): then `Ok(false)`.
pub fn read_box(
    a: &gtar::Archive,
    e: &gtar::Entry,
    t: &TensorMeta,
    s: &Slice,
    chunk: usize,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<bool, QueryError> {
    let reads = plan_reads(
        s,
        &t.shape,
        t.dtype.storage().0 as u64,
        GAP_READ_THROUGH,
        READ_MAX,
    );
    let mut out = Vec::with_capacity(chunk.min(box_bytes(t, s) as usize));
    let mut buf = Vec::new();
    // A deflated entry: one decompressing reader, advanced from read to read.
    let mut inflate = match e.cd.method {
        0 => None,
        _ => Some((a.entry_reader(e)?, 0u64)),
    };
    for r in reads {
        buf.resize(r.len as usize, 0);
        match &mut inflate {
            None => a.read_stored_at(e, r.at, &mut buf)?,
            Some((reader, pos)) => {
                skip(reader, r.at - *pos, &t.path)?;
                reader
                    .read_exact(&mut buf)
                    .map_err(|err| corrupt(&t.path, err))?;
                *pos = r.at + r.len;
            }
        }
        for (off, len) in r.pieces {
            let mut piece = &buf[off as usize..(off + len) as usize];
            while !piece.is_empty() {
                let n = piece.len().min(chunk - out.len());
                out.extend_from_slice(&piece[..n]);
                piece = &piece[n..];
                if out.len() == chunk
                    && !emit(std::mem::replace(&mut out, Vec::with_capacity(chunk)))
                {
                    return Ok(false);
                }
            }
        }
    }
    if let Some((mut reader, _)) = inflate {
        // To the end: the reader checks size and CRC-32 there.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|err| corrupt(&t.path, err))?;
    }
    Ok(out.is_empty() || emit(out))
}

fn skip(r: &mut impl Read, n: u64, path: &str) -> Result<(), QueryError> {
    let skipped =
        std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(|e| corrupt(path, e))?;
    if skipped != n {
        return Err(corrupt(path, "the entry ends before the tensor does"));
    }
    Ok(())
}

fn corrupt(path: &str, e: impl std::fmt::Display) -> QueryError {
    QueryError::Format(gtar::Error::Corrupt(format!("{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DType;
    use gtar::{ArchiveWriter, Compression, OpenMode};

    use crate::assembly::slices::tests::sl;

    /// The box's bytes picked element by element (numpy's slicing, by hand).
    fn naive(bytes: &[u8], global: &[u64], item: usize, s: &Slice) -> Vec<u8> {
        crate::assembly::slices::tests::naive(s, global)
            .into_iter()
            .flat_map(|g| &bytes[g as usize * item..(g as usize + 1) * item])
            .copied()
            .collect()
    }

    /// A small deterministic generator (no dependency for a test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn random_box(rng: &mut Lcg, global: &[u64]) -> Slice {
        let mut s = sl(&[], &[]);
        for &g in global {
            let o = rng.next(g + 1);
            let n = rng.next(g - o + 1);
            s.offsets.push(o);
            s.shape.push(n);
        }
        s
    }

    #[test]
    fn reads_cover_exactly_the_box_in_order_and_merge_short_gaps() {
        let mut rng = Lcg(7);
        for global in [vec![], vec![37], vec![5, 7, 9], vec![3, 1, 4, 6]] {
            for _ in 0..200 {
                let s = random_box(&mut rng, &global);
                for (gap, max) in [(0, 1 << 20), (64, 1 << 20), (4096, 24), (8, 8)] {
                    let reads = plan_reads(&s, &global, 4, gap, max);
                    let mut got = Vec::new();
                    let mut last_end = 0;
                    for r in &reads {
                        assert!(r.at >= last_end && r.len <= max, "{s} {r:?}");
                        last_end = r.at + r.len;
                        for &(o, n) in &r.pieces {
                            assert!(o + n <= r.len);
                            got.extend((r.at + o..r.at + o + n).step_by(4).map(|b| b / 4));
                        }
                    }
                    let want: Vec<u64> = s
                        .runs(&global)
                        .flat_map(|r| r.global..r.global + r.len)
                        .collect();
                    assert_eq!(got, want, "{s} gap {gap} max {max}");
                }
            }
        }
        // A column block of a row-major matrix: 8 runs of 16 bytes, 48-byte
        // gaps: one read with a gap of 64 allowed, 8 without.
        let cols = sl(&[0, 4], &[8, 4]);
        assert_eq!(plan_reads(&cols, &[8, 16], 4, 64, 1 << 20).len(), 1);
        assert_eq!(plan_reads(&cols, &[8, 16], 4, 0, 1 << 20).len(), 8);
    }

    #[test]
    fn boxes_read_back_as_numpy_slices_them_stored_and_deflated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        let shapes: Vec<Vec<u64>> = vec![vec![], vec![300], vec![6, 50, 7]];
        let mut tensors = Vec::new();
        let mut t = w.begin().unwrap();
        for (i, shape) in shapes.iter().enumerate() {
            let n: u64 = shape.iter().product();
            let bytes: Vec<u8> = (0..n * 8).map(|b| (b * 31 + i as u64) as u8).collect();
            for (c, comp) in [("s", Compression::Stored), ("d", Compression::Deflate(6))] {
                let name = format!("g/frames/0/t{i}{c}.f64.uni");
                t.add(&name, &bytes, comp).unwrap();
                tensors.push((name, shape.clone(), bytes.clone()));
            }
        }
        t.commit().unwrap();
        w.close().unwrap();
        let a = gtar::Archive::open(&path).unwrap();
        let mut rng = Lcg(11);
        for (name, shape, bytes) in &tensors {
            let e = a.index().get(name).cloned().unwrap();
            let meta = TensorMeta {
                path: name.clone(),
                group: "g".into(),
                name: "t".into(),
                dtype: DType::F64,
                shape: shape.clone(),
                size_bytes: bytes.len() as u64,
                crc32: 0,
            };
            for _ in 0..60 {
                let s = random_box(&mut rng, shape);
                check(&meta, &s).unwrap();
                let mut got = Vec::new();
                let mut sizes = Vec::new();
                assert!(read_box(&a, &e, &meta, &s, 40, |c| {
                    sizes.push(c.len());
                    got.extend(c);
                    true
                })
                .unwrap());
                assert_eq!(got, naive(bytes, shape, 8, &s), "{name} {s}");
                assert!(sizes.iter().all(|&n| n > 0 && n <= 40));
            }
            // A client that goes away stops the read.
            let whole = Slice::whole(shape);
            if whole.elems() > 5 {
                assert!(!read_box(&a, &e, &meta, &whole, 8, |_| false).unwrap());
            }
        }
    }

    #[test]
    fn a_box_outside_or_of_the_wrong_rank_names_tensor_shape_and_box() {
        let meta = TensorMeta {
            path: "g/frames/3/w.f32.uni".into(),
            group: "g".into(),
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![4, 8],
            size_bytes: 128,
            crc32: 0,
        };
        let e = check(&meta, &sl(&[0, 6], &[4, 4])).unwrap_err().to_string();
        assert!(
            e.contains("g/frames/3/w.f32.uni") && e.contains("[4, 8]"),
            "{e}"
        );
        assert!(
            e.contains("[0:4, 6:10]") && e.contains("dimension 1"),
            "{e}"
        );
        let e = check(&meta, &sl(&[0], &[4])).unwrap_err().to_string();
        assert!(e.contains("1 dimensions, the tensor 2"), "{e}");
        check(&meta, &sl(&[1, 2], &[3, 0])).unwrap();
    }
}
