//! Recovery checkpoints: recovery reads the torn tail, not the archive.
//!
//! A writer keeps a sidecar next to the archive, `<archive>` +
//! [`SIDECAR_SUFFIX`]: a header naming the archive file (device and inode)
//! and an append-only chain of records. Each record says "bytes `[0, end)` of
//! the archive are durable and hold exactly these entries" as a delta: the
//! central-directory headers (and data offsets) of the entries committed
//! since the previous record, whose `end` it names as its `prev`. The first
//! record starts from 0 and holds the index at open; each later record holds
//! one transaction (or foreign entry), so that recovery replays transactions
//! through the same frame-replacement rule as the writer. Each record carries
//! a CRC-32 of itself.
//!
//! Invariants:
//! * a record is written only after an `fdatasync` of the archive that covers
//!   every byte it describes returned ([`Checkpoints::sync`]), so a record
//!   that exists describes durable bytes; `end` is always a commit point (the
//!   end of a whole transaction or of a complete foreign entry);
//! * the sidecar is a cache, never the only copy of anything: it is not
//!   fsynced, a writer that cannot write it carries on without it, and
//!   whatever recovery cannot verify it ignores and scans the archive from
//!   offset 0 as before ([`recover`]);
//! * every open for writing starts a new chain (truncate, then a record of
//!   the whole index), and [`OpenMode::Create`](crate::OpenMode) empties the
//!   sidecar *before* it truncates the archive, so no chain outlives the bytes
//!   it describes through our own writers.
//!
//! What recovery checks before it trusts a chain (any failure: full scan):
//! the header's CRC and that it names this very file (a compaction renames a
//! new file into place: a new inode); every record's CRC and that it
//! continues the chain (a torn last record ends the chain, the records
//! before it still count); `end` within the file; and the local headers of up
//! to [`SAMPLES`] entries spread over the chain, the first and the last
//! included, against what the chain says about them (name, method, CRC,
//! sizes, data offset; the last one ends exactly at `end` and, if ours, is a
//! transaction's END). Programs that only append (libgetar, keras_gtar and
//! zip tools overwrite the central directory with new entries, which lies at
//! or after `end`) leave the chain true. A file rewritten in place under the
//! same inode by another program is caught by the sampled headers, not
//! proven absent: their CRCs are of the entries' data, so a different file
//! would have to repeat names, sizes, offsets and CRCs at every sample.
//!
//! Cost: a record per fsync holds only that fsync's new entries, so the
//! sidecar grows like the central directory; recovery reads the sidecar
//! (~100 bytes an entry), [`SAMPLES`] local headers and then scans from `end`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Error;
use crate::index::{parse_central_directory, Entry};
use crate::scan::{read_local, scan_from, ScanReport, Src};
use crate::zipfmt::*;

/// The sidecar of `a.zip` is `a.zip.gtar-ckpt`.
pub const SIDECAR_SUFFIX: &str = ".gtar-ckpt";

const MAGIC: &[u8; 8] = b"GTARCKP1";
/// Magic, device, inode, CRC-32 of the 24 bytes before it.
const HEADER_LEN: usize = 28;
const REC_MAGIC: u32 = 0x5450_4b43; // "CKPT"
/// Magic, prev, end, entry count, central-directory bytes.
const REC_HEAD: usize = 36;
/// Local headers checked against the chain before it is trusted.
pub const SAMPLES: usize = 16;
/// A sidecar larger than this is not read (a central directory of this size
/// would be millions of entries); recovery scans instead.
const MAX_SIDECAR: u64 = 1 << 32;
/// Marks an entry whose data offset the record does not know.
const NO_OFFSET: u64 = u64::MAX;

