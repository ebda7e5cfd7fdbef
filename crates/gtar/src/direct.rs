//! The `O_DIRECT` engine under [`ArchiveWriter`](crate::ArchiveWriter): the
//! data blocks of large entries go to the device from reused, aligned
//! staging buffers (or straight from the caller's aligned memory) instead of
//! through fresh page-cache pages. See the writer's module docs for why.
//!
//! Invariants:
//! * Only whole, aligned blocks are written direct; the caller writes every
//!   header and each entry's last partial block through the page cache, and
//!   the two never touch the same block (the kernel keeps the page cache
//!   coherent with direct writes).
//! * Writes go out in file order from one I/O thread, up to
//!   [`DIRECT_STAGES`] − 1 stages queued or in flight while the caller fills
//!   the next; [`DirectIo::end`] and [`DirectIo::drain_quietly`] return only
//!   when none is, so nothing is committed or truncated under a write. The
//!   first failed write is reported by the next call that waits for a stage
//!   (and by `end`), never lost.
//! * A file system that refuses `O_DIRECT` (EINVAL) is detected at the first
//!   write, which then goes through the page cache, and so does every later
//!   one: the engine degrades, it never fails for that.
//! * Durability is not this module's business: the writer's fsync is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Entries at least this large go through direct I/O when it is enabled.
pub(crate) const DIRECT_MIN: u64 = 1 << 20;
/// Alignment of direct I/O offsets, lengths and memory: 4 KiB suits every
/// common logical block size (512 or 4096).
pub(crate) const DIRECT_ALIGN: usize = 4096;
/// Size of the staging buffer, i.e. of one direct write.
pub(crate) const DIRECT_STAGE: usize = 4 << 20;
/// Staging buffers per writer (allocated as they are first needed). With
/// two (double buffering) the device idled whenever the thread filling them
/// was descheduled or waited for the network for longer than one write: the
/// stage it was filling was the only one not in flight. With four, the I/O
/// thread has up to three written stages queued, 12 MiB of slack, so the
/// disk keeps writing through such hiccups. 16 MiB per writer of large
/// entries, well inside the daemon's memory bound.
pub(crate) const DIRECT_STAGES: usize = 4;

/// One aligned staging buffer: `DIRECT_STAGE` bytes starting at `off` in a
/// plain `Vec` with one page of slack, sliced at its first aligned address
/// (no unsafe code, no custom allocation). Allocated on first use, so a
/// writer that never sees a large entry costs no memory for it.
struct Stage {
    buf: Vec<u8>,
    off: usize,
}

impl Stage {
    fn new() -> Stage {
        Stage {
            buf: Vec::new(),
            off: 0,
        }
    }

    /// The staged bytes (empty if never filled).
    fn bytes(&self) -> &[u8] {
        self.buf
            .get(self.off..self.off + DIRECT_STAGE)
            .unwrap_or(&[])
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0u8; DIRECT_STAGE + DIRECT_ALIGN];
            self.off = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        }
        &mut self.buf[self.off..self.off + DIRECT_STAGE]
    }
}

/// A stage to write: its first `len` bytes at file offset `at`.
struct IoReq {
    stage: Stage,
    len: usize,
    at: u64,
}

/// The stage back, with how its write went.
struct IoDone {
    stage: Stage,
    result: io::Result<()>,
}

/// The `O_DIRECT` side of a writer (see the module docs).
///
/// While the I/O thread writes the queued stages, the writer thread copies
/// the next data into another, so the copy and the device transfer overlap
/// (they alternated once, and the copy left the disk idle for a quarter of
/// the time). Nothing is truncated or committed while a write is queued or
/// in flight.
pub(crate) struct DirectIo {
    /// The stage being filled.
    cur: Stage,
    /// Stages neither filled nor queued.
    free: Vec<Stage>,
    /// Stages handed to the I/O thread and not yet back.
    queued: usize,
    /// The first failed write not yet reported.
    failed: Option<io::Error>,
    /// Bytes staged in `cur`, and the (aligned) file offset of its first.
    staged: usize,
    at: u64,
    /// The file system refused a direct write (EINVAL): the I/O thread then
    /// writes through the page cache, and new entries no longer use this path.
    /// Shared with the I/O thread, which sets it.
    refused: Arc<AtomicBool>,
    io: Option<std::sync::mpsc::Sender<IoReq>>,
    done: std::sync::mpsc::Receiver<IoDone>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The files, shared with the I/O thread, for writes made straight from
    /// the caller's memory ([`EntryWriter::write_unstaged`]).
    files: Arc<(File, File)>,
}

impl std::fmt::Debug for DirectIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectIo")
            .field("staged", &self.staged)
            .field("at", &self.at)
            .field("queued", &self.queued)
            .field("refused", &self.refused.load(Ordering::Relaxed))
            .finish()
    }
}

