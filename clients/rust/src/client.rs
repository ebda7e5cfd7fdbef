//! The async client: connect, then query or open a [`FrameWriter`].

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::proto::{self, logd_client::LogdClient};
use crate::tensor::{DType, DynArray, Filling};
use crate::writer::{FrameWriter, OpenOptions};

/// Largest gRPC message the client sends or accepts: the daemon accepts 16 MiB.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// How long connecting may take before it fails.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The channel with the TCP token added to every request (when there is one).
pub type Transport = tonic::service::interceptor::InterceptedService<Channel, Auth>;

/// Adds `authorization: Bearer <token>` to each request on TCP, where the
/// daemon cannot know who is asking ([`Address::token`]); nothing on a Unix
/// socket.
#[derive(Clone, Default)]
pub struct Auth {
    /// On TCP, where the token comes from: read again until found, because a
    /// socket-activated daemon writes its token file only once the first
    /// connection has started it.
    address: Option<Address>,
    token: Arc<Mutex<Option<BearerValue>>>,
}

type BearerValue = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

fn bearer(address: &Address) -> Result<Option<BearerValue>> {
    address
        .token()?
        .map(|t| {
            format!("Bearer {t}").parse().map_err(|_| Error::Address {
                address: address.to_string(),
                why: "the TCP token is not printable ASCII".into(),
            })
        })
        .transpose()
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        let known = self
            .token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        f.write_str(if known { "Auth(token)" } else { "Auth(none)" })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut r: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let mut token = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if token.is_none() {
            if let Some(a) = &self.address {
                // An unreadable file now is reported by the daemon's answer
                // (UNAUTHENTICATED names the file).
                *token = bearer(a).ok().flatten();
            }
        }
        if let Some(v) = &*token {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A connection to gtar-logd. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: LogdClient<Transport>,
    address: Address,
    /// Check the CRC-32 of tensors read from the archive file ([`Client::verify_reads`]).
    verify: bool,
}

/// Which frame to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameSel {
    /// A frame index string, e.g. `"12"`.
    Index(String),
    /// A position in the frame list (GETAR order); negative counts from the
    /// end, `-1` is the last frame.
    Position(i64),
}

impl FrameSel {
    /// The frame with this index string.
    pub fn index(i: impl Into<String>) -> FrameSel {
        FrameSel::Index(i.into())
    }

    /// The last frame.
    pub const LAST: FrameSel = FrameSel::Position(-1);
}

impl From<i64> for FrameSel {
    fn from(p: i64) -> FrameSel {
        FrameSel::Position(p)
    }
}

impl From<&str> for FrameSel {
    fn from(i: &str) -> FrameSel {
        FrameSel::Index(i.to_string())
    }
}

impl From<String> for FrameSel {
    fn from(i: String) -> FrameSel {
        FrameSel::Index(i)
    }
}

/// A GetFrame request with every option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameQuery {
    /// Group prefix (keras_gtar's `group`); empty = the whole archive.
    pub group: String,
    /// The frame.
    pub frame: FrameSel,
    /// Only records with these names (e.g. `"weight"`); empty = all.
    pub names: Vec<String>,
    /// Only this box of each tensor (every tensor of the answer must have
    /// its dimensions and contain it); `None` = whole tensors.
    pub slice: Option<Slice>,
}

/// A box inside a tensor: `offsets` where it starts, `shape` its extent, one
/// entry per dimension (none for a scalar). Read with [`FrameQuery::slice`]
/// or [`Client::read_slice`]: only the box's bytes are read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Slice {
    /// Where the box starts in each dimension.
    pub offsets: Vec<u64>,
    /// The box's extent in each dimension.
    pub shape: Vec<u64>,
}

impl Slice {
    /// The box `ranges[0] × ranges[1] × …` (e.g. `Slice::of(&[0..128, 0..64])`).
    pub fn of(ranges: &[std::ops::Range<u64>]) -> Slice {
        Slice {
            offsets: ranges.iter().map(|r| r.start).collect(),
            shape: ranges
                .iter()
                .map(|r| r.end.saturating_sub(r.start))
                .collect(),
        }
    }

