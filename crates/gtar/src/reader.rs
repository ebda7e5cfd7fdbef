//! Opening archives and reading entries by offset.
//!
//! [`Archive::open`] trusts a central directory only if it is whole and
//! consistent: the EOCD is the last record of the file, the zip64 locator and
//! record (when present) agree with it, every central header parses, and every
//! local header offset lies before the directory. Otherwise the archive is
//! recovered in memory (a verified recovery checkpoint plus a scan of what
//! follows it, else a scan of the whole file; see `checkpoint` and `scan`)
//! without touching the file; only [`ArchiveWriter`](crate::ArchiveWriter) and
//! [`repair`](crate::repair()) modify files.
//!
//! Every read checks the entry's CRC-32 and size, so a corrupted entry is an
//! error naming the entry, never wrong data.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use flate2::read::DeflateDecoder;

use crate::checkpoint::recover;
use crate::error::Error;
use crate::index::{parse_central_directory, Entry, Index};
use crate::path::RecordType;
use crate::scan::ScanReport;
use crate::zipfmt::*;

/// How the index of an opened archive was obtained.
#[derive(Debug, Clone)]
pub enum OpenState {
    /// From a valid central directory.
    Clean,
    /// The central directory was missing or invalid; entries were recovered
    /// by scanning local headers (the file itself was not changed).
    Recovered(ScanReport),
}

/// Where the tail (central directory) of a valid archive sits.
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub cd_offset: u64,
    pub cd_size: u64,
    pub entries: u64,
}

