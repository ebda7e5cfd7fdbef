//! The offline commands: they work on an archive file directly, no daemon.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use gtar::{Archive, OpenState};

/// A remote archive `s3://BUCKET/KEY` (KEY: the prefix and the archive's
/// name, as `serve --remote s3://BUCKET/PREFIX` wrote it), with the runtime
/// its reads block on.
struct RemoteArchive {
    _rt: tokio::runtime::Runtime,
    remote: crate::remote::Remote,
    name: String,
}

fn remote(arg: &str) -> Result<Option<RemoteArchive>> {
    if !arg.starts_with("s3://") {
        return Ok(None);
    }
    let url: crate::remote::RemoteUrl = arg.parse()?;
    if url.prefix.is_empty() {
        anyhow::bail!("{arg}: give the archive's key, s3://BUCKET/PREFIX/NAME");
    }
    // A worker thread of its own: reads block on the runtime from this one.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let name = url.prefix.clone();
    let at = crate::remote::RemoteUrl {
        bucket: url.bucket,
        prefix: String::new(),
    };
    let remote = crate::remote::Remote::from_env(at, rt.handle().clone())?;
    Ok(Some(RemoteArchive {
        _rt: rt,
        remote,
        name,
    }))
}

/// The file an offline command works on. Offline commands take file paths;
/// a relative path that is not a file here but is an archive of the user's
/// daemon (under the default data directory) is taken from there, with a
/// note; otherwise the error says where the daemon's archives are.
/// `s3://` keys pass through.
pub fn locate(arg: &Path) -> Result<std::path::PathBuf> {
    let s = arg.to_string_lossy();
    if s.starts_with("s3://") || arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let data = crate::daemon::default_data_dir();
    if arg.is_relative() {
        let there = data.join(arg);
        if there.is_file() {
            let _ = writeln!(
                std::io::stderr(),
                "note: {s} is not a file here; using the daemon's archive {}",
                there.display()
            );
            return Ok(there);
        }
    }
    anyhow::bail!(
        "{s}: no such file. Offline commands take archive file paths, not the names a daemon \
         serves; your daemon's archives are files under {} (its --data-dir), e.g. {}",
        data.display(),
        data.join(arg).display()
    )
}

fn open(path: &Path) -> Result<Archive> {
    if let Some(r) = remote(&path.to_string_lossy())? {
        let (a, _) = r.remote.open_read(&r.name)?;
        return Ok(a);
    }
    open_file(path)
}

/// Open an archive file for reading, saying on stderr what recovery found:
/// a note for an archive a live writer holds (no central directory while it
/// appends: not damage), a warning for a damaged one.
pub fn open_file(path: &Path) -> Result<Archive> {
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

/// `gtar-logd fetch s3://BUCKET/KEY LOCAL.zip`: materialize a remote archive
/// as one zip file (progress on a terminal, quiet in scripts).
pub fn fetch(src: &str, dst: &Path, out: &mut dyn Write) -> Result<()> {
    let r = remote(src)?.ok_or_else(|| anyhow::anyhow!("{src}: expected s3://BUCKET/KEY"))?;
    let mut bar: Option<crate::lifecycle::progress::Progress> = None;
    let m = r.remote.fetch_blocking(&r.name, dst, &mut |done, total| {
        bar.get_or_insert_with(|| crate::lifecycle::progress::Progress::bytes(total, "fetch"))
            .set(done)
    })?;
    drop(bar);
    writeln!(
        out,
        "{src}: {} entries, {} bytes -> {}",
        m.entries.len(),
        m.size(),
        dst.display()
    )?;
    Ok(())
}
