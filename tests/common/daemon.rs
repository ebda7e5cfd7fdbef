//! Helpers for the daemon integration tests (`tests/daemon_*.rs`) and the
//! ingest benchmark: the real server in-process on a temp Unix socket and
//! `127.0.0.1:0`, the real binary as a child process (for `kill -9` and peak
//! RSS), cheap deterministic payloads, and frames described once
//! ([`FrameSpec`]) for both ways of sending them:
//! - through the project's Rust client (`gtar-logd-client`, as [`logd`]):
//!   [`Daemon::client`], [`write_client`], [`assert_frame_matches`]; what
//!   the happy-path tests use;
//! - as hand-made protobuf ([`Session`], [`frame_messages`], [`RawCodec`]):
//!   for tests of the protocol itself (malformed messages, odd chunking, half
//!   a frame, shared-memory offers, a 4.5 GiB tensor never held in memory)
//!   and the ingest benchmark, which measures the daemon without a client.
//!
//! Included with `#[path = "common/daemon.rs"] mod daemon;` so it does not
//! depend on (or disturb) `tests/common/mod.rs`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gtar_logd::listen::{self, Listener};
use gtar_logd::proto::v1::{
    self as pb, logd_client::LogdClient, write_request::Msg as In, write_response::Msg as Out,
    FrameAck, OpenArchive, Opened, WriteRequest,
};
use gtar_logd::server::{self, Config};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub type Client = LogdClient<Channel>;

pub use gtar_logd_client as logd;

/// Largest message our test clients send or accept.
pub const CLIENT_MAX_MESSAGE: usize = 32 << 20;

/// A fresh directory under cargo's target tmp dir: the same disk as the
/// repository, never tmpfs, and short enough for a Unix socket path.
/// A temp dir under target/ (the repository's disk), or under
/// `$GTAR_TEST_TMPDIR` when set (e.g. /dev/shm, to take the disk out of a
/// benchmark).
pub fn temp_root(prefix: &str) -> tempfile::TempDir {
    let custom = std::env::var_os("GTAR_TEST_TMPDIR").map(std::path::PathBuf::from);
    let base = custom
        .as_deref()
        .unwrap_or(Path::new(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(base).unwrap();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

// ------------------------------------------------------------ in-process

/// The real server, in this process, on its own runtime thread, listening on
/// a temp Unix socket and on `127.0.0.1:0` at once.
pub struct Daemon {
    pub root: PathBuf,
    pub data: PathBuf,
    pub uds: PathBuf,
    pub tcp: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(|_| {})
    }

    /// Start with a tweaked configuration (limits, max tensor size).
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Daemon {
        let tmp = temp_root("daemon-");
        let mut d = Daemon::start_in(tmp.path(), tweak);
        d._tmp = Some(tmp);
        d
    }

    /// Start with the data dir at `root/data` and the socket at `root/logd.sock`.
    pub fn start_in(root: &Path, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let data = root.join("data");
        let uds = root.join("logd.sock");
        let mut cfg = Config::new(data.clone());
        cfg.grace = Duration::from_secs(5);
        tweak(&mut cfg);
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let stop = shutdown.clone();
        let uds2 = uds.clone();
        let thread = std::thread::Builder::new()
            .name("test-daemon".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let u = listen::bind_unix(&uds2)?;
                    let t = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = t.local_addr()?;
                    let listeners = vec![Listener::Unix(u), Listener::Tcp(t)];
                    server::run(listeners, cfg, stop, move |_| {
                        let _ = ready_tx.send(addr);
                    })
                    .await
                })
            })
            .unwrap();
        let tcp = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the in-process daemon did not become ready");
        Daemon {
            root: root.to_path_buf(),
            data,
            uds,
            tcp,
            shutdown,
            thread: Some(thread),
            _tmp: None,
        }
    }

    pub async fn uds_client(&self) -> Client {
        connect_uds(&self.uds).await
    }

    pub async fn tcp_client(&self) -> Client {
        connect_tcp(self.tcp).await
    }

    /// The project's Rust client over the Unix socket (tensor bytes go
    /// through shared memory unless a writer turns it off).
    pub async fn client(&self) -> logd::Client {
        logd::Client::connect(&format!("unix:{}", self.uds.display()))
            .await
            .expect("connect over the Unix socket")
    }

    /// The project's Rust client over TCP (tensor bytes in chunks).
    pub async fn tcp(&self) -> logd::Client {
        logd::Client::connect(&self.tcp.to_string())
            .await
            .expect("connect over TCP")
    }

    /// Graceful shutdown (what SIGTERM does); returns `run`'s result. The
    /// files stay until the `Daemon` is dropped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.thread.take() {
            Some(t) => t.join().expect("daemon thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ------------------------------------------------------------ child process

/// Path of the daemon binary cargo built for this test or bench, or
/// $GTAR_LOGD_BENCH_BIN: another build to compare in a benchmark (A/B runs of
/// one change on the same disk, in one session).
pub fn daemon_bin() -> PathBuf {
    match std::env::var_os("GTAR_LOGD_BENCH_BIN").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_gtar-logd")),
    }
}

