//! The append writer: frames go in as transactions of zip entries.
//!
//! Invariants:
//! * zip64 always: every tail we write has the zip64 end record and locator
//!   (libgetar refuses to append otherwise).
//! * One writer per file: an exclusive `flock` is held while the writer lives.
//! * No stale bytes past the write position: opening for append truncates the
//!   old central directory away before the first new entry is written, and an
//!   aborted transaction truncates back to where it started. Recovery relies on
//!   this (see `recover`).
//! * Order of a commit: entry headers and data are written; the END flag of
//!   the last entry is written last; only then are the entries added to the
//!   shared index (readers see the frame). `sync` (fdatasync) makes every
//!   committed frame durable; callers report "durable" only after it returns.
//! * A newly created archive has its directory fsynced once, so the file
//!   itself survives a crash (write → fsync → fsync the directory).
//! * Direct I/O (opt-in, [`ArchiveWriter::enable_direct_io`]): the data of an
//!   entry of at least [`DIRECT_MIN`] bytes starts on a 4 KiB boundary (a
//!   padding extra field in its local header) and its whole blocks go through
//!   a second, `O_DIRECT` descriptor from aligned staging buffers (an I/O
//!   thread writes up to three, in order, while the writer thread fills
//!   the next), or, with
//!   [`EntryWriter::write_unstaged`], straight from the caller's block-aligned
//!   memory, synchronously, when nothing is staged; its last
//!   partial block and every header go through the page cache as before. The
//!   two never touch the same block, and the kernel keeps the page cache
//!   coherent with direct writes. No direct write is in flight when an entry
//!   ends, a frame commits or the file is truncated. Durability is unchanged:
//!   `sync` is still what makes a commit durable (it also flushes the device
//!   cache).
//!
//! Why direct I/O: on the virtual disks training jobs usually get, copying
//! into fresh page-cache pages costs the kernel far more CPU than the write
//! itself (`perf`: `copy_folio_from_iter_atomic` was 70 % of the daemon's
//! CPU), and that CPU is taken from the training process next to us. A copy
//! into a reused, already-mapped buffer is several times cheaper, and the
//! device then reads it by DMA. Checkpoint data is written once and rarely
//! read soon after, so skipping the page cache also spares the training
//! job's cached data.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::checkpoint::{invalidate, recover, Checkpoints};
use crate::direct::{DirectIo, DIRECT_ALIGN, DIRECT_MIN};
use crate::error::Error;
use crate::fsutil::{lock_exclusive, sync_parent_dir};
use crate::index::{Entry, Index};
use crate::reader::{read_tail, Archive};
use crate::repair::write_repaired;
use crate::scan::ScanReport;
use crate::zipfmt::*;

/// Bytes CRC-checked and then copied at a time: well inside a core's L2.
const CRC_PIECE: usize = 128 << 10;

/// What to do with an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Start a new, empty archive, replacing any file at the path.
    Create,
    /// Keep what is there (repairing it if needed) and add to it; create the
    /// file if it does not exist.
    Append,
}

/// How an entry's data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Stored,
    /// Deflate at a level 0–9.
    Deflate(u32),
}

/// Data compressed elsewhere (so compression stays off the writer thread).
#[derive(Debug, Clone)]
pub struct Precompressed {
    pub deflated: Vec<u8>,
    pub crc32: u32,
    pub uncompressed_size: u64,
}

impl Precompressed {
    /// Compress `data` with raw deflate at `level`.
    pub fn deflate(data: &[u8], level: u32) -> Precompressed {
        let mut enc = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(data.len() / 2 + 64),
            flate2::Compression::new(level.min(9)),
        );
        enc.write_all(data).expect("writing to a Vec cannot fail");
        Precompressed {
            deflated: enc.finish().expect("writing to a Vec cannot fail"),
            crc32: crc32fast::hash(data),
            uncompressed_size: data.len() as u64,
        }
    }
}

/// Result of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Transaction id (offset of its first entry).
    pub txn: u64,
    pub entries: usize,
    /// Bytes the transaction added to the file.
    pub bytes: u64,
}

/// Small writes are gathered here and written in one call; large data goes
/// straight to the file.
const BUF_CAP: usize = 1 << 20;

