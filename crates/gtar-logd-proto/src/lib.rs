//! The gtar-logd wire API, package `gtar.logd.v1`: messages, the tonic
//! client (`v1::logd_client::LogdClient`) and server stubs, and the encoded
//! file descriptor set for server reflection.
//!
//! Generated from `proto/gtar/logd/v1/logd.proto` and committed, so a plain
//! `cargo build` needs no `protoc`; the workspace's `tests/proto_drift.rs`
//! regenerates it and fails on drift. The daemon and `gtar-logd-client` both
//! depend on this crate, so the two can never disagree about the wire.

/// `gtar.logd.v1`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod v1 {
    include!("gtar.logd.v1.rs");
}

/// Encoded `FileDescriptorSet` of `gtar.logd.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("logd_descriptor.bin");
