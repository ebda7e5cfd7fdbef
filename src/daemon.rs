//! `gtar-logd serve`: everything between the parsed command line and the
//! server — logging, the allocator, the listeners, signals, systemd's
//! readiness and watchdog — so `main` only parses and calls [`run`].
//!
//! Order that matters: [`crate::listen::take_listen_fds`] runs first, before
//! any other thread exists (it edits the environment); `READY=1` is sent
//! only once every listener is served; `STOPPING=1` as soon as a signal
//! arrives; the socket file is removed after the server has shut down.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{listen, server, systemd};

/// What `serve` was asked to do (flags and their environment variables).
#[derive(Debug, Clone)]
pub struct Options {
    /// `None`: the default data directory ([`default_data_dir`]).
    pub data_dir: Option<PathBuf>,
    pub listen: listen::Request,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    /// How long a writer may be stuck in one disk operation before the
    /// watchdog stops being pinged.
    pub writer_stall: Duration,
    pub max_tensor_bytes: u64,
    pub queue_frames: usize,
    pub direct_io: bool,
    pub shared_memory: bool,
    pub grace: Duration,
    /// How long in total a frame may keep its archive's writer waiting.
    pub frame_deadline: Duration,
    pub stream_idle: Duration,
    pub connection_idle: Duration,
    pub peer_limits: crate::peer::PeerLimits,
    /// A tracing `EnvFilter`.
    pub log: String,
    /// `--multi-user`: run as the dispatcher of per-user workers (`users`).
    pub multi_user: bool,
    /// `--admin-group`: members read every user's archives under `~USER/`.
    pub admin_group: Option<String>,
    /// `--tcp-allow-anonymous`: TCP requests need no token.
    pub tcp_allow_anonymous: bool,
    /// `--token-file`: where the TCP token goes [default: `auth::default_token_file`].
    pub token_file: Option<PathBuf>,
    pub remote: Option<crate::remote::RemoteUrl>,
    pub remote_backlog_bytes: u64,
    /// `--worker-idle`: a multi-user worker with no connection for this
    /// long exits (the next connection starts a new one); zero: never.
    pub worker_idle: Duration,
}

impl Options {
    /// The server's configuration from these options: the part a
    /// single-user daemon and a multi-user worker share.
    fn server_config(&self, data_dir: PathBuf) -> server::Config {
        let mut cfg = server::Config::new(data_dir);
        cfg.max_tensor_bytes = self.max_tensor_bytes;
        cfg.limits.queue_frames = self
            .queue_frames
            .max(crate::service::ingest::FRAMES_IN_FLIGHT);
        cfg.limits.direct_io = self.direct_io;
        cfg.limits.frame_deadline = self.frame_deadline;
        cfg.shared_memory = self.shared_memory;
        cfg.grace = self.grace;
        cfg.stream_idle = self.stream_idle;
        cfg.connection_idle = self.connection_idle;
        cfg.peer_limits = self.peer_limits.clone();
        cfg.remote = self.remote.clone();
        cfg.remote_backlog_bytes = self.remote_backlog_bytes;
        cfg
    }
}

/// What a worker of the multi-user service adds to [`Options`].
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `<data-dir>/users`.
    pub users_dir: PathBuf,
    /// The user it serves (for logs).
    pub user_name: String,
    /// Root or the admin group: may read `~USER/` archives.
    pub admin: bool,
    /// Exit after this long without a connection (`serve --worker-idle`);
    /// `None`: never.
    pub idle_exit: Option<Duration>,
}

/// Where the multi-user service listens unless told otherwise.
pub const MULTI_USER_SOCKET: &str = "/run/gtar-logd/gtar-logd.sock";
/// Where the multi-user service keeps archives unless told otherwise.
pub const MULTI_USER_DATA_DIR: &str = "/var/lib/gtar-logd";

/// `$XDG_DATA_HOME/gtar-logd`, else `~/.local/share/gtar-logd`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("gtar-logd");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/gtar-logd"),
        None => PathBuf::from("gtar-logd-data"),
    }
}

/// Log to stderr. A log line that cannot be written is dropped, silently:
/// tracing's default reports the failure with `eprintln!`, which panics when
/// stderr is a closed pipe or a full disk — and a panic in the signal task
/// meant a SIGTERM that never stopped the daemon (`serve 2>&1 | head -3`, a
/// journald restart). Nothing the daemon does may depend on its log.
fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        fmt.init();
    } else {
        // journald adds its own timestamps; keep lines plain.
        fmt.without_time().with_ansi(false).init();
    }
}