/// The real `gtar-logd serve` binary as a child process.
pub struct ChildDaemon {
    pub proc: Child,
    pub data: PathBuf,
    pub uds: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub log: PathBuf,
}

impl ChildDaemon {
    /// Start `gtar-logd serve --data-dir DATA --uds SOCK [--tcp ADDR]`; stderr
    /// goes to `log` (appended). Waits until the socket accepts connections.
    pub fn spawn(data: &Path, uds: &Path, tcp: Option<SocketAddr>, log: &Path) -> ChildDaemon {
        Self::spawn_with(data, uds, tcp, log, |_| {})
    }

    /// [`ChildDaemon::spawn`], with more arguments or environment set by
    /// `tweak` on the command.
    pub fn spawn_with(
        data: &Path,
        uds: &Path,
        tcp: Option<SocketAddr>,
        log: &Path,
        tweak: impl FnOnce(&mut Command),
    ) -> ChildDaemon {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--uds")
            .arg(uds)
            .arg("--log")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        if let Some(a) = tcp {
            cmd.arg("--tcp").arg(a.to_string());
        }
        tweak(&mut cmd);
        let proc = cmd.spawn().expect("start gtar-logd serve");
        let mut c = ChildDaemon {
            proc,
            data: data.to_path_buf(),
            uds: uds.to_path_buf(),
            tcp,
            log: log.to_path_buf(),
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.proc.try_wait().unwrap() {
                panic!(
                    "gtar-logd exited early ({st}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.uds).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gtar-logd did not listen on {} within 30 s",
                self.uds.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn vm_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }

    /// SIGTERM and wait (at most `within`); panics if it does not exit 0 in time.
    pub fn terminate(&mut self, within: Duration) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.proc.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "gtar-logd exited with {st} after SIGTERM; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("gtar-logd did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.try_wait() {
            self.kill9();
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A free loopback port (bind :0, read it, release it).
pub fn free_tcp_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ------------------------------------------------------------ clients

fn tune(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
}

/// A client over the Unix socket at `path`.
pub async fn connect_uds(path: &Path) -> Client {
    let path = path.to_path_buf();
    // The URI is a placeholder: the connector ignores it and dials the socket.
    let ch = tune(Endpoint::try_from("http://[::]:1").unwrap())
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect over the Unix socket");
    limits(LogdClient::new(ch))
}

/// A client over loopback TCP.
pub async fn connect_tcp(addr: SocketAddr) -> Client {
    let ch = tune(Endpoint::try_from(format!("http://{addr}")).unwrap())
        .connect()
        .await
        .expect("connect over TCP");
    limits(LogdClient::new(ch))
}

fn limits(c: Client) -> Client {
    c.max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE)
}

/// A bare channel over the Unix socket at `path` (for health checks and
/// hand-made requests).
pub async fn uds_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:1")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// grpc.health.v1 status of the whole server ("") or one service.
pub async fn health(ch_path: &Path, service: &str) -> Result<i32, Status> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let ch = uds_channel(ch_path)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status)
}

/// `SERVING` in grpc.health.v1.
pub const SERVING: i32 = 1;

// ------------------------------------------------------------ payloads

const BLOCK: usize = 1 << 20;

fn base_block() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(BLOCK);
        for _ in 0..BLOCK / 8 {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        v
    })
}

