//! Snapshots: a consistent copy of an archive, also while a writer appends.
//!
//! The copy is the archive's committed prefix — every byte up to the end of
//! the last committed entry, cloned with a reflink where the file system has
//! one, else copied in the kernel — followed by a fresh central directory of
//! the committed entries. It is a valid zip64 GETAR archive holding every
//! frame that was committed when the view was taken.
//!
//! Invariants this relies on (kept by `writer` and `repair`): bytes before
//! the end of the last committed entry never change while the file exists
//! under its name (appends go after it; an aborted frame or a repair
//! truncates only after it). So the copy needs no lock against a writer in
//! this process; the view (entries + end) just has to be taken between
//! frames, as [`CommittedView::of_index`] over a writer's shared index is.
//!
//! The copy is written under a temporary name beside the destination,
//! fsynced, then linked to the destination name, which must not exist (a
//! snapshot never replaces a file), and the directory is fsynced.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::copy::{Copier, CopyStats, TempFile};
use crate::error::Error;
use crate::index::{Entry, Index};
use crate::reader::{local_data_offset, read_tail};
use crate::scan::{scan, ScanReport};
use crate::zipfmt::*;

/// The committed part of an archive: its entries in file order and where the
/// last one ends.
#[derive(Debug, Clone, Default)]
pub struct CommittedView {
    pub entries: Vec<Entry>,
    pub end: u64,
}

impl CommittedView {
    /// The view of an index whose entries are all committed (a writer's
    /// shared index, read under its lock, or an [`Archive`](crate::Archive)'s).
    pub fn of_index(src: &File, index: &Index) -> Result<CommittedView, Error> {
        // Entries never overlap: the one that starts last ends last.
        let end = match index
            .entries()
            .iter()
            .max_by_key(|e| e.cd.local_header_offset)
        {
            Some(e) => entry_end(src, e)?,
            None => 0,
        };
        Ok(CommittedView {
            entries: index.entries().to_vec(),
            end,
        })
    }

    /// The size of a file holding this view and its central directory (what
    /// the archive measures once its writer writes the tail).
    pub fn closed_len(&self) -> u64 {
        let cds: Vec<CentralEntry> = self.entries.iter().map(|e| e.cd.clone()).collect();
        self.end + encode_tail(&cds, self.end).len() as u64
    }

    /// The view of a file as it is on disk: its central directory, or, when
    /// there is none (a writer is appending, or one was killed), every
    /// complete frame a recovery scan finds.
    pub fn read(src: &File) -> Result<(CommittedView, Option<ScanReport>), Error> {
        let len = src.metadata()?.len();
        match read_tail(src, len) {
            Ok((tail, entries)) => Ok((
                CommittedView {
                    entries,
                    end: tail.cd_offset,
                },
                None,
            )),
            Err(why) => {
                let rep = scan(src, len, why)?;
                Ok((
                    CommittedView {
                        entries: rep.entries.clone(),
                        end: rep.end,
                    },
                    Some(rep),
                ))
            }
        }
    }
}