/// Keep freed message buffers for reuse instead of returning them to the
/// kernel. Each tensor chunk arrives in a fresh multi-MiB buffer (prost hands
/// slices of it to the writer thread, which frees them after writing); with
/// glibc's defaults those come from mmap and go back with munmap, so every
/// chunk paid for page faults and the kernel zeroing its pages — as much CPU
/// as copying it (`perf`: `clear_page_erms`, 11 % of the daemon). Served from
/// the heap, the same memory is reused; RSS stays at its peak (tens of MiB).
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Cancel `shutdown` on SIGTERM or SIGINT, telling systemd we are stopping.
///
/// The handlers are installed before this returns, not in the spawned task:
/// call it before binding a socket, so a SIGTERM that arrives as soon as a
/// client can connect (systemd stopping a just-started unit) is a clean stop,
/// not the default action's death by signal.
fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        systemd::notify_stopping("shutting down: flushing and closing archives");
        shutdown.cancel();
    });
}

/// The TCP token for the first TCP listener, unless anonymous TCP was
/// allowed (see `auth`).
fn tcp_token(o: &Options, listeners: &[listen::Listener]) -> anyhow::Result<Option<PathBuf>> {
    let port = listeners.iter().find_map(|l| match l {
        listen::Listener::Tcp(t) => t.local_addr().ok().map(|a| a.port()),
        _ => None,
    });
    let Some(port) = port else { return Ok(None) };
    if o.tcp_allow_anonymous {
        tracing::warn!(
            "--tcp-allow-anonymous: every local user who can reach the TCP port reads and \
             writes every archive (meant for a single-user machine)"
        );
        return Ok(None);
    }
    Ok(Some(
        o.token_file
            .clone()
            .unwrap_or_else(|| crate::auth::default_token_file(port)),
    ))
}

/// Run the daemon until SIGTERM/SIGINT; see the module docs.
pub fn run(o: Options) -> anyhow::Result<()> {
    keep_freed_buffers();
    init_logging(&o.log);
    if o.multi_user {
        return run_dispatcher(o);
    }
    let activation = listen::take_listen_fds()?;
    let perms =
        listen::SocketPermissions::parse(o.socket_mode.as_deref(), o.socket_group.as_deref())
            .map_err(|e| anyhow::anyhow!("--socket-mode/--socket-group: {e}"))?;
    let data_dir = o.data_dir.clone().unwrap_or_else(default_data_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone());
        let request = listen::Request {
            perms: Some(perms),
            ..o.listen.clone()
        };
        let bound = listen::bind_all(request, activation).await?;
        let mut cfg = o.server_config(data_dir);
        let token_file = tcp_token(&o, &bound.listeners)?;
        if let Some(f) = &token_file {
            let t = crate::auth::create(f)?;
            tracing::info!(token_file = %f.display(), "TCP requests need `authorization: Bearer <token>` from this file");
            cfg.tcp_token = Some(std::sync::Arc::new(t));
        }
        let addrs: Vec<String> = bound.listeners.iter().map(|l| l.describe()).collect();
        let mut watchdog = None;
        let on_ready = |alive: server::Liveness| {
            tracing::info!("ready");
            systemd::notify_ready(&format!("serving on {}", addrs.join(", ")));
            let stall = o.writer_stall;
            match systemd::spawn_watchdog_from_env(move || alive.check(stall)) {
                Ok(w) => watchdog = w,
                Err(e) => tracing::error!(error = %e, "cannot start the watchdog thread"),
            }
        };
        let res = server::run(bound.listeners, cfg, shutdown, on_ready).await;
        drop(watchdog);
        if let Some(p) = &bound.socket_file {
            let _ = std::fs::remove_file(p);
        }
        if let Some(f) = &token_file {
            let _ = std::fs::remove_file(f);
        }
        res
    })
}

/// The arguments every worker gets: every tunable of this daemon (the
/// per-peer limits then apply per user: a worker's peers are one uid).
fn worker_args(o: &Options) -> Vec<std::ffi::OsString> {
    [
        format!("--max-tensor-bytes={}", o.max_tensor_bytes),
        format!("--queue-frames={}", o.queue_frames),
        format!("--direct-io={}", o.direct_io),
        format!("--shared-memory={}", o.shared_memory),
        format!("--grace-secs={}", o.grace.as_secs()),
        format!("--writer-stall-secs={}", o.writer_stall.as_secs()),
        format!("--frame-deadline={}", o.frame_deadline.as_secs()),
        format!("--stream-idle={}", o.stream_idle.as_secs()),
        format!("--connection-idle={}", o.connection_idle.as_secs()),
        format!("--peer-streams={}", o.peer_limits.streams),
        format!("--peer-bytes-in-flight={}", o.peer_limits.bytes_in_flight),
        format!("--peer-archives={}", o.peer_limits.archives),
        format!("--idle-exit-secs={}", o.worker_idle.as_secs()),
        format!("--log={}", o.log),
        format!("--remote-backlog-bytes={}", o.remote_backlog_bytes),
    ]
    .into_iter()
    .map(Into::into)
    .collect()
}

