//! The one table that maps error kinds to gRPC codes (the README's gRPC API
//! section says what each code means to a client).
//! Each layer's error enum states its [`Kind`] next to its definition (see
//! [`crate::error`]); [`code`] is the single place a kind becomes a code, and
//! [`to_status`] the single place an error becomes a [`Status`].

use tonic::{Code, Status};

pub use crate::error::Kind;
use crate::error::{BadField, Classify};

/// The table.
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::BadInput => Code::InvalidArgument,
        Kind::Outside => Code::PermissionDenied,
        Kind::Forbidden => Code::PermissionDenied,
        Kind::NotFound => Code::NotFound,
        Kind::Exhausted => Code::ResourceExhausted,
        Kind::Conflict => Code::FailedPrecondition,
        Kind::ShuttingDown => Code::Unavailable,
        Kind::TimedOut => Code::DeadlineExceeded,
        Kind::Internal => Code::Internal,
    }
}

pub fn status(kind: Kind, msg: impl Into<String>) -> Status {
    Status::new(code(kind), msg)
}

/// Any classified error as a status: its kind's code, its message.
pub fn to_status(e: &impl Classify) -> Status {
    status(e.kind(), e.to_string())
}

/// `From` for each layer's error, so handlers can use `?` (a blanket impl
/// over [`Classify`] is not allowed for a foreign type like `Status`).
macro_rules! status_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Status {
            fn from(e: $t) -> Status {
                to_status(&e)
            }
        }
    )*};
}
status_from!(
    BadField,
    crate::catalog::CatalogError,
    crate::archives::LeaseError,
    crate::archives::LifecycleError,
    crate::archives::ReadError,
    crate::remote::RemoteError,
    crate::writer::WriterError,
    crate::query::QueryError,
    crate::peer::QuotaError,
    crate::assembly::JobError
);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogError;
    use crate::writer::WriterError;

    #[test]
    fn the_table_matches_the_design() {
        assert_eq!(code(Kind::BadInput), Code::InvalidArgument);
        assert_eq!(code(Kind::NotFound), Code::NotFound);
        assert_eq!(code(Kind::Exhausted), Code::ResourceExhausted);
        assert_eq!(code(Kind::ShuttingDown), Code::Unavailable);
        assert_eq!(code(Kind::Internal), Code::Internal);
        let s: Status = CatalogError::Outside {
            name: "../x.zip".into(),
            root: "/data".into(),
        }
        .into();
        assert!(s.message().contains("/data"), "{}", s.message());
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
