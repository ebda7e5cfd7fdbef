//! systemd integration: socket activation, `sd_notify` (readiness, stopping,
//! status, watchdog) and the permissions of the daemon's own Unix socket.
//!
//! Synchronous and free of tokio: everything here runs before the runtime
//! starts or on a plain OS thread, and it is all no-op outside systemd.
//!
//! Invariants a caller must keep:
//! - [`take_listen_fds`] adopts file descriptors 3.. that systemd passed. Call it
//!   once, early in `main`, before other threads exist: it removes
//!   `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` from the environment, and
//!   `setenv`/`unsetenv` race with any thread reading the environment. A second
//!   call returns nothing (the fds are owned by the first result).
//! - When systemd passed sockets, they are *the* listeners: the daemon binds
//!   nothing of its own (the `.socket` units define where it listens).
//! - `READY=1` ([`notify_ready`]) is sent only once the server really serves:
//!   its listeners accept and the gRPC service answers. `STOPPING=1`
//!   ([`notify_stopping`]) is sent as soon as shutdown begins.
//! - Watchdog pings ([`spawn_watchdog`]) are sent only while the liveness check
//!   says the writer threads are alive and making progress; when it fails the
//!   pings stop and systemd restarts the daemon after `WatchdogSec=`.
//! - [`bind_unix_listener`] never lets anyone connect who the requested mode
//!   and group don't allow, not even for a moment: it sets them between bind(2)
//!   and listen(2).

use std::ffi::{CStr, CString};
use std::io;
use std::mem;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The `FileDescriptorName=` our `.socket` units give the Unix socket.
pub const FDNAME_UDS: &str = "uds";
/// The `FileDescriptorName=` our `.socket` units give the TCP socket.
pub const FDNAME_TCP: &str = "tcp";

// ---------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------

/// A listening socket passed by systemd, by address family.
#[derive(Debug)]
pub enum Listener {
    /// `AF_UNIX`, `SOCK_STREAM`.
    Unix(UnixListener),
    /// `AF_INET` or `AF_INET6`, `SOCK_STREAM`.
    Tcp(TcpListener),
}

/// One socket passed by systemd, with its `FileDescriptorName=` if it had one
/// (systemd's default name, the socket unit's name, is kept as given;
/// `systemd-socket-activate` without `--fdname` passes `unknown`).
#[derive(Debug)]
pub struct PassedSocket {
    /// The name from `LISTEN_FDNAMES`, if that was set.
    pub name: Option<String>,
    /// The listener, which now owns the file descriptor (close-on-exec set).
    pub listener: Listener,
}

/// The sockets systemd passed, split by family for the server.
#[derive(Debug, Default)]
pub struct Activation {
    /// Unix stream listeners, with their fd names.
    pub unix: Vec<(Option<String>, UnixListener)>,
    /// TCP listeners, with their fd names.
    pub tcp: Vec<(Option<String>, TcpListener)>,
}

impl Activation {
    /// True when systemd passed no socket (not socket-activated).
    pub fn is_empty(&self) -> bool {
        self.unix.is_empty() && self.tcp.is_empty()
    }

    /// All passed sockets, Unix ones first, with their names.
    pub fn into_listeners(self) -> Vec<(Option<String>, Listener)> {
        let unix = self.unix.into_iter().map(|(n, l)| (n, Listener::Unix(l)));
        let tcp = self.tcp.into_iter().map(|(n, l)| (n, Listener::Tcp(l)));
        unix.chain(tcp).collect()
    }

    /// Split passed sockets by family.
    pub fn from_sockets(sockets: Vec<PassedSocket>) -> Self {
        let mut a = Activation::default();
        for s in sockets {
            match s.listener {
                Listener::Unix(l) => a.unix.push((s.name, l)),
                Listener::Tcp(l) => a.tcp.push((s.name, l)),
            }
        }
        a
    }
}

/// Why the sockets systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_PID` is not a number.
    #[error("{var}={value:?} is not a valid number")]
    BadNumber { var: &'static str, value: String },
    /// `LISTEN_FDNAMES` does not name every fd.
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds}")]
    NameCount { names: usize, fds: usize },
    /// A passed fd is not an open listening stream socket of a family we serve.
    #[error("passed fd {fd} ({name}): {why}")]
    BadSocket {
        fd: RawFd,
        name: String,
        why: String,
    },
}

