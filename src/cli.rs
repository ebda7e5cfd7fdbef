//! The offline commands: they work on an archive file directly, no daemon.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use gtar::{Archive, OpenState};

fn open(path: &Path) -> Result<Archive> {
    let a =
        Archive::open(path).with_context(|| format!("{}: cannot open archive", path.display()))?;
    if let OpenState::Recovered(rep) = a.state() {
        if gtar::is_being_written(path).unwrap_or(false) {
            // Not damage: a live writer removes the central directory while
            // it appends and writes it again when the archive goes idle.
            eprintln!(
                "note: {}: being written by a running gtar-logd (or another writer); showing its {} complete entries as of now",
                path.display(),
                rep.entries.len()
            );
        } else {
            eprintln!(
                "warning: {}: {}; showing the {} complete entries (run `gtar-logd repair` to fix the file)",
                path.display(),
                rep.reason,
                rep.entries.len()
            );
        }
    }
    Ok(a)
}

/// `gtar-logd frames ARCHIVE [--group G]`: one frame index a line, GETAR order.
pub fn frames(path: &Path, group: Option<&str>, out: &mut dyn Write) -> Result<()> {
    let a = open(path)?;
    let frames = a.index().frames_under(group);
    if frames.is_empty() {
        if let Some(g) = group {
            let ix = a.index();
            if !ix
                .record_types()
                .any(|rt| gtar::group_under(&rt.group, Some(g)))
            {
                anyhow::bail!("{}: no group {g:?} in this archive", path.display());
            }
        }
    }
    for f in frames {
        writeln!(out, "{f}")?;
    }
    Ok(())
}

/// `gtar-logd ls ARCHIVE`: record types with their frame counts.
pub fn ls(path: &Path, out: &mut dyn Write) -> Result<()> {
    let a = open(path)?;
    let ix = a.index();
    for rt in ix.record_types() {
        writeln!(
            out,
            "{:<10}  {:>8}  {}",
            rt.behavior.name(),
            ix.frame_count(rt),
            rt.pattern()
        )?;
    }
    Ok(())
}

/// `gtar-logd repair ARCHIVE`: repair in place, say what was kept and dropped.
pub fn repair(path: &Path, out: &mut dyn Write) -> Result<()> {
    match gtar::repair(path).with_context(|| format!("{}: cannot repair", path.display()))? {
        None => writeln!(out, "{}: valid, nothing to repair", path.display())?,
        Some(rep) => {
            writeln!(out, "{}: repaired ({})", path.display(), rep.reason)?;
            writeln!(
                out,
                "kept {} entries ({} complete gtar-logd commits: frames, and records written on their own), {} bytes",
                rep.entries.len(),
                rep.txns_kept,
                rep.end
            )?;
            writeln!(
                out,
                "dropped {} entries of an unfinished frame, {} bytes of torn tail{}",
                rep.entries_dropped,
                rep.bytes_dropped,
                if rep.stopped.is_empty() {
                    String::new()
                } else {
                    format!(" (stopped at: {})", rep.stopped)
                }
            )?;
        }
    }
    Ok(())
}
