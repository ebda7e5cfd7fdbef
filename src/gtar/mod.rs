//! The GETAR format (libgetar's zip backend): record paths, the zip64 append
//! writer with atomic frames, the reader and its index, and repair.
//!
//! Synchronous by design: no tokio, no tonic. The daemon runs this code on
//! writer threads of its own; the CLI and tests call it directly.
//!
//! Invariants every module here keeps:
//! * archives we write are always zip64 (end record + locator), so libgetar
//!   opens them for reading *and* appending;
//! * a frame is a transaction: its entries become visible together or not at
//!   all, also after `kill -9` or power loss (see [`recover`]);
//! * a commit is durable only after [`ArchiveWriter::sync`] returns;
//! * reads check CRC-32 and size: damage is an error, never wrong data.

pub mod index;
pub mod path;
pub mod reader;
pub mod recover;
pub mod writer;
pub mod zipfmt;

pub use index::{Entry, Index};
pub use path::{index_cmp, Behavior, Format, FrameIndex, RecordPath, RecordType, Resolution};
pub use reader::{Archive, OpenState};
pub use recover::{repair, ScanReport};
pub use writer::{
    ArchiveWriter, Committed, Compression, EntryWriter, OpenMode, Precompressed, Txn,
};

/// Errors of the format layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    #[error("no such record: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the archive is open for writing by another process")]
    Locked,
}