/// What the `LISTEN_*` variables say, before touching any fd.
#[derive(Debug, PartialEq, Eq)]
pub struct ListenEnv {
    /// `(fd, name)` for each passed fd, starting at [`LISTEN_FDS_START`].
    pub fds: Vec<(RawFd, Option<String>)>,
}

/// Parse `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` as `sd_listen_fds_with_names`
/// does: the fds are ours only when `LISTEN_PID` is our pid; `None` when
/// nothing was passed to this process.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Option<ListenEnv>, ActivationError> {
    let (Some(pid), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid.trim().parse().map_err(|_| ActivationError::BadNumber {
        var: "LISTEN_PID",
        value: pid.to_owned(),
    })?;
    if pid != my_pid {
        // Meant for another process (e.g. inherited through a shell wrapper).
        return Ok(None);
    }
    let n: usize = n.trim().parse().map_err(|_| ActivationError::BadNumber {
        var: "LISTEN_FDS",
        value: n.to_owned(),
    })?;
    if n == 0 {
        return Ok(None);
    }
    if n > 4096 {
        return Err(ActivationError::BadNumber {
            var: "LISTEN_FDS",
            value: n.to_string(),
        });
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; n],
        Some(s) => {
            let v: Vec<Option<String>> = s
                .split(':')
                .map(|x| (!x.is_empty()).then(|| x.to_owned()))
                .collect();
            if v.len() != n {
                return Err(ActivationError::NameCount {
                    names: v.len(),
                    fds: n,
                });
            }
            v
        }
    };
    Ok(Some(ListenEnv {
        fds: names
            .into_iter()
            .enumerate()
            .map(|(i, name)| (LISTEN_FDS_START + i as RawFd, name))
            .collect(),
    }))
}

static FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Adopt the sockets systemd passed to this process (socket activation), and
/// remove `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment
/// so that children don't inherit them. Empty when not socket-activated.
///
/// Call once, early in `main`, before any other thread exists (see the module
/// docs). Fds are classified by family (`SO_DOMAIN`); a name says what a fd is
/// for: `uds` must be a Unix socket and `tcp` an inet one, other names (or
/// none) are accepted by family. The listeners are left in blocking mode; call
/// `set_nonblocking(true)` before handing them to tokio.
pub fn take_listen_fds() -> Result<Activation, ActivationError> {
    if FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Activation::default());
    }
    let var = |k: &str| std::env::var(k).ok();
    let parsed = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    match parsed? {
        None => Ok(Activation::default()),
        Some(env) => Ok(Activation::from_sockets(adopt_fds(&env.fds)?)),
    }
}

/// Take ownership of listening sockets by fd: check each is an open listening
/// stream socket, set close-on-exec, and wrap it by family.
///
/// On error, fds not yet adopted are left open (they still belong to whoever
/// passed them); adopted ones are closed with the returned error.
pub fn adopt_fds(fds: &[(RawFd, Option<String>)]) -> Result<Vec<PassedSocket>, ActivationError> {
    let mut out = Vec::with_capacity(fds.len());
    for (fd, name) in fds {
        let fd = *fd;
        let bad = |why: String| ActivationError::BadSocket {
            fd,
            name: name.clone().unwrap_or_else(|| "unnamed".into()),
            why,
        };
        let family = inspect_listening_socket(fd).map_err(bad)?;
        let listener = match family {
            libc::AF_UNIX => Listener::Unix(
                // SAFETY: `fd` is an open AF_UNIX listening stream socket that
                // systemd passed to us; we take sole ownership of it here.
                unsafe { UnixListener::from_raw_fd(fd) },
            ),
            libc::AF_INET | libc::AF_INET6 => Listener::Tcp(
                // SAFETY: as above, for an AF_INET/AF_INET6 listening stream socket.
                unsafe { TcpListener::from_raw_fd(fd) },
            ),
            other => return Err(bad(format!("address family {other} is not served"))),
        };
        let kind_ok = !matches!(
            (name.as_deref(), &listener),
            (Some(FDNAME_UDS) | Some("unix"), Listener::Tcp(_))
                | (Some(FDNAME_TCP), Listener::Unix(_))
        );
        if !kind_ok {
            return Err(bad(format!(
                "named {:?} but its address family is {}",
                name.as_deref().unwrap_or(""),
                if family == libc::AF_UNIX {
                    "AF_UNIX"
                } else {
                    "AF_INET*"
                }
            )));
        }
        out.push(PassedSocket {
            name: name.clone(),
            listener,
        });
    }
    Ok(out)
}