    /// Elements in the box.
    pub fn elems(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The box's contiguous byte runs in a row-major tensor of `global` shape
    /// and `item`-byte elements, as (byte offset in the tensor, bytes), in
    /// the box's own row-major order: the innermost dimensions the box
    /// covers whole are merged into one run. `None` if the box does not lie
    /// inside the tensor.
    pub fn byte_runs(&self, global: &[u64], item: u64) -> Option<Vec<(u64, u64)>> {
        let nd = global.len();
        if self.offsets.len() != nd
            || self.shape.len() != nd
            || (0..nd).any(|d| {
                self.offsets[d]
                    .checked_add(self.shape[d])
                    .is_none_or(|e| e > global[d])
            })
        {
            return None;
        }
        if self.elems() == 0 {
            return Some(Vec::new());
        }
        if nd == 0 {
            return Some(vec![(0, item)]);
        }
        // `k`: the last dimension the box does not cover whole; one run
        // spans the box's extent in `k` and every dimension after it.
        let k = (0..nd)
            .rev()
            .find(|&d| self.offsets[d] != 0 || self.shape[d] != global[d])
            .unwrap_or(0);
        let mut strides = vec![1u64; nd];
        for d in (0..nd - 1).rev() {
            strides[d] = strides[d + 1] * global[d + 1];
        }
        let len = self.shape[k..].iter().product::<u64>() * item;
        let count: u64 = self.shape[..k].iter().product();
        let mut runs = Vec::with_capacity(count as usize);
        for r in 0..count {
            let mut rest = r;
            let mut at = self.offsets[k] * strides[k];
            for d in (0..k).rev() {
                at += (self.offsets[d] + rest % self.shape[d]) * strides[d];
                rest /= self.shape[d];
            }
            runs.push((at * item, len));
        }
        Some(runs)
    }
}

impl FrameQuery {
    /// All tensors of `frame`, any group.
    pub fn new(frame: impl Into<FrameSel>) -> FrameQuery {
        FrameQuery {
            group: String::new(),
            frame: frame.into(),
            names: Vec::new(),
            slice: None,
        }
    }

    /// Only this box of each tensor (see [`Slice`]).
    pub fn slice(mut self, slice: Slice) -> FrameQuery {
        self.slice = Some(slice);
        self
    }

    /// Only tensors under this group prefix.
    pub fn group(mut self, group: impl Into<String>) -> FrameQuery {
        self.group = group.into();
        self
    }

    /// Only records with these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> FrameQuery {
        self.names = names.into_iter().map(Into::into).collect();
        self
    }
}

/// Where a frame stands ([`Client::list_frame_states`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameState {
    /// An fsync covered it (its `durable` ack is due or sent).
    pub durable: bool,
    /// With a daemon that replicates (`serve --remote`): in the committed
    /// remote manifest. `None`: no remote, or not known yet.
    pub replicated: Option<bool>,
}

/// One tensor read back from an archive.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Record path in the archive, e.g. `run1/layer/0/frames/3/weight.f32.uni`.
    pub path: String,
    /// Record group, with any stream prefix, e.g. `run1/layer/0`.
    pub group: String,
    /// Record name, e.g. `weight`.
    pub name: String,
    /// The values, with the dtype and shape they were written with.
    pub array: DynArray,
}

/// The tensors of one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Frame index string.
    pub index: String,
    /// Tensors in archive order.
    pub tensors: Vec<Tensor>,
}

impl Frame {
    /// The tensor with this group (full, with any prefix) and name.
    pub fn get(&self, group: &str, name: &str) -> Option<&Tensor> {
        self.tensors
            .iter()
            .find(|t| t.group == group && t.name == name)
    }
}

/// An archive under the daemon's data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// Name relative to the data directory.
    pub archive: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// True while a Write stream has it open.
    pub writing: bool,
}

/// DescribeArchive's answer: groups, record types, frame count, first and
/// last frame.
pub type ArchiveDescription = proto::DescribeArchiveResponse;

/// A keep policy for [`Client::compact`]: a frame kept by any field is kept;
/// set at least one.
pub type KeepPolicy = proto::KeepPolicy;
/// What [`Client::compact`] kept, dropped and reclaimed.
pub type Compacted = proto::CompactResponse;
/// What [`Client::snapshot`] made.
pub type Snapshot = proto::SnapshotResponse;

impl Client {
    /// Connect to the daemon at `address` (see [`Address`] for the accepted
    /// spellings; an empty string means [`Address::from_env`]).
    pub async fn connect(address: &str) -> Result<Client> {
        let address = if address.trim().is_empty() {
            Address::from_env()?
        } else {
            address.parse()?
        };
        Client::connect_to(address).await
    }

