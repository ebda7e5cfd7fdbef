//! The one table that maps error kinds to gRPC codes (DESIGN.md → Errors).
//! Each layer keeps its own error enum; here each is classified into a
//! [`Kind`], and [`code`] is the single place a kind becomes a code.

use tonic::{Code, Status};

use crate::catalog::CatalogError;
use crate::writer::WriterError;

/// What went wrong, as far as a client is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Malformed request: the message names the field.
    BadInput,
    /// A path that would leave the data directory.
    Outside,
    /// Unknown archive, group, record or frame.
    NotFound,
    /// Queue or disk full.
    Exhausted,
    /// Conflicting use of an archive (another writer, CREATE while in use).
    Conflict,
    /// The daemon is shutting down.
    ShuttingDown,
    /// Any other I/O or internal failure.
    Internal,
}

/// The table.
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::BadInput => Code::InvalidArgument,
        Kind::Outside => Code::PermissionDenied,
        Kind::NotFound => Code::NotFound,
        Kind::Exhausted => Code::ResourceExhausted,
        Kind::Conflict => Code::FailedPrecondition,
        Kind::ShuttingDown => Code::Unavailable,
        Kind::Internal => Code::Internal,
    }
}

pub fn status(kind: Kind, msg: impl Into<String>) -> Status {
    Status::new(code(kind), msg)
}

/// Prefix of prost's decode errors, which tonic reports as INTERNAL.
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// A request that does not decode (e.g. a string field that is not UTF-8) is
/// bad input, not an internal error: remap tonic's INTERNAL for it.
pub fn remap_decode(s: Status) -> Status {
    if s.code() == Code::Internal && s.message().starts_with(DECODE_ERROR) {
        status(Kind::BadInput, format!("request: {}", s.message()))
    } else {
        s
    }
}

/// The same remapping for trailers-only responses (unary requests whose
/// message fails to decode before a handler runs): rewrites `grpc-status`.
pub fn remap_decode_headers(headers: &mut tonic::codegen::http::HeaderMap) {
    let internal = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    let decode = headers.get("grpc-message").is_some_and(|v| {
        // grpc-message is percent-encoded; the prefix has only spaces to decode.
        v.to_str()
            .map(|m| m.replace("%20", " ").starts_with(DECODE_ERROR))
            .unwrap_or(false)
    });
    if internal && decode {
        let code = (code(Kind::BadInput) as i32).to_string();
        headers.insert(
            "grpc-status",
            code.parse().expect("a number is a header value"),
        );
    }
}

/// Bad input in a named field.
pub fn bad(field: &str, why: impl std::fmt::Display) -> Status {
    status(Kind::BadInput, format!("{field}: {why}"))
}

pub fn gtar_kind(e: &gtar::Error) -> Kind {
    match e {
        gtar::Error::Io(io) if io.raw_os_error() == Some(28) => Kind::Exhausted,
        gtar::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => Kind::NotFound,
        gtar::Error::Io(_) | gtar::Error::Corrupt(_) => Kind::Internal,
        gtar::Error::NotFound(_) => Kind::NotFound,
        gtar::Error::Invalid(_) => Kind::BadInput,
        gtar::Error::Locked => Kind::Conflict,
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        let kind = match &e {
            CatalogError::BadName { .. } => Kind::BadInput,
            CatalogError::Outside(_) => Kind::Outside,
            CatalogError::NotFound(_) => Kind::NotFound,
            CatalogError::Format { source, .. } => gtar_kind(source),
            CatalogError::Io(io) if io.raw_os_error() == Some(28) => Kind::Exhausted,
            CatalogError::Io(_) => Kind::Internal,
        };
        status(kind, e.to_string())
    }
}

impl From<WriterError> for Status {
    fn from(e: WriterError) -> Status {
        let kind = match &e {
            WriterError::Format(_) | WriterError::Failed { .. } => Kind::Internal,
            WriterError::DiskFull(_) | WriterError::QueueFull(_) => Kind::Exhausted,
            WriterError::Aborted(_) => Kind::BadInput,
            WriterError::ShuttingDown => Kind::ShuttingDown,
            WriterError::Invalid(_) => Kind::BadInput,
            WriterError::Locked(_) | WriterError::Busy(_) => Kind::Conflict,
        };
        status(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_the_design() {
        assert_eq!(code(Kind::BadInput), Code::InvalidArgument);
        assert_eq!(code(Kind::NotFound), Code::NotFound);
        assert_eq!(code(Kind::Exhausted), Code::ResourceExhausted);
        assert_eq!(code(Kind::ShuttingDown), Code::Unavailable);
        assert_eq!(code(Kind::Internal), Code::Internal);
        let s: Status = CatalogError::Outside("../x.zip".into()).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status = WriterError::DiskFull("a.zip".into()).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s = remap_decode(Status::internal(
            "failed to decode Protobuf message: invalid string",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            remap_decode(Status::internal("disk")).code(),
            Code::Internal
        );
        let mut h = tonic::codegen::http::HeaderMap::new();
        h.insert("grpc-status", "13".parse().unwrap());
        h.insert(
            "grpc-message",
            "failed%20to%20decode%20Protobuf%20message".parse().unwrap(),
        );
        remap_decode_headers(&mut h);
        assert_eq!(h["grpc-status"], "3");
    }
}
