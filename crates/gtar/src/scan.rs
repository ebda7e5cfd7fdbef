//! Recovering archives that have no valid central directory.
//!
//! How completeness is recorded: every entry gtar-logd writes carries the
//! private `gL` extra field ([`COMMIT_TAG`]) in its local header with the
//! transaction id (the offset of the transaction's first local header), the
//! entry's number within the transaction, and an END flag. The END flag is set
//! on the transaction's last entry only after every entry of the transaction
//! is completely written (sizes and CRC in place); an fsync follows before a
//! commit is reported durable.
//!
//! [`scan`] walks local headers from offset 0 and keeps:
//! * each complete foreign entry (no `gL` field: written by libgetar, keras_gtar,
//!   or any zip tool) whose CRC matches, one by one — they carry no frame
//!   boundaries, so a complete entry is the best unit we have;
//! * our entries only as whole transactions: entries 0..n of one txn, CRC
//!   valid, the last one flagged END; a transaction replaces the frames it
//!   marks exactly as the writer's index does ([`Index::push_txn`]), so the
//!   repaired central directory lists what the one before the crash listed.
//!
//! A file that does not start like a zip archive (its first bytes are not
//! `PK`) is refused with [`Error::Corrupt`] instead of being "recovered" as an
//! empty archive: opening it fails, and repair never truncates someone's
//! unrelated file. An empty file, or a torn first header, is still recovered.
//!
//! The walk stops at the first thing that is not a complete, valid entry of an
//! acceptable sequence; everything from the end of the last kept entry on is the
//! torn tail. Because the writer never leaves stale bytes beyond its write
//! position (it truncates the old central directory before appending) and
//! entries are written in order, nothing after a torn point was ever
//! acknowledged as durable.
//!
//! Where the walk starts: at offset 0, or at the `end` of a recovery
//! checkpoint that passed its checks (`checkpoint.rs`: a chain of records,
//! each written after an fdatasync covering it, verified by CRC and by
//! sampled local headers). Every offset a checkpoint names is a commit point,
//! so the walk starts there with no transaction open, exactly as it would
//! have arrived there from offset 0; the entries before it are taken from the
//! checkpoint without reading their data. A checkpoint that fails any check
//! is ignored (the report says why) and the walk starts at 0. Invariant: the
//! walk never starts anywhere but 0 or a verified checkpoint's `end`.
//!
//! Bounded work: each entry is read once (CRC check); data-descriptor entries
//! are delimited by searching for a descriptor whose size field equals its own
//! distance from the data start and whose CRC matches, so a damaged archive
//! can't make the scan loop or look backwards.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use flate2::read::DeflateDecoder;

use crate::error::Error;
use crate::index::{Entry, Index};
use crate::zipfmt::*;

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    /// Why the central directory could not be used.
    pub reason: String,
    /// Entries kept, in file order.
    pub entries: Vec<Entry>,
    /// Offset just past the last kept entry: where the tail starts.
    pub end: u64,
    /// Complete gtar-logd transactions (frames) kept.
    pub txns_kept: u64,
    /// Entries of an unfinished transaction that were dropped.
    pub entries_dropped: u64,
    /// Bytes after `end` that were dropped.
    pub bytes_dropped: u64,
    /// Why the walk stopped (empty if it reached the end of the file cleanly).
    pub stopped: String,
    /// The verified checkpoint the walk started from (its committed length),
    /// or `None` if it walked from offset 0.
    pub checkpoint: Option<u64>,
    /// Why no checkpoint was used (empty when one was).
    pub checkpoint_note: String,
    /// Bytes read from the archive and its checkpoint by this recovery.
    pub bytes_read: u64,
}

/// The archive being scanned, counting the bytes read from it.
pub(crate) struct Src<'a> {
    file: &'a File,
    read: Cell<u64>,
}

impl<'a> Src<'a> {
    pub(crate) fn new(file: &'a File) -> Src<'a> {
        Src {
            file,
            read: Cell::new(0),
        }
    }
    pub(crate) fn file(&self) -> &File {
        self.file
    }
    /// Count bytes read from elsewhere on the archive's behalf.
    pub(crate) fn count(&self, n: u64) {
        self.read.set(self.read.get() + n);
    }
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, at)?;
        self.count(buf.len() as u64);
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let n = self.file.read_at(buf, at)?;
        self.count(n as u64);
        Ok(n)
    }
}

const CHUNK: usize = 1 << 20;

pub(crate) struct Local {
    pub(crate) name: String,
    pub(crate) flags: u16,
    pub(crate) method: u16,
    pub(crate) crc32: u32,
    pub(crate) csize: Option<u64>,
    pub(crate) usize_: Option<u64>,
    pub(crate) mark: Option<CommitMark>,
    pub(crate) data_offset: u64,
    pub(crate) has_zip64: bool,
}

