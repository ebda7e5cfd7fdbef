//! The writer pipeline: one owner per open archive, on an OS thread of its own.
//!
//! Invariants:
//! * Exactly one [`ArchiveWriter`] per archive path in this process, owned by
//!   one dedicated thread; async code only sends it jobs over a bounded queue
//!   (`try_send`: a full queue is `RESOURCE_EXHAUSTED`, never unbounded memory).
//! * Frames are serialized: the thread takes one frame job at a time and
//!   drains that frame's own bounded part channel, so two clients appending to
//!   one archive never interleave, and memory per frame in flight is bounded by
//!   the part channel's capacity × chunk size.
//! * Ack order: `received` once the frame is committed (visible to readers
//!   through the shared index); `durable` once an fsync covering it returned.
//!   Group commit runs on a thread of its own ([`syncer`]): one fdatasync
//!   covers every frame committed while the previous one ran, and the writer
//!   never waits for the disk between frames.
//! * A frame whose parts stop (client gone, stream error, timeout) is aborted:
//!   truncated away, never visible.
//! * Bounded delay for other writers of an archive: while the thread waits
//!   for a frame's next part, every other frame of the archive waits too, so
//!   a frame may keep the thread waiting for its client at most
//!   [`Limits::frame_deadline`] in total, plus one second per
//!   [`FRAME_DEADLINE_CREDIT`] bytes it delivered (a big frame from a client
//!   slower than the disk is not cut off); then it is aborted
//!   ([`WriterError::Deadline`]). Frames that arrive whole (the service
//!   assembles small frames apart, [`WriterHandle::submit_frame`]) never
//!   make it wait, and go before queued streaming frames of other streams:
//!   a whole frame waits for at most the one frame in progress (one
//!   deadline), not for every stalled frame queued. A stream's own frames
//!   keep their order.
//! * Two live streams claim one (archive, group) only when both asked to
//!   share it ([`Lease::claim_group`]); the refusal names the holder.
//! * A full disk fails the frame, not the writer, and shows in health until
//!   a frame commits again ([`Registry::problems`]).
//! * A writer that hits an error it cannot recover from (failed fsync, panic)
//!   marks itself failed (see [`WriterState`]), fails every later job and
//!   says why in the log; other archives are unaffected.
//! * Shutdown: [`Registry::shutdown`] closes every writer: in-progress frames
//!   are aborted, then the central directory is written and fsynced.

mod actor;
mod error;
mod handle;
mod registry;
mod syncer;

pub use error::WriterError;
pub use handle::{Between, FrameTicket, Lease, Part, WriterHandle, WriterState};
pub use registry::Registry;

use std::time::Duration;

/// Tunables of the pipeline.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Frames that may wait for one archive's writer.
    pub queue_frames: usize,
    /// Parts (chunks) buffered per frame in flight.
    pub parts_per_frame: usize,
    /// How long in total a frame may keep the writer waiting for its data
    /// (plus a credit for the bytes it sent; module docs); then it is
    /// aborted so other writers of the archive go on.
    pub frame_deadline: Duration,
    /// Write the central directory after this long without frames, so other
    /// zip readers can open the archive while the daemon keeps it.
    pub idle_tail: Duration,
    /// Write large entries with O_DIRECT (see `gtar::writer`): far less CPU
    /// taken from the training job, no page-cache churn. Falls back to the
    /// page cache by itself where the file system refuses it.
    pub direct_io: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            queue_frames: 64,
            parts_per_frame: 4,
            frame_deadline: crate::limits::DEFAULT_FRAME_DEADLINE,
            idle_tail: Duration::from_secs(2),
            direct_io: true,
        }
    }
}
