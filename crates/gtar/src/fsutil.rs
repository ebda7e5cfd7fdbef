//! The two file-system primitives crash safety leans on, in one place.

use std::fs::File;
use std::path::Path;

use crate::error::Error;

/// Exclusive advisory lock so two writers (or a writer and a repair) never
/// interleave in one file. Never blocks: a held lock is [`Error::Locked`].
pub(crate) fn lock_exclusive(file: &File) -> Result<(), Error> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// fsync the directory holding `path`, so a file just created (or renamed
/// into place) survives a crash along with its contents.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()?;
    Ok(())
}

/// Whether a writer holds `path` open for appending right now (our writers
/// hold an exclusive `flock` for as long as they live). An archive being
/// written has no central directory between bursts, and that is not damage.
pub fn is_being_written(path: &Path) -> Result<bool, Error> {
    let file = File::open(path)?;
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}