pub(crate) fn read_local(file: &Src, at: u64, len: u64) -> Result<Local, String> {
    if at + LOCAL_HEADER_LEN as u64 > len {
        return Err(format!(
            "{} bytes at offset {at}, too short for a local header",
            len - at
        ));
    }
    let mut h = [0u8; LOCAL_HEADER_LEN];
    file.read_exact_at(&mut h, at).map_err(|e| e.to_string())?;
    if rd32(&h, 0) != LOCAL_SIG {
        return Err(if rd32(&h, 0) == CENTRAL_SIG {
            format!("an old central directory at offset {at}")
        } else {
            format!("no local header at offset {at}")
        });
    }
    let flags = rd16(&h, 6);
    if flags & GP_ENCRYPTED != 0 {
        return Err(format!("encrypted entry at offset {at}"));
    }
    let nlen = rd16(&h, 26) as usize;
    let elen = rd16(&h, 28) as usize;
    let data_offset = at + (LOCAL_HEADER_LEN + nlen + elen) as u64;
    if data_offset > len {
        return Err(format!("local header at offset {at} is cut off"));
    }
    let mut var = vec![0u8; nlen + elen];
    file.read_exact_at(&mut var, at + LOCAL_HEADER_LEN as u64)
        .map_err(|e| e.to_string())?;
    let name = std::str::from_utf8(&var[..nlen])
        .map_err(|_| format!("non-UTF-8 name at offset {at}"))?
        .to_string();
    let c32 = rd32(&h, 18);
    let u32_ = rd32(&h, 22);
    let ex = parse_extra(&var[nlen..], [true, true, false]).map_err(|e| format!("{name}: {e}"))?;
    if ex
        .name_crc
        .is_some_and(|c| c != crc32fast::hash(name.as_bytes()))
    {
        return Err(format!(
            "{name}: the name at offset {at} is damaged (its CRC-32 differs)"
        ));
    }
    let (mut csize, mut usize_) = (Some(c32 as u64), Some(u32_ as u64));
    if c32 == u32::MAX || u32_ == u32::MAX {
        let z = ex
            .zip64
            .ok_or_else(|| format!("{name}: zip64 sizes missing"))?;
        usize_ = z[0];
        csize = z[1];
    }
    if flags & GP_DATA_DESCRIPTOR != 0 {
        csize = None;
        usize_ = None;
    }
    Ok(Local {
        name,
        flags,
        method: rd16(&h, 8),
        crc32: rd32(&h, 14),
        csize,
        usize_,
        mark: ex.mark,
        data_offset,
        has_zip64: ex.zip64.is_some(),
    })
}

/// CRC and size of the uncompressed bytes of `[from, from+n)`.
fn checksum(file: &Src, from: u64, n: u64, method: u16) -> io::Result<(u32, u64)> {
    struct Pos<'a, 'b> {
        f: &'a Src<'b>,
        pos: u64,
        end: u64,
    }
    impl Read for Pos<'_, '_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let k = (self.end - self.pos).min(b.len() as u64) as usize;
            if k == 0 {
                return Ok(0);
            }
            let got = self.f.read_at(&mut b[..k], self.pos)?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.pos += got as u64;
            Ok(got)
        }
    }
    let raw = Pos {
        f: file,
        pos: from,
        end: from + n,
    };
    // Buffers sized to the entry: a scan over many small entries must not
    // allocate (and zero) a whole CHUNK per entry.
    let cap = usize::try_from(n).unwrap_or(CHUNK).clamp(4096, CHUNK);
    let mut r: Box<dyn Read> = match method {
        METHOD_STORED => Box::new(raw),
        METHOD_DEFLATE => Box::new(DeflateDecoder::new(io::BufReader::with_capacity(cap, raw))),
        m => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("compression method {m}"),
            ))
        }
    };
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; cap];
    let mut total = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        total += k as u64;
    }
    Ok((h.finalize(), total))
}

/// Find the data descriptor that ends a bit-3 entry whose data starts at `d`.
/// Returns (compressed size, uncompressed size, crc, descriptor length).
fn find_descriptor(file: &Src, loc: &Local, len: u64) -> Option<(u64, u64, u32, u64)> {
    let d = loc.data_offset;
    let mut buf = vec![
        0u8;
        usize::try_from(len.saturating_sub(d))
            .unwrap_or(CHUNK)
            .min(CHUNK)
            + 3
    ];
    let mut base = d;
    while base < len {
        let n = ((len - base) as usize).min(buf.len());
        if file.read_exact_at(&mut buf[..n], base).is_err() {
            return None;
        }
        for i in 0..n.saturating_sub(3) {
            if buf[i..i + 4] != DESCRIPTOR_SIG.to_le_bytes() {
                continue;
            }
            let p = base + i as u64;
            let dist = p - d;
            let mut desc = [0u8; 24];
            let avail = ((len - p) as usize).min(24);
            if avail < 16 || file.read_exact_at(&mut desc[..avail], p).is_err() {
                continue;
            }
            // 64-bit sizes when the header had a zip64 field (miniz), else 32-bit.
            let forms: &[(u64, u64, u64)] = &[
                (rd32(&desc, 8) as u64, rd32(&desc, 12) as u64, 16),
                (
                    if avail >= 24 {
                        rd64(&desc, 8)
                    } else {
                        u64::MAX
                    },
                    if avail >= 24 {
                        rd64(&desc, 16)
                    } else {
                        u64::MAX
                    },
                    24,
                ),
            ];
            let order: Vec<usize> = if loc.has_zip64 {
                vec![1, 0]
            } else {
                vec![0, 1]
            };
            for k in order {
                let (c, u, dl) = forms[k];
                if c != dist {
                    continue;
                }
                let crc = rd32(&desc, 4);
                if let Ok((got_crc, got_u)) = checksum(file, d, c, loc.method) {
                    if got_crc == crc && got_u == u {
                        return Some((c, u, crc, dl));
                    }
                }
            }
        }
        if n < buf.len() {
            break;
        }
        base += (n - 3) as u64;
    }
    None
}