/// Appends frames to one archive. See the module docs for the invariants.
#[derive(Debug)]
pub struct ArchiveWriter {
    path: PathBuf,
    file: File,
    index: Arc<RwLock<Index>>,
    /// End of the last committed entry: where the tail goes or the next entry.
    end: u64,
    /// A central directory currently sits at `end`.
    tail_present: bool,
    /// Committed data not yet fsynced.
    unsynced: bool,
    buf: Vec<u8>,
    buf_at: u64,
    direct: Option<DirectIo>,
    /// Lay out large entries as direct I/O does even where it is off
    /// ([`ArchiveWriter::align_large_entries`]).
    align_large: bool,
    /// The recovery checkpoint chain (see `checkpoint`): fed at commit,
    /// written after each fdatasync.
    checkpoints: Checkpoints,
}

/// Open (creating if missing) and lock `path`. A compaction renames a new
/// file over the path while it holds the lock on the old one: if the file
/// we locked is no longer the one at the path, lock the new one instead, or
/// frames would go to an unlinked file and be lost.
fn open_locked(path: &Path) -> Result<(File, bool), Error> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        lock_exclusive(&file)?;
        let (ours, there) = (file.metadata()?, std::fs::metadata(path));
        match there {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => return Ok((file, existed)),
            _ => continue, // replaced (or removed) while we opened it
        }
    }
}

impl ArchiveWriter {
    /// Open `path` for writing. With [`OpenMode::Append`] an archive whose
    /// tail is damaged is repaired first; the report says what was kept.
    pub fn open(
        path: impl AsRef<Path>,
        mode: OpenMode,
    ) -> Result<(ArchiveWriter, Option<ScanReport>), Error> {
        Self::open_shared(path, mode, Arc::default())
    }