/// Where an entry ends, its data descriptor (foreign entries only) included.
fn entry_end(file: &File, e: &Entry) -> Result<u64, Error> {
    let data = match e.data_offset {
        Some(d) => d,
        None => local_data_offset(file, e)?,
    };
    let end = data + e.cd.compressed_size;
    if e.cd.flags & GP_DATA_DESCRIPTOR == 0 {
        return Ok(end);
    }
    // The descriptor: optional signature, CRC-32, then both sizes in 4 or 8
    // bytes each. Pick the form whose fields match the entry.
    let mut d = [0u8; 24];
    let mut n = 0;
    while n < d.len() {
        match file.read_at(&mut d[n..], end + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    let sig = n >= 4 && rd32(&d, 0) == DESCRIPTOR_SIG;
    let o = if sig { 4 } else { 0 };
    let (c, u) = (e.cd.compressed_size, e.cd.uncompressed_size);
    let len = if n >= o + 4 && rd32(&d, o) == e.cd.crc32 {
        if n >= o + 20 && rd64(&d, o + 4) == c && rd64(&d, o + 12) == u {
            Some(o + 20)
        } else if n >= o + 12 && rd32(&d, o + 4) as u64 == c && rd32(&d, o + 8) as u64 == u {
            Some(o + 12)
        } else {
            None
        }
    } else {
        None
    };
    let len = len.ok_or_else(|| {
        Error::Corrupt(format!(
            "{}: no data descriptor where its data ends (offset {end})",
            e.name()
        ))
    })?;
    Ok(end + len as u64)
}

/// What a snapshot did.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries in the copy.
    pub entries: usize,
    /// Committed bytes copied (the copy is this plus its central directory).
    pub committed: u64,
    pub stats: CopyStats,
    /// A writer held the source (offline snapshots only).
    pub live: bool,
    /// The source had no valid central directory; what the scan found.
    pub recovered: Option<ScanReport>,
}

/// Copy the committed part `view` of `src` to a new file `dst` (module docs).
pub fn snapshot(src: &File, view: &CommittedView, dst: &Path) -> Result<Snapshot, Error> {
    if dst.exists() {
        return Err(Error::Invalid(format!(
            "{} exists: remove it or choose another name",
            dst.display()
        )));
    }
    for e in &view.entries {
        let end = e.cd.local_header_offset + LOCAL_HEADER_LEN as u64 + e.cd.compressed_size;
        if end > view.end {
            return Err(Error::Invalid(format!(
                "{}: entry ends past the committed end {}",
                e.name(),
                view.end
            )));
        }
    }
    let tmp = TempFile::create_beside(dst, "snapshot-tmp")?;
    let mut copier = Copier::new();
    copier.clone_prefix(src, &tmp.file, view.end).map_err(|e| {
        Error::Corrupt(format!(
            "copying the first {} bytes of the archive: {e}",
            view.end
        ))
    })?;
    let cds: Vec<CentralEntry> = view.entries.iter().map(|e| e.cd.clone()).collect();
    tmp.file
        .write_all_at(&encode_tail(&cds, view.end), view.end)?;
    // Check the copy against the view: entries' local headers where the
    // directory says (64 of them, spread evenly, the first and the last
    // among them: a reflinked copy is not in the page cache, and a check per
    // entry would read the disk once per entry). A source re-created or
    // truncated under us (not a writer appending, which is fine) fails here
    // instead of giving a broken copy.
    let n = view.entries.len();
    let step = n.div_ceil(64).max(1);
    let checked = (0..n).step_by(step).chain(n.checked_sub(1));
    for e in checked.map(|i| &view.entries[i]) {
        let mut h = vec![0u8; LOCAL_HEADER_LEN + e.cd.name.len()];
        tmp.file.read_exact_at(&mut h, e.cd.local_header_offset)?;
        if rd32(&h, 0) != LOCAL_SIG || &h[LOCAL_HEADER_LEN..] != e.cd.name.as_bytes() {
            return Err(Error::Corrupt(format!(
                "{}: not at offset {} of the copy: the archive changed while it was \
                 copied (was it re-created?); try again",
                e.name(),
                e.cd.local_header_offset
            )));
        }
    }
    tmp.persist_new(dst)?;
    Ok(Snapshot {
        entries: view.entries.len(),
        committed: view.end,
        stats: copier.stats,
        live: false,
        recovered: None,
    })
}

/// Snapshot the archive file `src` to `dst`, from outside any writer: when
/// no writer holds `src`, a shared lock keeps one from starting (or
/// repairing) during the copy; when a writer holds it (a running daemon),
/// the copy holds every frame committed on disk when it starts.
pub fn snapshot_path(src: &Path, dst: &Path) -> Result<Snapshot, Error> {
    let file = File::open(src)?;
    let live = match file.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    };
    let (view, recovered) = CommittedView::read(&file)?;
    let mut s = snapshot(&file, &view, dst)?;
    s.live = live;
    s.recovered = recovered;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Archive, ArchiveWriter, Compression, OpenMode};

    #[test]
    fn a_snapshot_of_an_open_writer_holds_its_committed_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        for f in 0..3 {
            let mut t = w.begin().unwrap();
            t.add(
                &format!("frames/{f}/x.u8.uni"),
                &vec![f as u8; 100_000],
                Compression::Stored,
            )
            .unwrap();
            t.commit().unwrap();
        }
        // An uncommitted frame is on its way: not in the snapshot.
        let shared = w.shared_index();
        let mut t = w.begin().unwrap();
        t.add("frames/3/x.u8.uni", &[3; 10], Compression::Stored)
            .unwrap();
        let src = File::open(&path).unwrap();
        let view = CommittedView::of_index(&src, &shared.read().unwrap()).unwrap();
        let dst = dir.path().join("b.zip");
        let s = snapshot(&src, &view, &dst).unwrap();
        assert_eq!(s.entries, 3);
        assert_eq!(s.stats.total(), s.committed);
        t.commit().unwrap();
        let a = Archive::open(&dst).unwrap();
        assert!(matches!(a.state(), crate::OpenState::Clean));
        assert_eq!(a.index().frames_under(None), ["0", "1", "2"]);
        assert_eq!(a.read("frames/2/x.u8.uni").unwrap(), vec![2u8; 100_000]);
        // Never over an existing file.
        let e = snapshot(&src, &view, &dst).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        drop(w);
        // Offline, of the closed file: all four frames.
        let dst2 = dir.path().join("c.zip");
        let s = snapshot_path(&path, &dst2).unwrap();
        assert!(!s.live && s.recovered.is_none());
        assert_eq!(
            Archive::open(&dst2).unwrap().index().frames_under(None),
            ["0", "1", "2", "3"]
        );
        // The three archives, and the first one's recovery checkpoint.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
        assert!(crate::checkpoint::sidecar_path(&path).exists());
    }
}
