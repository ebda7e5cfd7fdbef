//! Generated from `proto/gtar/logd/v1/logd.proto` (committed; `tests/proto_drift.rs`
//! regenerates it and fails on drift).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    include!("gtar.logd.v1.rs");
}

/// Encoded `FileDescriptorSet` for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("logd_descriptor.bin");
