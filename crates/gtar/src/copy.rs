//! Copying byte ranges between files, and replacing a file atomically.
//!
//! Ranges are copied by the kernel where it can: `FICLONERANGE` (a reflink:
//! the copy shares the source's extents, no data is written) when asked for
//! and the file system has it, else `copy_file_range` (an in-kernel copy,
//! which XFS, btrfs and NFS may also turn into sharing or a server-side
//! copy), else positional reads and writes through a buffer.
//!
//! Invariants:
//! * a copy either copies exactly the requested range or returns an error; a
//!   source that ends early is an error (`UnexpectedEof`), never a short file;
//! * a [`TempFile`] is removed when dropped unless it was persisted, and it is
//!   persisted as write → fsync the file → rename (or link) → fsync the
//!   directory, so after a crash the final name holds either nothing new or
//!   the complete file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::fsutil::sync_parent_dir;

/// How the bytes of a copy were moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes shared with the source by a reflink (no data written).
    pub reflinked: u64,
    /// Bytes copied in the kernel (`copy_file_range`).
    pub kernel: u64,
    /// Bytes copied through a buffer in this process.
    pub buffered: u64,
}

impl CopyStats {
    pub fn total(&self) -> u64 {
        self.reflinked + self.kernel + self.buffered
    }
}

/// Copies ranges from one file to another, remembering what the kernel
/// refused so that a file system without `copy_file_range` (or a copy across
/// file systems on an old kernel) costs one failed call, not one per range.
pub(crate) struct Copier {
    kernel_ok: bool,
    buf: Vec<u8>,
    pub stats: CopyStats,
}

const BUF: usize = 1 << 20;

impl Copier {
    pub fn new() -> Copier {
        Copier {
            kernel_ok: true,
            buf: Vec::new(),
            stats: CopyStats::default(),
        }
    }

    /// Copy `len` bytes at `src_off` of `src` to `dst_off` of `dst`.
    pub fn copy(
        &mut self,
        src: &File,
        src_off: u64,
        dst: &File,
        dst_off: u64,
        len: u64,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while self.kernel_ok && done < len {
            let mut so = (src_off + done) as libc::loff_t;
            let mut d = (dst_off + done) as libc::loff_t;
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the life of the borrows;
            // the offsets are passed by pointer to locals the call updates.
            let n = unsafe {
                libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, want, 0)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not supported here (old kernel, cross-device, special
                    // file system): copy through a buffer from now on.
                    Some(libc::ENOSYS | libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL)
                        if done == 0 =>
                    {
                        self.kernel_ok = false;
                    }
                    _ => return Err(e),
                }
            } else if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the source ends before offset {}", src_off + len),
                ));
            } else {
                done += n as u64;
                self.stats.kernel += n as u64;
            }
        }
        if done < len {
            self.copy_buffered(src, src_off + done, dst, dst_off + done, len - done)?;
        }
        Ok(())
    }

    fn copy_buffered(
        &mut self,
        src: &File,
        src_off: u64,
        dst: &File,
        dst_off: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; BUF];
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BUF as u64) as usize;
            src.read_exact_at(&mut self.buf[..n], src_off + done)?;
            dst.write_all_at(&self.buf[..n], dst_off + done)?;
            done += n as u64;
            self.stats.buffered += n as u64;
        }
        Ok(())
    }

    /// Copy `[0, len)` of `src` to the start of `dst` (an empty file),
    /// sharing extents with a reflink where the file system can: whole
    /// blocks are cloned, the partial block at the end is copied.
    pub fn clone_prefix(&mut self, src: &File, dst: &File, len: u64) -> io::Result<()> {
        let block = block_size(src)?.max(1);
        let whole = len / block * block;
        let mut from = 0;
        if whole > 0 {
            let arg = libc::file_clone_range {
                src_fd: src.as_raw_fd() as i64,
                src_offset: 0,
                src_length: whole,
                dest_offset: 0,
            };
            // SAFETY: FICLONERANGE reads the struct we pass; both descriptors
            // are open. It fails without side effects where unsupported.
            let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) };
            if r == 0 {
                self.stats.reflinked += whole;
                from = whole;
            } else {
                let e = io::Error::last_os_error();
                tracing::debug!("no reflink ({e}); copying");
            }
        }
        self.copy(src, from, dst, from, len - from)
    }
}