    /// Connect to the default address ([`Address::from_env`]).
    pub async fn connect_default() -> Result<Client> {
        Client::connect_to(Address::from_env()?).await
    }

    /// Connect to a parsed address.
    pub async fn connect_to(address: Address) -> Result<Client> {
        let connect_err = |source| Error::Connect {
            address: address.to_string(),
            source,
        };
        let channel = match &address {
            Address::Tcp(uri) => Endpoint::from_shared(uri.clone())
                .map_err(connect_err)?
                .connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await
                .map_err(connect_err)?,
            Address::Unix(path) => {
                let path: PathBuf = path.clone();
                // The URI is required by tonic but unused: the connector
                // ignores it and dials the socket.
                Endpoint::from_static("http://[::]:50051")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(connect_err)?
            }
        };
        Client::from_channel(channel, address)
    }

    /// Use a channel set up by the caller (TLS, timeouts, ...). On TCP the
    /// token is read as [`Address::token`] says.
    pub fn from_channel(channel: Channel, address: Address) -> Result<Client> {
        let auth = Auth {
            token: Arc::new(Mutex::new(bearer(&address)?)),
            address: matches!(address, Address::Tcp(_)).then(|| address.clone()),
        };
        let inner = LogdClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Client {
            inner,
            address,
            verify: false,
        })
    }

    /// Whether to ask the daemon where stored tensors lie in the archive
    /// file, to read them from the file directly: on the Unix socket only
    /// (the daemon grants it to the file's owner or root; otherwise, and for
    /// compressed records, the bytes are streamed).
    fn locate(&self) -> bool {
        matches!(self.address, Address::Unix(_))
    }

    /// Check the CRC-32 of every tensor this client reads from the archive
    /// file itself (located reads, on the Unix socket). Off by default, as
    /// in the Python client: the daemon locates only committed entries, the
    /// file is checked to be the one it located them in (device and inode),
    /// and the bytes come through the same kernel path the daemon's own
    /// reads take; what the check adds is detecting bit rot on the disk, at
    /// the cost of a CRC pass (about a third of a warm load). Streamed
    /// tensors are always checked by the daemon.
    pub fn verify_reads(mut self, on: bool) -> Client {
        self.verify = on;
        self
    }

    /// The address this client is connected to.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The generated gRPC client, for calls this crate does not wrap.
    pub fn raw(&self) -> LogdClient<Transport> {
        self.inner.clone()
    }

    /// Open a write stream into `archive` (a path relative to the daemon's
    /// data directory, e.g. `"runs/mnist.zip"`).
    pub async fn writer(&self, archive: &str, options: OpenOptions) -> Result<FrameWriter> {
        FrameWriter::open(self.inner.clone(), archive, options).await
    }

    /// Archives whose name starts with `prefix` (empty = all).
    pub async fn list_archives(&self, prefix: &str) -> Result<Vec<ArchiveInfo>> {
        let r = self
            .inner
            .clone()
            .list_archives(proto::ListArchivesRequest {
                prefix: prefix.into(),
            })
            .await?
            .into_inner();
        Ok(r.archives
            .into_iter()
            .map(|a| ArchiveInfo {
                archive: a.archive,
                size_bytes: a.size_bytes,
                writing: a.writing,
            })
            .collect())
    }

    /// Groups, record types and frames of an archive.
    pub async fn describe(&self, archive: &str) -> Result<ArchiveDescription> {
        Ok(self
            .inner
            .clone()
            .describe_archive(proto::DescribeArchiveRequest {
                archive: archive.into(),
            })
            .await?
            .into_inner())
    }

    /// Apply a keep policy to `archive` while streams go on writing to it
    /// (the daemon's `Compact`): frames of records under `group` (empty =
    /// all) that no policy keeps are dropped; the newest is never dropped.
    /// With `dry_run`, only report what it would do.
    ///
    /// ```no_run
    /// # async fn f(c: gtar_logd_client::Client) -> gtar_logd_client::Result<()> {
    /// use gtar_logd_client::KeepPolicy;
    /// let keep = KeepPolicy { last: Some(3), best: "val_loss:min:2".into(), ..Default::default() };
    /// let done = c.compact("runs/a.zip", "", keep, false).await?;
    /// println!("dropped {:?}, {} bytes reclaimed", done.dropped, done.bytes_reclaimed);
    /// # Ok(()) }
    /// ```
    pub async fn compact(
        &self,
        archive: &str,
        group: &str,
        keep: KeepPolicy,
        dry_run: bool,
    ) -> Result<Compacted> {
        Ok(self
            .inner
            .clone()
            .compact(proto::CompactRequest {
                archive: archive.into(),
                group: group.into(),
                keep: Some(keep),
                dry_run,
            })
            .await?
            .into_inner())
    }

    /// A consistent copy of `archive` under the new name `destination` in
    /// the daemon's data directory, holding every frame acked before the
    /// call (the daemon's `Snapshot`; a reflink where the file system has one).
    pub async fn snapshot(&self, archive: &str, destination: &str) -> Result<Snapshot> {
        Ok(self
            .inner
            .clone()
            .snapshot(proto::SnapshotRequest {
                archive: archive.into(),
                destination: destination.into(),
            })
            .await?
            .into_inner())
    }

    /// Frame indices of an archive, or of the records under `group` (empty =
    /// all), in GETAR order (shorter first, then bytewise).
    pub async fn list_frames(&self, archive: &str, group: &str) -> Result<Vec<String>> {
        Ok(self
            .inner
            .clone()
            .list_frames(proto::ListFramesRequest {
                archive: archive.into(),
                group: group.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .frames)
    }

    /// Frame indices in GETAR order, each with where it stands (durable,
    /// replicated) as the daemon knows it now; every frame listed is
    /// received (committed, visible to readers).
    pub async fn list_frame_states(
        &self,
        archive: &str,
        group: &str,
    ) -> Result<Vec<(String, FrameState)>> {
        let r = self
            .inner
            .clone()
            .list_frames(proto::ListFramesRequest {
                archive: archive.into(),
                group: group.into(),
                states: true,
            })
            .await?
            .into_inner();
        if r.states.len() != r.frames.len() {
            return Err(Error::Protocol(format!(
                "ListFrames: {} states for {} frames (a daemon older than this client?)",
                r.states.len(),
                r.frames.len()
            )));
        }
        Ok(r.frames
            .into_iter()
            .zip(r.states)
            .map(|(f, s)| {
                (
                    f,
                    FrameState {
                        durable: s.durable,
                        replicated: s.replicated,
                    },
                )
            })
            .collect())
    }

    /// Each tensor's header (path, group, name, dtype, shape, size, CRC-32)
    /// of one frame, and the frame's index; the daemon reads no tensor bytes.
    pub async fn frame_headers(
        &self,
        archive: &str,
        frame: impl Into<FrameSel>,
    ) -> Result<(String, Vec<proto::TensorInfo>)> {
        use proto::frame_data::Msg;
        use proto::get_frame_request::Frame as Sel;
        let frame = Some(match frame.into() {
            FrameSel::Index(i) => Sel::Index(i),
            FrameSel::Position(p) => Sel::Position(p),
        });
        let mut stream = self
            .inner
            .clone()
            .get_frame(proto::GetFrameRequest {
                archive: archive.into(),
                frame,
                headers_only: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut index = None;
        let mut infos = Vec::new();
        while let Some(m) = stream.next().await {
            match m?.msg {
                Some(Msg::Frame(i)) => index = Some(i),
                Some(Msg::Tensor(t)) => infos.push(t),
                other => {
                    return Err(Error::Protocol(format!(
                        "GetFrame headers_only: unexpected {other:?}"
                    )))
                }
            }
        }
        let index =
            index.ok_or_else(|| Error::Protocol("GetFrame headers_only: no frame".into()))?;
        Ok((index, infos))
    }

    /// All tensors of one frame, e.g. `get_frame("a.zip", FrameSel::LAST)` or
    /// `get_frame("a.zip", "12")`.
    pub async fn get_frame(&self, archive: &str, frame: impl Into<FrameSel>) -> Result<Frame> {
        self.query_frame(archive, &FrameQuery::new(frame)).await
    }

    /// The tensors of one frame, filtered by group prefix and record names.
    pub async fn query_frame(&self, archive: &str, q: &FrameQuery) -> Result<Frame> {
        use proto::get_frame_request::Frame as Sel;
        let frame = Some(match &q.frame {
            FrameSel::Index(i) => Sel::Index(i.clone()),
            FrameSel::Position(p) => Sel::Position(*p),
        });
        let stream = self
            .inner
            .clone()
            .get_frame(proto::GetFrameRequest {
                archive: archive.into(),
                group: q.group.clone(),
                frame,
                names: q.names.clone(),
                locate: self.locate(),
                batch: self.locate(),
                slice: q.slice.as_ref().map(|s| proto::TensorSlice {
                    offsets: s.offsets.clone(),
                    shape: s.shape.clone(),
                }),
                headers_only: false,
            })
            .await?
            .into_inner();
        let mut frames = read_frames(stream, self.verify).await?;
        if frames.len() != 1 {
            return Err(Error::Protocol(format!(
                "GetFrame streamed {} frames, expected exactly one",
                frames.len()
            )));
        }
        Ok(frames.pop().expect("one frame"))
    }

    /// Box `slice` of one tensor (its record `group`, with any stream
    /// prefix, and `name`) of `frame`, as an array of the box's shape: only
    /// the box's bytes are read (streamed by the daemon, or read from the
    /// archive file in contiguous runs when located). A box that does not
    /// lie inside the tensor is `InvalidArgument` naming the tensor, its
    /// shape and the box.
    pub async fn read_slice(
        &self,
        archive: &str,
        frame: impl Into<FrameSel>,
        group: &str,
        name: &str,
        slice: Slice,
    ) -> Result<DynArray> {
        let q = FrameQuery::new(frame)
            .group(group)
            .names([name])
            .slice(slice);
        let f = self.query_frame(archive, &q).await?;
        let index = f.index.clone();
        f.tensors
            .into_iter()
            .find(|t| t.group == group && t.name == name)
            .map(|t| t.array)
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "frame {index} of {archive} has no tensor {group}/{name}"
                ))
            })
    }

    /// One constant or text record, e.g. `"keras/model.json"`, as bytes, of
    /// any size: a record larger than one answer is read in ranges.
    pub async fn read_record(&self, archive: &str, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let piece = self
                .inner
                .clone()
                .read_record(proto::ReadRecordRequest {
                    archive: archive.into(),
                    path: path.into(),
                    offset: out.len() as u64,
                    max_bytes: 0,
                })
                .await?
                .into_inner();
            if out.is_empty() {
                out.reserve_exact(piece.size as usize);
            }
            let done = piece.data.is_empty();
            out.extend_from_slice(&piece.data);
            if done || out.len() as u64 >= piece.size {
                return Ok(out);
            }
        }
    }

    /// One discrete tensor (`group`, with any stream prefix, and `name`) over
    /// frames `start..stop` of its frame list, Python-slice style (negatives
    /// count from the end, `None` = to the end). One [`Frame`] per frame, each
    /// holding that one tensor.
    pub async fn tensor_history(
        &self,
        archive: &str,
        group: &str,
        name: &str,
        start: i64,
        stop: Option<i64>,
    ) -> Result<Vec<Frame>> {
        let stream = self
            .inner
            .clone()
            .tensor_history(proto::TensorHistoryRequest {
                archive: archive.into(),
                group: group.into(),
                name: name.into(),
                start,
                stop,
                locate: self.locate(),
                batch: self.locate(),
            })
            .await?
            .into_inner();
        read_frames(stream, self.verify).await
    }
}

