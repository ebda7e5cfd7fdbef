//! The one error type of the crate.

/// What can go wrong talking to gtar-logd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address could not be parsed or is of an unsupported kind.
    #[error("invalid gtar-logd address {address:?}: {why}")]
    Address {
        /// The address as given.
        address: String,
        /// Why it was refused.
        why: String,
    },
    /// The daemon could not be reached.
    #[error(
        "cannot connect to gtar-logd at {address}: {source}; is the daemon running? \
         Start it with `gtar-logd serve` (or pass its address, e.g. `unix:/path/to.sock` or `host:port`)"
    )]
    Connect {
        /// The address that was tried.
        address: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The daemon answered with a gRPC error status (`code()` tells which kind:
    /// `NotFound`, `InvalidArgument`, `ResourceExhausted`, ...).
    #[error("gtar-logd: {}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// A tensor given to the client is inconsistent (shape × dtype ≠ bytes), or
    /// a tensor was asked for as the wrong element type.
    #[error("invalid tensor: {0}")]
    Tensor(String),
    /// The daemon's answer broke the protocol's contract (see
    /// `proto/gtar/logd/v1/logd.proto`).
    #[error("gtar-logd protocol violation: {0}")]
    Protocol(String),
    /// A [`FrameWriter`](crate::FrameWriter) can no longer be used: its stream
    /// ended or an earlier write was cancelled halfway through a frame.
    #[error("write stream unusable: {0}")]
    WriterClosed(String),
    /// Runtime set-up failed (blocking client).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The gRPC status code, when the daemon answered with an error status.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// A copy of this error for fanning one stream failure out to many
    /// waiters (errors that are not `Clone` keep their message).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Status(s) => Error::Status(s.clone()),
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::Tensor(m) => Error::Tensor(m.clone()),
            other => Error::WriterClosed(other.to_string()),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        Error::Status(Box::new(s))
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
