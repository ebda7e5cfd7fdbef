//! Where the daemon listens, in one room: sockets systemd passed (socket
//! activation), the daemon's own Unix socket with its permissions, TCP, and
//! the policy that picks among them ([`bind_all`]).
//!
//! Invariants a caller must keep:
//! - [`take_listen_fds`] adopts file descriptors 3.. that systemd passed. Call
//!   it once, early in `main`, before other threads exist: it removes
//!   `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` from the environment, and
//!   `setenv`/`unsetenv` race with any thread reading the environment. A
//!   second call returns nothing (the fds are owned by the first result).
//! - When systemd passed sockets, they are *the* listeners: the daemon binds
//!   nothing of its own (the `.socket` units define where it listens).
//! - [`bind_unix_listener`] never lets anyone connect who the requested mode
//!   and group don't allow, not even for a moment: it sets them between
//!   bind(2) and listen(2).
//! - TCP carries no identity: a listener on a non-loopback address is bound
//!   only because the operator asked for it, and is logged as a warning.

use std::ffi::{CStr, CString};
use std::io;
use std::mem;
use std::net::{SocketAddr as IpSocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
pub enum Passed {
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
    pub listener: Passed,
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
    pub fn into_listeners(self) -> Vec<(Option<String>, Passed)> {
        let unix = self.unix.into_iter().map(|(n, l)| (n, Passed::Unix(l)));
        let tcp = self.tcp.into_iter().map(|(n, l)| (n, Passed::Tcp(l)));
        unix.chain(tcp).collect()
    }

    /// Split passed sockets by family.
    pub fn from_sockets(sockets: Vec<PassedSocket>) -> Self {
        let mut a = Activation::default();
        for s in sockets {
            match s.listener {
                Passed::Unix(l) => a.unix.push((s.name, l)),
                Passed::Tcp(l) => a.tcp.push((s.name, l)),
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
            libc::AF_UNIX => Passed::Unix(
                // SAFETY: `fd` is an open AF_UNIX listening stream socket that
                // systemd passed to us; we take sole ownership of it here.
                unsafe { UnixListener::from_raw_fd(fd) },
            ),
            libc::AF_INET | libc::AF_INET6 => Passed::Tcp(
                // SAFETY: as above, for an AF_INET/AF_INET6 listening stream socket.
                unsafe { TcpListener::from_raw_fd(fd) },
            ),
            other => return Err(bad(format!("address family {other} is not served"))),
        };
        let kind_ok = !matches!(
            (name.as_deref(), &listener),
            (Some(FDNAME_UDS) | Some("unix"), Passed::Tcp(_)) | (Some(FDNAME_TCP), Passed::Unix(_))
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

// ---------------------------------------------------------------------------
// Listeners for the server (tokio)
// ---------------------------------------------------------------------------

/// A socket to serve on.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
    /// Unix connections accepted by someone else and handed over: a
    /// multi-user worker's connections from its dispatcher (`users`).
    Handed(crate::users::Handed),
}

impl Listener {
    /// Describe the bound address, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
            {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".into(),
            },
            Listener::Tcp(l) => l.local_addr().map_or("tcp:?".into(), |a| a.to_string()),
            Listener::Handed(_) => "connections passed by the dispatcher".into(),
        }
    }
}

/// Bind a Unix socket at `path` that only the daemon's user may connect to
/// (mode 0600), replacing a stale socket file (one nobody listens on) and
/// creating the parent directory (mode 0700 when we create it).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    bind_unix_with(path, SocketPermissions::new(None, None))
}

/// [`bind_unix`] with a chosen mode and group (`--socket-mode`,
/// `--socket-group`): the socket file never has a wider mode, not even between
/// bind and chmod ([`bind_unix_listener`]). A parent directory
/// we create is 0700, or 0750 owned by the group when one is given.
pub fn bind_unix_with(
    path: &std::path::Path,
    perms: SocketPermissions,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            let mode = if perms.gid.is_some() { 0o750 } else { 0o700 };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(parent)?;
            if let Some(gid) = perms.gid {
                std::os::unix::fs::lchown(parent, None, Some(gid))?;
            }
        }
    }
    let l = bind_unix_listener(path, perms)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

