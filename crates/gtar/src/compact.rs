//! Compaction: rewrite an archive keeping only some of its frames.
//!
//! What the new file holds is what a reader of the old one sees (for each
//! name the last entry of that name; earlier copies, which no reader can
//! see, are not copied), less the discrete records of the dropped frames:
//! * first, one transaction with every constant and continuous record (model
//!   description, keras_gtar's shapes, metrics and other `vars/`);
//! * then, per frame index, one transaction with the discrete records at that
//!   index: those outside the compacted group always, those inside it only if
//!   the frame is kept. Frames follow in the order they were first written.
//!
//! Invariants:
//! * the old file is never modified. The new one is written under a fixed
//!   temporary name beside it (`.{name}.compact-tmp`, replaced if an
//!   interrupted compaction left one), fsynced, renamed over the old one, and
//!   the directory is fsynced: after a crash at any point the archive's path
//!   names the old archive or the new one, each complete and valid;
//! * the caller holds the archive's writer lock for the whole run
//!   ([`Exclusive`] offline; the daemon's own `ArchiveWriter` when live), so
//!   nothing is appended to the old file while it is copied, and the fixed
//!   temporary name has one user at a time;
//! * entries are copied raw: compressed bytes, CRC-32, sizes and DOS time as
//!   they are, nothing decompressed or recompressed. CRCs are not verified
//!   during the copy, on purpose: the CRC travels with the bytes, every read
//!   of the new file checks it as every read of the old one did (so a bad
//!   entry is reported exactly as it would have been), and checking here
//!   would pull every kept byte through this process, which is what
//!   `copy_file_range` and reflinks avoid (the local header of every entry
//!   is checked against the directory, which catches a misplaced entry). The data of an entry of
//!   at least [`ALIGN_MIN`] bytes lands at the same offset modulo 4 KiB as in
//!   the old file (a padding extra field), so `copy_file_range` can share its
//!   extents on file systems with reflinks and copies whole pages elsewhere;
//! * every entry written carries our commit mark, each transaction above
//!   being one frame for recovery: if a later append to the new file is torn,
//!   [`scan`](crate::scan) keeps every frame compaction wrote.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::copy::{beside, Copier, CopyStats, TempFile};
use crate::error::Error;
use crate::fsutil::lock_exclusive;
use crate::index::{group_under, Entry, Index};
use crate::path::{Behavior, RecordPath};
use crate::reader::{read_tail, Archive};
use crate::scan::{scan, ScanReport};
use crate::zipfmt::*;

/// Entries at least this large keep their data's offset modulo 4 KiB.
pub const ALIGN_MIN: u64 = 64 << 10;
const BLOCK: u64 = 4096;
/// Data below this size is read and written through a buffer with its
/// header (fewer system calls for the many small records of a frame).
const SMALL: u64 = 256 << 10;
/// Large copies are split so that progress can be reported.
const PIECE: u64 = 64 << 20;

/// An entry's local header: where its data starts, and its DOS time and date.
#[derive(Debug, Clone, Copy)]
struct SrcHeader {
    data_offset: u64,
    dos: [u8; 4],
}

/// Read and check the local header of `e`: a local header signature and the
/// same name as the central directory says.
fn src_header(file: &File, e: &Entry) -> Result<SrcHeader, Error> {
    let at = e.cd.local_header_offset;
    let mut h = vec![0u8; LOCAL_HEADER_LEN + e.cd.name.len()];
    file.read_exact_at(&mut h, at).map_err(|err| {
        Error::Corrupt(format!(
            "{}: cannot read its local header at offset {at}: {err}",
            e.name()
        ))
    })?;
    let nlen = rd16(&h, 26) as usize;
    if rd32(&h, 0) != LOCAL_SIG
        || nlen != e.cd.name.len()
        || &h[LOCAL_HEADER_LEN..] != e.cd.name.as_bytes()
    {
        return Err(Error::Corrupt(format!(
            "{}: the local header at offset {at} does not match the central directory",
            e.name()
        )));
    }
    let data_offset = at + (LOCAL_HEADER_LEN + nlen + rd16(&h, 28) as usize) as u64;
    if let Some(d) = e.data_offset {
        debug_assert_eq!(d, data_offset, "{}", e.name());
    }
    Ok(SrcHeader {
        data_offset,
        dos: h[10..14].try_into().expect("4 bytes"),
    })
}