/// Where an archive's bytes come from: a local file, or (in the daemon) an
/// object store read by ranges. Positional and synchronous: callers run off
/// any async worker, as for a file.
pub trait ReadAt: Send + Sync + std::fmt::Debug {
    /// Read up to `buf.len()` bytes at `offset`; 0 only at the end.
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The local file, if the bytes are one (compaction, snapshot and
    /// located reads need a file; a remote archive has none).
    fn local_file(&self) -> Option<&File> {
        None
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    fn pread_exact(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.pread(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

impl ReadAt for File {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn local_file(&self) -> Option<&File> {
        Some(self)
    }
}

/// A read-only view of an archive: its bytes and its index.
#[derive(Debug, Clone)]
pub struct Archive {
    path: PathBuf,
    file: Arc<dyn ReadAt>,
    index: Arc<RwLock<Index>>,
    /// The index's [`Learned`](crate::Learned), held apart so that reads
    /// use it without taking the index lock (a caller may hold a guard).
    learned: crate::Learned,
    state: OpenState,
}

impl Archive {
    /// Open `path` for reading; recovers in memory if the tail is damaged.
    pub fn open(path: impl AsRef<Path>) -> Result<Archive, Error> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        let (index, state) = match read_tail(&file, len) {
            Ok((tail, entries)) => {
                let _ = tail;
                let mut ix = Index::new();
                for e in entries {
                    ix.push(e);
                }
                (ix, OpenState::Clean)
            }
            Err(why) => {
                let report = recover(&file, &path, len, why)?;
                let mut ix = Index::new();
                for e in report.entries.iter().cloned() {
                    ix.push(e);
                }
                (ix, OpenState::Recovered(report))
            }
        };
        Ok(Archive {
            path,
            file: Arc::new(file),
            learned: index.learned().clone(),
            index: Arc::new(RwLock::new(index)),
            state,
        })
    }

    /// A reader over a file whose index someone else (a writer) maintains.
    pub fn with_shared_index(path: &Path, index: Arc<RwLock<Index>>) -> Result<Archive, Error> {
        let learned = index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .learned()
            .clone();
        Ok(Archive {
            path: path.to_path_buf(),
            file: Arc::new(File::open(path)?),
            index,
            learned,
            state: OpenState::Clean,
        })
    }

    /// A view of an archive whose bytes come from `source` and whose index
    /// the caller built (e.g. from a remote manifest). `path` names it in
    /// messages.
    pub fn from_source(path: PathBuf, source: Arc<dyn ReadAt>, index: Index) -> Archive {
        Archive {
            path,
            file: source,
            learned: index.learned().clone(),
            index: Arc::new(RwLock::new(index)),
            state: OpenState::Clean,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file: the one the index describes, even after a compaction
    /// renamed another file over [`path`](Archive::path). An error for an
    /// archive read from remote storage (it has no local file).
    pub fn file(&self) -> Result<&File, Error> {
        self.file.local_file().ok_or_else(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: only in remote storage, no local file",
                    self.path.display()
                ),
            ))
        })
    }

    pub fn state(&self) -> &OpenState {
        &self.state
    }

    /// The index; hold the guard only briefly, a writer may be waiting.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared index handle.
    pub fn shared_index(&self) -> Arc<RwLock<Index>> {
        self.index.clone()
    }

    /// Metadata of the open file (owner, device and inode: what a reader
    /// that opens the path itself must find there).
    pub fn file_metadata(&self) -> Result<std::fs::Metadata, Error> {
        Ok(self.file()?.metadata()?)
    }

    /// Read the current contents of `name` (the last entry of that name).
    pub fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        let e = self
            .index()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        self.read_entry(&e)
    }

    /// Read record `rt` at frame `index`.
    pub fn read_record(&self, rt: &RecordType, index: &str) -> Result<Vec<u8>, Error> {
        let e = self
            .index()
            .record(rt, index)
            .cloned()
            .ok_or_else(|| Error::NotFound(rt.path_at(index)))?;
        self.read_entry(&e)
    }

    /// Where an entry's (possibly compressed) data starts.
    pub fn data_offset(&self, e: &Entry) -> Result<u64, Error> {
        if let Some(o) = self.learned.data_offset(e) {
            return Ok(o);
        }
        let o = local_data_offset(&*self.file, e)?;
        self.learned.keep_data_offset(e, o);
        Ok(o)
    }

    /// Read a whole entry into memory, checking size and CRC.
    pub fn read_entry(&self, e: &Entry) -> Result<Vec<u8>, Error> {
        let size = usize::try_from(e.cd.uncompressed_size)
            .map_err(|_| Error::Corrupt(format!("{}: entry too large for memory", e.name())))?;
        let mut out = Vec::new();
        out.try_reserve_exact(size.min(1 << 32))
            .map_err(|_| Error::Corrupt(format!("{}: cannot allocate {} bytes", e.name(), size)))?;
        self.entry_reader(e)?
            .read_to_end(&mut out)
            .map_err(|err| data_error(e, err))?;
        Ok(out)
    }

    /// A small entry's bytes, read once and then kept in memory for every
    /// reader of this archive (see [`Learned`](crate::Learned)); a
    /// larger one is read as [`read_entry`](Self::read_entry) reads it.
    pub fn read_small(&self, e: &Entry) -> Result<Arc<[u8]>, Error> {
        if let Some(b) = self.learned.bytes(e) {
            return Ok(b);
        }
        let b: Arc<[u8]> = self.read_entry(e)?.into();
        self.learned.keep_bytes(e, b.clone());
        Ok(b)
    }

    /// Bytes `offset .. offset + len` of an entry's uncompressed data,
    /// clamped to its end. Like every read, a range that reaches the entry's
    /// end is checked against the CRC (the entry is read from its start for
    /// that); a range before the end of a stored entry is read in place, and
    /// its check comes with the last range.
    pub fn read_range(&self, e: &Entry, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        let size = e.size();
        let start = offset.min(size);
        let end = start.saturating_add(len).min(size);
        let mut out = vec![0u8; (end - start) as usize];
        if end < size && e.cd.method == METHOD_STORED {
            let data_offset = self.data_offset(e)?;
            self.file.pread_exact(&mut out, data_offset + start)?;
            return Ok(out);
        }
        let mut r = self.entry_reader(e)?;
        io::copy(&mut (&mut r).take(start), &mut io::sink())?;
        r.read_exact(&mut out)?;
        if end == size {
            // Reading to the end checked the CRC, except for an empty range
            // at the end: nothing is left, so this read is what checks it.
            let left = r.read(&mut [0u8; 1])?;
            debug_assert_eq!(left, 0);
        }
        Ok(out)
    }

    /// Fill `buf` with bytes `offset ..` of a stored (uncompressed) entry,
    /// read in place with one positioned read: for a reader that wants only
    /// parts of an entry (a box of a tensor). Unlike every other read this
    /// checks no CRC-32: a CRC covers the whole entry, and reading the whole
    /// entry is what such a reader avoids. A compressed entry, or a range
    /// past the entry's end, is an error.
    pub fn read_stored_at(&self, e: &Entry, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        if e.cd.method != METHOD_STORED {
            return Err(Error::Corrupt(format!(
                "{}: compressed; only a stored entry is read in place",
                e.name()
            )));
        }
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > e.cd.compressed_size)
        {
            return Err(Error::Corrupt(format!(
                "{}: bytes {offset}..+{} lie past the entry's {} bytes",
                e.name(),
                buf.len(),
                e.cd.compressed_size
            )));
        }
        let data_offset = self.data_offset(e)?;
        self.file.pread_exact(buf, data_offset + offset)?;
        Ok(())
    }