/// A tensor being reassembled from its chunks or read from the archive file.
struct Partial {
    info: proto::TensorInfo,
    dtype: DType,
    shape: Vec<usize>,
    fill: Fill,
    /// Bytes that make the array: the tensor's, or its box's.
    want: u64,
}

/// Where a tensor's bytes land.
enum Fill {
    /// In the array's own memory (its little-endian bytes): no copy after
    /// the read or the chunk, and no zeroing before.
    Array(Filling),
    /// In a byte buffer decoded at the end (bool; big-endian targets).
    Bytes(Vec<u8>),
}

impl Partial {
    fn new(info: proto::TensorInfo, dtype: DType, shape: Vec<usize>, want: u64) -> Result<Partial> {
        let fill = match Filling::new(dtype, &shape)
            .map_err(|e| Error::Protocol(format!("tensor {}: {e}", info.path)))?
        {
            Some(f) => Fill::Array(f),
            None => {
                let cap = usize::try_from(want).unwrap_or(0).min(1 << 30);
                Fill::Bytes(Vec::with_capacity(cap))
            }
        };
        Ok(Partial {
            info,
            dtype,
            shape,
            fill,
            want,
        })
    }

    /// Bytes received so far.
    fn len(&self) -> usize {
        match &self.fill {
            Fill::Array(f) => f.filled(),
            Fill::Bytes(b) => b.len(),
        }
    }