/// Fill `out` with bytes `offset..offset+out.len()` of the deterministic
/// stream `seed`. Cheap even in an unoptimized test build (memcpy per 1 MiB
/// block): block `b` is the random base block rotated by an amount depending
/// on `(seed, b)`, with `(seed, b)` written into its first 16 bytes, so
/// misplaced, repeated or swapped blocks and shifted bytes all show up.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let base = base_block();
    let mut pos = offset;
    let mut done = 0;
    while done < out.len() {
        let b = pos / BLOCK as u64;
        let o = (pos % BLOCK as u64) as usize;
        let n = (BLOCK - o).min(out.len() - done);
        let rot = (seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add(b.wrapping_mul(104_729))
            % BLOCK as u64) as usize;
        // block[i] = base[(i + rot) % BLOCK] for i in o..o+n
        let dst = &mut out[done..done + n];
        let start = (o + rot) % BLOCK;
        let first = (BLOCK - start).min(n);
        dst[..first].copy_from_slice(&base[start..start + first]);
        if first < n {
            dst[first..].copy_from_slice(&base[..n - first]);
        }
        // The header bytes (0..16 of the block) that fall in this piece.
        if o < 16 {
            let mut hdr = [0u8; 16];
            hdr[..8].copy_from_slice(&seed.to_le_bytes());
            hdr[8..].copy_from_slice(&b.to_le_bytes());
            let end = 16.min(o + n);
            dst[..end - o].copy_from_slice(&hdr[o..end]);
        }
        pos += n as u64;
        done += n;
    }
}

pub fn gen(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, 0, &mut v);
    v
}

// ------------------------------------------------------------ frames

/// Where a tensor's bytes come from.
#[derive(Clone, Debug)]
pub enum Payload {
    Bytes(Vec<u8>),
    /// Shared bytes: cloning the payload or cutting chunks from it does not
    /// copy them (as a real client holding its tensor in memory would send).
    Shared(prost::bytes::Bytes),
    /// `len` bytes of the deterministic stream `seed` (see [`fill`]).
    Gen {
        seed: u64,
        len: u64,
    },
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Shared(b) => b.len() as u64,
            Payload::Gen { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes `offset..offset+out.len()`.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) {
        match self {
            Payload::Bytes(b) => {
                out.copy_from_slice(&b[offset as usize..offset as usize + out.len()])
            }
            Payload::Shared(b) => {
                out.copy_from_slice(&b[offset as usize..offset as usize + out.len()])
            }
            Payload::Gen { seed, .. } => fill(*seed, offset, out),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len() as usize];
        self.read_at(0, &mut v);
        v
    }
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub group: String,
    pub name: String,
    pub dtype: i32,
    pub shape: Vec<u64>,
    pub data: Payload,
}