    /// A streaming reader over an entry's uncompressed bytes. It returns an
    /// error instead of end-of-file if the size or CRC do not match.
    pub fn entry_reader(&self, e: &Entry) -> Result<EntryReader, Error> {
        let data_offset = self.data_offset(e)?;
        let raw = PosReader {
            file: self.file.clone(),
            pos: data_offset,
            end: data_offset + e.cd.compressed_size,
        };
        let inner: Box<dyn Read + Send> = match e.cd.method {
            METHOD_STORED => Box::new(raw),
            METHOD_DEFLATE => Box::new(DeflateDecoder::new(io::BufReader::with_capacity(
                1 << 16,
                raw,
            ))),
            m => {
                return Err(Error::Corrupt(format!(
                    "{}: unsupported compression method {m}",
                    e.name()
                )))
            }
        };
        Ok(EntryReader {
            name: e.cd.name.clone(),
            inner,
            crc: crc32fast::Hasher::new(),
            seen: 0,
            size: e.cd.uncompressed_size,
            want_crc: e.cd.crc32,
            verified: false,
        })
    }
}

/// Reads `[pos, end)` of a shared file with positional reads.
struct PosReader {
    file: Arc<dyn ReadAt>,
    pos: u64,
    end: u64,
}

impl Read for PosReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(left) as usize;
        let got = self.file.pread(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside an entry",
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// See [`Archive::entry_reader`].
pub struct EntryReader {
    name: String,
    inner: Box<dyn Read + Send>,
    crc: crc32fast::Hasher,
    seen: u64,
    size: u64,
    want_crc: u32,
    verified: bool,
}

impl EntryReader {
    /// Uncompressed size of the entry.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Read for EntryReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.size - self.seen).min(buf.len() as u64) as usize;
        if want == 0 {
            if !self.verified && !buf.is_empty() {
                self.verify()?; // empty entries end here
            }
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(corrupt_io(&self.name, "entry is shorter than its size"));
        }
        self.crc.update(&buf[..n]);
        self.seen += n as u64;
        if self.seen == self.size {
            // Fail on the last chunk rather than after it, so a caller that
            // stops reading at `size` bytes still sees the error.
            self.verify()?;
        }
        Ok(n)
    }
}

impl EntryReader {
    fn verify(&mut self) -> io::Result<()> {
        self.verified = true;
        let got = self.crc.clone().finalize();
        if got != self.want_crc {
            return Err(corrupt_io(
                &self.name,
                &format!(
                    "CRC-32 mismatch (stored {:08x}, data {got:08x})",
                    self.want_crc
                ),
            ));
        }
        Ok(())
    }
}

fn corrupt_io(name: &str, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {what}"))
}

/// Read an entry's local header to find where its data starts.
pub(crate) fn local_data_offset(file: &dyn ReadAt, e: &Entry) -> Result<u64, Error> {
    // The header and the name after it: zip's CRC-32 covers the data, not
    // the name, so a central directory entry whose name was damaged into
    // another record's would otherwise hand out that entry's (intact) bytes
    // under the wrong name. The local header's copy of the name must agree.
    let name = e.name().as_bytes();
    let mut h = vec![0u8; LOCAL_HEADER_LEN + name.len()];
    file.pread_exact(&mut h, e.cd.local_header_offset)
        .map_err(|_| Error::Corrupt(format!("{}: local header is past the end", e.name())))?;
    if rd32(&h, 0) != LOCAL_SIG {
        return Err(Error::Corrupt(format!(
            "{}: no local header at offset {}",
            e.name(),
            e.cd.local_header_offset
        )));
    }
    if rd16(&h, 26) as usize != name.len() || &h[LOCAL_HEADER_LEN..] != name {
        return Err(Error::Corrupt(format!(
            "{}: the local header at offset {} names another entry ({:?})",
            e.name(),
            e.cd.local_header_offset,
            String::from_utf8_lossy(&h[LOCAL_HEADER_LEN..]),
        )));
    }
    Ok(e.cd.local_header_offset
        + LOCAL_HEADER_LEN as u64
        + rd16(&h, 26) as u64
        + rd16(&h, 28) as u64)
}