/// Write `data` at `at`: direct while offset and length are aligned and the
/// file system takes it, through `buffered` otherwise (sets `refused` on
/// EINVAL, for good).
fn write_blocks(
    direct: &File,
    buffered: &File,
    data: &[u8],
    at: u64,
    refused: &AtomicBool,
) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let chunk = &data[done..];
        let pos = at + done as u64;
        let aligned =
            pos.is_multiple_of(DIRECT_ALIGN as u64) && chunk.len().is_multiple_of(DIRECT_ALIGN);
        if refused.load(Ordering::Relaxed) || !aligned {
            return buffered.write_all_at(chunk, pos);
        }
        match direct.write_at(chunk, pos) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    "direct I/O refused by the file system ({e}); writing through the page cache"
                );
                refused.store(true, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DirectIo {
    /// Reopen `file` with `O_DIRECT` (through procfs, not its path, which
    /// another program may have renamed or replaced since it was opened) and
    /// start the I/O thread.
    pub(crate) fn open(file: &File) -> io::Result<DirectIo> {
        let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&proc_path)?;
        DirectIo::new(direct, file.try_clone()?)
    }

    /// The engine over a `direct` and a `buffered` handle on one file.
    pub(crate) fn new(direct: File, buffered: File) -> io::Result<DirectIo> {
        let (req_tx, req_rx) = std::sync::mpsc::channel::<IoReq>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<IoDone>();
        let refused = Arc::new(AtomicBool::new(false));
        let refused2 = refused.clone();
        let files = Arc::new((direct, buffered));
        let files2 = files.clone();
        let thread = std::thread::Builder::new()
            .name("gtar-direct-io".into())
            .spawn(move || {
                let (direct, buffered) = &*files2;
                for r in req_rx {
                    let result =
                        write_blocks(direct, buffered, &r.stage.bytes()[..r.len], r.at, &refused2);
                    let done = IoDone {
                        stage: r.stage,
                        result,
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            })?;
        Ok(DirectIo {
            cur: Stage::new(),
            free: (1..DIRECT_STAGES).map(|_| Stage::new()).collect(),
            queued: 0,
            failed: None,
            staged: 0,
            at: 0,
            refused,
            io: Some(req_tx),
            done: done_rx,
            thread: Some(thread),
            files,
        })
    }

    /// Take back one stage from the I/O thread, waiting for it, and keep
    /// its write's error if it is the first.
    fn reap_one(&mut self) {
        let d = match self.done.recv() {
            Ok(d) => d,
            Err(_) => IoDone {
                stage: Stage::new(),
                result: Err(io::Error::other("the direct I/O thread stopped")),
            },
        };
        self.queued -= 1;
        self.free.push(d.stage);
        if let Err(e) = d.result {
            self.failed.get_or_insert(e);
        }
    }

    /// The first failed write since the last report, if any.
    fn take_failed(&mut self) -> io::Result<()> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Wait for every queued write, and return how they went.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        while self.queued > 0 {
            self.reap_one();
        }
        self.take_failed()
    }

    /// Whether new entries use this path (the file system has not refused).
    pub(crate) fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Queue the first `len` staged bytes for the I/O thread (waiting for a
    /// free stage first if every other one is queued) and continue in a free
    /// stage at `at + len`. `len` is `staged` or its whole blocks, with the
    /// rest already copied elsewhere by the caller.
    fn submit(&mut self, len: usize) -> io::Result<()> {
        if self.free.is_empty() {
            self.reap_one();
        }
        self.take_failed()?;
        let next = self.free.pop().expect("a stage was reaped");
        let stage = std::mem::replace(&mut self.cur, next);
        let req = IoReq {
            stage,
            len,
            at: self.at,
        };
        self.at += len as u64;
        self.staged = 0;
        let sent = self.io.as_ref().map(|io| io.send(req));
        if !matches!(sent, Some(Ok(()))) {
            self.free.push(Stage::new());
            return Err(io::Error::other("the direct I/O thread stopped"));
        }
        self.queued += 1;
        Ok(())
    }
}

impl DirectIo {
    /// Begin an entry's direct data at file offset `at` (block-aligned).
    pub(crate) fn begin(&mut self, at: u64) -> io::Result<()> {
        debug_assert_eq!(at % DIRECT_ALIGN as u64, 0);
        self.drain()?;
        self.staged = 0;
        self.at = at;
        Ok(())
    }

    /// Stage `data`; every full stage goes to the I/O thread.
    pub(crate) fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let k = data.len().min(DIRECT_STAGE - self.staged);
            let (now, later) = data.split_at(k);
            self.cur.bytes_mut()[self.staged..self.staged + k].copy_from_slice(now);
            self.staged += k;
            data = later;
            if self.staged == DIRECT_STAGE {
                self.submit(DIRECT_STAGE)?;
            }
        }
        Ok(())
    }

    /// Whether the stage is empty, so [`write_unstaged`](Self::write_unstaged)
    /// may write at the direct position.
    pub(crate) fn nothing_staged(&self) -> bool {
        self.staged == 0
    }

    /// Write whole blocks at the direct position straight from `data`, on
    /// this thread, once the write in flight is done; nothing may be staged.
    pub(crate) fn write_unstaged(&mut self, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(self.staged, 0);
        debug_assert_eq!(data.len() % DIRECT_ALIGN, 0);
        self.drain()?;
        let (direct, buffered) = &*self.files;
        write_blocks(direct, buffered, data, self.at, &self.refused)?;
        self.at += data.len() as u64;
        Ok(())
    }

    /// End the entry's direct data: whole blocks go direct, the last partial
    /// block is appended to `rest` for the caller's buffered path. Returns
    /// the file offset of that partial block, once every direct byte is
    /// written (so the entry can be committed).
    pub(crate) fn end(&mut self, rest: &mut Vec<u8>) -> io::Result<u64> {
        let whole = self.staged / DIRECT_ALIGN * DIRECT_ALIGN;
        rest.extend_from_slice(&self.cur.bytes()[whole..self.staged]);
        let rest_at = self.at + whole as u64;
        if whole > 0 {
            self.submit(whole)?;
        }
        self.drain()?;
        Ok(rest_at)
    }

    /// Wait for a write in flight, ignoring how it went (the caller is
    /// dropping the entry anyway).
    pub(crate) fn drain_quietly(&mut self) {
        let _ = self.drain();
    }

    /// Behave as if the file system had refused a direct write.
    #[cfg(test)]
    pub(crate) fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }
}

impl Drop for DirectIo {
    fn drop(&mut self) {
        self.io = None; // ends the thread's loop once it has written
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
