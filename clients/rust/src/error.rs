//! The one error type of the crate.

use std::fmt;

use crate::address::Address;

/// What can go wrong talking to gtar-logd.
///
/// `Debug` prints the same message as `Display`, so a `main` that returns
/// `Result<(), Error>` (or a `Box<dyn std::error::Error>` holding one) and an
/// `unwrap()` show what went wrong in words, not a struct dump.
#[derive(thiserror::Error)]
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
    /// The daemon could not be reached. The message says why (no socket
    /// file, connection refused, permission denied, no answer), how to start
    /// a daemon that listens there, and where `gtar-logd serve` listens by
    /// default.
    #[error("{}", connect_message(address, source))]
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

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The innermost I/O error in an error's source chain: the reason a
/// connection failed, under tonic's and hyper's wrappers.
fn root_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut found = None;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            found = Some(io);
        }
        cur = err.source();
    }
    found
}

/// The innermost message in an error's source chain (tonic's own Display is
/// only "transport error").
fn root_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `Error::Connect`'s message: the address, why it failed, and what to do.
fn connect_message(address: &str, source: &tonic::transport::Error) -> String {
    use std::io::ErrorKind as K;
    let parsed: Option<Address> = address.parse().ok();
    let unix = matches!(parsed, Some(Address::Unix(_)));
    let why = match root_io_error(source) {
        Some(io) => {
            let what = match io.kind() {
                K::NotFound if unix => "no such socket file",
                K::ConnectionRefused if unix => {
                    "connection refused: the socket file exists but no daemon is listening on it"
                }
                K::ConnectionRefused => "connection refused: nothing is listening on that port",
                K::PermissionDenied => {
                    "permission denied: the socket belongs to another user (the daemon's \
                     --socket-group and --socket-mode decide who may connect)"
                }
                K::TimedOut => "no answer",
                _ => "",
            };
            if what.is_empty() {
                io.to_string()
            } else {
                format!("{what} ({io})")
            }
        }
        None => root_message(source),
    };
    let default = Address::default_socket();
    let defaults =
        "$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock, else /tmp/gtar-logd-$UID/gtar-logd.sock";
    let start = match &parsed {
        Some(Address::Unix(p)) if *p == default => {
            return format!(
                "cannot connect to gtar-logd at {address}: {why}. Is the daemon running? \
                 Start it with `gtar-logd serve`: with no flags it listens on this socket \
                 ({defaults}). A daemon started with --uds or --tcp listens where it logs \
                 `listening address=...` at startup; pass that address \
                 (`unix:/path/to.sock` or `host:port`)"
            );
        }
        Some(Address::Unix(p)) => format!("`gtar-logd serve --uds {}`", p.display()),
        Some(Address::Tcp(uri)) => format!(
            "`gtar-logd serve --tcp {}`",
            uri.strip_prefix("http://").unwrap_or(uri)
        ),
        None => "`gtar-logd serve`".to_string(),
    };
    format!(
        "cannot connect to gtar-logd at {address}: {why}. Is the daemon running? \
         Start one there with {start}, or pass the address a running daemon logs as \
         `listening address=...` at startup. With no flags, `gtar-logd serve` listens on \
         unix:{} ({defaults})",
        default.display()
    )
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