fn block_size(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(f.metadata()?.blksize())
}

/// A file being written under a temporary name next to its final one.
#[derive(Debug)]
pub(crate) struct TempFile {
    pub path: PathBuf,
    pub file: File,
    done: bool,
}

impl TempFile {
    /// Create `path` afresh (read + write), replacing a leftover of that name.
    /// Only for names that a lock the caller holds makes exclusive.
    pub fn create_replacing(path: PathBuf) -> Result<TempFile, Error> {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!("removed {}, left by an interrupted run", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Self::create_new(path)
    }

    /// A new file with a unique name `.{final name}.{tag}-{pid}-{n}` beside
    /// `final_path`.
    pub fn create_beside(final_path: &Path, tag: &str) -> Result<TempFile, Error> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        for _ in 0..100 {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = beside(final_path, &format!("{tag}-{}-{n}", std::process::id()));
            match Self::create_new(p) {
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                r => return r,
            }
        }
        Err(Error::Invalid(format!(
            "cannot find a free temporary name beside {}",
            final_path.display()
        )))
    }

    fn create_new(path: PathBuf) -> Result<TempFile, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            path,
            file,
            done: false,
        })
    }

    /// fsync, rename over `final_path`, fsync the directory.
    pub fn persist_replacing(mut self, final_path: &Path) -> Result<(), Error> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, final_path)?;
        self.done = true;
        sync_parent_dir(final_path)
    }

    /// fsync, then give the file the name `final_path` unless that name is
    /// taken (an atomic hard link: a file created meanwhile is never
    /// replaced), remove the temporary name, fsync the directory.
    pub fn persist_new(mut self, final_path: &Path) -> Result<(), Error> {
        self.file.sync_all()?;
        std::fs::hard_link(&self.path, final_path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::Invalid(format!(
                    "{} exists: remove it or choose another name",
                    final_path.display()
                ))
            } else {
                e.into()
            }
        })?;
        // From here the final name holds the complete file; the temporary
        // name is only an extra link.
        let _ = std::fs::remove_file(&self.path);
        self.done = true;
        sync_parent_dir(final_path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `.{name of path}.{suffix}` in the directory of `path`.
pub(crate) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    path.with_file_name(format!(".{name}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_exactly_and_fails_on_a_short_source() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let src_p = dir.path().join("s");
        std::fs::write(&src_p, &data).unwrap();
        let src = File::open(&src_p).unwrap();
        for kernel in [true, false] {
            let dst_p = dir.path().join(format!("d{kernel}"));
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&dst_p)
                .unwrap();
            let mut c = Copier::new();
            c.kernel_ok = kernel;
            c.copy(&src, 5, &dst, 100, 2_500_000).unwrap();
            let got = std::fs::read(&dst_p).unwrap();
            assert_eq!(got.len(), 2_500_100);
            assert!(got[100..] == data[5..2_500_005]);
            assert_eq!(c.stats.total(), 2_500_000);
            let err = c.copy(&src, 2_999_000, &dst, 0, 2000).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        }
        let dst_p = dir.path().join("clone");
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst_p)
            .unwrap();
        let mut c = Copier::new();
        c.clone_prefix(&src, &dst, 1_234_567).unwrap();
        assert!(std::fs::read(&dst_p).unwrap() == data[..1_234_567]);
    }

    #[test]
    fn temp_files_vanish_unless_persisted_and_never_replace_when_asked_not_to() {
        let dir = tempfile::tempdir().unwrap();
        let fin = dir.path().join("a.zip");
        let t = TempFile::create_beside(&fin, "x").unwrap();
        let p = t.path.clone();
        assert!(p.exists());
        drop(t);
        assert!(!p.exists());
        std::fs::write(&fin, b"old").unwrap();
        let t = TempFile::create_beside(&fin, "x").unwrap();
        t.file.write_all_at(b"new", 0).unwrap();
        let p = t.path.clone();
        let err = t.persist_new(&fin).unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        assert!(!p.exists());
        assert_eq!(std::fs::read(&fin).unwrap(), b"old");
        let t = TempFile::create_replacing(beside(&fin, "y")).unwrap();
        t.file.write_all_at(b"new", 0).unwrap();
        t.persist_replacing(&fin).unwrap();
        assert_eq!(std::fs::read(&fin).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
