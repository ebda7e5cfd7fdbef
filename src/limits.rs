//! Every size limit of the daemon, in one place, and the checks that they
//! agree with each other (compile-time asserts below).
//!
//! The wire: a gRPC message the daemon accepts or sends is at most
//! [`MAX_MESSAGE`]. Anything bigger travels in pieces: tensors and records
//! are written as a header plus `chunk`s, and read as a stream of
//! [`SEND_CHUNK`]-sized chunks (GetFrame, TensorHistory) or in ranges of at
//! most [`RECORD_READ_DEFAULT`] (ReadRecord), which stay under the 4 MiB
//! that grpcurl and grpcio receive by default.

/// Largest gRPC message the daemon accepts or sends (a chunk plus headers).
pub const MAX_MESSAGE: usize = 16 << 20;

/// What grpcurl and grpcio accept by default; answers a client did not ask
/// to be bigger stay under it.
pub const CLIENT_DEFAULT_RECEIVE: usize = 4 << 20;

/// Chunk size of streamed answers (GetFrame, TensorHistory).
pub const SEND_CHUNK: usize = 1 << 20;

/// Bytes of a record one ReadRecord answer holds unless the request asks
/// for fewer (`max_bytes`) — or more, up to [`RECORD_READ_MAX`].
pub const RECORD_READ_DEFAULT: u64 = 3 << 20;
/// The most one ReadRecord answer holds whatever the request asks.
pub const RECORD_READ_MAX: u64 = 12 << 20;
/// A record is also returned as `text` only when it is at most this big
/// (and whole in the answer, and UTF-8): `data` + `text` then stay small.
pub const RECORD_TEXT_MAX: u64 = 1 << 20;

/// Default of `--max-tensor-bytes`: the largest tensor or record a client
/// may write (1 TiB).
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 1 << 40;

/// Tensors up to this size are compressed whole off the writer thread when
/// the stream asks for compression; larger ones are stored.
pub const COMPRESS_MAX: u64 = 256 << 20;

/// Largest number of dimensions of a tensor.
pub const MAX_RANK: usize = 32;

/// Longest name component (group part, tensor or scalar name, frame index),
/// in bytes: like a file name, so an archive unzips anywhere.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Longest archive name (a path relative to the data directory), in bytes.
pub const MAX_ARCHIVE_NAME_BYTES: usize = 4096;

/// Default of `--frame-deadline`: how long in total a frame may keep its
/// archive's writer (and so every other writer of the archive) waiting for
/// the client's next bytes; see `writer` for the credit below.
pub const DEFAULT_FRAME_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Each this many bytes a frame has delivered add one second to its deadline:
/// a multi-GiB frame from a client slower than the disk is not cut off.
pub const FRAME_DEADLINE_CREDIT: u64 = 64 << 20;

/// Frames up to this many bytes (tensors, records, manifest) are assembled in
/// the stream and handed to the writer whole: a stalled or trickling small
/// frame never holds the archive. Bigger frames stream through to the disk
/// (no copy, bounded memory) under the frame deadline.
pub const SMALL_FRAME_MAX: u64 = 4 << 20;

/// Defaults of the idle limits: a Write stream that sends nothing for this
/// long is ended (`--stream-idle`), and a connection that exchanges no bytes
/// for this long is closed (`--connection-idle`).
pub const DEFAULT_STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(300);
pub const DEFAULT_CONNECTION_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// Defaults of the per-peer limits (a peer is a uid on the Unix socket, one
/// connection on TCP): live Write streams (`--peer-streams`), bytes of
/// uncommitted small frames held by the daemon (`--peer-bytes-in-flight`),
/// archives open for writing (`--peer-archives`).
pub const DEFAULT_PEER_STREAMS: usize = 64;
pub const DEFAULT_PEER_BYTES_IN_FLIGHT: u64 = 256 << 20;
pub const DEFAULT_PEER_ARCHIVES: usize = 32;

/// A `located` batch of frames (GetFrame/TensorHistory `batch`) holds at
/// most this many encoded bytes; a frame whose tensors alone take more is
/// sent unbatched, a message per tensor.
pub const LOCATED_BATCH_BYTES: usize = 1 << 20;

/// Room for the fields around the payload of one message.
const ENVELOPE: usize = 64 << 10;

const _: () = assert!(LOCATED_BATCH_BYTES + ENVELOPE <= CLIENT_DEFAULT_RECEIVE);

const _: () = assert!(SEND_CHUNK + ENVELOPE <= CLIENT_DEFAULT_RECEIVE);
// A ReadRecord answer holds `data`, plus `text` only for a whole record of
// at most RECORD_TEXT_MAX (so then `data` is that small too).
const _: () = assert!(RECORD_READ_DEFAULT as usize + ENVELOPE <= CLIENT_DEFAULT_RECEIVE);
const _: () = assert!(2 * RECORD_TEXT_MAX as usize + ENVELOPE <= CLIENT_DEFAULT_RECEIVE);
const _: () = assert!(RECORD_READ_MAX as usize + ENVELOPE <= MAX_MESSAGE);
const _: () = assert!(RECORD_TEXT_MAX <= RECORD_READ_DEFAULT);
const _: () = assert!(COMPRESS_MAX <= DEFAULT_MAX_TENSOR_BYTES);
// A peer may fill every stream's small-frame buffer twice (FRAMES_IN_FLIGHT)
// without hitting its bytes limit only with few streams; the limit is what
// bounds memory, so it must at least allow one small frame.
const _: () = assert!(SMALL_FRAME_MAX <= DEFAULT_PEER_BYTES_IN_FLIGHT);
const _: () = assert!(SMALL_FRAME_MAX as usize <= MAX_MESSAGE);

/// Remote storage (`serve --remote`): bytes read from the local file and
/// sent as one part of a multipart upload (memory per upload in flight).
pub const REMOTE_PART: usize = 16 << 20;
/// Parts of one multipart upload read and sent at once (memory per
/// archive uploading: this many [`REMOTE_PART`]s). 8 was slower than 4
/// against a local server on 2 cores (benches/remote.rs: 0.63× vs 0.85× a
/// plain upload, one run each, under load).
pub const REMOTE_PARTS_IN_FLIGHT: usize = 4;
/// A segment up to this size is uploaded with one PUT, larger ones as a
/// multipart upload of [`REMOTE_PART`]-sized parts.
pub const REMOTE_SINGLE_PUT_MAX: u64 = 32 << 20;
/// Default of `--remote-backlog-bytes`: durable bytes of one archive that may
/// wait for upload before the archive is reported lagging (the bytes wait in
/// the local file, not in memory).
pub const DEFAULT_REMOTE_BACKLOG_BYTES: u64 = 8 << 30;
/// Bytes a remote read fetches ahead of a small read (a local header, a
/// ReadRecord range): one request then serves the reads that follow.
pub const REMOTE_READ_AHEAD: u64 = 1 << 20;

const _: () = assert!(REMOTE_SINGLE_PUT_MAX >= REMOTE_PART as u64);
