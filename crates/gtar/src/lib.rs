//! The GETAR format (libgetar's zip backend): record paths, the zip64 append
//! writer with atomic frames, the reader and its index, and repair.
//!
//! Synchronous by design: no async runtime, no RPC (`cargo tree -p gtar -e
//! normal` shows it). The daemon runs this code on writer threads of its own;
//! the CLI and tests call it directly.
//!
//! The public face is what this file re-exports; the modules behind it are
//! private. Their graph has no cycles: `path`, `zipfmt` at the bottom, then
//! `index`, `scan` (recovery in memory), `checkpoint` (where a scan may
//! start), `reader`, `fsutil`, `repair`,
//! `direct` (the `O_DIRECT` engine) and `writer` on top. The lifecycle after
//! the save sits beside the writer: `retention` (keep policies, pure logic),
//! `copy` (kernel copies and atomic file replacement), `compact` and
//! `snapshot` (on `reader`, `scan`, `copy`, `fsutil`; never on `writer`).
//!
//! # Example
//!
//! Three frames of one record, each committed as a transaction and made
//! durable, then read back (libgetar reads the same file as
//! `gtar.GTAR(path, 'r').getRecord(...)`):
//!
//! ```
//! use gtar::{Archive, ArchiveWriter, Compression, OpenMode, RecordPath};
//!
//! # fn main() -> Result<(), gtar::Error> {
//! # let dir = std::env::temp_dir().join(format!("gtar-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let path = dir.join("run.zip");
//! let bytes = |v: f32| -> Vec<u8> { [v; 4].iter().flat_map(|x| x.to_le_bytes()).collect() };
//!
//! let (mut writer, _repaired) = ArchiveWriter::open(&path, OpenMode::Create)?;
//! for step in 0..3 {
//!     let mut frame = writer.begin()?;
//!     let name = format!("layer/0/frames/{step}/weight.f32.uni");
//!     frame.add(&name, &bytes(step as f32), Compression::Stored)?;
//!     frame.commit()?; // visible to readers, all of it or none
//!     writer.sync()?; // and durable
//! }
//! writer.close()?;
//!
//! let archive = Archive::open(&path)?;
//! let record = RecordPath::parse("layer/0/frames/2/weight.f32.uni");
//! assert_eq!(archive.index().frames(&record.rtype), ["0", "1", "2"]);
//! assert_eq!(archive.read("layer/0/frames/2/weight.f32.uni")?, bytes(2.0));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! Invariants every module here keeps:
//! * archives we write are always zip64 (end record + locator), so libgetar
//!   opens them for reading *and* appending;
//! * a frame is a transaction: its entries become visible together or not at
//!   all, also after `kill -9` or power loss (the commit mark, see `scan`);
//! * a commit is durable only after [`ArchiveWriter::sync`] returns;
//! * reads check CRC-32 and size: damage is an error, never wrong data.
//!
//! # What crash safety assumes of the file system
//!
//! As redb does, the assumptions in one list; if one does not hold, a crash
//! may lose or tear acknowledged frames.
//! 1. `fdatasync` (and `fsync`) returns only once every byte written to the
//!    file before the call, and the file size, are on stable storage, with
//!    the device's volatile cache flushed. A failed `fdatasync` is treated
//!    as fatal for the writer (the page cache may have dropped the dirty
//!    pages), never retried as if nothing happened.
//! 2. After a crash, bytes past the last successful `fdatasync` may be
//!    missing, zero, or stale, but bytes covered by it are exactly as
//!    written. Torn writes are detected by CRC and commit marks, so sectors
//!    need not be written atomically.
//! 3. `ftruncate` followed by `fdatasync` makes the shorter length durable;
//!    the writer never leaves stale bytes beyond its append position, so a
//!    scan from offset 0 (or from a verified recovery checkpoint, which is
//!    written only after the fdatasync covering it) can find where the last
//!    complete frame ends.
//! 4. A newly created file's directory entry is durable after an `fsync` of
//!    the directory (write → fsync the file → fsync the directory).
//! 5. `O_DIRECT` writes and buffered writes to different blocks of one file
//!    are both covered by the next `fdatasync` (the kernel keeps the page
//!    cache coherent with direct I/O). A file system that refuses `O_DIRECT`
//!    says so with EINVAL, and the writer falls back to the page cache.
//! 6. `flock` locks are advisory: they keep our own writers (and a repair)
//!    apart, not other programs. Another program appending while the daemon
//!    holds the archive is outside what we guarantee.

mod checkpoint;
mod compact;
mod copy;
mod direct;
mod error;
mod fsutil;
mod index;
mod path;
mod reader;
mod repair;
mod retention;
mod scan;
mod snapshot;
mod writer;
mod zipfmt;

pub use checkpoint::{sidecar_path, Checkpoints, SAMPLES as CHECKPOINT_SAMPLES, SIDECAR_SUFFIX};
pub use compact::{entry_time, CompactPlan, Compacted, Exclusive, Rewriter};
pub use copy::CopyStats;
pub use error::Error;
pub use fsutil::is_being_written;
pub use index::{group_under, Entry, Index, Learned, FRAME_MARKER_GROUP};
pub use path::{
    check_component, index_cmp, Behavior, Format, FrameIndex, RecordPath, RecordType, Resolution,
};
pub use reader::{Archive, EntryReader, OpenState, ReadAt};
pub use repair::repair;
pub use retention::{select, Best, Decision, Direction, FrameFacts, Policy, Reason};
pub use scan::ScanReport;
pub use snapshot::{snapshot, snapshot_path, CommittedView, Snapshot};
pub use writer::{
    ArchiveWriter, Committed, Compression, EntryWriter, OpenMode, Precompressed, Txn,
};
pub use zipfmt::{encode_tail, CentralEntry};

/// Entries at least this large have their data written with `O_DIRECT` once
/// [`ArchiveWriter::enable_direct_io`] is on (and start on a 4 KiB boundary).
pub const DIRECT_MIN: u64 = direct::DIRECT_MIN;