/// Check `fd` is an open, listening `SOCK_STREAM` socket; set `FD_CLOEXEC`;
/// return its address family.
fn inspect_listening_socket(fd: RawFd) -> Result<libc::c_int, String> {
    // SAFETY: fcntl on an arbitrary integer is harmless; EBADF if not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(format!("not an open fd: {}", io::Error::last_os_error()));
    }
    let int_opt = |opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(format!("not a socket: {}", io::Error::last_os_error()))
        } else {
            Ok(v)
        }
    };
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket (use ListenStream=)".into());
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err("not listening (Accept=no sockets must be listening)".into());
    }
    let family = int_opt(libc::SO_DOMAIN)?;
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: fd checked open above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(format!(
                "cannot set FD_CLOEXEC: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(family)
}

// ---------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------

/// Send a state string (e.g. `"READY=1\nSTATUS=serving"`) to the socket named
/// by `NOTIFY_SOCKET`. `Ok(false)` when not started by systemd with
/// `Type=notify` (no `NOTIFY_SOCKET`). The variable is left in place: the
/// daemon notifies more than once (ready, watchdog, stopping).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => notify_to(&addr, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Send `state` to a notification socket address as systemd spells it: a
/// filesystem path, or an abstract name when it starts with `@`.
pub fn notify_to(addr: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let bytes = addr.as_bytes();
    let sock = UnixDatagram::unbound()?;
    let target = if let Some(abs) = bytes.strip_prefix(b"@") {
        abstract_addr(abs)?
    } else if bytes.first() == Some(&b'/') {
        SocketAddr::from_pathname(Path::new(addr))?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported NOTIFY_SOCKET address {addr:?}"),
        ));
    };
    let n = sock.send_to_addr(state.as_bytes(), &target)?;
    if n != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ));
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets are Linux-only",
    ))
}

/// Log a failed notification and carry on: systemd integration must never
/// take the daemon down.
fn notify_logged(state: &str) -> bool {
    match notify(state) {
        Ok(sent) => sent,
        Err(e) => {
            tracing::warn!("sd_notify {:?} failed: {e}", state.lines().next());
            false
        }
    }
}

/// `READY=1` with a human-readable status. Call only when the server accepts
/// connections and answers requests.
pub fn notify_ready(status: &str) -> bool {
    notify_logged(&format!(
        "READY=1\nSTATUS={}\nMAINPID={}",
        one_line(status),
        std::process::id()
    ))
}

