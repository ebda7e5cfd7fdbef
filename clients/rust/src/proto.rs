//! The generated `gtar.logd.v1` protobuf and gRPC code: the crate
//! `gtar-logd-proto`, which the daemon uses too.
//!
//! The high-level [`Client`](crate::Client) covers the whole service; these
//! types are public for callers that need the raw messages, e.g. to build a
//! [`logd_client::LogdClient`] on a channel of their own.

pub use gtar_logd_proto::v1::*;