    /// [`ArchiveWriter::open`], maintaining `shared` as the index (its old
    /// contents are replaced), so readers that hold it keep seeing the
    /// archive across a re-open.
    pub fn open_shared(
        path: impl AsRef<Path>,
        mode: OpenMode,
        shared: Arc<RwLock<Index>>,
    ) -> Result<(ArchiveWriter, Option<ScanReport>), Error> {
        let path = path.as_ref().to_path_buf();
        let (file, existed) = open_locked(&path)?;
        let mut index = Index::new();
        let mut report = None;
        let end;
        if mode == OpenMode::Create || !existed {
            // The old chain must not outlive the bytes it describes.
            invalidate(&path);
            file.set_len(0)?;
            file.write_all_at(&encode_tail(&[], 0), 0)?;
            file.sync_all()?;
            if !existed {
                sync_parent_dir(&path)?;
            }
            end = 0;
        } else {
            let len = file.metadata()?.len();
            match read_tail(&file, len) {
                Ok((tail, entries)) => {
                    // The new chain's first record claims these bytes are
                    // durable; another program may have written them unsynced.
                    file.sync_data()?;
                    for e in entries {
                        index.push(e);
                    }
                    end = tail.cd_offset;
                }
                Err(why) => {
                    let rep = recover(&file, &path, len, why)?;
                    write_repaired(&file, &rep)?;
                    for e in rep.entries.iter().cloned() {
                        index.push(e);
                    }
                    end = rep.end;
                    report = Some(rep);
                }
            }
        }
        let checkpoints = Checkpoints::start(&file, &path, index.entries(), end);
        *shared.write().unwrap_or_else(|p| p.into_inner()) = index;
        Ok((
            ArchiveWriter {
                path,
                file,
                index: shared,
                end,
                tail_present: true,
                unsynced: false,
                buf: Vec::with_capacity(BUF_CAP),
                buf_at: end,
                direct: None,
                align_large: false,
                checkpoints,
            },
            report,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the data of large entries with `O_DIRECT` (see the module docs).
    /// Returns whether it is on: `false` where the file cannot be reopened
    /// that way (e.g. a file system without direct I/O); a file system that
    /// accepts the flag but refuses the writes is detected at the first one.
    pub fn enable_direct_io(&mut self) -> bool {
        if self.direct.is_none() {
            match DirectIo::open(&self.file) {
                Ok(d) => self.direct = Some(d),
                Err(e) => tracing::debug!("{}: no direct I/O: {e}", self.path.display()),
            }
        }
        self.direct.as_ref().is_some_and(DirectIo::usable)
    }

    /// Lay out large entries as direct I/O does (data at 4 KiB-aligned
    /// offsets, by a padding extra field) whether or not `O_DIRECT` is on:
    /// the archive then has the same bytes whichever way it was written
    /// (tests compare the two), and copies of it can share whole blocks.
    pub fn align_large_entries(&mut self) {
        self.align_large = true;
    }

    /// Whether an entry of `len` bytes gets its data block-aligned.
    fn aligned_for(&self, len: u64) -> bool {
        len >= DIRECT_MIN && (self.align_large || self.direct_for(len))
    }

    /// Whether an entry of `len` bytes is written with direct I/O (its data
    /// is then aligned too).
    fn direct_for(&self, len: u64) -> bool {
        len >= DIRECT_MIN && self.direct.as_ref().is_some_and(DirectIo::usable)
    }

    /// The direct engine of an entry that [`direct_for`](Self::direct_for)
    /// chose, once its data has begun.
    fn direct(&mut self) -> &mut DirectIo {
        self.direct.as_mut().expect("direct_for chose direct I/O")
    }

    /// Begin direct data at `at` (aligned, the append position): what is
    /// buffered goes out first, so the two paths never share a block.
    fn direct_begin(&mut self, at: u64) -> Result<(), Error> {
        self.flush_buf()?;
        debug_assert_eq!(at, self.buf_at);
        Ok(self.direct().begin(at)?)
    }

    /// End direct data: the last partial block continues in the (buffered)
    /// append buffer. Returns once every byte is written.
    fn direct_end(&mut self) -> Result<(), Error> {
        let d = self.direct.as_mut().expect("direct_begin ran");
        self.buf.clear();
        self.buf_at = d.end(&mut self.buf)?;
        Ok(())
    }

    /// Wait for a direct write in flight (before truncating the file). Its
    /// error does not matter: the frame is being dropped anyway.
    fn direct_drain(&mut self) {
        if let Some(d) = self.direct.as_mut() {
            d.drain_quietly();
        }
    }

    /// The index, shared with readers made by [`ArchiveWriter::reader`].
    pub fn shared_index(&self) -> Arc<RwLock<Index>> {
        self.index.clone()
    }

    /// A reader that sees every committed frame as soon as it is committed.
    pub fn reader(&self) -> Result<Archive, Error> {
        Archive::with_shared_index(&self.path, self.index.clone())
    }

    /// Bytes of committed entries (the file size without its tail).
    pub fn committed_len(&self) -> u64 {
        self.end
    }

    /// Start a frame. Dropping it without [`Txn::commit`] aborts it: the file
    /// is truncated back and nothing of it stays visible.
    pub fn begin(&mut self) -> Result<Txn<'_>, Error> {
        if self.tail_present {
            // Remove the old central directory before writing over it, so no
            // stale bytes are left behind a torn write.
            self.file.set_len(self.end)?;
            self.tail_present = false;
        }
        self.buf.clear();
        self.buf_at = self.end;
        Ok(Txn {
            txn: self.end,
            pos: self.end,
            entries: Vec::new(),
            last_header: None,
            w: self,
            done: false,
            poisoned: false,
        })
    }

    /// Make every committed frame durable (fdatasync), and record them in
    /// the recovery checkpoint.
    pub fn sync(&mut self) -> Result<(), Error> {
        if self.unsynced {
            self.checkpoints.sync(&self.file)?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// A second handle on the file, so another thread can fsync it while
    /// this one keeps writing (group commit). `sync_data` on it makes durable
    /// every byte written before the call; [`Checkpoints::sync`] with it
    /// (from [`ArchiveWriter::checkpoints`]) also records those frames in the
    /// recovery checkpoint.
    pub fn sync_handle(&self) -> Result<File, Error> {
        Ok(self.file.try_clone()?)
    }

    /// The recovery checkpoint chain of this writer, for a thread that
    /// fsyncs on its behalf (see [`ArchiveWriter::sync_handle`]).
    pub fn checkpoints(&self) -> Checkpoints {
        self.checkpoints.clone()
    }

    /// Write the central directory so other zip readers can open the file
    /// now, and fsync. The next frame removes it again.
    pub fn write_tail(&mut self) -> Result<(), Error> {
        if !self.tail_present {
            let tail = {
                let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
                let cds: Vec<CentralEntry> = ix.entries().iter().map(|e| e.cd.clone()).collect();
                encode_tail(&cds, self.end)
            };
            self.file.write_all_at(&tail, self.end)?;
            self.tail_present = true;
            self.unsynced = true;
        }
        self.sync()
    }

    /// Write the tail and release the file.
    pub fn close(mut self) -> Result<(), Error> {
        self.write_tail()
    }

    fn flush_buf(&mut self) -> Result<(), Error> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.buf_at)?;
            self.buf_at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Write `data` at `at`, which is always the current append position.
    fn append(&mut self, at: u64, data: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(at, self.buf_at + self.buf.len() as u64);
        if self.buf.len() + data.len() <= BUF_CAP {
            self.buf.extend_from_slice(data);
        } else {
            self.flush_buf()?;
            if data.len() < BUF_CAP {
                self.buf.extend_from_slice(data);
            } else {
                self.file.write_all_at(data, at)?;
                self.buf_at = at + data.len() as u64;
            }
        }
        Ok(())
    }

    /// Overwrite already-appended bytes at `at` (a header patch).
    fn patch(&mut self, at: u64, data: &[u8]) -> Result<(), Error> {
        if at >= self.buf_at {
            let i = (at - self.buf_at) as usize;
            self.buf[i..i + data.len()].copy_from_slice(data);
            Ok(())
        } else {
            Ok(self.file.write_all_at(data, at)?)
        }
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        // Best effort: leave a readable file behind. Errors here are not
        // reportable; the archive is repaired on the next open if this fails.
        let _ = self.write_tail();
    }
}

/// A frame being written: a set of entries that become visible together.
pub struct Txn<'a> {
    w: &'a mut ArchiveWriter,
    txn: u64,
    pos: u64,
    entries: Vec<Entry>,
    /// (offset, name, method, crc, csize, usize) of the last entry, whose
    /// header gets the END flag at commit.
    last_header: Option<(u64, Entry)>,
    done: bool,
    /// An entry was started and never finished: the frame cannot commit.
    poisoned: bool,
}

impl<'a> Txn<'a> {
    fn mark(&self, end: bool) -> CommitMark {
        CommitMark {
            txn: self.txn,
            entry: self.entries.len() as u32,
            end,
        }
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.poisoned {
            return Err(Error::Invalid(
                "an entry of this frame was left unfinished; the frame must be aborted".into(),
            ));
        }
        Ok(())
    }

    fn check_name(name: &str) -> Result<(), Error> {
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "entry name must be 1..65535 bytes, got {}",
                name.len()
            )));
        }
        if name.starts_with('/') || name.contains('\0') {
            return Err(Error::Invalid(format!(
                "entry name {name:?} is not a relative path"
            )));
        }
        Ok(())
    }

    fn push_entry(&mut self, offset: u64, cd: CentralEntry, data_offset: u64) {
        let e = Entry {
            cd,
            data_offset: Some(data_offset),
        };
        self.last_header = Some((offset, e.clone()));
        self.entries.push(e);
    }

    /// Add an entry with its whole content.
    pub fn add(&mut self, name: &str, data: &[u8], compression: Compression) -> Result<(), Error> {
        match compression {
            Compression::Stored => self.add_raw(
                name,
                METHOD_STORED,
                data,
                crc32fast::hash(data),
                data.len() as u64,
            ),
            Compression::Deflate(level) => {
                let p = Precompressed::deflate(data, level);
                self.add_precompressed(name, &p)
            }
        }
    }

    /// Add an entry compressed beforehand.
    pub fn add_precompressed(&mut self, name: &str, p: &Precompressed) -> Result<(), Error> {
        self.add_raw(
            name,
            METHOD_DEFLATE,
            &p.deflated,
            p.crc32,
            p.uncompressed_size,
        )
    }

    fn add_raw(
        &mut self,
        name: &str,
        method: u16,
        data: &[u8],
        crc: u32,
        usize_: u64,
    ) -> Result<(), Error> {
        self.check_usable()?;
        Self::check_name(name)?;
        let at = self.pos;
        let direct = self.w.direct_for(data.len() as u64);
        let header = LocalHeader {
            name,
            method,
            crc32: crc,
            compressed_size: data.len() as u64,
            uncompressed_size: usize_,
            mark: self.mark(false),
            pad: if self.w.aligned_for(data.len() as u64) {
                align_pad(at, name, DIRECT_ALIGN as u64)
            } else {
                0
            },
        }
        .encode();
        self.w.append(at, &header)?;
        let data_at = at + header.len() as u64;
        if direct {
            self.w.direct_begin(data_at)?;
            self.w.direct().write(data)?;
            self.w.direct_end()?;
        } else {
            self.w.append(data_at, data)?;
        }
        self.pos = data_at + data.len() as u64;
        self.push_entry(
            at,
            CentralEntry {
                name: name.to_string(),
                method,
                flags: GP_UTF8,
                crc32: crc,
                compressed_size: data.len() as u64,
                uncompressed_size: usize_,
                local_header_offset: at,
            },
            data_at,
        );
        Ok(())
    }

    /// Start a stored entry of `size` bytes whose data arrives in pieces
    /// (tensors larger than memory). Write exactly `size` bytes, then
    /// [`EntryWriter::finish`].
    pub fn start_entry(&mut self, name: &str, size: u64) -> Result<EntryWriter<'_, 'a>, Error> {
        self.check_usable()?;
        Self::check_name(name)?;
        let at = self.pos;
        let direct = self.w.direct_for(size);
        let pad = if self.w.aligned_for(size) {
            align_pad(at, name, DIRECT_ALIGN as u64)
        } else {
            0
        };
        let header = LocalHeader {
            name,
            method: METHOD_STORED,
            crc32: 0, // patched by finish()
            compressed_size: size,
            uncompressed_size: size,
            mark: self.mark(false),
            pad,
        };
        let bytes = header.encode();
        self.w.append(at, &bytes)?;
        let data_at = at + bytes.len() as u64;
        if direct {
            self.w.direct_begin(data_at)?;
        }
        Ok(EntryWriter {
            name: name.to_string(),
            header_at: at,
            pad,
            direct,
            data_at,
            size,
            written: 0,
            crc: crc32fast::Hasher::new(),
            finished: false,
            broken: false,
            txn: self,
        })
    }

    /// Entries written so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finish the frame: mark its last entry END and make it visible to
    /// readers. Not yet durable: call [`ArchiveWriter::sync`] (group commit).
    pub fn commit(mut self) -> Result<Committed, Error> {
        self.check_usable()?;
        let (at, last) = self
            .last_header
            .take()
            .ok_or_else(|| Error::Invalid("a frame needs at least one record".into()))?;
        let data_at = last
            .data_offset
            .expect("entries we write know their data offset");
        let pad = (data_at - at) as usize - LocalHeader::encoded_len(&last.cd.name, 0);
        let header = LocalHeader {
            name: &last.cd.name,
            method: last.cd.method,
            crc32: last.cd.crc32,
            compressed_size: last.cd.compressed_size,
            uncompressed_size: last.cd.uncompressed_size,
            mark: CommitMark {
                txn: self.txn,
                entry: (self.entries.len() - 1) as u32,
                end: true,
            },
            pad: pad as u16,
        }
        .encode();
        self.w.patch(at, &header)?;
        self.w.flush_buf()?;
        let entries = std::mem::take(&mut self.entries);
        let n = entries.len();
        self.w.checkpoints.committed(&entries, self.pos);
        {
            let mut ix = self.w.index.write().unwrap_or_else(|p| p.into_inner());
            ix.push_txn(entries);
        }
        let bytes = self.pos - self.txn;
        self.w.end = self.pos;
        self.w.unsynced = true;
        self.done = true;
        Ok(Committed {
            txn: self.txn,
            entries: n,
            bytes,
        })
    }

    /// Give the frame up explicitly (same as dropping it).
    pub fn abort(mut self) -> Result<(), Error> {
        self.done = true;
        self.w.direct_drain();
        self.w.buf.clear();
        self.w.buf_at = self.w.end;
        self.w.file.set_len(self.w.end)?;
        Ok(())
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.w.direct_drain();
            self.w.buf.clear();
            self.w.buf_at = self.w.end;
            // If this fails the bytes stay, but without an END flag they are
            // never visible and recovery drops them.
            let _ = self.w.file.set_len(self.w.end);
        }
    }
}