/// `STOPPING=1` with a status; call as soon as graceful shutdown begins.
pub fn notify_stopping(status: &str) -> bool {
    notify_logged(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
}

/// `STATUS=...`, shown by `systemctl status`.
pub fn notify_status(status: &str) -> bool {
    notify_logged(&format!("STATUS={}", one_line(status)))
}

/// Ask for more time to finish starting up or shutting down
/// (`EXTEND_TIMEOUT_USEC=`), e.g. while flushing archives on a slow disk.
pub fn notify_extend_timeout(by: Duration) -> bool {
    notify_logged(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
}

/// One `WATCHDOG=1` ping.
pub fn notify_watchdog() -> bool {
    notify_logged("WATCHDOG=1")
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

// ---------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------

/// The watchdog timeout systemd enforces (`WatchdogSec=`), from `WATCHDOG_USEC`;
/// `None` if not set, zero, or meant for another process (`WATCHDOG_PID`).
pub fn watchdog_timeout() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog_env(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Pure form of [`watchdog_timeout`].
pub fn parse_watchdog_env(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// A running watchdog thread. Dropping it (or [`WatchdogHandle::stop`]) stops the pings.
#[must_use = "dropping the handle stops the watchdog pings"]
pub struct WatchdogHandle {
    stop: Arc<AtomicBool>,
    pings: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl WatchdogHandle {
    /// Pings sent so far.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    /// Stop pinging and wait for the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for WatchdogHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Ping systemd's watchdog from a dedicated OS thread every `timeout / 2`
/// (as `sd_watchdog_enabled(3)` advises), but only while `healthy()` returns
/// true. `healthy` is the daemon's liveness check: every writer thread alive and
/// making progress (not stuck in a write or fsync). When it fails, pings stop,
/// the reason is logged, and systemd restarts the service after `timeout`.
pub fn spawn_watchdog(
    timeout: Duration,
    healthy: impl Fn() -> bool + Send + 'static,
) -> io::Result<WatchdogHandle> {
    spawn_watchdog_with(timeout, healthy, || notify("WATCHDOG=1").map(|_| ()))
}

/// Start the watchdog from `WATCHDOG_USEC`/`WATCHDOG_PID`; `None` when systemd
/// asked for no watchdog.
pub fn spawn_watchdog_from_env(
    healthy: impl Fn() -> bool + Send + 'static,
) -> io::Result<Option<WatchdogHandle>> {
    match watchdog_timeout() {
        Some(t) => spawn_watchdog(t, healthy).map(Some),
        None => Ok(None),
    }
}

fn spawn_watchdog_with(
    timeout: Duration,
    healthy: impl Fn() -> bool + Send + 'static,
    ping: impl Fn() -> io::Result<()> + Send + 'static,
) -> io::Result<WatchdogHandle> {
    let period = (timeout / 2).max(Duration::from_millis(1));
    let stop = Arc::new(AtomicBool::new(false));
    let pings = Arc::new(AtomicU64::new(0));
    let (stop2, pings2) = (stop.clone(), pings.clone());
    let thread = std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            let mut was_healthy = true;
            while !stop2.load(Ordering::SeqCst) {
                let ok = healthy();
                if ok {
                    match ping() {
                        Ok(()) => {
                            pings2.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!("watchdog ping failed: {e}"),
                    }
                    if !was_healthy {
                        tracing::info!("writers healthy again: watchdog pings resumed");
                    }
                } else if was_healthy {
                    tracing::error!(
                        "writer threads dead or stalled: watchdog pings stopped; \
                         systemd will restart the daemon after {timeout:?}"
                    );
                }
                was_healthy = ok;
                // park_timeout may wake early (spuriously, or from stop()).
                let next = Instant::now() + period;
                loop {
                    let now = Instant::now();
                    if now >= next || stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::park_timeout(next - now);
                }
            }
        })?;
    Ok(WatchdogHandle {
        stop,
        pings,
        thread: Some(thread),
    })
}

// ---------------------------------------------------------------------------
// The daemon's own Unix socket: owner group and mode
// ---------------------------------------------------------------------------

/// Who may connect to the daemon's own Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPermissions {
    /// File mode bits of the socket (connecting needs write permission).
    pub mode: u32,
    /// Group to own the socket, or `None` to keep the daemon's own group.
    pub gid: Option<u32>,
}

impl SocketPermissions {
    /// Owner only (0600), or owner and `gid` (0660) when a group is given,
    /// unless `mode` is set explicitly.
    pub fn new(mode: Option<u32>, gid: Option<u32>) -> Self {
        let mode = mode.unwrap_or(if gid.is_some() { 0o660 } else { 0o600 });
        SocketPermissions { mode, gid }
    }

    /// From `--socket-mode`/`--socket-group` style strings (octal mode; group
    /// name or numeric gid).
    pub fn parse(mode: Option<&str>, group: Option<&str>) -> io::Result<Self> {
        let mode = mode.map(parse_mode).transpose()?;
        let gid = group.map(resolve_group).transpose()?;
        Ok(Self::new(mode, gid))
    }
}

/// Parse an octal file mode such as `0660` or `660`; at most 0777 (no setuid,
/// setgid or sticky bits on a socket).
pub fn parse_mode(s: &str) -> io::Result<u32> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket mode {s:?} is not an octal mode between 0000 and 0777"),
        )),
    }
}

/// A group name (looked up with `getgrnam_r`) or a numeric gid.
pub fn resolve_group(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in group name"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `grp`, `result` and `buf` are valid for writes; getgrnam_r
        // stores pointers into `buf` only, which we don't keep.
        let mut grp: libc::group = unsafe { mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let r = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        if result.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no such group {name:?}"),
            ));
        }
        return Ok(grp.gr_gid);
    }
}

/// Set the owner group and mode of an already bound Unix socket file. Prefer
/// [`bind_unix_listener`], which never exposes the socket with a wider mode.
pub fn apply_socket_permissions(path: &Path, perms: SocketPermissions) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = perms.gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "chgrp {gid} {}: {e} (the daemon must be root or a member of the group)",
                    path.display()
                ),
            )
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", path.display())))
}

