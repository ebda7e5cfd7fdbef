//! Client shared memory regions: tensor bytes passed in a client's memfd
//! instead of through gRPC and the socket (`OpenArchive.shm`, `ShmChunk`).
//!
//! Invariants:
//! * A region is opened only through the peer's own descriptor table,
//!   `/proc/<pid>/fd/<fd>`, with the pid from the socket's peer credentials
//!   (never from the message). The kernel decides whether the daemon may
//!   open it, which in practice means "same user"; a daemon of another
//!   user is refused and the client falls back to `chunk`s.
//! * The file must be a regular file owned by the peer's uid, so a client
//!   can only hand over bytes it could read itself (not, say, a file it
//!   holds open write-only that the daemon's user may read).
//! * It must be sealed against shrinking (`F_SEAL_SHRINK`, a memfd made
//!   with `MFD_ALLOW_SEALING`) before it is mapped: a mapping of a file
//!   that shrinks faults with SIGBUS, which would kill the whole daemon.
//! * Nothing here blocks on what the client offers: the descriptor is opened
//!   `O_NONBLOCK` (a FIFO's open would otherwise wait for a writer forever)
//!   and anything but a regular file is refused right after `fstat`, before
//!   any read or map. [`attach`] does file-system calls: run it off the
//!   async workers.
//! * The mapping is only lent as a slice for one call, through
//!   [`Region::with_bytes`] (CRC, then a direct write from it, or a copy
//!   into a compression buffer). The client promises not to write
//!   those bytes until the frame is durable; if it does anyway, the bytes are
//!   plain data with no invariant to break: its own frame may end up with a
//!   CRC that does not match (readers report it), nothing else is touched.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use tokio::net::unix::UCred;

/// An attached region: the client's file, mapped read-only.
pub struct Region {
    map: memmap2::Mmap,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({} bytes)", self.size())
    }
}

impl Region {
    /// Bytes of the region; every range read lies inside it.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether `[offset, offset + len)` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// Lend the bytes at `[offset, offset + len)` to `f` for the duration of
    /// the call, without copying them.
    ///
    /// # Panics
    /// If the range is not inside the region (callers check [`Region::contains`]).
    pub fn with_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        assert!(self.contains(offset, len), "range outside the region");
        // SAFETY: in bounds of a mapping that lives as long as `self` and
        // cannot fault (sealed against shrinking, at least `size` long). The
        // client may write to it only in breach of the protocol; those are
        // plain bytes either way (see the module docs).
        let bytes = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len as usize)
        };
        f(bytes)
    }
}

