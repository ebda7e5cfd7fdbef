//! gtar-logd: a daemon that streams training checkpoints into GETAR archives.
//!
//! Layers, bottom up: [`gtar`] (the file format, synchronous), then the
//! writer pipeline, catalog and gRPC service built on it.
//!
//! # Public face
//!
//! The library exists for the `gtar-logd` binary (`src/main.rs`), the
//! integration tests and the benchmarks; what they need is what this file
//! exports, and everything else is private to the crate:
//! * the commands: [`daemon`] (`serve`), [`view`], the offline [`cli`]
//!   commands and the [`lifecycle`] after the save (compact, snapshot,
//!   export);
//! * starting a server in-process, as the tests do: [`server`] with its
//!   [`Config`] and the [`listen`]ers it takes;
//! * the settings the command line exposes: [`limits`], [`PeerLimits`],
//!   [`RemoteUrl`], [`WriterLimits`];
//! * the wire types, [`proto`], and the storage dtype they map to, [`DType`].
//!
//! The rest (the writer actor, the catalog, frame assembly, the gRPC
//! handlers, shared memory, users and the systemd glue) is reachable only
//! through those.

mod archives;
mod assembly;
mod auth;
mod authority;
mod catalog;
pub mod cli;
pub mod daemon;
mod error;
mod layout;
pub mod lifecycle;
pub mod limits;
pub mod listen;
mod peer;
mod query;
pub mod remote;
pub mod server;
mod service;
mod shm;
mod slice_read;
mod systemd;
mod users;
pub mod view;
mod writer;

pub use gtar_logd_proto as proto;
pub use layout::DType;
pub use peer::PeerLimits;
pub use remote::RemoteUrl;
pub use server::Config;
pub use writer::Limits as WriterLimits;
