//! Listeners, the tonic server (Logd, reflection v1 + v1alpha, health), and
//! the shutdown sequence.
//!
//! [`run`] takes listeners, not addresses (mini-redis style), so tests bind
//! a temp socket and `127.0.0.1:0`, and systemd can pass sockets in.
//!
//! Shutdown sequence, on the `shutdown` token (SIGTERM/SIGINT in `main`):
//! 1. listeners stop accepting; open Write streams see the token, drop their
//!    uncommitted frame and end with UNAVAILABLE;
//! 2. in-flight queries get `grace` to finish, then connections are dropped;
//! 3. every writer aborts what is in progress, writes its central directory
//!    and fsyncs ([`Registry::shutdown`]); then `run` returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::archives::Archives;
use crate::authority::FixAuthority;
use crate::listen::Listener;
use crate::proto::v1::logd_server::LogdServer;
use crate::service::{Service, State};
use crate::writer::{Limits, Registry};

/// HTTP/2 flow control: bytes a client may have in flight per stream and
/// per connection (bounded memory: at most this much is buffered unread).
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept (fewer frames per 4 MiB chunk).
const MAX_FRAME: u32 = 1 << 20;

/// Daemon configuration (what the CLI collects).
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub max_tensor_bytes: u64,
    /// How long queries may keep running after shutdown starts.
    pub grace: Duration,
    /// Whether Write streams may attach a client's shared memory.
    pub shared_memory: bool,
    /// A multi-user worker: `<data-dir>/users`, and whether this worker's
    /// user may read other users' archives under `~USER/` (root, admin group).
    pub others: Option<(PathBuf, bool)>,
    /// The token TCP requests must carry; `None`: TCP is anonymous
    /// (`--tcp-allow-anonymous`), or there is no TCP listener.
    pub tcp_token: Option<Arc<crate::auth::Token>>,
    /// A Write stream that sends nothing for this long is ended.
    pub stream_idle: Duration,
    /// A connection that exchanges no bytes for this long is closed.
    pub connection_idle: Duration,
    /// What one peer may hold at once.
    pub peer_limits: crate::peer::PeerLimits,
    /// Replicate to (and read from) this object store (`--remote`).
    pub remote: Option<crate::remote::RemoteUrl>,
    /// Backlog beyond which an archive is reported lagging.
    pub remote_backlog_bytes: u64,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            limits: Limits::default(),
            max_tensor_bytes: crate::limits::DEFAULT_MAX_TENSOR_BYTES,
            grace: Duration::from_secs(10),
            shared_memory: true,
            others: None,
            tcp_token: None,
            stream_idle: crate::limits::DEFAULT_STREAM_IDLE,
            connection_idle: crate::limits::DEFAULT_CONNECTION_IDLE,
            peer_limits: Default::default(),
            remote: None,
            remote_backlog_bytes: crate::limits::DEFAULT_REMOTE_BACKLOG_BYTES,
        }
    }
}

/// Whether the writer threads are alive and making progress: what the
/// systemd watchdog pings on (see [`Registry::healthy`]).
#[derive(Clone)]
pub struct Liveness(Arc<Registry>);

impl Liveness {
    /// True unless a working writer has been stuck in one disk operation for
    /// longer than `stall` (or its thread died).
    pub fn check(&self, stall: Duration) -> bool {
        self.0.healthy(stall)
    }
}

