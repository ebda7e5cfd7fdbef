//! Repair in place: make a file whose central directory is missing or torn a
//! valid zip64 archive again, keeping every complete frame (see [`scan`] for
//! what "complete" means) and dropping the torn tail.
//!
//! This is a write: it takes the writer's exclusive lock, so it never runs
//! beside a live [`ArchiveWriter`](crate::ArchiveWriter), and it fsyncs before
//! it returns. It lives on the writer side of the crate (the reader only ever
//! recovers in memory), which keeps the module graph acyclic:
//! `reader → checkpoint → scan`, `repair → reader, checkpoint, scan, fsutil`,
//! `writer → repair, …`. A repair reads the archive's recovery checkpoint
//! (it scans only what follows it) and starts a new one for the repaired file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::checkpoint::{recover, Checkpoints};
use crate::error::Error;
use crate::fsutil::lock_exclusive;
use crate::reader::read_tail;
use crate::scan::ScanReport;
use crate::zipfmt::{encode_tail, CentralEntry};

/// Repair `path` in place if its central directory is missing or invalid:
/// keep every complete frame, drop the torn tail, write a new central
/// directory and fsync. Returns `None` if the archive was already valid.
pub fn repair(path: &Path) -> Result<Option<ScanReport>, Error> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    lock_exclusive(&file)?;
    let len = file.metadata()?.len();
    match read_tail(&file, len) {
        Ok(_) => Ok(None),
        Err(why) => {
            let rep = recover(&file, path, len, why)?;
            write_repaired(&file, &rep)?;
            Checkpoints::start(&file, path, &rep.entries, rep.end);
            Ok(Some(rep))
        }
    }
}

/// Truncate to the end of the kept entries, write a tail, fsync.
pub(crate) fn write_repaired(file: &File, rep: &ScanReport) -> Result<(), Error> {
    file.set_len(rep.end)?;
    let cds: Vec<CentralEntry> = rep.entries.iter().map(|e| e.cd.clone()).collect();
    let tail = encode_tail(&cds, rep.end);
    file.write_all_at(&tail, rep.end)?;
    file.sync_all()?;
    Ok(())
}