    /// Append a chunk (the caller checked it fits `size_bytes`).
    fn push(&mut self, data: &[u8]) {
        match &mut self.fill {
            Fill::Array(f) => f.push(data),
            Fill::Bytes(b) => b.extend_from_slice(data),
        }
    }

    /// All `len` bytes at once, written by `read` (a located read), which
    /// returns `Ok` only once it has written every byte it was given.
    fn read_whole<R>(
        &mut self,
        len: usize,
        read: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<R>,
    ) -> Result<R> {
        match &mut self.fill {
            Fill::Array(f) => {
                let buf = f.rest();
                if buf.len() != len {
                    return Err(Error::Protocol(format!(
                        "tensor {}: {len} located bytes for {} to fill",
                        self.info.path,
                        buf.len()
                    )));
                }
                let r = read(buf)?;
                // SAFETY: `read` returned Ok: it wrote all `len` bytes.
                unsafe { f.advance(len) };
                Ok(r)
            }
            Fill::Bytes(b) => {
                b.clear();
                b.reserve_exact(len);
                let r = read(&mut b.spare_capacity_mut()[..len])?;
                // SAFETY: `read` returned Ok: it wrote the first `len` bytes
                // of the spare capacity.
                unsafe { b.set_len(len) };
                Ok(r)
            }
        }
    }