/// Health of remote storage: the service `gtar.logd.v1.Remote` is SERVING
/// while the store answers and `gtar.logd.v1.Remote/ARCHIVE` NOT_SERVING
/// while an archive's replication fails or lags; each change is logged. The
/// store is probed at start (an error names the endpoint and the bucket),
/// then every few seconds. Local archives work throughout.
fn watch_remote(
    r: Arc<crate::remote::replicate::Replicator>,
    state: Arc<State>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || st.archives.replicate_existing()).await;
        let mut last_ok: Option<bool> = None;
        let mut bad: std::collections::HashSet<String> = Default::default();
        loop {
            let probe = r.remote().probe().await;
            let ok = probe.is_ok();
            if last_ok != Some(ok) {
                match &probe {
                    Ok(()) => {
                        tracing::info!(remote = %r.remote().describe(), "remote storage reachable")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "remote storage unusable; archives stay local and replication retries")
                    }
                }
                let s = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status("gtar.logd.v1.Remote", s).await;
                last_ok = Some(ok);
            }
            for (name, s) in r.statuses() {
                let failing = s.error.is_some() || s.lagging;
                if failing != bad.contains(&name) {
                    let svc = format!("gtar.logd.v1.Remote/{name}");
                    if failing {
                        bad.insert(name);
                        health
                            .set_service_status(svc, ServingStatus::NotServing)
                            .await;
                    } else {
                        bad.remove(&name);
                        health.set_service_status(svc, ServingStatus::Serving).await;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
}

/// Serve until `shutdown` is cancelled, then shut down in order (module docs).
/// `on_ready` runs once every listener is being served.
pub async fn run(
    listeners: Vec<Listener>,
    cfg: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Liveness),
) -> anyhow::Result<()> {
    let registry = Registry::new(cfg.limits.clone(), tokio::runtime::Handle::current());
    let archives = match &cfg.others {
        None => Archives::new(&cfg.data_dir, registry.clone()),
        Some((users_dir, admin)) => Archives::with_others(
            &cfg.data_dir,
            registry.clone(),
            crate::archives::Others::new(users_dir.clone(), *admin),
        ),
    }
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot use the data directory {} (--data-dir): {e}",
            cfg.data_dir.display()
        )
    })?;
    tracing::info!(data_dir = %archives.root().display(), "serving archives");
    let archives = match &cfg.remote {
        None => archives,
        Some(url) => {
            let remote =
                crate::remote::Remote::from_env(url.clone(), tokio::runtime::Handle::current())
                    .map_err(|e| anyhow::anyhow!("--remote: {e}"))?;
            let r = crate::remote::replicate::Replicator::new(
                Arc::new(remote),
                cfg.remote_backlog_bytes,
            );
            tracing::info!(remote = %r.remote().describe(), "replicating to remote storage");
            archives.with_replicator(r)
        }
    };
    let state = Arc::new(State {
        archives,
        shutdown: shutdown.clone(),
        max_tensor_bytes: cfg.max_tensor_bytes,
        shared_memory: cfg.shared_memory,
        stream_idle: cfg.stream_idle,
        quotas: crate::peer::Quotas::new(cfg.peer_limits.clone()),
        jobs: crate::assembly::Jobs::new(cfg.limits.frame_deadline),
    });
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<LogdServer<Service>>().await;
    let refl_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let refl_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let logd = LogdServer::new(Service::new(state.clone()))
        .max_decoding_message_size(crate::limits::MAX_MESSAGE)
        .max_encoding_message_size(crate::limits::MAX_MESSAGE);

    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        tracing::info!(address = %l.describe(), "listening");
        // TCP carries no identity: there, every request shows the token.
        let token = match l {
            Listener::Tcp(_) => cfg.tcp_token.clone(),
            _ => None,
        };
        let router = Server::builder()
            // h2's default windows make a local sender wait for WINDOW_UPDATE
            // round trips every MiB; checkpoints stream hundreds of MiB.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .layer(crate::auth::RequireTokenLayer(token))
            .layer(tower::util::MapResponseLayer::new(
                |mut r: tonic::codegen::http::Response<tonic::body::Body>| {
                    crate::service::errors::remap_decode_headers(r.headers_mut());
                    r
                },
            ))
            .add_service(health_svc.clone())
            .add_service(refl_v1.clone())
            .add_service(refl_v1alpha.clone())
            .add_service(logd.clone());
        let stop = shutdown.clone();
        // A connection carrying a silent stream is ended by the stream's own
        // limit first (with its error), never cut off underneath it.
        let idle = cfg.connection_idle.max(cfg.stream_idle);
        match l {
            // Unix sockets only: see crate::authority (TCP clients send a
            // host:port, which h2 takes).
            Listener::Unix(u) => {
                let incoming = UnixListenerStream::new(u)
                    .map(move |c| c.map(|c| Idle::new(FixAuthority::new(c), idle)));
                servers
                    .spawn(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()));
            }
            Listener::Tcp(t) => {
                let incoming =
                    TcpListenerStream::new(t).map(move |c| c.map(|c| Idle::new(c, idle)));
                servers
                    .spawn(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()));
            }
            Listener::Handed(h) => {
                let incoming = h.map(move |c| c.map(|c| Idle::new(FixAuthority::new(c), idle)));
                servers
                    .spawn(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()));
            }
        }
    }

    // Writers that fail, or whose last frame hit a full disk, flip health to
    // NOT_SERVING for their archive as soon as the registry publishes it
    // (docs/systemd.md); a disk that has room again flips it back.
    {
        let registry = registry.clone();
        let health = health.clone();
        let stop = shutdown.clone();
        let root = state.archives.root().to_path_buf();
        let mut failures = registry.watch_failures();
        tokio::spawn(async move {
            let mut reported = std::collections::HashSet::new();
            let service = |path: &std::path::Path| {
                let name = path
                    .strip_prefix(&root)
                    .unwrap_or(path)
                    .display()
                    .to_string();
                (format!("gtar.logd.v1.Logd/{name}"), name)
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = failures.changed() => if changed.is_err() { return },
                }
                let problems = registry.problems();
                for (path, why) in &problems {
                    if reported.insert(path.clone()) {
                        let (svc, name) = service(path);
                        tracing::error!(archive = %name, error = %why, "archive writer cannot write; health NOT_SERVING for it");
                        health
                            .set_service_status(svc, ServingStatus::NotServing)
                            .await;
                    }
                }
                let now: std::collections::HashSet<_> =
                    problems.into_iter().map(|(p, _)| p).collect();
                for path in reported.iter().filter(|p| !now.contains(*p)) {
                    let (svc, name) = service(path);
                    tracing::info!(archive = %name, "archive writes again; health SERVING for it");
                    health.set_service_status(svc, ServingStatus::Serving).await;
                }
                reported.retain(|p| now.contains(p));
            }
        });
    }

    if let Some(r) = state.archives.replicator().cloned() {
        watch_remote(r, state.clone(), health.clone(), shutdown.clone());
    }

    on_ready(Liveness(registry.clone()));
    shutdown.cancelled().await;
    tracing::info!("shutting down: no new connections; open frames are dropped");
    health.set_not_serving::<LogdServer<Service>>().await;
    let drained = tokio::time::timeout(cfg.grace, async {
        while let Some(r) = servers.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "server ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the grace period; closing them");
        servers.shutdown().await;
    }
    let reg = registry.clone();
    tokio::task::spawn_blocking(move || reg.shutdown()).await?;
    tracing::info!("all archives closed and synced");
    Ok(())
}

/// A connection that is closed (reads end) once no byte has gone either way
/// for `idle`: idle connections cost a task and buffers each, and hyper has
/// no idle timeout for HTTP/2 servers. Its limit is at least the stream
/// idle limit, so a silent Write stream is ended first by its own limit,
/// with its error.
struct Idle<S> {
    inner: S,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, idle: Duration) -> Idle<S> {
        Idle {
            inner,
            idle,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<S: Connected> Connected for Idle<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                // The reader is always polled while the connection lives;
                // the timer is checked (and pushed on) only here.
                let due = this.last + this.idle;
                if this.timer.deadline().into_std() != due {
                    this.timer.as_mut().reset(due.into());
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if this.last + this.idle <= Instant::now() => {
                        tracing::debug!(idle_s = this.idle.as_secs(), "closing an idle connection");
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    Poll::Ready(()) => continue,
                }
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
