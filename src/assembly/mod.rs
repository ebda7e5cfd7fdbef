//! Assembling frames written by several processes (ranks) of one job — no
//! protobuf here: the service's `ingest.rs` translates the wire to these
//! calls and these acks back to the wire.
//!
//! A rank's stream joins its job ([`Jobs::join`] → a [`Seat`]), and per frame
//! builds its part ([`RankFrame`]: whole tensors, slices of global tensors
//! ([`Slice`]), records) and commits it ([`Seat::commit`] → [`Tickets`]).
//! When every rank of the world has committed frame F, the parts are checked
//! to fit together and handed to the archive's writer as one ordinary frame;
//! each rank then hears [`Ack::Received`] and [`Ack::Durable`] for the whole
//! frame (and, with remote storage, [`Ack::Replicated`]), or [`Ack::Aborted`]
//! naming the ranks that were missing.
//!
//! Invariants (details in [`job`] and [`frame`]):
//! * Until every rank committed F and the parts agree, nothing of F reaches
//!   the writer: no reader sees any of it, and an abort touches nothing stored.
//! * A sharded tensor is stored once, as the global tensor at its usual
//!   record path; libgetar reads the frame as if one process had written it.
//! * The assembler never blocks an async worker: bookkeeping under a short
//!   lock; copies and shared-memory reads on blocking threads.
//!
//! Across nodes (a later issue): the commit decision is the one place that
//! needs every rank's part — `Seat::commit` counting the world. Parts held by
//! several daemons would each be written as an uncommitted segment, and the
//! frame committed by a conditional put of the remote manifest naming all of
//! them (see ARCHITECTURE.md, "Many processes, one frame").

pub mod frame;
pub mod job;
pub mod slices;

pub use frame::{RankFrame, Seg};
pub use job::{JobError, JobKey, Jobs, RankSpec, Seat, WriterSink};
pub use slices::Slice;

use tokio::sync::oneshot;

/// Why a frame of several ranks was dropped whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub index: String,
    pub reason: String,
    /// Ranks that had not committed the frame.
    pub missing: Vec<u32>,
    /// The parts disagreed (a bug in the senders, not a transient failure).
    pub bad_input: bool,
}

/// Why a rank's frame was not written.
#[derive(Debug, Clone)]
pub enum FrameError {
    /// The writer refused or failed it (as for a frame of one stream).
    Writer(crate::writer::WriterError),
    Aborted(Abort),
}

/// What a rank waits on after its commit.
pub struct Tickets {
    pub received: oneshot::Receiver<Result<gtar::Committed, FrameError>>,
    /// Resolves only after `received` resolved `Ok`.
    pub durable: oneshot::Receiver<Result<(), FrameError>>,
}

/// What a writing stream is told about one of its frames, in this order:
/// `Received` (visible to readers), `Durable` (fsynced), `Replicated` (in
/// remote storage); or `Aborted` instead of all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Received(FrameDone),
    Durable(FrameDone),
    Replicated(FrameDone),
    Aborted { seq: u64, abort: Abort },
}

/// A frame of a stream, as its acks name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameDone {
    pub index: String,
    /// The frame's number within the stream, from 0.
    pub seq: u64,
    /// Bytes the frame added to the archive.
    pub bytes: u64,
}

#[cfg(test)]
mod tests;