    fn finish(self) -> Result<Tensor> {
        let array = match self.fill {
            Fill::Array(f) => f.finish().ok_or_else(|| {
                Error::Protocol(format!("tensor {}: bytes missing", self.info.path))
            })?,
            Fill::Bytes(b) => DynArray::from_le_bytes(self.dtype, &self.shape, &b)
                .map_err(|e| Error::Protocol(format!("tensor {}: {e}", self.info.path)))?,
        };
        Ok(Tensor {
            path: self.info.path,
            group: self.info.group,
            name: self.info.name,
            array,
        })
    }
}

/// Bytes of a located tensor read (then CRC-checked) at a time: well inside
/// a core's L2 cache. Also when unchecked: measured on a cold page cache,
/// 512 KiB reads kept pace with a plain read where 4 MiB and whole-tensor
/// reads fell to 0.75 × (`benches/read.rs`).
const READ_PIECE: usize = 512 << 10;

/// Tensors at least this large are read by several threads at once.
const PARALLEL_MIN: usize = 8 << 20;

/// Fill `buf` from `file` at `offset` and, with `verify`, return the CRC-32
/// of what was read; `Ok` only once every byte of `buf` is written. A large
/// tensor is split between up to 4 threads (one per core): the copy out of
/// the page cache and the CRC are CPU work, and the anchor this read is
/// held to (a plain `pread`) gets no CRC to do. Each thread reads and checks
/// in pieces that stay in the cache between the two (a CRC pass over the
/// whole tensor after the read would fetch it from memory a second time);
/// the parts' CRCs are combined in order.
fn read_into(
    file: &std::fs::File,
    buf: &mut [MaybeUninit<u8>],
    offset: u64,
    verify: bool,
) -> Result<crc32fast::Hasher> {
    let part = |file: &std::fs::File,
                buf: &mut [MaybeUninit<u8>],
                mut at: u64|
     -> std::io::Result<crc32fast::Hasher> {
        let mut crc = crc32fast::Hasher::new();
        for piece in buf.chunks_mut(READ_PIECE) {
            let piece = read_exact_at_uninit(file, piece, at)?;
            if verify {
                crc.update(piece);
            }
            at += piece.len() as u64;
        }
        Ok(crc)
    };
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // Asked once: the standard library reads cgroup files each time.
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = if buf.len() >= PARALLEL_MIN {
        cores.min(4)
    } else {
        1
    };
    let per = buf
        .len()
        .div_ceil(threads)
        .next_multiple_of(READ_PIECE)
        .max(READ_PIECE);
    std::thread::scope(|s| {
        let mut parts = buf.chunks_mut(per);
        let first = parts.next();
        let others: Vec<_> = parts
            .enumerate()
            .map(|(i, b)| {
                let at = offset + ((i + 1) * per) as u64;
                s.spawn(move || part(file, b, at))
            })
            .collect();
        let mut crc = match first {
            Some(b) => part(file, b, offset)?,
            None => crc32fast::Hasher::new(),
        };
        for h in others {
            let more = h
                .join()
                .map_err(|_| Error::Protocol("a thread reading a tensor panicked".into()))??;
            crc.combine(&more);
        }
        Ok(crc)
    })
}

