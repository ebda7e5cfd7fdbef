//! `gtar-logd`: parse the command line and run. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gtar_logd::daemon;

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
    /// One user's server in the multi-user service (started by
    /// `serve --multi-user`, not by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Print the frame indices of an archive, one a line, in GETAR order.
    Frames {
        /// The archive file (.zip), or s3://BUCKET/PREFIX/NAME (see `serve --remote`).
        archive: PathBuf,
        /// Only frames of records in this group (or below it), e.g. a keras_gtar group.
        #[arg(long)]
        group: Option<String>,
    },
    /// List the record types of an archive with their frame counts.
    Ls {
        /// The archive file (.zip), or s3://BUCKET/PREFIX/NAME (see `serve --remote`).
        archive: PathBuf,
    },
    /// Write an archive kept in remote storage (`serve --remote`) as one zip
    /// file that libgetar and any zip reader open.
    Fetch {
        /// s3://BUCKET/PREFIX/NAME; endpoint and credentials from the AWS environment.
        remote: String,
        /// The file to write (replaced atomically if it exists).
        local: PathBuf,
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
    /// A web page of every frame's exact statistics: metric curves, each
    /// tensor across frames, every layer's update ratio, frame diffs. Shows
    /// the archives of your daemon, or with PATHS the archive files and
    /// directories given (offline, no daemon). Prints a URL with a token.
    View(ViewCli),
}

#[derive(clap::Args)]
struct ViewCli {
    /// Archive files or directories holding them (offline); none: your daemon's archives.
    paths: Vec<PathBuf>,
    /// The daemon's address when no PATHS are given [default: as for every client: $GTAR_LOGD_ADDRESS, else the default socket]
    #[arg(long, default_value = "")]
    address: String,
    /// The address to serve the page on (anything but loopback lets others on the network try the token)
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// The port to serve the page on [default: a free one]
    #[arg(long, default_value_t = 0)]
    port: u16,
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
    /// Let the frame recorded as the best (GTARLogger's monitor=) be dropped like any other; its record goes with it. By default it is kept.
    #[arg(long)]
    drop_best: bool,
}

fn compact(c: CompactCli, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let archive = locate(&c.archive)?;
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
            drop_best: c.drop_best,
        },
        dry_run: c.dry_run,
    };
    if args.policy.is_empty() {
        anyhow::bail!(
            "give at least one of --keep-last, --keep-every, --keep-best, --keep-newer-than \
             (compaction drops every frame no policy keeps)"
        );
    }
    gtar_logd::lifecycle::compact::compact(&archive, &args, out).map(|_| ())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory holding the archives [default: $XDG_DATA_HOME/gtar-logd or ~/.local/share/gtar-logd]
    #[arg(long, env = "GTAR_LOGD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to listen on [default: $XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock or /tmp/gtar-logd-$UID/gtar-logd.sock]; "none" to disable
    #[arg(long, env = "GTAR_LOGD_UDS")]
    uds: Option<String>,
    /// TCP address to listen on, HOST:PORT, e.g. 127.0.0.1:7461 or localhost:7461 (off unless given)
    #[arg(long, env = "GTAR_LOGD_TCP")]
    tcp: Option<String>,
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
    #[arg(long, env = "GTAR_LOGD_MAX_TENSOR_BYTES", default_value_t = gtar_logd::limits::DEFAULT_MAX_TENSOR_BYTES)]
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
    /// Seconds in total a frame may keep its archive's writer waiting for the client's next bytes (plus 1 s per 64 MiB it sent) before it is aborted, so other writers of the archive go on; frames up to 4 MiB are assembled apart and never wait
    #[arg(long, env = "GTAR_LOGD_FRAME_DEADLINE", default_value_t = gtar_logd::limits::DEFAULT_FRAME_DEADLINE.as_secs(), value_name = "SECS")]
    frame_deadline: u64,
    /// Seconds a Write stream may send nothing before the daemon ends it
    #[arg(long, env = "GTAR_LOGD_STREAM_IDLE", default_value_t = gtar_logd::limits::DEFAULT_STREAM_IDLE.as_secs(), value_name = "SECS")]
    stream_idle: u64,
    /// Seconds a connection may exchange no bytes before the daemon closes it
    #[arg(long, env = "GTAR_LOGD_CONNECTION_IDLE", default_value_t = gtar_logd::limits::DEFAULT_CONNECTION_IDLE.as_secs(), value_name = "SECS")]
    connection_idle: u64,
    /// Live Write streams per peer (a uid on the Unix socket, a connection on TCP)
    #[arg(long, env = "GTAR_LOGD_PEER_STREAMS", default_value_t = gtar_logd::limits::DEFAULT_PEER_STREAMS)]
    peer_streams: usize,
    /// Bytes of uncommitted frames the daemon holds per peer
    #[arg(long, env = "GTAR_LOGD_PEER_BYTES_IN_FLIGHT", default_value_t = gtar_logd::limits::DEFAULT_PEER_BYTES_IN_FLIGHT)]
    peer_bytes_in_flight: u64,
    /// Archives open for writing per peer
    #[arg(long, env = "GTAR_LOGD_PEER_ARCHIVES", default_value_t = gtar_logd::limits::DEFAULT_PEER_ARCHIVES)]
    peer_archives: usize,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "gtar_logd=debug"
    #[arg(long, env = "GTAR_LOGD_LOG", default_value = "info")]
    log: String,
    /// The system service for a shared machine (run as root): each user who connects to the Unix socket is served by a worker process running as that user, with their own archives under DATA_DIR/users/NAME [socket default: /run/gtar-logd/gtar-logd.sock, mode 0666; data dir default: /var/lib/gtar-logd]. No TCP.
    #[arg(long, env = "GTAR_LOGD_MULTI_USER")]
    multi_user: bool,
    /// With --multi-user: members of this group (and root) may read every user's archives as ~USER/NAME.zip
    #[arg(long, env = "GTAR_LOGD_ADMIN_GROUP")]
    admin_group: Option<String>,
    /// Serve TCP without a token (any local user can then read and write every archive: only for a single-user machine)
    #[arg(long, env = "GTAR_LOGD_TCP_ALLOW_ANONYMOUS")]
    tcp_allow_anonymous: bool,
    /// Where to write the token TCP requests must carry [default: tcp-PORT.token next to the default socket]
    #[arg(long, env = "GTAR_LOGD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Replicate every archive to S3-compatible storage, s3://BUCKET/PREFIX, and serve archives that exist only there; endpoint and credentials from the AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP)
    #[arg(long, env = "GTAR_LOGD_REMOTE", value_name = "s3://BUCKET/PREFIX")]
    remote: Option<gtar_logd::RemoteUrl>,
    /// Durable bytes of one archive that may wait for upload before it is reported lagging (health, DescribeArchive, log); frames are still accepted and acked durable, and replication catches up from the local file
    #[arg(long, env = "GTAR_LOGD_REMOTE_BACKLOG_BYTES", default_value_t = gtar_logd::limits::DEFAULT_REMOTE_BACKLOG_BYTES)]
    remote_backlog_bytes: u64,
    /// With --multi-user: seconds a user's worker process may go without a connection before it exits (the user's next connection starts a new one); 0: never
    #[arg(
        long,
        env = "GTAR_LOGD_WORKER_IDLE",
        default_value_t = 600,
        value_name = "SECS"
    )]
    worker_idle: u64,
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The multi-user service's users directory (DATA_DIR/users).
    #[arg(long)]
    users_dir: PathBuf,
    /// The user served (for logs).
    #[arg(long)]
    user_name: String,
    /// Root or the admin group: may read ~USER/ archives.
    #[arg(long)]
    admin: bool,
    /// Exit after this many seconds without a connection (0: never).
    #[arg(long, default_value_t = 0)]
    idle_exit_secs: u64,
}