/// Bind a listening Unix socket at `path` with exactly `perms`.
///
/// The socket gets its group and mode after bind(2) but before listen(2), so
/// no one outside the chosen group can connect even in the moment between
/// bind and chmod (connecting to a socket that is not listening is refused);
/// the process umask is not touched, so other threads are unaffected. A stale
/// socket left at `path` by a dead daemon is replaced; a live one (something
/// accepts connections) is an `AddrInUse` error; anything that is not a socket
/// is left alone and is an error.
pub fn bind_unix_listener(path: &Path, perms: SocketPermissions) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use: another daemon is listening there",
                        path.display()
                    ),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if md_is_stale_socket(path) {
        std::fs::remove_file(path)?;
    }
    // socket → bind → chown/chmod → listen: until listen(2), connect(2)
    // is refused whatever the file's mode, so the umask-derived mode that
    // bind gives the file is never usable by anyone.
    let addr = sockaddr_un(path)?;
    // SAFETY: plain socket(2); the fd is owned by `fd` below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    let r = unsafe { libc::bind(raw, (&addr.0 as *const libc::sockaddr_un).cast(), addr.1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("bind {}: {e}", path.display()),
        ));
    }
    let res = apply_socket_permissions(path, perms).and_then(|()| {
        // SAFETY: `raw` is our bound socket.
        if unsafe { libc::listen(raw, libc::SOMAXCONN) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// True if `path` is a socket file (checked by the caller to be dead).
fn md_is_stale_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut a: libc::sockaddr_un = unsafe { mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= a.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {} is empty, has a NUL, or is longer than {} bytes",
                path.display(),
                a.sun_path.len() - 1
            ),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((a, len as libc::socklen_t))
}

/// The name of the group with `gid`, for log messages; `None` if unknown.
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `resolve_group`.
    let mut grp: libc::group = unsafe { mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let r = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 || result.is_null() {
        return None;
    }
    // SAFETY: gr_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(grp.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn into_fd(l: impl IntoRawFd) -> RawFd {
        l.into_raw_fd()
    }

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn listen_env_not_for_us() {
        assert_eq!(parse_listen_env(None, None, None, 7).unwrap(), None);
        assert_eq!(
            parse_listen_env(Some("8"), Some("2"), None, 7).unwrap(),
            None
        );
        assert_eq!(parse_listen_env(Some("7"), None, None, 7).unwrap(), None);
        assert_eq!(
            parse_listen_env(Some("7"), Some("0"), None, 7).unwrap(),
            None
        );
    }

    #[test]
    fn listen_env_names() {
        let e = parse_listen_env(Some("7"), Some("2"), Some("uds:tcp"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(
            e.fds,
            vec![(3, Some("uds".to_owned())), (4, Some("tcp".to_owned()))]
        );
        let e = parse_listen_env(Some("7"), Some("2"), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(e.fds, vec![(3, None), (4, None)]);
        let e = parse_listen_env(Some("7"), Some("2"), Some(":tcp"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(e.fds, vec![(3, None), (4, Some("tcp".to_owned()))]);
    }

    #[test]
    fn listen_env_errors() {
        assert!(matches!(
            parse_listen_env(Some("x"), Some("1"), None, 7),
            Err(ActivationError::BadNumber {
                var: "LISTEN_PID",
                ..
            })
        ));
        assert!(matches!(
            parse_listen_env(Some("7"), Some("-1"), None, 7),
            Err(ActivationError::BadNumber {
                var: "LISTEN_FDS",
                ..
            })
        ));
        assert!(matches!(
            parse_listen_env(Some("7"), Some("2"), Some("uds"), 7),
            Err(ActivationError::NameCount { names: 1, fds: 2 })
        ));
    }

    #[test]
    fn adopt_by_family_and_name() {
        let d = tmpdir();
        let u = UnixListener::bind(d.path().join("a.sock")).unwrap();
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let taddr = t.local_addr().unwrap();
        let (ufd, tfd) = (into_fd(u), into_fd(t));
        // Unnamed / default-named fds are classified by family.
        let got = adopt_fds(&[(tfd, None), (ufd, Some("gtar-logd.socket".into()))]).unwrap();
        let a = Activation::from_sockets(got);
        assert_eq!(a.unix.len(), 1);
        assert_eq!(a.tcp.len(), 1);
        assert_eq!(a.tcp[0].1.local_addr().unwrap(), taddr);
        assert_eq!(a.unix[0].0.as_deref(), Some("gtar-logd.socket"));
        // CLOEXEC is set.
        for fd in [a.unix[0].1.as_raw_fd(), a.tcp[0].1.as_raw_fd()] {
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_ne!(fl & libc::FD_CLOEXEC, 0);
        }
        // The listeners work.
        let c = std::net::TcpStream::connect(taddr).unwrap();
        let (s, _) = a.tcp[0].1.accept().unwrap();
        drop((c, s));
    }

    #[test]
    fn adopt_rejects_mismatched_names_and_non_listeners() {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let tfd = into_fd(t);
        let e = adopt_fds(&[(tfd, Some("uds".into()))]).unwrap_err();
        assert!(e.to_string().contains("named \"uds\""), "{e}");
        // (the TcpListener took ownership before the name check and closed it)

        let d = tmpdir();
        let u = UnixListener::bind(d.path().join("b.sock")).unwrap();
        let ufd = into_fd(u);
        let e = adopt_fds(&[(ufd, Some("tcp".into()))]).unwrap_err();
        assert!(e.to_string().contains("named \"tcp\""), "{e}");

        let dg = UnixDatagram::unbound().unwrap();
        let e = adopt_fds(&[(dg.as_raw_fd(), None)]).unwrap_err();
        assert!(e.to_string().contains("not a stream socket"), "{e}");

        let f = std::fs::File::open("/dev/null").unwrap();
        let e = adopt_fds(&[(f.as_raw_fd(), None)]).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }

    #[test]
    fn notify_path_socket_receives_ready() {
        let d = tmpdir();
        let p = d.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        notify_to(p.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn notify_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gtar-logd-test-{}-{:?}", std::process::id(), Instant::now());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        let addr = OsString::from(format!("@{name}"));
        notify_to(&addr, "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to(std::ffi::OsStr::new("relative"), "X=1").is_err());
    }

    #[test]
    fn watchdog_env() {
        let d = Duration::from_micros(200_000);
        assert_eq!(parse_watchdog_env(Some("200000"), None, 5), Some(d));
        assert_eq!(parse_watchdog_env(Some("200000"), Some("5"), 5), Some(d));
        assert_eq!(parse_watchdog_env(Some("200000"), Some("6"), 5), None);
        assert_eq!(parse_watchdog_env(Some("0"), None, 5), None);
        assert_eq!(parse_watchdog_env(None, Some("5"), 5), None);
        assert_eq!(parse_watchdog_env(Some("x"), None, 5), None);
    }

    #[test]
    fn watchdog_pings_only_while_healthy() {
        let d = tmpdir();
        let p = d.path().join("wd");
        let rx = UnixDatagram::bind(&p).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h2 = healthy.clone();
        let p2 = p.clone();
        let wd = spawn_watchdog_with(
            Duration::from_millis(40),
            move || h2.load(Ordering::SeqCst),
            move || notify_to(p2.as_os_str(), "WATCHDOG=1"),
        )
        .unwrap();
        let mut buf = [0u8; 32];
        for _ in 0..3 {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
        healthy.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        // Drain what was sent before the flip, then expect silence.
        rx.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        while rx.recv(&mut buf).is_ok() {}
        rx.set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        assert!(rx.recv(&mut buf).is_err(), "pinged while unhealthy");
        healthy.store(true, Ordering::SeqCst);
        rx.set_read_timeout(Some(Duration::from_millis(2000)))
            .unwrap();
        assert!(rx.recv(&mut buf).is_ok(), "no ping after recovery");
        assert!(wd.pings() >= 4);
        wd.stop();
    }

    #[test]
    fn mode_and_group_parsing() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        assert!(parse_mode("4777").is_err());
        assert!(parse_mode("0980").is_err());
        assert!(parse_mode("").is_err());
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(resolve_group("no-such-group-gtar-logd").is_err());
        assert_eq!(SocketPermissions::new(None, None).mode, 0o600);
        assert_eq!(SocketPermissions::new(None, Some(5)).mode, 0o660);
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn bind_sets_mode_and_group_and_replaces_stale_socket() {
        let d = tmpdir();
        let p = d.path().join("logd.sock");
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let perms = SocketPermissions::new(Some(0o660), Some(gid));
        let l = bind_unix_listener(&p, perms).unwrap();
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o7777, 0o660);
        assert_eq!(md.gid(), gid);
        // Reachable through the final path after the rename.
        let c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        drop((c, s));
        // No leftovers from the private bind directory.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("logd.sock")]);
        // A live socket is not stolen.
        let e = bind_unix_listener(&p, perms).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // A stale one (listener gone) is replaced.
        drop(l);
        let l2 = bind_unix_listener(&p, SocketPermissions::new(Some(0o600), None)).unwrap();
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o600);
        drop(l2);
        // A regular file is never clobbered.
        let f = d.path().join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert!(bind_unix_listener(&f, perms).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
    }
}
