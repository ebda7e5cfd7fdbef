//! `gtar-logd`: parse the command line and run. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gtar_logd::server::{self, Listener};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "gtar-logd", version, about = "Keep every checkpoint of a training run in a GETAR archive", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: take frames over gRPC and append them to archives
    /// under the data directory; answer load queries.
    Serve(ServeArgs),
    /// Print the frame indices of an archive, one a line, in GETAR order.
    Frames {
        /// The archive file (.zip).
        archive: PathBuf,
        /// Only frames of records in this group (or below it), e.g. a keras_gtar group.
        #[arg(long)]
        group: Option<String>,
    },
    /// List the record types of an archive with their frame counts.
    Ls {
        /// The archive file (.zip).
        archive: PathBuf,
    },
    /// Repair an archive left without a valid central directory (crash, kill -9,
    /// full disk): keep every complete frame, drop the torn tail.
    Repair {
        /// The archive file (.zip).
        archive: PathBuf,
    },
    /// Keep some frames and drop the rest: writes the kept frames, every
    /// constant record and the metrics to a new file, then replaces the
    /// archive with it (fsynced, renamed: after a crash it is the old or the
    /// new archive, complete). A frame kept by any --keep-* is kept; the
    /// newest frame always is. Refused while a daemon has the archive open.
    Compact(CompactCli),
    /// Copy an archive consistently, also while it is being written: the
    /// copy holds every frame committed when it starts (a reflink where the
    /// file system has one). DST must not exist.
    Snapshot {
        /// The archive file to copy.
        src: PathBuf,
        /// The new file.
        dst: PathBuf,
    },
    /// Write one frame's tensors to a safetensors or npz file, bit-exact,
    /// with their dtypes and the names the training code gave them.
    Export {
        /// The archive file (.zip).
        archive: PathBuf,
        /// The group the frames were written under (GTARLogger's / the
        /// client's `group`), if any.
        #[arg(long)]
        group: Option<String>,
        /// The frame index [default: the last frame].
        #[arg(long)]
        frame: Option<String>,
        /// Output format.
        #[arg(long, value_enum)]
        format: gtar_logd::lifecycle::export::ExportFormat,
        /// Output file (replaced if it exists).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct CompactCli {
    /// The archive file (.zip).
    archive: PathBuf,
    /// Keep the last N frames.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Keep every K-th frame: indices that are multiples of K (by position when indices are not all integers).
    #[arg(long, value_name = "K")]
    keep_every: Option<u64>,
    /// Keep the N frames with the best value of a stored metric, e.g. val_loss:min:3 (a `vars/` record whose steps are frame indices, as GTARLogger's epoch metrics).
    #[arg(long, value_name = "METRIC:min|max:N")]
    keep_best: Option<String>,
    /// Keep frames written less than this long ago, e.g. 7d, 12h (needs frame write times).
    #[arg(long, value_name = "DURATION")]
    keep_newer_than: Option<String>,
    /// Judge only the frames of records in this group (or below it); other records are kept whole.
    #[arg(long)]
    group: Option<String>,
    /// Print what would be kept and dropped, write nothing.
    #[arg(long)]
    dry_run: bool,
}

fn compact(c: CompactCli, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let keep_best = c
        .keep_best
        .as_deref()
        .map(str::parse::<gtar::Best>)
        .transpose()
        .map_err(|e| match e {
            gtar::Error::Invalid(m) => anyhow::anyhow!("--{m}"),
            e => e.into(),
        })?;
    let keep_newer_than = c
        .keep_newer_than
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d)
                .map_err(|e| anyhow::anyhow!("--keep-newer-than {d:?}: {e} (e.g. 7d, 12h, 30min)"))
        })
        .transpose()?;
    let args = gtar_logd::lifecycle::compact::CompactArgs {
        group: c.group,
        policy: gtar::Policy {
            keep_last: c.keep_last,
            keep_every: c.keep_every,
            keep_best,
            keep_newer_than,
        },
        dry_run: c.dry_run,
    };
    if args.policy.is_empty() {
        anyhow::bail!(
            "give at least one of --keep-last, --keep-every, --keep-best, --keep-newer-than \
             (compaction drops every frame no policy keeps)"
        );
    }
    gtar_logd::lifecycle::compact::compact(&c.archive, &args, out).map(|_| ())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory holding the archives [default: $XDG_DATA_HOME/gtar-logd or ~/.local/share/gtar-logd]
    #[arg(long, env = "GTAR_LOGD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to listen on [default: $XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock or /tmp/gtar-logd-$UID/gtar-logd.sock]; "none" to disable
    #[arg(long, env = "GTAR_LOGD_UDS")]
    uds: Option<String>,
    /// TCP address to listen on, e.g. 127.0.0.1:7461 (off unless given)
    #[arg(long, env = "GTAR_LOGD_TCP")]
    tcp: Option<SocketAddr>,
    /// Group (name or gid) whose members may connect to the Unix socket [default: none: only the daemon's user]
    #[arg(long, env = "GTAR_LOGD_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Octal mode of the Unix socket [default: 0660 with --socket-group, else 0600]
    #[arg(long, env = "GTAR_LOGD_SOCKET_MODE")]
    socket_mode: Option<String>,
    /// Seconds a writer may be stuck in one disk operation before the systemd watchdog stops being pinged
    #[arg(long, default_value_t = 120)]
    writer_stall_secs: u64,
    /// Largest tensor accepted, in bytes
    #[arg(long, env = "GTAR_LOGD_MAX_TENSOR_BYTES", default_value_t = 1 << 40)]
    max_tensor_bytes: u64,
    /// Frames that may queue per archive before writers get RESOURCE_EXHAUSTED (at least 2: one stream keeps up to 2 frames in flight and is slowed down, not refused)
    #[arg(long, default_value_t = 64)]
    queue_frames: usize,
    /// Write large tensors (>= 1 MiB) with O_DIRECT: much less CPU taken from training, no page-cache churn; falls back to the page cache where the file system refuses it
    #[arg(long, env = "GTAR_LOGD_DIRECT_IO", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    direct_io: bool,
    /// Let clients on the Unix socket that run as the daemon's user pass tensor bytes in shared memory (a sealed memfd the daemon maps read-only) instead of through the socket: fewer copies, less CPU
    #[arg(long, env = "GTAR_LOGD_SHARED_MEMORY", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    shared_memory: bool,
    /// Seconds open queries may run on after SIGTERM before they are cut off
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "gtar_logd=debug"
    #[arg(long, env = "GTAR_LOGD_LOG", default_value = "info")]
    log: String,
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail and has no preconditions.
    unsafe { libc::getuid() }
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("gtar-logd");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/gtar-logd"),
        None => PathBuf::from("gtar-logd-data"),
    }
}

