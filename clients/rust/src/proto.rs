//! The generated `gtar.logd.v1` protobuf and gRPC code, shared with the daemon
//! (the daemon commits it as `src/proto/gtar.logd.v1.rs`; a drift test there
//! regenerates it from `proto/gtar/logd/v1/logd.proto`).
//!
//! The high-level [`Client`](crate::Client) covers the whole service; these
//! types are public for callers that need the raw messages, e.g. to build a
//! [`logd_client::LogdClient`] on a channel of their own.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!("../../../src/proto/gtar.logd.v1.rs");