impl TensorSpec {
    pub fn new(
        group: &str,
        name: &str,
        dtype: pb::DType,
        shape: &[u64],
        data: Payload,
    ) -> TensorSpec {
        TensorSpec {
            group: group.into(),
            name: name.into(),
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FrameSpec {
    pub index: String,
    pub tensors: Vec<TensorSpec>,
    /// Constant/text records written inside the frame.
    pub records: Vec<(String, Vec<u8>)>,
    /// Scalars `(group, name, value)` at the frame's index.
    pub scalars: Vec<(String, String, f64)>,
}

pub fn req(m: In) -> WriteRequest {
    WriteRequest { msg: Some(m) }
}

pub fn open_req(archive: &str, group: &str) -> OpenArchive {
    OpenArchive {
        archive: archive.into(),
        mode: pb::OpenMode::Append as i32,
        group: group.into(),
        compression: 0,
        shm: None,
        share_group: false,
        ..Default::default()
    }
}

/// The messages of one frame, tensors cut into `chunk`-byte pieces.
pub fn frame_messages(f: &FrameSpec, chunk: usize) -> impl Iterator<Item = WriteRequest> + '_ {
    let begin = std::iter::once(req(In::Begin(pb::BeginFrame {
        index: f.index.clone(),
    })));
    let tensors = f.tensors.iter().flat_map(move |t| {
        let head = std::iter::once(req(In::Tensor(pb::TensorHeader {
            group: t.group.clone(),
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            ..Default::default()
        })));
        let len = t.data.len();
        let chunks = (0..len.div_ceil(chunk as u64)).map(move |i| {
            let off = i * chunk as u64;
            let n = (len - off).min(chunk as u64) as usize;
            let data = match &t.data {
                Payload::Shared(b) => b.slice(off as usize..off as usize + n),
                other => {
                    let mut buf = vec![0u8; n];
                    other.read_at(off, &mut buf);
                    buf.into()
                }
            };
            req(In::Chunk(pb::Chunk { data }))
        });
        head.chain(chunks)
    });
    let records = f.records.iter().map(|(p, d)| {
        req(In::Record(pb::ConstRecord {
            path: p.clone(),
            data: d.clone(),
            ..Default::default()
        }))
    });
    let scalars = f.scalars.iter().map(|(g, n, v)| {
        req(In::Scalar(pb::Scalar {
            group: g.clone(),
            name: n.clone(),
            index: String::new(),
            value: *v,
        }))
    });
    let commit = std::iter::once(req(In::Commit(pb::CommitFrame {})));
    begin
        .chain(tensors)
        .chain(records)
        .chain(scalars)
        .chain(commit)
}

/// One Write stream: send messages, watch `received` / `durable` acks.
///
/// A task reads the response stream into an unbounded channel so the daemon
/// is never blocked on us reading acks.
pub struct Session {
    tx: Option<mpsc::Sender<WriteRequest>>,
    events: mpsc::UnboundedReceiver<Result<Out, Status>>,
    pub opened: Opened,
    pub received: Vec<FrameAck>,
    pub durable: Vec<FrameAck>,
    /// `replicated` acks (daemons with `--remote`).
    pub replicated: Vec<FrameAck>,
    /// `aborted` answers (streams opened with `ranks`).
    pub aborted: Vec<pb::FrameAborted>,
    /// Every ack in arrival order: (`true` for durable, seq).
    pub acks: Vec<(bool, u64)>,
    /// The status the stream ended with, once it ended.
    pub ended: Option<Result<(), Status>>,
}

impl Session {
    /// Open a Write stream; returns the daemon's error if `open` is refused.
    pub async fn open(client: &mut Client, open: OpenArchive) -> Result<Session, Status> {
        Session::open_raw(client, req(In::Open(open))).await
    }

    /// Open a Write stream whose first message is `first` (may be bad).
    pub async fn open_raw(client: &mut Client, first: WriteRequest) -> Result<Session, Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let resp = client.write(ReceiverStream::new(rx)).await?;
        let mut inbound = resp.into_inner();
        let (etx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = inbound.next().await {
                let item = match m {
                    Ok(pb::WriteResponse { msg: Some(m) }) => Ok(m),
                    Ok(pb::WriteResponse { msg: None }) => {
                        Err(Status::internal("empty WriteResponse"))
                    }
                    Err(s) => Err(s),
                };
                let stop = item.is_err();
                if etx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        let mut s = Session {
            tx: Some(tx),
            events,
            opened: Opened::default(),
            received: Vec::new(),
            durable: Vec::new(),
            replicated: Vec::new(),
            aborted: Vec::new(),
            acks: Vec::new(),
            ended: None,
        };
        match s.next().await? {
            Some(Out::Opened(o)) => s.opened = o,
            Some(other) => panic!("first response is not `opened`: {other:?}"),
            None => return Err(Status::unknown("stream ended before `opened`")),
        }
        Ok(s)
    }

    /// The next response; `Ok(None)` when the stream ended cleanly.
    pub async fn next(&mut self) -> Result<Option<Out>, Status> {
        if let Some(end) = &self.ended {
            return end.clone().map(|_| None);
        }
        match self.events.recv().await {
            Some(Ok(m)) => {
                match &m {
                    Out::Received(a) => {
                        self.acks.push((false, a.seq));
                        self.received.push(a.clone())
                    }
                    Out::Durable(a) => {
                        self.acks.push((true, a.seq));
                        self.durable.push(a.clone())
                    }
                    Out::Replicated(a) => self.replicated.push(a.clone()),
                    Out::Aborted(a) => self.aborted.push(a.clone()),
                    Out::Opened(_) => {}
                }
                Ok(Some(m))
            }
            Some(Err(s)) => {
                self.ended = Some(Err(s.clone()));
                Err(s)
            }
            None => {
                self.ended = Some(Ok(()));
                Ok(None)
            }
        }
    }

    /// Send one message. If the daemon already ended the stream, returns
    /// the status it ended with.
    pub async fn send(&mut self, m: WriteRequest) -> Result<(), Status> {
        let ok = match &self.tx {
            Some(tx) => tx.send(m).await.is_ok(),
            None => false,
        };
        if ok {
            return Ok(());
        }
        self.tx = None;
        Err(self.drain_error().await)
    }

    async fn drain_error(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::unknown("the daemon closed the stream"),
                Err(s) => return s,
            }
        }
    }

    /// Send every message of a frame.
    pub async fn send_frame(&mut self, f: &FrameSpec, chunk: usize) -> Result<(), Status> {
        for m in frame_messages(f, chunk) {
            self.send(m).await?;
        }
        Ok(())
    }

    /// Wait until `n` frames have been acked `received`.
    pub async fn wait_received(&mut self, n: usize) -> Result<(), Status> {
        while self.received.len() < n {
            if self.next().await?.is_none() {
                return Err(Status::unknown("stream ended before the ack"));
            }
        }
        Ok(())
    }

    /// Wait until `n` frames have been acked `durable`.
    pub async fn wait_durable(&mut self, n: usize) -> Result<(), Status> {
        while self.durable.len() < n {
            if self.next().await?.is_none() {
                return Err(Status::unknown("stream ended before the ack"));
            }
        }
        Ok(())
    }

    /// Wait until `n` frames have been acked `replicated`.
    pub async fn wait_replicated(&mut self, n: usize) -> Result<(), Status> {
        while self.replicated.len() < n {
            if self.next().await?.is_none() {
                return Err(Status::unknown("stream ended before the ack"));
            }
        }
        Ok(())
    }

    /// Close our side and read every remaining response.
    pub async fn finish(mut self) -> Result<Session, Status> {
        self.tx = None;
        loop {
            if self.next().await?.is_none() {
                return Ok(self);
            }
        }
    }

    /// Drop our side without reading anything more (a client going away).
    pub fn abandon(self) {}
}

/// Write `frames` in one stream, wait for every durable ack.
pub async fn write_frames(
    client: &mut Client,
    open: OpenArchive,
    frames: &[FrameSpec],
    chunk: usize,
) -> Result<Session, Status> {
    let mut s = Session::open(client, open).await?;
    for f in frames {
        s.send_frame(f, chunk).await?;
    }
    let s = s.finish().await?;
    assert_eq!(s.received.len(), frames.len(), "received acks");
    assert_eq!(s.durable.len(), frames.len(), "durable acks");
    Ok(s)
}

// ------------------------------------------------------------ reads

/// One tensor of a GetFrame / TensorHistory answer.
#[derive(Debug, Clone)]
pub struct GotTensor {
    pub frame: String,
    pub info: pb::TensorInfo,
    pub data: Vec<u8>,
}

/// Collect a FrameData stream.
pub async fn collect_frames(
    mut s: tonic::Streaming<pb::FrameData>,
) -> Result<Vec<GotTensor>, Status> {
    use pb::frame_data::Msg;
    let mut out: Vec<GotTensor> = Vec::new();
    let mut frame = String::new();
    while let Some(m) = s.message().await? {
        match m.msg {
            Some(Msg::Frame(f)) => frame = f,
            Some(Msg::Tensor(info)) => out.push(GotTensor {
                frame: frame.clone(),
                info,
                data: Vec::new(),
            }),
            Some(Msg::Chunk(c)) => out
                .last_mut()
                .expect("chunk before any tensor")
                .data
                .extend_from_slice(&c.data),
            Some(Msg::Located(_)) => panic!("a `located` batch, not asked for"),
            None => panic!("empty FrameData"),
        }
    }
    for t in &out {
        assert_eq!(
            t.data.len() as u64,
            t.info.size_bytes,
            "{}: bytes streamed vs size_bytes",
            t.info.path
        );
    }
    Ok(out)
}

pub async fn get_frame(
    client: &mut Client,
    archive: &str,
    group: &str,
    frame: pb::get_frame_request::Frame,
) -> Result<Vec<GotTensor>, Status> {
    let s = client
        .get_frame(pb::GetFrameRequest {
            archive: archive.into(),
            group: group.into(),
            frame: Some(frame),
            names: vec![],
            locate: false,
            batch: false,
            ..Default::default()
        })
        .await?
        .into_inner();
    collect_frames(s).await
}

pub fn by_index(i: &str) -> pb::get_frame_request::Frame {
    pb::get_frame_request::Frame::Index(i.into())
}

pub fn by_position(p: i64) -> pb::get_frame_request::Frame {
    pb::get_frame_request::Frame::Position(p)
}

pub async fn list_frames(
    client: &mut Client,
    archive: &str,
    group: &str,
) -> Result<Vec<String>, Status> {
    Ok(client
        .list_frames(pb::ListFramesRequest {
            archive: archive.into(),
            group: group.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .frames)
}

// ------------------------------------------------------------ through the client

impl TensorSpec {
    /// The tensor as the client sends it (any dtype, raw little-endian bytes).
    pub fn data(&self) -> logd::TensorData<'static> {
        let dtype = logd::DType::from_proto(self.dtype).expect("a known dtype");
        logd::TensorData::new(dtype, self.shape.clone(), self.data.to_vec())
            .expect("bytes match dtype and shape")
    }
}

impl FrameSpec {
    /// The frame as the client writes it: tensors, then records, then scalars.
    pub fn new_frame(&self) -> logd::NewFrame<'static> {
        let mut f = logd::NewFrame::new(self.index.clone());
        for t in &self.tensors {
            f.push_tensor(t.group.clone(), t.name.clone(), t.data());
        }
        for (p, d) in &self.records {
            f = f.record(p.clone(), d.clone());
        }
        for (g, n, v) in &self.scalars {
            f = f.scalar(g.clone(), n.clone(), *v);
        }
        f
    }
}

/// The acks of one frame written through the client.
#[derive(Debug, Clone)]
pub struct Acked {
    pub received: logd::Ack,
    pub durable: logd::Ack,
}

/// Write `frames` through one client writer, wait for each frame's
/// `received` and `durable` acks (the client fails the stream if acks come
/// out of order or a `durable` comes before its `received`), close it.
pub async fn write_with(
    w: &mut logd::FrameWriter,
    frames: &[FrameSpec],
) -> logd::Result<Vec<Acked>> {
    let mut handles = Vec::new();
    for f in frames {
        handles.push(w.write(f.new_frame()).await?);
    }
    let mut acks = Vec::new();
    for mut h in handles {
        let received = h.received().await?;
        let durable = h.durable().await?;
        assert_eq!(received.seq, durable.seq);
        acks.push(Acked { received, durable });
    }
    Ok(acks)
}

/// Open a writer on `archive` with `options`, write `frames`, close it.
pub async fn write_client(
    c: &logd::Client,
    archive: &str,
    options: logd::OpenOptions,
    frames: &[FrameSpec],
) -> logd::Result<(logd::Opened, Vec<Acked>)> {
    let mut w = c.writer(archive, options).await?;
    let acks = write_with(&mut w, frames).await?;
    let opened = w.opened().clone();
    w.close().await?;
    assert_eq!(acks.len(), frames.len(), "acks");
    Ok((opened, acks))
}

/// Append-mode options for stream group `group`, bytes over the socket (the
/// shared-memory path has tests of its own).
pub fn append(group: &str) -> logd::OpenOptions {
    logd::OpenOptions::append()
        .group(group)
        .shared_memory(false)
}

/// Check that `got` holds exactly the tensors of `f` (by name and group
/// suffix): dtype, shape and bytes, bit-exact.
pub fn assert_frame_matches(got: &logd::Frame, f: &FrameSpec) {
    assert_eq!(got.index, f.index, "frame index");
    assert_eq!(
        got.tensors.len(),
        f.tensors.len(),
        "frame {}: tensors {:?}",
        f.index,
        got.tensors.iter().map(|t| &t.path).collect::<Vec<_>>()
    );
    for t in &f.tensors {
        let g = got
            .tensors
            .iter()
            .find(|g| g.name == t.name && g.group.ends_with(&t.group))
            .unwrap_or_else(|| panic!("frame {}: tensor {}/{} missing", f.index, t.group, t.name));
        assert_eq!(
            g.array.dtype().to_proto() as i32,
            t.dtype,
            "{}: dtype",
            g.path
        );
        let shape: Vec<u64> = g.array.shape().iter().map(|&n| n as u64).collect();
        assert_eq!(shape, t.shape, "{}: shape", g.path);
        assert!(
            g.array.to_le_bytes() == t.data.to_vec(),
            "{}: bytes differ (frame {})",
            g.path,
            f.index
        );
    }
}

/// Assert a client call failed with the daemon's status `code`.
#[track_caller]
pub fn assert_fails<T: std::fmt::Debug>(r: logd::Result<T>, code: Code, what: &str) -> logd::Error {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.code(), Some(code), "{what}: {e:?}");
            e
        }
    }
}

/// Assert a result failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}
