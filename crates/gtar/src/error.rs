//! The format layer's one error type: what callers match on (a locked
//! archive, a missing record, corruption) and everything else as I/O.

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
