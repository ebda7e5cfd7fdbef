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
    /// A tracing `EnvFilter`.
    pub log: String,
    pub remote: Option<crate::remote::RemoteUrl>,
    pub remote_backlog_bytes: u64,
}

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

fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        systemd::notify_stopping("shutting down: flushing and closing archives");
        shutdown.cancel();
    });
}

/// Run the daemon until SIGTERM/SIGINT; see the module docs.
pub fn run(o: Options) -> anyhow::Result<()> {
    keep_freed_buffers();
    init_logging(&o.log);
    let activation = listen::take_listen_fds()?;
    let perms =
        listen::SocketPermissions::parse(o.socket_mode.as_deref(), o.socket_group.as_deref())
            .map_err(|e| anyhow::anyhow!("--socket-mode/--socket-group: {e}"))?;
    let data_dir = o.data_dir.clone().unwrap_or_else(default_data_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let request = listen::Request {
            perms: Some(perms),
            ..o.listen.clone()
        };
        let bound = listen::bind_all(request, activation).await?;
        let mut cfg = server::Config::new(data_dir);
        cfg.max_tensor_bytes = o.max_tensor_bytes;
        cfg.limits.queue_frames = o.queue_frames.max(crate::service::ingest::FRAMES_IN_FLIGHT);
        cfg.limits.direct_io = o.direct_io;
        cfg.shared_memory = o.shared_memory;
        cfg.grace = o.grace;
        cfg.remote = o.remote.clone();
        cfg.remote_backlog_bytes = o.remote_backlog_bytes;
        let shutdown = CancellationToken::new();
        cancel_on_signal(shutdown.clone());
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
        res
    })
}