/// DOS time and date (local time, 2 s resolution) as a point in time; `None`
/// for the fixed 1980-01-01 00:00 that gtar-logd writes (its frames carry no
/// time in their headers) and for impossible values.
fn dos_to_time(dos: [u8; 4]) -> Option<SystemTime> {
    let time = u16::from_le_bytes([dos[0], dos[1]]);
    let date = u16::from_le_bytes([dos[2], dos[3]]);
    if date == (1 << 5) | 1 && time == 0 {
        return None;
    }
    let (day, month, year) = (date & 31, (date >> 5) & 15, 1980 + (date >> 9) as i32);
    let (sec, min, hour) = ((time & 31) * 2, (time >> 5) & 63, time >> 11);
    if day == 0 || month == 0 || month > 12 || hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    // SAFETY: an all-zero `tm` is a valid value; mktime reads and normalises
    // the struct we own.
    let secs = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        tm.tm_sec = sec as i32;
        tm.tm_min = min as i32;
        tm.tm_hour = hour as i32;
        tm.tm_mday = day as i32;
        tm.tm_mon = month as i32 - 1;
        tm.tm_year = year - 1900;
        tm.tm_isdst = -1; // DOS times are local time: let the zone rules say
        libc::mktime(&mut tm)
    };
    (secs >= 0).then(|| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
}

/// When `e` was written, from the DOS time in its local header: known for
/// entries written by libgetar (miniz stamps the time of writing), `None`
/// for gtar-logd's (a fixed 1980 date, so archives are reproducible).
pub fn entry_time(file: &File, e: &Entry) -> Result<Option<SystemTime>, Error> {
    Ok(dos_to_time(src_header(file, e)?.dos))
}

/// The extra padding that puts data written at `at` for `name` at the same
/// offset modulo 4 KiB as `src_data` (0 for small entries).
fn congruent_pad(at: u64, name: &str, src_data: u64, size: u64) -> u16 {
    if size < ALIGN_MIN {
        return 0;
    }
    let base = at + LocalHeader::encoded_len(name, 0) as u64;
    let mut pad = (src_data % BLOCK + BLOCK - base % BLOCK) % BLOCK;
    if pad != 0 && pad < 6 {
        // The shortest padding field is 6 bytes (see zipfmt::align_pad).
        pad += BLOCK;
    }
    pad as u16
}

/// What compaction writes: the transactions, and what it keeps and drops.
#[derive(Debug, Clone, Default)]
pub struct CompactPlan {
    txns: Vec<Vec<Entry>>,
    /// Frames of the compacted group that are kept (GETAR order).
    pub kept: Vec<String>,
    /// Frames of the compacted group that are dropped (GETAR order).
    pub dropped: Vec<String>,
    /// Entries copied.
    pub entries_kept: usize,
    /// Entries of the dropped frames.
    pub entries_dropped: usize,
    /// Earlier copies of rewritten names: invisible to every reader.
    pub entries_superseded: usize,
    /// Stored (compressed) bytes copied.
    pub data_bytes: u64,
}

impl CompactPlan {
    /// Plan to keep, of the frames of records in `scope` (a group, or `None`
    /// for the whole archive), those for which `keep` says so.
    pub fn new(index: &Index, scope: Option<&str>, keep: &dyn Fn(&str) -> bool) -> CompactPlan {
        Self::dropping_records(index, scope, keep, &|_| false)
    }