/// The default socket, shared with the clients' default address.
fn default_uds() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("gtar-logd/gtar-logd.sock"),
        None => PathBuf::from(format!("/tmp/gtar-logd-{}/gtar-logd.sock", uid())),
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

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    use gtar_logd::systemd;
    keep_freed_buffers();
    init_logging(&a.log);
    // Sockets passed by systemd, taken before any other thread exists (it
    // edits the environment). When there are some, they are the listeners.
    let activation = systemd::take_listen_fds()?;
    let perms =
        systemd::SocketPermissions::parse(a.socket_mode.as_deref(), a.socket_group.as_deref())
            .map_err(|e| anyhow::anyhow!("--socket-mode/--socket-group: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        let activated = !activation.is_empty();
        for (name, l) in activation.into_listeners() {
            let l = Listener::from_activated(l)?;
            let name = name.unwrap_or_default();
            tracing::info!(address = %l.describe(), %name, "socket passed by systemd");
            listeners.push(l);
        }
        if activated && (a.uds.is_some() || a.tcp.is_some()) {
            tracing::info!("socket-activated: --uds/--tcp are ignored");
        }
        let uds = match a.uds.as_deref() {
            _ if activated => None,
            Some("none") | Some("") => None,
            Some(p) => Some(PathBuf::from(p.strip_prefix("unix:").unwrap_or(p))),
            None => Some(default_uds()),
        };
        if let Some(p) = &uds {
            let l = server::bind_unix_with(p, perms)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", p.display()))?;
            listeners.push(Listener::Unix(l));
        }
        if let Some(addr) = a.tcp.filter(|_| !activated) {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            listeners.push(Listener::Tcp(l));
        }
        if listeners.is_empty() {
            anyhow::bail!("nothing to listen on: give --uds or --tcp");
        }
        let mut cfg = server::Config::new(a.data_dir.unwrap_or_else(default_data_dir));
        cfg.max_tensor_bytes = a.max_tensor_bytes;
        cfg.limits.queue_frames = a
            .queue_frames
            .max(gtar_logd::service::ingest::FRAMES_IN_FLIGHT);
        cfg.limits.direct_io = a.direct_io;
        cfg.shared_memory = a.shared_memory;
        cfg.grace = std::time::Duration::from_secs(a.grace_secs);
        let shutdown = CancellationToken::new();
        {
            let shutdown = shutdown.clone();
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
        let addrs: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
        let stall = std::time::Duration::from_secs(a.writer_stall_secs.max(1));
        let mut watchdog = None;
        // Called once every listener is served and health says SERVING.
        let on_ready = |registry: std::sync::Arc<gtar_logd::writer::Registry>| {
            tracing::info!("ready");
            systemd::notify_ready(&format!("serving on {}", addrs.join(", ")));
            match systemd::spawn_watchdog_from_env(move || registry.healthy(stall)) {
                Ok(w) => watchdog = w,
                Err(e) => tracing::error!(error = %e, "cannot start the watchdog thread"),
            }
        };
        let res = server::run(listeners, cfg, shutdown, on_ready).await;
        drop(watchdog);
        if let Some(p) = &uds {
            let _ = std::fs::remove_file(p);
        }
        res
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let res = match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Frames { archive, group } => {
            gtar_logd::cli::frames(&archive, group.as_deref(), &mut out)
        }
        Cmd::Ls { archive } => gtar_logd::cli::ls(&archive, &mut out),
        Cmd::Repair { archive } => gtar_logd::cli::repair(&archive, &mut out),
        Cmd::Compact(c) => compact(c, &mut out),
        Cmd::Snapshot { src, dst } => {
            gtar_logd::lifecycle::snapshot::snapshot(&src, &dst, &mut out).map(|_| ())
        }
        Cmd::Export {
            archive,
            group,
            frame,
            format,
            output,
        } => gtar_logd::lifecycle::export::export(
            &archive,
            group.as_deref(),
            frame.as_deref(),
            format,
            &output,
        )
        .and_then(|e| {
            use std::io::Write;
            writeln!(
                out,
                "frame {} of {}: {} tensors, {} bytes -> {}",
                e.frame,
                archive.display(),
                e.tensors.len(),
                e.bytes,
                output.display()
            )?;
            Ok(())
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gtar-logd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