/// `serve --multi-user`: the dispatcher (see `users`).
fn run_dispatcher(o: Options) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let activation = listen::take_listen_fds()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "--multi-user needs root: it starts a worker process as each connecting user"
        );
    }
    if o.listen.tcp.is_some() || !activation.tcp.is_empty() {
        anyhow::bail!(
            "--multi-user serves the Unix socket only: TCP carries no identity, so it cannot \
             tell whose archives a request may see (drop --tcp, or the TCP .socket unit)"
        );
    }
    let admin_gid = o
        .admin_group
        .as_deref()
        .map(listen::resolve_group)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--admin-group: {e}"))?;
    // Every user may connect (0666) unless a group or mode is given: who
    // they are comes from the kernel, and each reaches only their own worker.
    let mode = o.socket_mode.as_deref().or(if o.socket_group.is_some() {
        None
    } else {
        Some("0666")
    });
    let perms = listen::SocketPermissions::parse(mode, o.socket_group.as_deref())
        .map_err(|e| anyhow::anyhow!("--socket-mode/--socket-group: {e}"))?;
    let data_dir = o
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(MULTI_USER_DATA_DIR));
    // Users pass through it to their own directory (0711: no listing);
    // systemd's StateDirectoryMode= makes it so, and so do we.
    crate::users::ensure_dir_mode(&data_dir, 0o711).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the data directory {} (--data-dir): {e}",
            data_dir.display()
        )
    })?;
    let dopts = crate::users::DispatchOptions {
        users_dir: data_dir.join("users"),
        admin_gid,
        worker_args: worker_args(&o),
        remote: o.remote.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone());
        let (listener, socket_file) = match activation.unix.into_iter().next() {
            Some((_, l)) => {
                l.set_nonblocking(true)?;
                (tokio::net::UnixListener::from_std(l)?, None)
            }
            None => {
                let p = match o.listen.uds.as_deref() {
                    None | Some("") | Some("none") => PathBuf::from(MULTI_USER_SOCKET),
                    Some(p) => PathBuf::from(p.strip_prefix("unix:").unwrap_or(p)),
                };
                if let Some(parent) = p.parent().filter(|d| !d.exists()) {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)?;
                }
                let l = listen::bind_unix_with(&p, perms)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {} (--uds): {e}", p.display()))?;
                (l, Some(p))
            }
        };
        // The watchdog pings while the dispatcher's event loop turns.
        let beat = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let beat = beat.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(1));
                while !stop.is_cancelled() {
                    t.tick().await;
                    beat.store(systemd_now_secs(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        let stall = o.writer_stall.as_secs().max(5);
        let watchdog = systemd::spawn_watchdog_from_env(move || {
            systemd_now_secs().saturating_sub(beat.load(std::sync::atomic::Ordering::Relaxed))
                < stall
        })
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot start the watchdog thread");
            None
        });
        let where_ = socket_file
            .as_ref()
            .map_or("the socket systemd passed".to_string(), |p| p.display().to_string());
        tracing::info!(socket = %where_, data_dir = %data_dir.display(), admin_group = ?o.admin_group, "multi-user: one worker per connecting user");
        systemd::notify_ready(&format!("multi-user service on {where_}"));
        let workers = crate::users::Workers::default();
        let res = crate::users::dispatch(listener, dopts, workers, shutdown, o.grace).await;
        drop(watchdog);
        if let Some(p) = &socket_file {
            let _ = std::fs::remove_file(p);
        }
        res
    })
}

fn systemd_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `gtar-logd worker`: one user's server, on connections its dispatcher
/// passes over fd [`crate::users::WORKER_CHANNEL_FD`] (see `users`).
pub fn run_worker(o: Options, w: WorkerOptions) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    // First, while this is the only thread (it sets environment variables).
    crate::users::take_worker_env()
        .map_err(|e| anyhow::anyhow!("cannot take the service's AWS_* variables: {e}"))?;
    keep_freed_buffers();
    init_logging(&o.log);
    let fd = crate::users::WORKER_CHANNEL_FD;
    // SAFETY: fstat on a descriptor number only reads its metadata.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        anyhow::bail!(
            "gtar-logd worker is started by `gtar-logd serve --multi-user` (fd {fd} must be its channel)"
        );
    }
    // SAFETY: fd 3 is the channel the dispatcher passed us (checked above to
    // be a socket); nothing else in this process owns it.
    let chan = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let data_dir = o.data_dir.clone().unwrap_or_else(default_data_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone());
        let incoming = crate::users::incoming(chan, shutdown.clone(), w.idle_exit)?;
        // `remote` is the dispatcher's, under this user's prefix (users::user_remote).
        let mut cfg = o.server_config(data_dir);
        cfg.others = Some((w.users_dir, w.admin));
        tracing::info!(user = %w.user_name, admin = w.admin, remote = ?o.remote.as_ref().map(|r| r.to_string()), "worker serving");
        server::run(
            vec![listen::Listener::Handed(incoming)],
            cfg,
            shutdown,
            |_| {},
        )
        .await
    })
}