/// Streams the data of one stored entry. See [`Txn::start_entry`].
pub struct EntryWriter<'t, 'a> {
    txn: &'t mut Txn<'a>,
    name: String,
    header_at: u64,
    pad: u16,
    /// The data goes through the writer's direct stage.
    direct: bool,
    data_at: u64,
    size: u64,
    written: u64,
    crc: crc32fast::Hasher,
    finished: bool,
    /// A write failed part-way: what is staged is unknown, so the entry
    /// takes nothing more (its frame can only be aborted).
    broken: bool,
}

impl Drop for EntryWriter<'_, '_> {
    fn drop(&mut self) {
        if !self.finished {
            self.txn.poisoned = true;
        }
    }
}

impl EntryWriter<'_, '_> {
    /// Append the next piece of the entry's data.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.check_room(data.len() as u64)?;
        self.broken = true;
        if self.direct {
            // CRC and copy into the stage piece by piece: the copy then
            // reads each piece from the cache the CRC just pulled it into,
            // so the data crosses the memory bus once instead of twice.
            for piece in data.chunks(CRC_PIECE) {
                self.crc.update(piece);
                self.txn.w.direct().write(piece)?;
            }
        } else {
            self.crc.update(data);
            let at = self.data_at + self.written;
            self.txn.w.append(at, data)?;
        }
        self.broken = false;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Whether `n` more bytes may be written: no earlier write failed, and
    /// they fit the declared size.
    fn check_room(&self, n: u64) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Invalid(format!(
                "{}: an earlier write to this entry failed",
                self.name
            )));
        }
        if self.written + n > self.size {
            return Err(Error::Invalid(format!(
                "{}: {} bytes written, more than the declared {}",
                self.name,
                self.written + n,
                self.size
            )));
        }
        Ok(())
    }

    /// [`EntryWriter::write`] without the copy into the writer's stage, for
    /// data in memory that outlives the call anyway (a client's shared
    /// memory): when the entry is direct, nothing is staged and `data` is
    /// block-aligned in memory, its whole blocks are written with direct I/O
    /// from where they are, on this thread; only the last partial block is
    /// staged. Otherwise it is `write`.
    pub fn write_unstaged(&mut self, data: &[u8]) -> Result<(), Error> {
        let nothing_staged = self
            .txn
            .w
            .direct
            .as_ref()
            .is_some_and(DirectIo::nothing_staged);
        let aligned = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
        if !self.direct || !nothing_staged || !aligned {
            return self.write(data);
        }
        self.check_room(data.len() as u64)?;
        self.crc.update(data);
        self.broken = true;
        let (whole, tail) = data.split_at(data.len() / DIRECT_ALIGN * DIRECT_ALIGN);
        if !whole.is_empty() {
            self.txn.w.direct().write_unstaged(whole)?;
        }
        self.txn.w.direct().write(tail)?;
        self.broken = false;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Complete the entry: every declared byte must have been written.
    pub fn finish(mut self) -> Result<(), Error> {
        self.check_room(0)?;
        if self.written != self.size {
            return Err(Error::Invalid(format!(
                "{}: {} bytes written, {} declared",
                self.name, self.written, self.size
            )));
        }
        if self.direct {
            self.txn.w.direct_end()?;
        }
        let crc = self.crc.clone().finalize();
        let mark = self.txn.mark(false);
        let header = LocalHeader {
            name: &self.name,
            method: METHOD_STORED,
            crc32: crc,
            compressed_size: self.size,
            uncompressed_size: self.size,
            mark,
            pad: self.pad,
        }
        .encode();
        self.txn.w.patch(self.header_at, &header)?;
        self.txn.pos = self.data_at + self.size;
        self.finished = true;
        let cd = CentralEntry {
            name: std::mem::take(&mut self.name),
            method: METHOD_STORED,
            flags: GP_UTF8,
            crc32: crc,
            compressed_size: self.size,
            uncompressed_size: self.size,
            local_header_offset: self.header_at,
        };
        self.txn.push_entry(self.header_at, cd, self.data_at);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::direct::{DIRECT_STAGE, DIRECT_STAGES};

    /// Deterministic pseudo-random bytes (xorshift), shared by the crate's
    /// unit tests.
    pub(crate) fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Sizes around every boundary of the direct path: below, at and above
    /// DIRECT_MIN, a stage and a half, with and without a partial block, and
    /// more stages than the engine has (it waits for one to come back).
    fn sizes() -> Vec<usize> {
        let m = DIRECT_MIN as usize;
        vec![
            3,
            m - 1,
            m,
            m + 1,
            DIRECT_STAGE,
            DIRECT_STAGE + DIRECT_ALIGN,
            DIRECT_STAGE * 2 + 4097,
            DIRECT_STAGE * (DIRECT_STAGES + 2) + 4097,
            100,
        ]
    }

    /// Writes one frame of every size, whole and streamed in odd pieces;
    /// returns the expected contents.
    fn write_frames(
        w: &mut ArchiveWriter,
        frames: std::ops::Range<usize>,
    ) -> Vec<(String, Vec<u8>)> {
        let mut expect = Vec::new();
        for f in frames {
            let mut t = w.begin().unwrap();
            for (k, n) in sizes().into_iter().enumerate() {
                let data = bytes((f * 100 + k) as u64, n);
                let name = format!("frames/{f}/r{k}.u8.uni");
                if k % 2 == 0 {
                    t.add(&name, &data, Compression::Stored).unwrap();
                } else if (k / 2 + f) % 3 == 0 {
                    let mut e = t.start_entry(&name, n as u64).unwrap();
                    for piece in data.chunks(65_537) {
                        e.write(piece).unwrap();
                    }
                    e.finish().unwrap();
                } else if (k / 2 + f) % 3 == 1 {
                    // write_unstaged from block-aligned memory, in two calls
                    // split on a block boundary (both zero-copy when direct).
                    let mut buf = vec![0u8; n + DIRECT_ALIGN];
                    let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
                    buf[off..off + n].copy_from_slice(&data);
                    let aligned = &buf[off..off + n];
                    let cut = n / 2 / DIRECT_ALIGN * DIRECT_ALIGN;
                    let mut e = t.start_entry(&name, n as u64).unwrap();
                    e.write_unstaged(&aligned[..cut]).unwrap();
                    e.write_unstaged(&aligned[cut..]).unwrap();
                    e.finish().unwrap();
                } else {
                    // write_unstaged from memory that is not block-aligned:
                    // the staged path.
                    let mut e = t.start_entry(&name, n as u64).unwrap();
                    for piece in data.chunks(3 * 1_048_573) {
                        e.write_unstaged(piece).unwrap();
                    }
                    e.finish().unwrap();
                }
                expect.push((name, data));
            }
            t.commit().unwrap();
            w.sync().unwrap();
        }
        expect
    }

    fn check(path: &Path, expect: &[(String, Vec<u8>)], aligned: bool) {
        let a = Archive::open(path).unwrap();
        assert!(matches!(a.state(), crate::OpenState::Clean));
        for (name, data) in expect {
            assert!(a.read(name).unwrap() == *data, "{name}");
        }
        if aligned {
            // Large entries start on a block boundary (found through their
            // local headers, as any reader finds them).
            let file = File::open(path).unwrap();
            for e in a.index().entries() {
                let off = super::super::reader::local_data_offset(&file, e).unwrap();
                if e.cd.compressed_size >= DIRECT_MIN {
                    assert_eq!(off % DIRECT_ALIGN as u64, 0, "{} at {off}", e.cd.name);
                }
            }
        }
    }

    #[test]
    fn direct_io_writes_what_buffered_writes_would() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.zip");
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        if !w.enable_direct_io() {
            eprintln!("no direct I/O on this file system: the buffered path is tested instead");
        }
        let expect = write_frames(&mut w, 0..3);
        w.close().unwrap();
        check(&path, &expect, true);
    }

    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.zip");
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        // A direct side without O_DIRECT behaves like one on a file system
        // that takes it; marking it refused then exercises the fallback in
        // the middle of an entry's data.
        w.direct =
            Some(DirectIo::new(w.file.try_clone().unwrap(), w.file.try_clone().unwrap()).unwrap());
        let mut expect = write_frames(&mut w, 0..1);
        let mut t = w.begin().unwrap();
        let data = bytes(9, DIRECT_STAGE * 2 + 11);
        let mut e = t
            .start_entry("frames/9/x.u8.uni", data.len() as u64)
            .unwrap();
        e.write(&data[..DIRECT_STAGE + 5]).unwrap();
        e.txn.w.direct.as_ref().unwrap().refuse();
        e.write(&data[DIRECT_STAGE + 5..]).unwrap();
        e.finish().unwrap();
        t.commit().unwrap();
        expect.push(("frames/9/x.u8.uni".into(), data));
        assert!(!w.direct_for(DIRECT_MIN), "refused sticks");
        w.close().unwrap();
        check(&path, &expect, false);
    }

    #[test]
    fn an_aborted_direct_entry_leaves_nothing_and_the_next_frame_lands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.zip");
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        w.enable_direct_io();
        let mut expect = write_frames(&mut w, 0..1);
        let end = w.committed_len();
        {
            let mut t = w.begin().unwrap();
            t.add("frames/x/a.u8.uni", &bytes(1, 10), Compression::Stored)
                .unwrap();
            let mut e = t
                .start_entry("frames/x/b.u8.uni", 3 * DIRECT_STAGE as u64)
                .unwrap();
            e.write(&bytes(2, DIRECT_STAGE + 77)).unwrap();
            // dropped unfinished: the frame is poisoned, then aborted
        }
        assert_eq!(w.committed_len(), end);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
        expect.extend(write_frames(&mut w, 1..2));
        drop(w);
        check(&path, &expect, true);
        let a = Archive::open(&path).unwrap();
        assert!(a.read("frames/x/a.u8.uni").is_err());
    }

    /// One committed frame, then a direct side whose files refuse writes
    /// (opened read-only: EBADF), like a disk failing in the middle of an
    /// entry, while `fail` writes; afterwards nothing of it is in the file,
    /// and with a working direct side again the writer goes on.
    fn with_failing_direct(name: &str, fail: impl FnOnce(&mut ArchiveWriter)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        w.enable_direct_io();
        let mut expect = write_frames(&mut w, 0..1);
        let end = w.committed_len();
        let ro = || File::open(&path).unwrap();
        w.direct = Some(DirectIo::new(ro(), ro()).unwrap());
        fail(&mut w);
        assert_eq!(w.committed_len(), end);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
        w.direct = None;
        w.enable_direct_io();
        expect.extend(write_frames(&mut w, 1..2));
        drop(w);
        check(&path, &expect, true);
    }

    #[test]
    fn a_failing_queued_write_is_reported_not_lost() {
        // The staged writes go to the I/O thread and fail there, while this
        // thread goes on.
        with_failing_direct("q.zip", |w| {
            let mut t = w.begin().unwrap();
            let size = DIRECT_STAGE * (DIRECT_STAGES + 2);
            let mut e = t.start_entry("frames/x/q.u8.uni", size as u64).unwrap();
            let data = bytes(3, size);
            // The failure surfaces at a later write (waiting for a stage) or
            // at the entry's end, never not at all.
            let mut err = None;
            for piece in data.chunks(DIRECT_STAGE / 2) {
                if let Err(x) = e.write(piece) {
                    err = Some(x);
                    break;
                }
            }
            let err = match err {
                Some(x) => x,
                None => e.finish().unwrap_err(),
            };
            assert!(err.to_string().contains("Bad file descriptor"), "{err}");
        });
    }

    #[test]
    fn a_failing_write_breaks_its_entry_and_the_writer_goes_on() {
        with_failing_direct("f.zip", |w| {
            let mut t = w.begin().unwrap();
            let size = 3 * DIRECT_STAGE;
            let mut e = t.start_entry("frames/x/b.u8.uni", size as u64).unwrap();
            let buf = vec![7u8; size + DIRECT_ALIGN];
            let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
            let err = e.write_unstaged(&buf[off..off + size]).unwrap_err();
            assert!(err.to_string().contains("Bad file descriptor"), "{err}");
            // What reached the file is unknown: the entry takes nothing more.
            let again = e.write(&[1]).unwrap_err();
            assert!(again.to_string().contains("earlier write"), "{again}");
        });
    }
}