/// Where the sidecar of `archive` lives.
pub fn sidecar_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(SIDECAR_SUFFIX);
    PathBuf::from(s)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode_header(dev: u64, ino: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&dev.to_le_bytes());
    b.extend_from_slice(&ino.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn encode_record(prev: u64, end: u64, entries: &[Entry]) -> Vec<u8> {
    let mut cd = Vec::with_capacity(entries.len() * 96);
    for e in entries {
        e.cd.encode_into(&mut cd);
    }
    let mut b = Vec::with_capacity(REC_HEAD + cd.len() + 8 * entries.len() + 4);
    b.extend_from_slice(&REC_MAGIC.to_le_bytes());
    b.extend_from_slice(&prev.to_le_bytes());
    b.extend_from_slice(&end.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    b.extend_from_slice(&(cd.len() as u64).to_le_bytes());
    b.extend_from_slice(&cd);
    for e in entries {
        b.extend_from_slice(&e.data_offset.unwrap_or(NO_OFFSET).to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Empty the sidecar of `archive` (before the archive itself is emptied).
pub(crate) fn invalidate(archive: &Path) {
    match OpenOptions::new().write(true).open(sidecar_path(archive)) {
        Ok(f) => {
            if let Err(e) = f.set_len(0) {
                tracing::warn!(archive = %archive.display(), error = %e, "cannot empty the recovery checkpoint");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            // Cannot open it: remove it, so it cannot describe the new file.
            tracing::warn!(archive = %archive.display(), error = %e, "cannot open the recovery checkpoint");
            let _ = std::fs::remove_file(sidecar_path(archive));
        }
    }
}

/// Remove the sidecar of `archive` (before the archive is replaced).
pub(crate) fn remove(archive: &Path) {
    match std::fs::remove_file(sidecar_path(archive)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(archive = %archive.display(), error = %e, "cannot remove the recovery checkpoint");
            invalidate(archive);
        }
    }
}

/// Transactions committed since the last record, each with the committed
/// length after it. Each becomes a record of its own: recovery needs the
/// transaction boundaries to apply the frame-replacement rule
/// ([`crate::index::Index::push_txn`]) exactly as the writer did.
#[derive(Debug, Default)]
struct Pending {
    txns: Vec<(Vec<Entry>, u64)>,
}

#[derive(Debug)]
struct Sidecar {
    /// `None`: no checkpoints (could not be written); recovery scans.
    file: Option<File>,
    /// Where the next record goes.
    at: u64,
    /// `end` of the last record written.
    recorded: u64,
}

/// The writer's side of the checkpoint chain; clones share it (the fsync
/// thread of the daemon holds one).
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pending: Arc<Mutex<Pending>>,
    /// Also serializes [`Checkpoints::sync`]: records go out in chain order.
    sidecar: Arc<Mutex<Sidecar>>,
}

impl Checkpoints {
    /// Start a new chain for `archive` (at `path`), whose bytes `[0, end)`
    /// are durable and hold `entries`.
    pub(crate) fn start(archive: &File, path: &Path, entries: &[Entry], end: u64) -> Checkpoints {
        let file = (|| -> io::Result<(File, u64)> {
            let meta = archive.metadata()?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(sidecar_path(path))?;
            // It lists the archive's entry names: no more readable than it.
            f.set_permissions(meta.permissions())?;
            let mut b = encode_header(meta.dev(), meta.ino());
            b.extend_from_slice(&encode_record(0, end, entries));
            f.write_all_at(&b, 0)?;
            Ok((f, b.len() as u64))
        })();
        let (file, at) = match file {
            Ok((f, at)) => (Some(f), at),
            Err(e) => {
                tracing::debug!(archive = %path.display(), error = %e, "no recovery checkpoints");
                invalidate(path);
                (None, 0)
            }
        };
        Checkpoints {
            pending: Arc::new(Mutex::new(Pending::default())),
            sidecar: Arc::new(Mutex::new(Sidecar {
                file,
                at,
                recorded: end,
            })),
        }
    }

    /// A transaction committed `entries`; the archive's committed bytes now
    /// end at `end`.
    pub(crate) fn committed(&self, entries: &[Entry], end: u64) {
        lock(&self.pending).txns.push((entries.to_vec(), end));
    }

    /// `fdatasync` the archive (a handle on it), then record every commit
    /// made before the call as durable. Callers report "durable" after this
    /// returns, exactly as after `sync_data`.
    pub fn sync(&self, archive: &File) -> io::Result<()> {
        let mut sc = lock(&self.sidecar);
        let txns = std::mem::take(&mut lock(&self.pending).txns);
        if let Err(e) = archive.sync_data() {
            // The entries taken are not durable and will not be recorded:
            // the chain ends here.
            sc.file = None;
            return Err(e);
        }
        let Some(&(_, end)) = txns.last() else {
            return Ok(());
        };
        let mut rec = Vec::new();
        let mut prev = sc.recorded;
        for (entries, e) in &txns {
            rec.extend_from_slice(&encode_record(prev, *e, entries));
            prev = *e;
        }
        let at = sc.at;
        if let Some(f) = &sc.file {
            match f.write_all_at(&rec, at) {
                Ok(()) => {
                    sc.at += rec.len() as u64;
                    sc.recorded = end;
                }
                Err(e) => {
                    // A partial record fails its CRC: the chain before it
                    // still holds. No more records after a hole.
                    tracing::debug!(error = %e, "recovery checkpoint not written");
                    sc.file = None;
                }
            }
        }
        Ok(())
    }
}

/// A chain that passed every check: `[0, end)` holds the entries of `txns`:
/// the first is the index the chain started from, each later one a
/// transaction (or a foreign entry) committed after it.
struct Trusted {
    txns: Vec<Vec<Entry>>,
    end: u64,
}

/// Read and verify the chain of `path`'s sidecar (module docs).
fn load(src: &Src, path: &Path, len: u64) -> Result<Trusted, String> {
    let sc = match File::open(sidecar_path(path)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("no checkpoint".into()),
        Err(e) => return Err(format!("checkpoint unreadable: {e}")),
    };
    let size = sc.metadata().map_err(|e| e.to_string())?.len();
    if size > MAX_SIDECAR {
        return Err(format!("checkpoint of {size} bytes is too large"));
    }
    let mut b = vec![0u8; size as usize];
    sc.read_exact_at(&mut b, 0)
        .map_err(|e| format!("checkpoint unreadable: {e}"))?;
    src.count(size);
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return Err("checkpoint has no header".into());
    }
    if crc32fast::hash(&b[..24]) != rd32(&b, 24) {
        return Err("checkpoint header fails its CRC".into());
    }
    let meta = src.file().metadata().map_err(|e| e.to_string())?;
    if (rd64(&b, 8), rd64(&b, 16)) != (meta.dev(), meta.ino()) {
        return Err("checkpoint belongs to another file (replaced or copied)".into());
    }
    let mut txns: Vec<Vec<Entry>> = Vec::new();
    let mut end = None::<u64>;
    let mut at = HEADER_LEN;
    while let Some(h) = b.get(at..at + REC_HEAD) {
        let (prev, rend, count, cd_len) = (rd64(h, 4), rd64(h, 12), rd64(h, 20), rd64(h, 28));
        let ok_head = rd32(h, 0) == REC_MAGIC
            && prev == end.unwrap_or(0)
            && rend >= prev
            && count <= cd_len / CENTRAL_HEADER_LEN as u64;
        let body = cd_len
            .checked_add(count * 8 + 4)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| b.get(at + REC_HEAD..at + REC_HEAD + n));
        let (Some(body), true) = (body, ok_head) else {
            break; // torn or foreign bytes: the chain ends before them
        };
        let rec_len = REC_HEAD + body.len();
        if crc32fast::hash(&b[at..at + rec_len - 4]) != rd32(&b, at + rec_len - 4) {
            break;
        }
        let Ok(mut new) = parse_central_directory(&body[..cd_len as usize], count, rend) else {
            break;
        };
        for (k, e) in new.iter_mut().enumerate() {
            let o = rd64(body, cd_len as usize + 8 * k);
            e.data_offset = (o != NO_OFFSET).then_some(o);
        }
        txns.push(new);
        end = Some(rend);
        at += rec_len;
    }
    let end = end.ok_or("checkpoint holds no valid record")?;
    if end > len {
        return Err(format!(
            "checkpoint says {end} bytes are committed, the file has {len}"
        ));
    }
    let entries: Vec<Entry> = txns.iter().flatten().cloned().collect();
    verify_samples(src, &entries, end, len)?;
    Ok(Trusted { txns, end })
}

/// Compare the local headers of up to [`SAMPLES`] entries with the chain.
fn verify_samples(src: &Src, entries: &[Entry], end: u64, len: u64) -> Result<(), String> {
    let n = entries.len();
    if n == 0 {
        return if end == 0 {
            Ok(())
        } else {
            Err("checkpoint has bytes but no entries".into())
        };
    }
    let mut picks: Vec<usize> = (0..SAMPLES).map(|k| k * (n - 1) / (SAMPLES - 1)).collect();
    picks.dedup();
    for i in picks {
        let e = &entries[i];
        let bad = |what: &str| {
            format!(
                "checkpoint does not match the archive: {} at offset {}: {what}",
                e.name(),
                e.cd.local_header_offset
            )
        };
        let loc = read_local(src, e.cd.local_header_offset, len).map_err(|w| bad(&w))?;
        if loc.name != e.cd.name || loc.method != e.cd.method {
            return Err(bad("another entry is there"));
        }
        if e.data_offset.is_some_and(|d| d != loc.data_offset) {
            return Err(bad("its data starts elsewhere"));
        }
        if e.cd.flags & GP_DATA_DESCRIPTOR == 0
            && (loc.crc32 != e.cd.crc32
                || loc.csize != Some(e.cd.compressed_size)
                || loc.usize_ != Some(e.cd.uncompressed_size))
        {
            return Err(bad("CRC or sizes differ"));
        }
        if i == n - 1 {
            let data_end = loc.data_offset + e.cd.compressed_size;
            let ends_ok = if e.cd.flags & GP_DATA_DESCRIPTOR == 0 {
                data_end == end
            } else {
                data_end <= end
            };
            if !ends_ok || loc.mark.is_some_and(|m| !m.end) {
                return Err(bad(
                    "the last entry does not end a commit at the checkpoint",
                ));
            }
        }
    }
    Ok(())
}

/// Recover the entries of `file` (at `path`, `len` bytes) whose central
/// directory is unusable (`reason`): from a verified checkpoint plus a scan
/// of what follows it, else by a scan of the whole file. Reads only.
pub(crate) fn recover(
    file: &File,
    path: &Path,
    len: u64,
    reason: String,
) -> Result<ScanReport, Error> {
    let src = Src::new(file);
    match load(&src, path, len) {
        Ok(t) => scan_from(&src, len, reason, Some((t.txns, t.end)), String::new()),
        Err(why) => scan_from(&src, len, reason, None, why),
    }
}