impl ServeArgs {
    fn into_options(self) -> daemon::Options {
        daemon::Options {
            data_dir: self.data_dir,
            listen: gtar_logd::listen::Request {
                uds: self.uds,
                tcp: self.tcp,
                perms: None,
            },
            socket_mode: self.socket_mode,
            socket_group: self.socket_group,
            writer_stall: Duration::from_secs(self.writer_stall_secs.max(1)),
            max_tensor_bytes: self.max_tensor_bytes,
            queue_frames: self.queue_frames,
            direct_io: self.direct_io,
            shared_memory: self.shared_memory,
            grace: Duration::from_secs(self.grace_secs),
            frame_deadline: Duration::from_secs(self.frame_deadline.max(1)),
            stream_idle: Duration::from_secs(self.stream_idle.max(1)),
            connection_idle: Duration::from_secs(self.connection_idle.max(1)),
            peer_limits: gtar_logd::PeerLimits {
                streams: self.peer_streams.max(1),
                bytes_in_flight: self
                    .peer_bytes_in_flight
                    .max(gtar_logd::limits::SMALL_FRAME_MAX),
                archives: self.peer_archives.max(1),
            },
            log: self.log,
            multi_user: self.multi_user,
            admin_group: self.admin_group,
            tcp_allow_anonymous: self.tcp_allow_anonymous,
            token_file: self.token_file,
            remote: self.remote,
            remote_backlog_bytes: self.remote_backlog_bytes,
            worker_idle: Duration::from_secs(self.worker_idle),
        }
    }
}

use gtar_logd::cli::locate;

fn view(v: ViewCli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(gtar_logd::view::run(gtar_logd::view::Options {
        paths: v.paths,
        address: v.address,
        host: v.host,
        port: v.port,
        cache_dir: None,
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let res = match cli.cmd {
        Cmd::Serve(a) => daemon::run(a.into_options()),
        Cmd::Worker(w) => daemon::run_worker(
            w.serve.into_options(),
            daemon::WorkerOptions {
                users_dir: w.users_dir,
                user_name: w.user_name,
                admin: w.admin,
                idle_exit: (w.idle_exit_secs > 0).then(|| Duration::from_secs(w.idle_exit_secs)),
            },
        ),
        Cmd::Frames { archive, group } => {
            locate(&archive).and_then(|a| gtar_logd::cli::frames(&a, group.as_deref(), &mut out))
        }
        Cmd::Ls { archive } => locate(&archive).and_then(|a| gtar_logd::cli::ls(&a, &mut out)),
        Cmd::Fetch { remote, local } => gtar_logd::cli::fetch(&remote, &local, &mut out),
        Cmd::Repair { archive } => {
            locate(&archive).and_then(|a| gtar_logd::cli::repair(&a, &mut out))
        }
        Cmd::Compact(c) => compact(c, &mut out),
        Cmd::View(v) => view(v),
        Cmd::Snapshot { src, dst } => locate(&src).and_then(|src| {
            gtar_logd::lifecycle::snapshot::snapshot(&src, &dst, &mut out).map(|_| ())
        }),
        Cmd::Export {
            archive,
            group,
            frame,
            format,
            output,
        } => locate(&archive).and_then(|archive| {
            gtar_logd::lifecycle::export::export(
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
            })
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr is gone (a closed pipe).
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "gtar-logd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