/// Open and map the region of `size` bytes a client offers as its
/// descriptor `fd`; `Err` says why not, for `Opened.shm_refused`.
pub fn attach(peer: Option<UCred>, fd: u32, size: u64) -> Result<Region, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let peer = peer.ok_or("shared memory needs the Unix socket")?;
    let pid = peer
        .pid()
        .ok_or("the client's pid is not known from the socket")?;
    if size == 0 {
        return Err("shm.size must be more than 0".into());
    }
    let map_len = usize::try_from(size).map_err(|_| "shm.size is too large".to_string())?;
    let path = format!("/proc/{pid}/fd/{fd}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => " (does the daemon run as another user?)",
                std::io::ErrorKind::NotFound => " (is the descriptor open in the client?)",
                _ if e.raw_os_error() == Some(libc::ENXIO) => " (a socket, not a memory file)",
                _ => "",
            };
            format!("cannot open the client's descriptor {fd}: {path}: {e}{hint}")
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {path}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("descriptor {} is not a regular file", fd));
    }
    if meta.uid() != peer.uid() {
        return Err(format!(
            "descriptor {} belongs to uid {}, not to the client's uid {}",
            fd,
            meta.uid(),
            peer.uid()
        ));
    }
    // SAFETY: fcntl on a descriptor we own; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(format!(
            "descriptor {} is not sealed against shrinking (a memfd made with \
             MFD_ALLOW_SEALING, then F_ADD_SEALS F_SEAL_SHRINK)",
            fd
        ));
    }
    if meta.len() < size {
        return Err(format!(
            "descriptor {} is {} bytes, less than shm.size {}",
            fd,
            meta.len(),
            size
        ));
    }
    // SAFETY: the file cannot shrink (sealed, checked above) and is at least
    // `size` long, so no access inside the mapping faults; it is only read
    // through `with_bytes`.
    let map = unsafe { memmap2::MmapOptions::new().len(map_len).map(&file) }
        .map_err(|e| format!("cannot map descriptor {}: {e}", fd))?;
    Ok(Region { map })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;

    fn me() -> UCred {
        // A socket pair's peer is this process: real credentials, as the
        // server gets them.
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        a.peer_cred().unwrap()
    }

    fn memfd(len: u64, seal: bool) -> File {
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        let fd = unsafe { libc::memfd_create(c"gtar-logd-test".as_ptr(), flags) };
        assert!(fd >= 0);
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            assert_eq!(
                unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
                0
            );
        }
        f
    }

    #[tokio::test]
    async fn attaches_a_memfd_of_the_peer_and_reads_it() {
        use std::os::unix::fs::FileExt;
        let f = memfd(1 << 20, true);
        f.write_all_at(b"hello", 4096).unwrap();
        let r = attach(Some(me()), f.as_raw_fd() as u32, 1 << 20).unwrap();
        r.with_bytes(4096, 5, |b| assert_eq!(b, b"hello"));
        // Written after attaching: seen (it is the same memory).
        f.write_all_at(b"later", 4096 + 5).unwrap();
        r.with_bytes(4096 + 5, 5, |b| assert_eq!(b, b"later"));
        assert!(r.contains(0, 1 << 20) && !r.contains(1, 1 << 20));
        assert!(!r.contains(u64::MAX, 2));
        // Sealed: the client cannot shrink it under the mapping.
        assert!(f.set_len(4096).is_err());
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let f = memfd(4096, true);
        let fd = f.as_raw_fd() as u32;
        let why = |peer, fd, size| attach(peer, fd, size).err().unwrap();
        assert!(why(None, fd, 4096).contains("Unix socket"));
        assert!(why(Some(me()), fd, 0).contains("more than 0"));
        assert!(why(Some(me()), fd, 8192).contains("less than shm.size"));
        assert!(why(Some(me()), 999_999, 4096).contains("is the descriptor open"));
        let dir = std::fs::File::open("/").unwrap();
        let d = dir.as_raw_fd() as u32;
        assert!(why(Some(me()), d, 1).contains("not a regular file"));
        let unsealed = memfd(4096, false);
        let u = unsealed.as_raw_fd() as u32;
        assert!(why(Some(me()), u, 4096).contains("not sealed"));
        // A file of another user: root's, or as root one given to nobody.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let (other, owner) = if me().uid() == 0 {
            std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
            (File::open(tmp.path()).unwrap(), 65534)
        } else {
            (File::open("/etc/passwd").unwrap(), 0)
        };
        let o = other.as_raw_fd() as u32;
        let msg = why(Some(me()), o, 1);
        assert!(msg.contains(&format!("belongs to uid {owner}")), "{msg}");
    }

    /// A FIFO with no writer, a character device: refused at once (opening
    /// the FIFO without O_NONBLOCK would wait for a writer forever).
    #[tokio::test]
    async fn descriptors_that_could_block_are_refused_at_once() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let zero = File::open("/dev/zero").unwrap();
        for f in [&held, &zero] {
            let t = std::time::Instant::now();
            let err = attach(Some(me()), f.as_raw_fd() as u32, 4096)
                .err()
                .unwrap();
            assert!(err.contains("not a regular file"), "{err}");
            assert!(t.elapsed() < std::time::Duration::from_secs(1));
        }
    }
}
