//! gtar-logd: a daemon that streams training checkpoints into GETAR archives.
//!
//! Layers, bottom up: [`gtar`] (the file format, synchronous), then the
//! writer pipeline, catalog and gRPC service built on it.

pub mod cli;
pub mod gtar;
pub mod proto;