/// Locate and parse the central directory. `Err` carries why the tail is not
/// usable (the archive then needs recovery).
pub fn read_tail(file: &File, len: u64) -> Result<(Tail, Vec<Entry>), String> {
    if len < EOCD_LEN as u64 {
        return Err(format!(
            "file is {len} bytes, too short for a zip end record"
        ));
    }
    // The EOCD may be followed by a comment of up to 64 KiB.
    let window = (len).min((EOCD_LEN + 0xFFFF) as u64);
    let mut buf = vec![0u8; window as usize];
    let base = len - window;
    file.read_exact_at(&mut buf, base)
        .map_err(|e| format!("reading the end of the file: {e}"))?;
    let mut eocd_at = None;
    for i in (0..=buf.len() - EOCD_LEN).rev() {
        // One byte compared first: this loop runs over the whole 64 KiB
        // window whenever the tail is damaged.
        if buf[i] == b'P'
            && rd32(&buf, i) == EOCD_SIG
            && i + EOCD_LEN + rd16(&buf, i + 20) as usize == buf.len()
        {
            eocd_at = Some(i);
            break;
        }
    }
    let i = eocd_at.ok_or("no end-of-central-directory record at the end of the file")?;
    let eocd = &buf[i..];
    if rd16(eocd, 4) != 0 || rd16(eocd, 6) != 0 {
        return Err("multi-disk archives are not supported".into());
    }
    let mut tail = Tail {
        entries: rd16(eocd, 10) as u64,
        cd_size: rd32(eocd, 12) as u64,
        cd_offset: rd32(eocd, 16) as u64,
    };
    let eocd_pos = base + i as u64;
    let mut cd_end_limit = eocd_pos;
    if eocd_pos >= (ZIP64_LOCATOR_LEN + ZIP64_EOCD_LEN) as u64 {
        let mut loc = [0u8; ZIP64_LOCATOR_LEN];
        file.read_exact_at(&mut loc, eocd_pos - ZIP64_LOCATOR_LEN as u64)
            .map_err(|e| e.to_string())?;
        if rd32(&loc, 0) == ZIP64_LOCATOR_SIG {
            let z_off = rd64(&loc, 8);
            if z_off > eocd_pos - (ZIP64_LOCATOR_LEN + ZIP64_EOCD_LEN) as u64 {
                return Err("zip64 locator points past the end".into());
            }
            let mut z = [0u8; ZIP64_EOCD_LEN];
            file.read_exact_at(&mut z, z_off)
                .map_err(|e| e.to_string())?;
            if rd32(&z, 0) != ZIP64_EOCD_SIG {
                return Err("zip64 end record missing where the locator points".into());
            }
            tail = Tail {
                entries: rd64(&z, 32),
                cd_size: rd64(&z, 40),
                cd_offset: rd64(&z, 48),
            };
            cd_end_limit = z_off;
        }
    }
    if tail
        .cd_offset
        .checked_add(tail.cd_size)
        .is_none_or(|end| end > cd_end_limit)
    {
        return Err("central directory extends past its end record".into());
    }
    if tail.cd_size > (1 << 34) || tail.entries > tail.cd_size / CENTRAL_HEADER_LEN as u64 {
        return Err("central directory size and entry count disagree".into());
    }
    let mut cd = vec![0u8; tail.cd_size as usize];
    file.read_exact_at(&mut cd, tail.cd_offset)
        .map_err(|e| format!("reading the central directory: {e}"))?;
    let entries = parse_central_directory(&cd, tail.entries, tail.cd_offset)?;
    Ok((tail, entries))
}

/// An error reading an entry's data: bytes that do not check out (a CRC-32
/// mismatch, a corrupt deflate stream, data shorter than its size) are
/// [`Error::Corrupt`], naming the entry; anything else is the I/O error it is.
fn data_error(e: &Entry, err: io::Error) -> Error {
    match err.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            let msg = err.to_string();
            if msg.contains(e.name()) {
                Error::Corrupt(msg)
            } else {
                Error::Corrupt(format!("{}: {msg}", e.name()))
            }
        }
        _ => Error::Io(err),
    }
}