/// Walk the local headers of `file` from offset 0 and keep what is complete
/// (module docs).
pub fn scan(file: &File, len: u64, reason: String) -> Result<ScanReport, Error> {
    scan_from(&Src::new(file), len, reason, None, String::new())
}

/// [`scan`], starting at the end of the verified checkpoint `start` (its
/// transactions, the first the index it started from, and committed length) if there is one; `note` says why there is
/// none.
pub(crate) fn scan_from(
    file: &Src,
    len: u64,
    reason: String,
    start: Option<(Vec<Vec<Entry>>, u64)>,
    note: String,
) -> Result<ScanReport, Error> {
    let mut head = [0u8; 2];
    let n = len.min(2) as usize;
    file.read_exact_at(&mut head[..n], 0)?;
    if !b"PK".starts_with(&head[..n]) {
        return Err(Error::Corrupt(format!(
            "not a zip archive (it does not start with a zip header; {reason})"
        )));
    }
    let mut rep = ScanReport {
        reason,
        checkpoint_note: note,
        ..Default::default()
    };
    // Kept entries, with the frame-replacement rule applied per transaction.
    let mut kept = Index::new();
    let mut at = 0u64;
    if let Some((txns, end)) = start {
        let mut txns = txns.into_iter();
        // The chain's first record is an index already resolved.
        for e in txns.next().unwrap_or_default() {
            kept.push(e);
        }
        for t in txns {
            kept.push_txn(t);
        }
        rep.end = end;
        rep.checkpoint = Some(end);
        at = end;
    }
    let mut pending: Vec<Entry> = Vec::new();
    let mut pending_txn = 0u64;
    let stopped = loop {
        if at == len {
            break String::new();
        }
        let loc = match read_local(file, at, len) {
            Ok(l) => l,
            Err(why) => break why,
        };
        let (csize, usize_, crc, after) = match (loc.csize, loc.usize_) {
            (Some(c), Some(u)) => {
                let end = match loc.data_offset.checked_add(c) {
                    Some(e) if e <= len => e,
                    _ => break format!("{}: entry is cut off at the end of the file", loc.name),
                };
                match checksum(file, loc.data_offset, c, loc.method) {
                    Ok((got, got_u)) if got == loc.crc32 && got_u == u => {}
                    Ok(_) => break format!("{}: data does not match its CRC-32", loc.name),
                    Err(e) => break format!("{}: {e}", loc.name),
                }
                (c, u, loc.crc32, end)
            }
            _ => match find_descriptor(file, &loc, len) {
                Some((c, u, crc, dl)) => (c, u, crc, loc.data_offset + c + dl),
                None => break format!("{}: no valid data descriptor found", loc.name),
            },
        };
        let entry = Entry {
            cd: CentralEntry {
                name: loc.name.clone(),
                method: loc.method,
                flags: loc.flags,
                crc32: crc,
                compressed_size: csize,
                uncompressed_size: usize_,
                local_header_offset: at,
            },
            data_offset: Some(loc.data_offset),
        };
        match loc.mark {
            Some(m) => {
                let fits = if pending.is_empty() {
                    m.entry == 0 && m.txn == at
                } else {
                    m.txn == pending_txn && m.entry as usize == pending.len()
                };
                if !fits {
                    break format!("{}: out-of-sequence frame entry at offset {at}", loc.name);
                }
                pending_txn = m.txn;
                pending.push(entry);
                if m.end {
                    kept.push_txn(std::mem::take(&mut pending));
                    rep.txns_kept += 1;
                    rep.end = after;
                }
            }
            None => {
                if !pending.is_empty() {
                    break format!("{}: foreign entry inside an unfinished frame", loc.name);
                }
                kept.push(entry);
                rep.end = after;
            }
        }
        at = after;
    };
    rep.entries = kept.entries().to_vec();
    rep.entries_dropped = pending.len() as u64;
    rep.bytes_dropped = len - rep.end;
    rep.stopped = stopped;
    rep.bytes_read = file.read.get();
    Ok(rep)
}