    /// As [`new`](Self::new), and also drop the records (not frames) whose
    /// names `drop_record` picks: a record that points at a dropped frame.
    pub fn dropping_records(
        index: &Index,
        scope: Option<&str>,
        keep: &dyn Fn(&str) -> bool,
        drop_record: &dyn Fn(&str) -> bool,
    ) -> CompactPlan {
        let mut plan = CompactPlan::default();
        for f in index.frames_under(scope) {
            if keep(&f) {
                plan.kept.push(f);
            } else {
                plan.dropped.push(f);
            }
        }
        let dropped: std::collections::HashSet<&str> =
            plan.dropped.iter().map(String::as_str).collect();
        let mut base = Vec::new();
        let mut frames: Vec<Vec<Entry>> = Vec::new();
        let mut frame_at: HashMap<String, usize> = HashMap::new();
        for e in index.entries() {
            let visible = index
                .get(e.name())
                .is_some_and(|v| v.cd.local_header_offset == e.cd.local_header_offset);
            if !visible {
                plan.entries_superseded += 1;
                continue;
            }
            let rp = RecordPath::parse(e.name());
            if rp.rtype.behavior != Behavior::Discrete {
                if drop_record(e.name()) {
                    plan.entries_dropped += 1;
                } else {
                    base.push(e.clone());
                }
                continue;
            }
            if group_under(&rp.rtype.group, scope) && dropped.contains(rp.index.as_str()) {
                plan.entries_dropped += 1;
                continue;
            }
            let k = *frame_at.entry(rp.index).or_insert_with(|| {
                frames.push(Vec::new());
                frames.len() - 1
            });
            frames[k].push(e.clone());
        }
        plan.txns = std::iter::once(base)
            .chain(frames)
            .filter(|t| !t.is_empty())
            .collect();
        plan.entries_kept = plan.txns.iter().map(Vec::len).sum();
        plan.data_bytes = plan
            .txns
            .iter()
            .flatten()
            .map(|e| e.cd.compressed_size)
            .sum();
        plan
    }

    /// The exact size of the file the plan writes (reads the local headers).
    pub fn new_len(&self, src: &File) -> Result<u64, Error> {
        let mut pos = 0u64;
        let mut cds = Vec::new();
        for e in self.txns.iter().flatten() {
            let h = src_header(src, e)?;
            let pad = congruent_pad(pos, e.name(), h.data_offset, e.cd.compressed_size);
            pos += LocalHeader::encoded_len(e.name(), pad) as u64 + e.cd.compressed_size;
            cds.push(e.cd.clone());
        }
        Ok(pos + encode_tail(&cds, pos).len() as u64)
    }
}

/// Writes the new file of a compaction (see the module docs): create it,
/// copy frames into it, then [`finish`](Rewriter::finish) puts it in place.
/// Dropped unfinished, it removes its temporary file.
pub struct Rewriter {
    tmp: TempFile,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
    entries: Vec<Entry>,
    times: Vec<[u8; 4]>,
    copier: Copier,
}

impl Rewriter {
    /// Start the new file for `archive`. The caller must hold the archive's
    /// writer lock (module docs).
    pub fn create(archive: &Path) -> Result<Rewriter, Error> {
        let tmp = TempFile::create_replacing(beside(archive, "compact-tmp"))?;
        Ok(Rewriter {
            tmp,
            pos: 0,
            buf: Vec::with_capacity(1 << 20),
            buf_at: 0,
            entries: Vec::new(),
            times: Vec::new(),
            copier: Copier::new(),
        })
    }

