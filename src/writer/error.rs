//! The writer layer's errors and their kinds (mapped to gRPC codes by
//! `service::errors`).

use std::path::Path;

use crate::error::{is_disk_full, Classify, Kind};

/// Errors of the writer layer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum WriterError {
    #[error("{0}")]
    Format(String),
    #[error("disk full while writing {0}")]
    DiskFull(String),
    #[error("too many frames queued for {0}; retry later")]
    QueueFull(String),
    #[error("the writer for {path} failed earlier: {why}")]
    Failed { path: String, why: String },
    #[error("frame aborted: {0}")]
    Aborted(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is open for writing by another process")]
    Locked(String),
    #[error("{0} is being written by another stream; CREATE would replace it")]
    Busy(String),
    #[error(
        "frame aborted: the client kept the writer of {path} waiting {waited_s:.1} s for its data \
         (limit: {limit_s} s plus 1 s per 64 MiB sent), and every other writer of the archive \
         waited with it; nothing of the frame was kept. Send the frame faster (or in one piece: \
         frames up to 4 MiB are assembled apart) or raise --frame-deadline \
         (GTAR_LOGD_FRAME_DEADLINE)"
    )]
    Deadline {
        path: String,
        waited_s: f64,
        limit_s: u64,
    },
    #[error(
        "{path} group {group:?} is being written by another live stream ({holder}). Wait for \
         it to finish, or write elsewhere: another archive name or group (GTARLogger(..., \
         group='run2'), Client.writer(..., group=...)); generic writers that mean to share one \
         group open both streams with share_group=True (Python) / share_group: true (Rust)"
    )]
    Held {
        path: String,
        group: String,
        holder: String,
    },
}

impl Classify for WriterError {
    fn kind(&self) -> Kind {
        match self {
            WriterError::Format(_) | WriterError::Failed { .. } => Kind::Internal,
            WriterError::DiskFull(_) | WriterError::QueueFull(_) => Kind::Exhausted,
            WriterError::Aborted(_) | WriterError::Invalid(_) => Kind::BadInput,
            WriterError::ShuttingDown => Kind::ShuttingDown,
            WriterError::Locked(_) | WriterError::Busy(_) | WriterError::Held { .. } => {
                Kind::Conflict
            }
            WriterError::Deadline { .. } => Kind::TimedOut,
        }
    }
}

impl WriterError {
    pub(super) fn from_gtar(path: &Path, e: gtar::Error) -> WriterError {
        match e {
            gtar::Error::Io(io) if is_disk_full(&io) => {
                WriterError::DiskFull(path.display().to_string())
            }
            gtar::Error::Invalid(s) => WriterError::Invalid(s),
            gtar::Error::Locked => WriterError::Locked(path.display().to_string()),
            e => WriterError::Format(format!("{}: {e}", path.display())),
        }
    }
}