/// `read_exact_at` into memory that need not be initialised (the standard
/// library's `read_buf_exact_at` is unstable); returns the bytes, now
/// initialised.
fn read_exact_at_uninit<'a>(
    file: &std::fs::File,
    buf: &'a mut [MaybeUninit<u8>],
    offset: u64,
) -> std::io::Result<&'a mut [u8]> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::other("offset beyond this platform's off_t"))?;
        // SAFETY: pread writes at most `buf.len() - done` bytes, into the
        // part of `buf` (borrowed mutably) not yet written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                buf.len() - done,
                at,
            )
        };
        match n {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the archive file ends before the tensor's bytes do",
                ))
            }
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    // SAFETY: the loop wrote all `buf.len()` bytes.
    Ok(unsafe { &mut *(buf as *mut [MaybeUninit<u8>] as *mut [u8]) })
}

/// Archive files opened to read located tensors, by (path, device, inode).
type Files = std::collections::HashMap<(String, u64, u64), std::sync::Arc<std::fs::File>>;

/// Read a located tensor from the archive file (off the async threads)
/// straight into its array: the file must be the one the daemon located it
/// in (device and inode: a compaction replaces the file), and with `verify`
/// the bytes must match their CRC-32 ([`Client::verify_reads`]).
async fn read_located(
    files: &mut Files,
    loc: proto::EntryLocation,
    mut into: Partial,
    verify: bool,
    runs: Option<Vec<(u64, u64)>>,
) -> Result<Partial> {
    use std::os::unix::fs::MetadataExt;
    let key = (loc.file.clone(), loc.device, loc.inode);
    let cached = files.get(&key).cloned();
    let (file, into) = tokio::task::spawn_blocking(move || -> Result<_> {
        let file = match cached {
            Some(f) => f,
            None => {
                let f = std::fs::File::open(&loc.file)?;
                let m = f.metadata()?;
                if (m.dev(), m.ino()) != (loc.device, loc.inode) {
                    return Err(Error::Protocol(format!(
                        "{} was replaced (compacted?) while it was read; read it again",
                        loc.file
                    )));
                }
                std::sync::Arc::new(f)
            }
        };
        if let Some(runs) = runs {
            let len = usize::try_from(into.want)
                .map_err(|_| Error::Protocol(format!("{}: box too large", loc.file)))?;
            into.read_whole(len, |buf| read_runs(&file, buf, loc.offset, &runs))?;
            return Ok((file, into));
        }
        let len = usize::try_from(loc.length)
            .map_err(|_| Error::Protocol(format!("{}: tensor too large", loc.file)))?;
        let crc = into.read_whole(len, |buf| read_into(&file, buf, loc.offset, verify))?;
        if verify && crc.finalize() != loc.crc32 {
            return Err(Error::Protocol(format!(
                "{}: CRC-32 mismatch of the tensor at offset {}",
                loc.file, loc.offset
            )));
        }
        Ok((file, into))
    })
    .await
    .map_err(|e| Error::Protocol(format!("reading a located tensor: {e}")))??;
    files.insert(key, file);
    Ok(into)
}

/// A tensor from its header: checked, and read from the archive file if it
/// is located (else its chunks follow).
async fn start_tensor(files: &mut Files, info: proto::TensorInfo, verify: bool) -> Result<Partial> {
    let dtype = DType::from_proto(info.dtype).ok_or_else(|| {
        Error::Protocol(format!(
            "tensor {}: unknown dtype {}",
            info.path, info.dtype
        ))
    })?;
    let shape = info
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| Error::Protocol(format!("tensor {}: shape too large", info.path)))?;
    let want = info
        .shape
        .iter()
        .try_fold(dtype.itemsize() as u64, |n, &d| n.checked_mul(d));
    if want != Some(info.size_bytes) {
        return Err(Error::Protocol(format!(
            "tensor {}: size_bytes {} is not {dtype} × shape {:?}",
            info.path, info.size_bytes, info.shape
        )));
    }
    // With a slice, the array is the box: its shape, its bytes.
    let runs = match &info.slice {
        None => None,
        Some(w) => {
            let b = Slice {
                offsets: w.offsets.clone(),
                shape: w.shape.clone(),
            };
            let runs = b
                .byte_runs(&info.shape, dtype.itemsize() as u64)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "tensor {}: the answer's slice {:?} + {:?} is not a box of shape {:?}",
                        info.path, b.offsets, b.shape, info.shape
                    ))
                })?;
            Some((b, runs))
        }
    };
    let (shape, want) = match &runs {
        None => (shape, info.size_bytes),
        Some((b, _)) => (
            b.shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<usize>, _>>()
                .map_err(|_| Error::Protocol(format!("tensor {}: box too large", info.path)))?,
            b.elems() * dtype.itemsize() as u64,
        ),
    };
    let p = Partial::new(info, dtype, shape, want)?;
    match p.info.location.clone() {
        Some(loc) if loc.length == p.info.size_bytes => {
            read_located(files, loc, p, verify, runs.map(|(_, r)| r)).await
        }
        Some(loc) => Err(Error::Protocol(format!(
            "tensor {}: located length {} is not its size_bytes {}",
            p.info.path, loc.length, p.info.size_bytes
        ))),
        None => Ok(p),
    }
}

