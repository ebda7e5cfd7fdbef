//! Attaching a client's shared memory region to a Write stream, so tensor
//! bytes skip gRPC and the socket (`OpenArchive.shm`, `ShmChunk`).
//!
//! Invariants:
//! * The region is opened only through the peer's own descriptor table,
//!   `/proc/<pid>/fd/<fd>`, with the pid from the socket's peer credentials
//!   (never from the message). The kernel decides whether the daemon may
//!   open it, which in practice means "same user"; a daemon of another
//!   user is refused and the client falls back to `chunk`s.
//! * The file must be a regular file owned by the peer's uid, so a client
//!   can only hand over bytes it could read itself (not, say, a file it
//!   holds open write-only that the daemon's user may read).
//! * It is only ever read with `pread` (see `writer::shm_read`), never
//!   mapped: a client that shrinks it costs its own frame, not a SIGBUS.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use tokio::net::unix::UCred;

use crate::proto::v1::SharedMemory;

/// An attached region: the client's file and the size it declared.
pub struct Region {
    pub file: Arc<File>,
    pub size: u64,
}

/// Open the region a client offers; `Err` says why not, for `Opened.shm_refused`.
pub fn attach(peer: Option<UCred>, req: &SharedMemory) -> Result<Region, String> {
    let peer = peer.ok_or("shared memory needs the Unix socket")?;
    let pid = peer
        .pid()
        .ok_or("the client's pid is not known from the socket")?;
    if req.size == 0 {
        return Err("shm.size must be more than 0".into());
    }
    let path = format!("/proc/{pid}/fd/{}", req.fd);
    let file = File::open(&path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => " (does the daemon run as another user?)",
            std::io::ErrorKind::NotFound => " (is the descriptor open in the client?)",
            _ if e.raw_os_error() == Some(libc::ENXIO) => " (a socket, not a memory file)",
            _ => "",
        };
        format!(
            "cannot open the client's descriptor {}: {path}: {e}{hint}",
            req.fd
        )
    })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {path}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("descriptor {} is not a regular file", req.fd));
    }
    if meta.uid() != peer.uid() {
        return Err(format!(
            "descriptor {} belongs to uid {}, not to the client's uid {}",
            req.fd,
            meta.uid(),
            peer.uid()
        ));
    }
    if meta.len() < req.size {
        return Err(format!(
            "descriptor {} is {} bytes, less than shm.size {}",
            req.fd,
            meta.len(),
            req.size
        ));
    }
    Ok(Region {
        file: Arc::new(file),
        size: req.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn me() -> UCred {
        // A socket pair's peer is this process: real credentials, as the
        // server gets them.
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        a.peer_cred().unwrap()
    }

    fn memfd(len: u64) -> File {
        let fd = unsafe { libc::memfd_create(c"gtar-logd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[tokio::test]
    async fn attaches_a_memfd_of_the_peer_and_reads_it() {
        use std::os::unix::fs::FileExt;
        let f = memfd(1 << 20);
        f.write_all_at(b"hello", 4096).unwrap();
        let r = attach(
            Some(me()),
            &SharedMemory {
                fd: f.as_raw_fd() as u32,
                size: 1 << 20,
            },
        )
        .unwrap();
        let mut buf = [0; 5];
        r.file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn refusals_say_why() {
        let f = memfd(4096);
        let fd = f.as_raw_fd() as u32;
        let why = |peer, fd, size| attach(peer, &SharedMemory { fd, size }).err().unwrap();
        assert!(why(None, fd, 4096).contains("Unix socket"));
        assert!(why(Some(me()), fd, 0).contains("more than 0"));
        assert!(why(Some(me()), fd, 8192).contains("less than shm.size"));
        assert!(why(Some(me()), 999_999, 4096).contains("is the descriptor open"));
        let dir = std::fs::File::open("/").unwrap();
        let d = dir.as_raw_fd() as u32;
        assert!(why(Some(me()), d, 1).contains("not a regular file"));
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
}
