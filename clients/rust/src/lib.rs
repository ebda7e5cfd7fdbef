//! Rust client for gtar-logd, the daemon that streams
//! training checkpoints into GETAR (libgetar zip64) archives.
//!
//! Write frames of `ndarray` tensors of any supported dtype (`f32 f64 i32 i64
//! u8 u32 u64`, `f16` and `bf16` from the `half` crate, `i8 i16 u16 bool`);
//! read frames, records and tensor histories back as [`DynArray`]s,
//! bit-exactly; wait for the daemon's durable acks.
//!
//! ```no_run
//! use gtar_logd_client::{Client, FrameSel, OpenOptions, TensorData};
//! use ndarray::Array2;
//!
//! # async fn demo() -> gtar_logd_client::Result<()> {
//! let client = Client::connect("unix:/run/user/1000/gtar-logd/gtar-logd.sock").await?;
//! let mut w = client.writer("runs/demo.zip", OpenOptions::append()).await?;
//! let weight = Array2::<f32>::eye(3);
//! let frame = w.write_frame("0", [("layer/0", "weight", TensorData::from(&weight))]).await?;
//! frame.await?; // durable
//! w.close().await?;
//! let last = client.get_frame("runs/demo.zip", FrameSel::LAST).await?;
//! let got = last.tensors[0].array.as_array::<f32>().unwrap();
//! assert_eq!(got, &weight.into_dyn());
//! # Ok(()) }
//! ```
//!
//! # A complete program
//!
//! `examples/quickstart.rs`, which this crate's tests run against a real
//! daemon over the Unix socket and over TCP; run it with
//! `cargo run --release -p gtar-logd-client --example quickstart -- unix:/path/to.sock`:
//!
//! ```no_run
#![doc = include_str!("../examples/quickstart.rs")]
//! ```
//!
//! Addresses: `unix:/path/to.sock`, `unix:///path`, `http://host:port` or
//! `host:port`; the default is `$GTAR_LOGD_ADDRESS`, then `$GTAR_LOGD_UDS`, then
//! the daemon's default socket (see [`Address::from_env`]). For code without
//! an async runtime, see [`blocking`].
//!
//! On a Unix socket, tensor bytes go through a shared memory region (a sealed
//! memfd the daemon maps) instead of the socket, when the daemon runs as the
//! same user: one copy here, and the daemon writes them to disk from those
//! pages. [`Opened::shm_attached`] says whether it did; turn it off with
//! [`OpenOptions::shared_memory`].

#![deny(missing_docs)]

mod address;
pub mod blocking;
mod client;
mod error;
pub mod proto;
mod shm;
mod tensor;
mod writer;

pub use address::Address;
pub use client::{
    ArchiveDescription, ArchiveInfo, Client, Compacted, Frame, FrameQuery, FrameSel, FrameState,
    KeepPolicy, Slice, Snapshot, Tensor,
};
pub use error::{Error, Result};
pub use tensor::{DType, DynArray, Element, TensorData};
pub use writer::{
    Ack, FrameHandle, FrameWriter, NewFrame, OpenMode, OpenOptions, Opened, CHUNK_BYTES,
    DEFAULT_SHM_SIZE,
};

pub use half;
pub use ndarray;
pub use tonic::Code;
