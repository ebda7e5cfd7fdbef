//! What kind of failure an error is, as far as a client is concerned.
//!
//! Each layer keeps its own error enum (catalog, writer, query, …) and says
//! next to its definition which [`Kind`] each variant is, by implementing
//! [`Classify`]. The service turns a kind into a gRPC code in exactly one
//! place (`service::errors::code`); nothing else maps errors to codes.
//!
//! Operating-system errors are classified here and only here (a full disk
//! or quota is [`Kind::Exhausted`] wherever it happens).

use std::io;

/// What went wrong, as far as a client is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Malformed request: the message names the field.
    BadInput,
    /// A path that would leave the data directory.
    Outside,
    /// Another user's archive (multi-user service): not the caller's to
    /// read, or never to write.
    Forbidden,
    /// Unknown archive, group, record or frame.
    NotFound,
    /// A queue, a limit or the disk is full.
    Exhausted,
    /// Conflicting use of an archive (another writer, CREATE while in use).
    Conflict,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A deadline or idle limit ran out (a stalled frame, a silent stream).
    TimedOut,
    /// Any other I/O or internal failure.
    Internal,
}

/// An error that knows its [`Kind`].
pub trait Classify: std::fmt::Display {
    fn kind(&self) -> Kind;
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The kind of a plain I/O error.
pub fn io_kind(e: &io::Error) -> Kind {
    if is_disk_full(e) {
        Kind::Exhausted
    } else if e.kind() == io::ErrorKind::NotFound {
        Kind::NotFound
    } else {
        Kind::Internal
    }
}

impl Classify for gtar::Error {
    fn kind(&self) -> Kind {
        match self {
            gtar::Error::Io(io) => io_kind(io),
            gtar::Error::Corrupt(_) => Kind::Internal,
            gtar::Error::NotFound(_) => Kind::NotFound,
            gtar::Error::Invalid(_) => Kind::BadInput,
            gtar::Error::Locked => Kind::Conflict,
        }
    }
}

/// Bad input in one field of a request. Validators are given the field's
/// name once and write it into `why`, which is the whole message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct BadField {
    pub field: String,
    pub why: String,
}

impl BadField {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> BadField {
        BadField {
            field: field.into(),
            why: why.into(),
        }
    }
}

impl Classify for BadField {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_quota_is_exhausted_wherever_it_comes_from() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(io_kind(&e), Kind::Exhausted);
            assert_eq!(gtar::Error::Io(e).kind(), Kind::Exhausted);
        }
        let gone = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(io_kind(&gone), Kind::NotFound);
        assert_eq!(gtar::Error::Locked.kind(), Kind::Conflict);
    }

    #[test]
    fn a_bad_field_names_its_field_once() {
        let e = BadField::new(
            "open.group",
            "open.group \"a/frames\" uses the reserved component \"frames\"",
        );
        assert_eq!(e.to_string().matches("open.group").count(), 1);
    }
}