    /// Where the temporary file is.
    pub fn temp_path(&self) -> &Path {
        &self.tmp.path
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// How the bytes were copied so far.
    pub fn stats(&self) -> CopyStats {
        self.copier.stats
    }

    fn flush(&mut self) -> Result<(), Error> {
        if !self.buf.is_empty() {
            self.tmp.file.write_all_at(&self.buf, self.buf_at)?;
            self.buf_at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Copy `entries` of `src` as one transaction (one frame for recovery);
    /// `progress` is told the stored bytes copied as they are.
    pub fn copy_frame(
        &mut self,
        src: &File,
        entries: &[Entry],
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), Error> {
        let txn = self.pos;
        let n = entries.len();
        for (k, e) in entries.iter().enumerate() {
            let h = src_header(src, e)?;
            let size = e.cd.compressed_size;
            let at = self.pos;
            let pad = congruent_pad(at, e.name(), h.data_offset, size);
            let mut header = LocalHeader {
                name: e.name(),
                method: e.cd.method,
                crc32: e.cd.crc32,
                compressed_size: size,
                uncompressed_size: e.cd.uncompressed_size,
                mark: CommitMark {
                    txn,
                    entry: k as u32,
                    end: k + 1 == n,
                },
                pad,
            }
            .encode();
            header[10..14].copy_from_slice(&h.dos);
            let data_at = at + header.len() as u64;
            debug_assert_eq!(at, self.buf_at + self.buf.len() as u64);
            self.buf.extend_from_slice(&header);
            if size < SMALL {
                let from = self.buf.len();
                self.buf.resize(from + size as usize, 0);
                src.read_exact_at(&mut self.buf[from..], h.data_offset)
                    .map_err(|err| {
                        Error::Corrupt(format!("{}: cannot read its data: {err}", e.name()))
                    })?;
                self.copier.stats.buffered += size;
                progress(size);
                if self.buf.len() >= 1 << 20 {
                    self.flush()?;
                }
            } else {
                self.flush()?;
                let mut done = 0;
                while done < size {
                    let piece = (size - done).min(PIECE);
                    self.copier
                        .copy(
                            src,
                            h.data_offset + done,
                            &self.tmp.file,
                            data_at + done,
                            piece,
                        )
                        .map_err(|err| {
                            Error::Corrupt(format!("{}: cannot copy its data: {err}", e.name()))
                        })?;
                    done += piece;
                    progress(piece);
                }
                self.buf_at = data_at + size;
            }
            self.pos = data_at + size;
            self.entries.push(Entry {
                cd: CentralEntry {
                    name: e.cd.name.clone(),
                    method: e.cd.method,
                    flags: GP_UTF8,
                    crc32: e.cd.crc32,
                    compressed_size: size,
                    uncompressed_size: e.cd.uncompressed_size,
                    local_header_offset: at,
                },
                data_offset: Some(data_at),
            });
            self.times.push(h.dos);
        }
        Ok(())
    }

    /// Copy everything `plan` keeps; `progress(done, total)` in stored bytes.
    pub fn write_plan(
        &mut self,
        src: &File,
        plan: &CompactPlan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error> {
        let total = plan.data_bytes;
        let mut done = 0u64;
        for txn in &plan.txns {
            self.copy_frame(src, txn, &mut |n| {
                done += n;
                progress(done, total);
            })?;
        }
        Ok(())
    }

    /// Write out what is buffered and fsync what was copied so far, so that
    /// [`finish`](Rewriter::finish) later has only what came after to sync
    /// (a live compaction calls this before it holds the writer).
    pub fn sync_data(&mut self) -> Result<(), Error> {
        self.flush()?;
        self.tmp.file.sync_data()?;
        Ok(())
    }

    /// Write the central directory, fsync, rename over `archive`, fsync the
    /// directory. Returns the new file's index.
    pub fn finish(mut self, archive: &Path) -> Result<Index, Error> {
        self.flush()?;
        let cds: Vec<CentralEntry> = self.entries.iter().map(|e| e.cd.clone()).collect();
        let mut tail = encode_tail(&cds, self.pos);
        // Central headers repeat each entry's DOS time (encode_tail writes
        // gtar-logd's fixed one): put the copied times back.
        let mut at = 0;
        for t in &self.times {
            debug_assert_eq!(rd32(&tail, at), CENTRAL_SIG);
            tail[at + 12..at + 16].copy_from_slice(t);
            at += CENTRAL_HEADER_LEN
                + rd16(&tail, at + 28) as usize
                + rd16(&tail, at + 30) as usize
                + rd16(&tail, at + 32) as usize;
        }
        self.tmp.file.write_all_at(&tail, self.pos)?;
        self.tmp.file.set_len(self.pos + tail.len() as u64)?;
        let mut index = Index::new();
        for e in std::mem::take(&mut self.entries) {
            index.push(e);
        }
        // The old file's recovery checkpoint describes a file about to be
        // replaced (it would be refused by inode anyway): remove it first,
        // so no stale sidecar is left beside the new file. A writer that
        // opens the new file starts a new one.
        crate::checkpoint::remove(archive);
        self.tmp.persist_replacing(archive)?;
        Ok(index)
    }
}

/// An archive opened for rewriting offline: the writer's exclusive lock is
/// held (so no daemon or other writer has it open for writing, and none can
/// open it until this is dropped) and its index is read, recovered in memory
/// if the central directory is missing or torn.
#[derive(Debug)]
pub struct Exclusive {
    path: PathBuf,
    file: File,
    index: Index,
    recovered: Option<ScanReport>,
    len: u64,
}

impl Exclusive {
    /// Lock and read `path`. [`Error::Locked`] if a writer holds it.
    pub fn open(path: &Path) -> Result<Exclusive, Error> {
        // A compaction that finishes between our open and our lock renames a
        // new file over the path: the file we locked is then a stale copy.
        // Lock until the path and the locked file are the same.
        for _ in 0..16 {
            let file = File::open(path)?;
            lock_exclusive(&file)?;
            let (held, now) = (file.metadata()?, std::fs::metadata(path)?);
            if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
                continue;
            }
            let len = held.len();
            let (index, recovered) = match read_tail(&file, len) {
                Ok((_, entries)) => (entries, None),
                Err(why) => {
                    let rep = scan(&file, len, why)?;
                    (rep.entries.clone(), Some(rep))
                }
            };
            let mut ix = Index::new();
            for e in index {
                ix.push(e);
            }
            return Ok(Exclusive {
                path: path.to_path_buf(),
                file,
                index: ix,
                recovered,
                len,
            });
        }
        Err(Error::Invalid(format!(
            "{}: the file keeps being replaced; try again",
            path.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// File size.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What recovery found when the central directory was not usable (the
    /// torn tail is not part of the index, so compaction drops it).
    pub fn recovered(&self) -> Option<&ScanReport> {
        self.recovered.as_ref()
    }

    /// A reader over the locked archive (for the facts a policy needs).
    pub fn reader(&self) -> Result<Archive, Error> {
        Archive::with_shared_index(&self.path, Arc::new(RwLock::new(self.index.clone())))
    }

    /// Write `plan` to a new file and put it in place of the archive (module
    /// docs); the lock is released when this returns.
    pub fn compact(
        self,
        plan: &CompactPlan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Compacted, Error> {
        let mut w = Rewriter::create(&self.path)?;
        w.write_plan(&self.file, plan, progress)?;
        let stats = w.stats();
        let index = w.finish(&self.path)?;
        let new_len = std::fs::metadata(&self.path)?.len();
        Ok(Compacted {
            old_len: self.len,
            new_len,
            entries: index.entries().len(),
            stats,
        })
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub old_len: u64,
    pub new_len: u64,
    pub entries: usize,
    pub stats: CopyStats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::tests::bytes;
    use crate::{ArchiveWriter, Compression, OpenMode};

    /// Frames 0..n of a run in group "run" (one large tensor, one small,
    /// deflated), a metric per frame, a constant rewritten every frame, and
    /// a frame of another group at every index.
    fn write(path: &Path, n: usize) -> HashMap<String, Vec<u8>> {
        let mut all = HashMap::new();
        let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
        w.enable_direct_io();
        for f in 0..n {
            let mut t = w.begin().unwrap();
            let mut put = |name: String, data: Vec<u8>, c| {
                t.add(&name, &data, c).unwrap();
                all.insert(name, data);
            };
            put(
                format!("run/w/frames/{f}/value.f32.uni"),
                bytes(f as u64, 300_000 + f),
                Compression::Stored,
            );
            put(
                format!("run/b/frames/{f}/value.f32.uni"),
                vec![f as u8; 1000],
                Compression::Deflate(6),
            );
            put(
                "run/w/shape.u32.uni".into(),
                (f as u32).to_le_bytes().to_vec(),
                Compression::Stored,
            );
            put(
                format!("run/metrics/vars/loss.f64.uni/{f}"),
                (f as f64).to_le_bytes().to_vec(),
                Compression::Stored,
            );
            put(
                format!("other/frames/{f}/x.u8.uni"),
                bytes(99 + f as u64, 70_000),
                Compression::Stored,
            );
            t.commit().unwrap();
        }
        w.close().unwrap();
        all
    }

    #[test]
    fn compaction_keeps_what_readers_see_of_kept_frames_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let all = write(&path, 6);
        let ex = Exclusive::open(&path).unwrap();
        let src_mod: HashMap<String, u64> = ex
            .index()
            .entries()
            .iter()
            .map(|e| {
                let h = src_header(ex.file(), e).unwrap();
                (e.cd.name.clone(), h.data_offset % BLOCK)
            })
            .collect();
        let keep = |f: &str| f == "1" || f == "5";
        let plan = CompactPlan::new(ex.index(), Some("run"), &keep);
        assert_eq!(plan.kept, ["1", "5"]);
        assert_eq!(plan.dropped, ["0", "2", "3", "4"]);
        assert_eq!(plan.entries_dropped, 8);
        assert_eq!(plan.entries_superseded, 5); // the shape record's old copies
        let predicted = plan.new_len(ex.file()).unwrap();
        let mut last = (0, 0);
        let done = ex.compact(&plan, &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(last.0, last.1);
        assert_eq!(done.new_len, predicted);
        assert!(done.new_len < done.old_len);
        let a = Archive::open(&path).unwrap();
        assert!(matches!(a.state(), crate::OpenState::Clean));
        for (name, data) in &all {
            let rp = RecordPath::parse(name);
            let gone = rp.rtype.group.starts_with("run/")
                && rp.rtype.behavior == Behavior::Discrete
                && !keep(&rp.index);
            // (`all` holds the last value of a rewritten name, as readers do.)
            match a.read(name) {
                Ok(got) => assert!(!gone && got == *data, "{name}"),
                Err(e) => assert!(gone, "{name}: {e}"),
            }
        }
        // Large data kept its offset modulo 4 KiB.
        let f = File::open(&path).unwrap();
        for e in a.index().entries() {
            if e.cd.compressed_size >= ALIGN_MIN {
                let d = src_header(&f, e).unwrap().data_offset;
                assert_eq!(d % BLOCK, src_mod[e.name()], "{}", e.name());
            }
        }
        // Every frame is a transaction: the recovery scan of the file
        // without its tail keeps all of them.
        let (tail, _) = read_tail(&f, f.metadata().unwrap().len()).unwrap();
        let rep = scan(&f, tail.cd_offset, "test".into()).unwrap();
        assert_eq!(rep.entries.len(), a.index().entries().len());
        assert_eq!(rep.txns_kept, 1 + 6); // the base and one per index
        assert!(rep.stopped.is_empty(), "{}", rep.stopped);
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_locked_archive_is_refused_and_a_leftover_temp_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        write(&path, 2);
        {
            let (_w, _) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
            assert!(matches!(Exclusive::open(&path), Err(Error::Locked)));
        }
        std::fs::write(beside(&path, "compact-tmp"), b"junk of a killed run").unwrap();
        let ex = Exclusive::open(&path).unwrap();
        let plan = CompactPlan::new(ex.index(), None, &|_| true);
        ex.compact(&plan, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // An append after compaction works and is recoverable as ever.
        let (mut w, rep) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
        assert!(rep.is_none());
        let mut t = w.begin().unwrap();
        t.add("run/w/frames/9/value.f32.uni", b"abcd", Compression::Stored)
            .unwrap();
        t.commit().unwrap();
        w.close().unwrap();
        assert_eq!(
            Archive::open(&path)
                .unwrap()
                .index()
                .frames_under(Some("run")),
            ["0", "1", "9"]
        );
    }

    #[test]
    fn dos_times_convert_and_our_fixed_date_means_unknown() {
        assert_eq!(dos_to_time([0, 0, 0x21, 0]), None);
        // 2024-03-05 13:14:16 local time.
        let date: u16 = (44 << 9) | (3 << 5) | 5;
        let time: u16 = (13 << 11) | (14 << 5) | 8;
        let mut dos = [0u8; 4];
        dos[..2].copy_from_slice(&time.to_le_bytes());
        dos[2..].copy_from_slice(&date.to_le_bytes());
        let t = dos_to_time(dos).unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        // Within a day of the UTC value whatever the time zone.
        assert!((secs - 1_709_644_456).abs() <= 14 * 3600, "{secs}");
        assert_eq!(dos_to_time([0, 0, 0, 0]), None);
    }
}
