//! gtar-logd: a daemon that streams training checkpoints into GETAR archives.
//!
//! Layers, bottom up: [`gtar`] (the file format, synchronous), then the
//! writer pipeline, catalog and gRPC service built on it.

pub mod catalog;
pub mod cli;
pub mod layout;
pub mod lifecycle;
pub mod proto;
pub mod query;
pub mod server;
pub mod service;
pub mod shm;
pub mod systemd;
pub mod writer;
