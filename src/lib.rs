//! gtar-logd: a daemon that streams training checkpoints into GETAR archives.
//!
//! Layers, bottom up: [`gtar`] (the file format, synchronous), then the
//! writer pipeline, catalog and gRPC service built on it.

pub mod archives;
pub mod assembly;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod layout;
pub mod lifecycle;
pub mod limits;
pub mod listen;
pub mod peer;
pub use gtar_logd_proto as proto;
pub mod query;
pub mod remote;
pub mod server;
pub mod service;
pub mod shm;
pub mod slice_read;
pub mod systemd;
pub mod users;
pub mod view;
pub mod writer;