impl Listener {
    /// Adopt a socket that systemd passed (socket activation). Needs a runtime.
    pub fn from_activated(l: Passed) -> std::io::Result<Listener> {
        Ok(match l {
            Passed::Unix(u) => {
                u.set_nonblocking(true)?;
                Listener::Unix(tokio::net::UnixListener::from_std(u)?)
            }
            Passed::Tcp(t) => {
                t.set_nonblocking(true)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(t)?)
            }
        })
    }
}

// ---------------------------------------------------------------------------
// The listener policy
// ---------------------------------------------------------------------------

/// Where the operator asked the daemon to listen (`--uds`, `--tcp`, and the
/// socket's mode and group).
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `None`: the default socket; `Some("none")` or `Some("")`: no socket.
    pub uds: Option<String>,
    /// `HOST:PORT`; a host name is resolved (`localhost:7461`).
    pub tcp: Option<String>,
    pub perms: Option<SocketPermissions>,
}

/// What [`bind_all`] bound: the listeners, and the socket file to remove
/// when the daemon exits.
pub struct Bound {
    pub listeners: Vec<Listener>,
    pub socket_file: Option<PathBuf>,
}

/// The default socket, shared with the clients' default address:
/// `$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock`, else
/// `/tmp/gtar-logd-$UID/gtar-logd.sock`.
pub fn default_uds() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("gtar-logd/gtar-logd.sock"),
        // SAFETY: getuid cannot fail and has no preconditions.
        None => PathBuf::from(format!("/tmp/gtar-logd-{}/gtar-logd.sock", unsafe {
            libc::getuid()
        })),
    }
}

/// Resolve `--tcp` (`HOST:PORT`, host names allowed) to one address.
pub async fn resolve_tcp(spec: &str) -> io::Result<IpSocketAddr> {
    let mut addrs = tokio::net::lookup_host(spec).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("--tcp {spec:?}: {e} (expected HOST:PORT, e.g. 127.0.0.1:7461)"),
        )
    })?;
    addrs.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("--tcp {spec:?} resolves to no address"),
        )
    })
}

/// The policy: sockets systemd passed are the listeners when there are any
/// (`--uds`/`--tcp` are then ignored, and say so); otherwise the requested
/// Unix socket (the default one unless disabled) and TCP address. Needs a
/// runtime. Errors name the address that failed.
pub async fn bind_all(req: Request, activation: Activation) -> anyhow::Result<Bound> {
    let mut listeners = Vec::new();
    if !activation.is_empty() {
        for (name, l) in activation.into_listeners() {
            let l = Listener::from_activated(l)?;
            let name = name.unwrap_or_default();
            tracing::info!(address = %l.describe(), %name, "socket passed by systemd");
            listeners.push(l);
        }
        if req.uds.is_some() || req.tcp.is_some() {
            tracing::info!("socket-activated: --uds/--tcp are ignored");
        }
        return Ok(Bound {
            listeners,
            socket_file: None,
        });
    }
    let socket_file = match req.uds.as_deref() {
        Some("none") | Some("") => None,
        Some(p) => Some(PathBuf::from(p.strip_prefix("unix:").unwrap_or(p))),
        None => Some(default_uds()),
    };
    if let Some(p) = &socket_file {
        let perms = req
            .perms
            .unwrap_or_else(|| SocketPermissions::new(None, None));
        let l = bind_unix_with(p, perms)
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--uds): {e}", p.display()))?;
        listeners.push(Listener::Unix(l));
    }
    if let Some(spec) = &req.tcp {
        let addr = resolve_tcp(spec).await?;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--tcp {spec}): {e}"))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "TCP on a non-loopback address: anyone who can reach it can read and write \
                 every archive; prefer 127.0.0.1 or the Unix socket"
            );
        }
        listeners.push(Listener::Tcp(l));
    }
    if listeners.is_empty() {
        anyhow::bail!("nothing to listen on: give --uds or --tcp");
    }
    Ok(Bound {
        listeners,
        socket_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use std::os::unix::net::UnixDatagram;

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