/// Fill `buf` with the byte `runs` (offset from `base`, length) of `file`,
/// one after the other: a located box, which has no CRC of its own (the
/// entry's CRC-32 covers the whole tensor, which a box read avoids reading).
fn read_runs(
    file: &std::fs::File,
    buf: &mut [MaybeUninit<u8>],
    base: u64,
    runs: &[(u64, u64)],
) -> Result<()> {
    let mut at = 0usize;
    for &(off, len) in runs {
        let len = len as usize;
        read_exact_at_uninit(file, &mut buf[at..at + len], base + off)?;
        at += len;
    }
    if at != buf.len() {
        return Err(Error::Protocol(format!(
            "a box of {at} bytes for {} to fill",
            buf.len()
        )));
    }
    Ok(())
}

/// Reassemble a FrameData stream: `frame`, then per tensor its header and
/// either chunks totalling `size_bytes` or its location in the archive file;
/// or (`batch`) whole located frames, many to a message.
async fn read_frames(mut stream: Streaming<proto::FrameData>, verify: bool) -> Result<Vec<Frame>> {
    use proto::frame_data::Msg;
    let mut files = Files::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut cur: Option<Partial> = None;
    let finish = |cur: &mut Option<Partial>, frames: &mut Vec<Frame>| -> Result<()> {
        if let Some(p) = cur.take() {
            let left = p.want - p.len() as u64;
            if left > 0 {
                return Err(Error::Protocol(format!(
                    "tensor {} ended {left} bytes short of its {}",
                    p.info.path, p.want
                )));
            }
            let t = p.finish()?;
            frames.last_mut().expect("a frame is open").tensors.push(t);
        }
        Ok(())
    };
    while let Some(m) = stream.next().await {
        match m?.msg {
            Some(Msg::Frame(index)) => {
                finish(&mut cur, &mut frames)?;
                frames.push(Frame {
                    index,
                    tensors: Vec::new(),
                });
            }
            Some(Msg::Tensor(info)) => {
                finish(&mut cur, &mut frames)?;
                if frames.is_empty() {
                    return Err(Error::Protocol(format!(
                        "tensor {} came before any `frame`",
                        info.path
                    )));
                }
                cur = Some(start_tensor(&mut files, info, verify).await?);
            }
            Some(Msg::Located(batch)) => {
                finish(&mut cur, &mut frames)?;
                for f in batch.frames {
                    frames.push(Frame {
                        index: f.frame,
                        tensors: Vec::new(),
                    });
                    for info in f.tensors {
                        if info.location.is_none() {
                            return Err(Error::Protocol(format!(
                                "tensor {} came in a `located` batch without its location",
                                info.path
                            )));
                        }
                        let mut p = Some(start_tensor(&mut files, info, verify).await?);
                        finish(&mut p, &mut frames)?;
                    }
                }
            }
            Some(Msg::Chunk(c)) => {
                let p = cur.as_mut().ok_or_else(|| {
                    Error::Protocol("a chunk came before any tensor header".into())
                })?;
                if p.len() as u64 + c.data.len() as u64 > p.want {
                    return Err(Error::Protocol(format!(
                        "tensor {} got more bytes than its {}",
                        p.info.path, p.want
                    )));
                }
                p.push(&c.data);
            }
            None => return Err(Error::Protocol("empty FrameData message".into())),
        }
    }
    finish(&mut cur, &mut frames)?;
    Ok(frames)
}
