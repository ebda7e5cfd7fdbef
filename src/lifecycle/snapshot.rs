//! `gtar-logd snapshot SRC DST`: a consistent copy of an archive file.
//!
//! The copy is made by [`gtar::snapshot_path`]: the committed prefix of SRC
//! (cloned with a reflink where the file system has one) and a fresh central
//! directory, written beside DST and linked into place, never over an
//! existing file. SRC may be open for writing by a daemon: the copy then
//! holds every frame committed on disk when it starts.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Run `gtar-logd snapshot`, printing a summary to `out`.
pub fn snapshot(src: &Path, dst: &Path, out: &mut dyn Write) -> Result<gtar::Snapshot> {
    let s = gtar::snapshot_path(src, dst)
        .with_context(|| format!("snapshot of {} to {}", src.display(), dst.display()))?;
    if let Some(rep) = &s.recovered {
        eprintln!(
            "note: {} has no valid central directory ({}){}; the snapshot holds the {} complete \
             entries a recovery scan finds",
            src.display(),
            rep.reason,
            if s.live {
                ": a writer is appending"
            } else {
                ""
            },
            rep.entries.len()
        );
    } else if s.live {
        eprintln!(
            "note: {} is open for writing: the snapshot holds what was committed when it started",
            src.display()
        );
    }
    let st = s.stats;
    writeln!(
        out,
        "{} -> {}: {} entries, {} bytes committed ({} reflinked, {} copied)",
        src.display(),
        dst.display(),
        s.entries,
        s.committed,
        st.reflinked,
        st.kernel + st.buffered
    )?;
    Ok(s)
}
