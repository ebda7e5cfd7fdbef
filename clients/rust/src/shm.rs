//! Shared memory for tensor bytes: a sealed memfd that the daemon maps, so a
//! tensor reaches the daemon as one `memcpy` here and an `O_DIRECT` write
//! there, instead of going through the socket (a copy into the gRPC buffer,
//! the kernel's socket copies, and the daemon's copies out of them).
//!
//! Invariants a change must keep:
//! * The file is sealed against shrinking before it is offered. The daemon
//!   refuses any other file: one that shrank under its mapping would raise
//!   SIGBUS in the daemon.
//! * A span is written only between its allocation and the send of the
//!   commit it belongs to, and it is freed only when that commit is acked
//!   durable (the daemon has read and written the bytes) or the stream has
//!   ended. So the daemon never sees bytes change under a frame it is
//!   writing.
//! * Spans are allocated in commit order and durable acks arrive in commit
//!   order, so the spans form a ring: allocate at the tail, free from the
//!   head. When no span is live the next one starts at 0 again, so a writer
//!   that waits for each frame keeps one frame's worth of pages resident and
//!   warm, not the whole (sparse) region.
//! * Span offsets are multiples of [`ALIGN`], so the daemon can write whole
//!   blocks with `O_DIRECT` straight from these pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use memmap2::MmapMut;

/// Span alignment: a page, which is also a multiple of any block size the
/// daemon's `O_DIRECT` writes need.
pub(crate) const ALIGN: u64 = 4096;

/// `n` rounded up to [`ALIGN`].
pub(crate) fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// The memfd and this process's mapping of it.
pub(crate) struct Region {
    file: File,
    map: MmapMut,
}

impl Region {
    /// A sparse, sealed memfd of `size` bytes (no memory is used until a
    /// span is written).
    pub(crate) fn new(size: u64) -> io::Result<Region> {
        let file = memfd()?;
        file.set_len(size)?;
        // SAFETY: fcntl on a descriptor we own; F_ADD_SEALS takes an int.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the file is ours alone until offered, and sealed against
        // shrinking, so the mapping can never outlive its pages. The daemon
        // only reads it.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Region { file, map })
    }

    /// The descriptor to name in `OpenArchive.shm`.
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Copy `bytes` into the region at `at` (inside a span allocated by the
    /// ring, so in bounds).
    pub(crate) fn write(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

#[cfg(target_os = "linux")]
fn memfd() -> io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name and valid flags; on success we own the fd.
    let fd = unsafe {
        libc::memfd_create(
            c"gtar-logd-client".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn memfd() -> io::Result<File> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "shared memory needs Linux (memfd)",
    ))
}

/// The live spans of a region, oldest first: `(commit seq, start, end)`.
#[derive(Debug)]
pub(crate) struct Ring {
    size: u64,
    spans: VecDeque<(u64, u64, u64)>,
}

impl Ring {
    pub(crate) fn new(size: u64) -> Ring {
        Ring {
            size,
            spans: VecDeque::new(),
        }
    }

    /// The start of a free span of `n` bytes for commit `seq`, or `None` when
    /// there is no room (the frame then goes through the socket).
    pub(crate) fn alloc(&mut self, seq: u64, n: u64) -> Option<u64> {
        let at = match (self.spans.front(), self.spans.back()) {
            (Some(&(_, head, _)), Some(&(_, _, tail))) if tail > head => {
                // Free: [tail, size) and [0, head).
                if n <= self.size - tail {
                    Some(tail)
                } else if n <= head {
                    Some(0)
                } else {
                    None
                }
            }
            // Wrapped (or full): free is [tail, head).
            (Some(&(_, head, _)), Some(&(_, _, tail))) => (n <= head - tail).then_some(tail),
            _ => (n <= self.size).then_some(0),
        }?;
        // A zero-byte span would make head == tail ambiguous: nothing to hold.
        if n > 0 {
            self.spans.push_back((seq, at, at + n));
        }
        Some(at)
    }

    /// Commit `seq` is durable: free its span and any older ones.
    pub(crate) fn free_through(&mut self, seq: u64) {
        while self.spans.front().is_some_and(|&(s, _, _)| s <= seq) {
            self.spans.pop_front();
        }
    }

    /// No span is live.
    pub(crate) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Bytes held by live spans.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.spans.iter().map(|&(_, a, b)| b - a).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_sealed_against_shrinking_and_writable() {
        let mut r = Region::new(3 * ALIGN).unwrap();
        r.write(ALIGN, b"hello");
        assert_eq!(&r.map[ALIGN as usize..ALIGN as usize + 5], b"hello");
        // SAFETY: F_GET_SEALS on our own descriptor.
        let seals = unsafe { libc::fcntl(r.fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        let e = r.file.set_len(ALIGN).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert_eq!(r.size(), 3 * ALIGN);
    }

    #[test]
    fn align_rounds_up_to_pages() {
        assert_eq!(align(0), 0);
        assert_eq!(align(1), ALIGN);
        assert_eq!(align(ALIGN), ALIGN);
        assert_eq!(align(ALIGN + 1), 2 * ALIGN);
    }

    #[test]
    fn ring_reuses_the_start_once_empty_and_wraps() {
        let mut r = Ring::new(10);
        assert_eq!(r.alloc(0, 4), Some(0));
        assert_eq!(r.alloc(1, 4), Some(4));
        assert_eq!(
            r.alloc(2, 4),
            None,
            "only 2 left at the end, 0 at the start"
        );
        r.free_through(0);
        assert_eq!(r.alloc(2, 4), Some(0), "wraps to the freed start");
        assert_eq!(r.alloc(3, 1), None, "wrapped: free is [4, 4)");
        r.free_through(1);
        assert_eq!(r.alloc(3, 6), Some(4));
        r.free_through(3);
        assert_eq!(r.used(), 0);
        assert_eq!(r.alloc(4, 10), Some(0), "empty ring starts at 0 again");
        assert_eq!(r.alloc(5, 11), None, "bigger than the region");
        assert_eq!(r.alloc(5, 0), Some(10), "nothing to hold still fits");
    }

    /// Random allocations and in-order frees never hand out overlapping or
    /// out-of-bounds spans, and a free ring always has room for a whole-size
    /// span.
    #[test]
    fn ring_spans_never_overlap() {
        let size = 1000;
        let mut r = Ring::new(size);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut seq, mut durable) = (0u64, 0u64);
        for _ in 0..20_000 {
            if next() % 3 == 0 && durable < seq {
                r.free_through(durable);
                durable += 1;
            } else {
                let n = 1 + next() % 400;
                if let Some(at) = r.alloc(seq, n) {
                    assert!(at + n <= size);
                    for &(s, a, b) in r.spans.iter().filter(|sp| sp.0 != seq) {
                        assert!(
                            at + n <= a || b <= at,
                            "{at}+{n} overlaps span {s}: {a}..{b}"
                        );
                    }
                }
                seq += 1;
            }
        }
        r.free_through(seq);
        assert_eq!(r.alloc(seq, size), Some(0));
    }
}
