//! The multi-user service (`serve --multi-user`): a dispatcher running as
//! root hands each connection on the Unix socket to a worker process that
//! runs as the connecting user.
//!
//! Why processes: isolation is then the kernel's, not ours. A worker has its
//! user's uid, gid and groups and a data directory only that user (and the
//! admin group, read-only) can enter, so it cannot open another user's
//! archive whatever a request says; the user can open their own archives with
//! libgetar (the files are theirs); and shared memory works because the
//! worker *is* the user, so the client's `/proc/<pid>/fd/<n>` opens.
//!
//! Invariants:
//! * Whose worker a connection goes to is decided by the socket's peer
//!   credentials (`SO_PEERCRED`, from the kernel at connect time), never by
//!   anything the client sends. The connected descriptor itself is passed
//!   (`SCM_RIGHTS`), so the worker sees the same peer credentials.
//! * A worker drops to the user (`setgroups`, `setgid`, `setuid`, in that
//!   order, all before `exec`) and never regains root; it gets an empty
//!   environment, the channel as fd 3, and nothing else of the dispatcher's
//!   but, with `--remote`, the service's `AWS_*` variables through a pipe on
//!   fd 4, read only after it made itself non-dumpable (its user can't read
//!   them back from it).
//! * A user's data directory is `<data-dir>/users/<name>`, created by the
//!   dispatcher owned by the user, mode 0700 (02750 with the admin group as
//!   its group when `--admin-group` is set); an existing one must already be
//!   owned by the user, else the user gets no worker. Workers run with umask
//!   077 (027 with an admin group), so archives are the user's alone.
//! * A dead worker (crash, `kill -9`) is noticed at the latest when the next
//!   connection is passed (the channel's peer is gone) and replaced by a
//!   fresh one; what it had made durable is recovered when the archive is
//!   next opened, as after any crash.
//! * When the dispatcher goes, its end of each channel closes; a worker that
//!   sees the end of its channel shuts down in order (closes and syncs).

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// The descriptor number a worker finds its channel at.
pub const WORKER_CHANNEL_FD: RawFd = 3;
/// The descriptor number a worker of a service with `--remote` reads the
/// service's `AWS_*` variables from (a pipe; see [`take_worker_env`]).
pub const WORKER_ENV_FD: RawFd = 4;
/// Bounds what goes through that pipe: written whole before the worker
/// starts, so it must fit the pipe's buffer (64 KiB on Linux).
const WORKER_ENV_MAX: usize = 60 * 1024;

// ---------------------------------------------------------------------------
// Passing connections
// ---------------------------------------------------------------------------

/// A channel pair: (dispatcher's end, worker's end). `SOCK_SEQPACKET` keeps
/// one connection per message.
fn channel() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(io::Error::from)
}

/// Pass `conn` over the channel. Never waits: a worker whose channel is full
/// (it stopped taking connections) gets `WouldBlock`, a dead one `EPIPE`.
pub fn send_fd(chan: RawFd, conn: RawFd) -> io::Result<()> {
    let fds = [conn];
    let iov = [IoSlice::new(b"c")];
    sendmsg::<()>(
        chan,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Receive one passed descriptor. `Ok(None)`: the channel ended (the
/// dispatcher is gone); `WouldBlock` when nothing is there yet.
fn recv_fd(chan: RawFd) -> io::Result<Option<Option<OwnedFd>>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        chan,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if msg.bytes == 0 {
        return Ok(None);
    }
    let mut got = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                } // extra descriptors (never sent by us) are closed
            }
        }
    }
    Ok(Some(got))
}

/// A connection a worker serves; counts itself in [`Handed::live`] until
/// dropped (what the idle exit watches).
pub struct Conn {
    inner: tokio::net::UnixStream,
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections a worker is handed, as a stream for `serve_with_incoming`.
pub type Handed = tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>;

/// How often an idle worker looks whether it has been idle long enough.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The worker's side: connections arriving on `chan`, as a stream for
/// `serve_with_incoming`. Cancels `ended` when the channel ends.
///
/// With `idle_exit`, a worker that has had no connection for that long
/// retires: it shuts down its side of the channel for reading, so the
/// dispatcher's next `send_fd` fails with `EPIPE` and starts a fresh worker
/// (`route`); a connection already queued on the channel is still received
/// and served, and the worker ends once that is closed too. No connection
/// is lost to the race between the two.
pub fn incoming(
    chan: OwnedFd,
    ended: CancellationToken,
    idle_exit: Option<std::time::Duration>,
) -> io::Result<Handed> {
    use std::sync::atomic::Ordering::SeqCst;
    // SAFETY: an OwnedFd is a valid open descriptor that stays open and the
    // same until the AsyncFd (its owner) is dropped.
    let afd = unsafe { AsyncFd::register(chan) }.map_err(|e| io::Error::other(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        let mut idle_since = Some(tokio::time::Instant::now());
        let mut retiring = false;
        let mut tick = tokio::time::interval(IDLE_CHECK);
        loop {
            let readable = tokio::select! {
                r = afd.readable() => r,
                _ = tick.tick(), if !retiring && idle_exit.is_some() => {
                    let limit = idle_exit.expect("the branch runs only with a limit");
                    let now = tokio::time::Instant::now();
                    if live.load(SeqCst) > 0 {
                        idle_since = None;
                    } else if now - *idle_since.get_or_insert(now) >= limit {
                        tracing::info!(idle = ?limit, "no connection for a while: exiting (the next connection starts a new worker)");
                        // SAFETY: shutdown(2) on our own open socket.
                        if unsafe { libc::shutdown(afd.get_ref().as_raw_fd(), libc::SHUT_RD) } != 0 {
                            tracing::warn!(error = %io::Error::last_os_error(), "cannot retire the channel; staying up");
                            idle_since = None;
                            continue;
                        }
                        retiring = true;
                    }
                    continue;
                }
            };
            let mut guard = match readable {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "connection channel failed");
                    break;
                }
            };
            match guard.try_io(|fd| recv_fd(fd.as_raw_fd())) {
                Err(_would_block) => continue,
                Ok(Ok(None)) if retiring => break,
                Ok(Ok(None)) => {
                    tracing::info!("the dispatcher closed the channel; shutting down");
                    break;
                }
                Ok(Ok(Some(None))) => continue,
                Ok(Ok(Some(Some(fd)))) => {
                    let s = std::os::unix::net::UnixStream::from(fd);
                    let s = s
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::UnixStream::from_std(s))
                        .map(|inner| {
                            live.fetch_add(1, SeqCst);
                            Conn {
                                inner,
                                live: live.clone(),
                            }
                        });
                    if tx.send(s).await.is_err() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "connection channel failed");
                    break;
                }
            }
        }
        // A retiring worker serves what it took off the channel to the end.
        while retiring && live.load(SeqCst) > 0 {
            tokio::time::sleep(IDLE_CHECK).await;
        }
        ended.cancel();
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

// ---------------------------------------------------------------------------
// Who a user is
// ---------------------------------------------------------------------------

/// What a worker runs as.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
}

impl Identity {
    /// The passwd entry and group list of `uid`.
    pub fn of(uid: u32) -> io::Result<Identity> {
        let u = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(io::Error::from)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("uid {uid} has no passwd entry"),
                )
            })?;
        if u.name.is_empty() || u.name.starts_with('.') || u.name.contains(['/', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("uid {uid}'s user name {:?} cannot name a directory", u.name),
            ));
        }
        let cname = CString::new(u.name.clone())?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(io::Error::from)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Identity {
            uid,
            gid: u.gid.as_raw(),
            groups,
            name: u.name,
            home: u.dir,
        })
    }

    /// Root, or a member of the admin group.
    pub fn is_admin(&self, admin_gid: Option<u32>) -> bool {
        self.uid == 0 || admin_gid.is_some_and(|g| self.gid == g || self.groups.contains(&g))
    }
}

/// Make `dir` (and its parents) if missing and give it exactly `mode`,
/// whatever the umask: `DirBuilder::mode` is filtered by it, and the shipped
/// unit's `UMask=0077` turned 0711 into 0700, locking every worker out of
/// its own directory. A directory found with another mode is repaired, and
/// the log says so.
pub fn ensure_dir_mode(dir: &Path, mode: u32) -> io::Result<()> {
    let created = match std::fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => false,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)?;
            true
        }
        Err(e) => return Err(e),
    };
    let had = std::fs::symlink_metadata(dir)?.mode() & 0o7777;
    if had != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        if !created {
            tracing::warn!(
                dir = %dir.display(),
                "repaired the directory's mode from {had:04o} to {mode:04o}"
            );
        }
    }
    Ok(())
}

/// What a user's directory must be: its mode and group (module docs).
fn user_dir_mode(who_gid: u32, admin_gid: Option<u32>) -> (u32, u32) {
    match admin_gid {
        Some(g) => (0o2750, g),
        None => (0o700, who_gid),
    }
}

/// At start: every existing user directory under `users_dir` gets the mode
/// and group it must have (an earlier version or a hand-made directory may
/// differ; a newly set `--admin-group` needs its group). Directories not
/// owned by the user they are named after are left alone ([`user_dir`]
/// refuses them).
pub fn repair_user_dirs(users_dir: &Path, admin_gid: Option<u32>) -> io::Result<()> {
    for entry in std::fs::read_dir(users_dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let md = std::fs::symlink_metadata(entry.path())?;
        let Ok(Some(u)) = nix::unistd::User::from_name(&name) else {
            continue;
        };
        if !md.is_dir() || md.uid() != u.uid.as_raw() {
            continue;
        }
        let (mode, gid) = user_dir_mode(u.gid.as_raw(), admin_gid);
        if md.gid() != gid {
            std::os::unix::fs::lchown(entry.path(), None, Some(gid))?;
            tracing::warn!(user = %name, "repaired the group of the user's directory to gid {gid}");
        }
        // chown may clear the set-group-ID bit: set the mode after it.
        if md.gid() != gid || md.mode() & 0o7777 != mode {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
            if md.mode() & 0o7777 != mode {
                tracing::warn!(
                    user = %name,
                    "repaired the mode of the user's directory from {:04o} to {mode:04o}",
                    md.mode() & 0o7777
                );
            }
        }
    }
    Ok(())
}

/// Create `<users_dir>/<name>` for `who` (module docs), or check the one
/// that is there. Returns the directory.
pub fn user_dir(users_dir: &Path, who: &Identity, admin_gid: Option<u32>) -> io::Result<PathBuf> {
    let dir = users_dir.join(&who.name);
    match std::fs::symlink_metadata(&dir) {
        Ok(md) => {
            if !md.is_dir() || md.uid() != who.uid {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} exists but is not a directory owned by {} (uid {}); not using it",
                        dir.display(),
                        who.name,
                        who.uid
                    ),
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
            // Mode while still ours (setgid is kept for a directory across
            // chown by root), then hand it over.
            let (mode, gid) = user_dir_mode(who.gid, admin_gid);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
            std::os::unix::fs::lchown(&dir, Some(who.uid), Some(gid))?;
        }
        Err(e) => return Err(e),
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------
// The dispatcher
// ---------------------------------------------------------------------------

/// What the dispatcher needs to start workers.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// `<data-dir>/users`.
    pub users_dir: PathBuf,
    pub admin_gid: Option<u32>,
    /// Arguments after `gtar-logd worker` every worker gets (the serve
    /// tunables); the channel, data directory and role are added per user.
    pub worker_args: Vec<OsString>,
    /// `serve --remote`: each worker replicates to its own prefix of it,
    /// `PREFIX/users/<name>` (see [`user_remote`]).
    pub remote: Option<crate::remote::RemoteUrl>,
}

/// The remote storage of `user`'s worker: `PREFIX/users/<name>` under the
/// service's `--remote`, so users' archive names never collide in the
/// bucket. The credentials are the service's (its AWS_* environment, passed
/// to the worker): the prefix separates names, it is not an access
/// boundary (see docs/systemd.md).
pub fn user_remote(service: &crate::remote::RemoteUrl, user: &str) -> crate::remote::RemoteUrl {
    let prefix = if service.prefix.is_empty() {
        format!("users/{user}")
    } else {
        format!("{}/users/{user}", service.prefix)
    };
    crate::remote::RemoteUrl {
        bucket: service.bucket.clone(),
        prefix,
    }
}

struct Worker {
    chan: OwnedFd,
    pid: u32,
    generation: u64,
}

/// The live workers, by uid.
#[derive(Clone, Default)]
pub struct Workers {
    inner: Arc<Mutex<WorkersInner>>,
}

#[derive(Default)]
struct WorkersInner {
    by_uid: HashMap<u32, Worker>,
    next_generation: u64,
    children: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Close every channel (workers shut down in order) and wait for them.
    pub async fn shutdown(&self, within: std::time::Duration) {
        let children = {
            let mut g = self.inner.lock().unwrap();
            g.by_uid.clear();
            std::mem::take(&mut g.children)
        };
        let all = futures_join_all(children);
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("workers still running after {within:?}; leaving them to systemd");
        }
    }
}

async fn futures_join_all(hs: Vec<tokio::task::JoinHandle<()>>) {
    for h in hs {
        let _ = h.await;
    }
}

/// Start a worker for `who`: a fresh channel, the same binary as `gtar-logd
/// worker`, dropped to the user before exec.
fn start_worker(
    o: &DispatchOptions,
    who: &Identity,
) -> io::Result<(OwnedFd, tokio::process::Child)> {
    let dir = user_dir(&o.users_dir, who, o.admin_gid)?;
    let (ours, theirs) = channel()?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("gtar-logd")
        .arg("worker")
        .args(&o.worker_args)
        .arg("--data-dir")
        .arg(&dir)
        .arg("--users-dir")
        .arg(&o.users_dir)
        .arg("--user-name")
        .arg(&who.name);
    if who.is_admin(o.admin_gid) {
        cmd.arg("--admin");
    }
    if let Some(r) = &o.remote {
        cmd.arg("--remote")
            .arg(user_remote(r, &who.name).to_string());
    }
    cmd.env_clear()
        .env("HOME", &who.home)
        .env("USER", &who.name)
        .env("LOGNAME", &who.name)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    // The store's endpoint and credentials (the service's AWS_* variables)
    // go through a pipe, not the environment: a process's initial
    // environment stays readable in /proc/PID/environ by its user, while
    // what the worker reads from the pipe after making itself non-dumpable
    // is not (see `take_worker_env`).
    let env_pipe = match &o.remote {
        Some(_) => Some(aws_env_pipe()?),
        None => None,
    };
    let env_fd = env_pipe.as_ref().map(|p| p.as_raw_fd());
    cmd.current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    let (uid, gid, groups) = (who.uid, who.gid, who.groups.clone());
    let umask: libc::mode_t = if o.admin_gid.is_some() { 0o027 } else { 0o077 };
    let chan_fd = theirs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (setgroups, setgid, setuid, umask,
    // dup2) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Never back: with all ids changed, root is gone for good.
            if uid != 0 && libc::setuid(0) == 0 {
                return Err(io::Error::other("regained root after setuid"));
            }
            libc::umask(umask);
            // dup2 clears close-on-exec on the copy: the fds we pass.
            if libc::dup2(chan_fd, WORKER_CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = env_fd {
                if libc::dup2(fd, WORKER_ENV_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start a worker for {}: {e}", who.name),
        )
    })?;
    drop(theirs);
    drop(env_pipe);
    Ok((ours, child))
}

/// A pipe holding this process's `AWS_*` variables as `NAME\0VALUE\0`
/// pairs, written whole and closed for writing: the read end, for a worker.
fn aws_env_pipe() -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = Vec::new();
    for (k, v) in std::env::vars_os().filter(|(k, _)| k.as_bytes().starts_with(b"AWS_")) {
        for part in [k.as_bytes(), v.as_bytes()] {
            buf.extend_from_slice(part);
            buf.push(0);
        }
    }
    if buf.len() > WORKER_ENV_MAX {
        return Err(io::Error::other(format!(
            "the AWS_* environment is {} bytes; at most {WORKER_ENV_MAX} are passed to workers",
            buf.len()
        )));
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created for us and are owned once.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::io::Write::write_all(&mut std::fs::File::from(w), &buf)?;
    Ok(r)
}

/// In a worker, before any other thread starts: make the process
/// non-dumpable (its user can then neither read its memory nor
/// `/proc/PID/environ`, nor attach a debugger; the kernel makes `/proc/PID`
/// root's), then read the service's `AWS_*` variables from
/// [`WORKER_ENV_FD`] into the environment, where `object_store` looks.
pub fn take_worker_env() -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat only reads the descriptor's metadata.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(WORKER_ENV_FD, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFIFO
    {
        return Ok(()); // a service without --remote passes none
    }
    // SAFETY: fd 4 is the pipe the dispatcher passed (checked above to be a
    // FIFO); nothing else in this process owns it.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(WORKER_ENV_FD) });
    let mut buf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut f, WORKER_ENV_MAX as u64 + 1),
        &mut buf,
    )?;
    let mut parts = buf.split(|b| *b == 0);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        if k.starts_with(b"AWS_") {
            std::env::set_var(
                std::ffi::OsStr::from_bytes(k),
                std::ffi::OsStr::from_bytes(v),
            );
        }
    }
    Ok(())
}

/// Pass `conn` to the worker of its peer's uid, starting one if there is
/// none or it died. The caller drops `conn` afterwards (the worker has its
/// own copy).
fn route(o: &DispatchOptions, workers: &Workers, uid: u32, conn: RawFd) -> io::Result<()> {
    {
        let g = workers.inner.lock().unwrap();
        if let Some(w) = g.by_uid.get(&uid) {
            match send_fd(w.chan.as_raw_fd(), conn) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("the worker of uid {uid} is not taking connections"),
                    ))
                }
                Err(e) => {
                    // EPIPE: it retired while idle (see `incoming`) or died.
                    tracing::info!(uid, pid = w.pid, error = %e, "the worker has gone; starting a new one");
                }
            }
        }
    }
    let who = Identity::of(uid)?;
    let (chan, mut child) = start_worker(o, &who)?;
    let pid = child.id().unwrap_or(0);
    send_fd(chan.as_raw_fd(), conn)?;
    let mut g = workers.inner.lock().unwrap();
    g.next_generation += 1;
    let generation = g.next_generation;
    tracing::info!(user = %who.name, uid, pid, "worker started");
    if let Some(old) = g.by_uid.insert(
        uid,
        Worker {
            chan,
            pid,
            generation,
        },
    ) {
        tracing::debug!(pid = old.pid, "replaced a dead worker");
    }
    let inner = workers.inner.clone();
    let name = who.name.clone();
    g.children.retain(|h| !h.is_finished());
    g.children.push(tokio::spawn(async move {
        let status = child.wait().await;
        let mut g = inner.lock().unwrap();
        if g.by_uid.get(&uid).is_some_and(|w| w.generation == generation) {
            g.by_uid.remove(&uid);
        }
        match status {
            Ok(s) if s.success() => tracing::info!(user = %name, pid, "worker exited"),
            Ok(s) => tracing::warn!(user = %name, pid, status = %s, "worker ended; the next connection starts a new one"),
            Err(e) => tracing::warn!(user = %name, pid, error = %e, "cannot wait for worker"),
        }
    }));
    Ok(())
}

/// Accept connections on `listener` until `shutdown`, passing each to its
/// user's worker; then close the channels and wait for the workers.
pub async fn dispatch(
    listener: tokio::net::UnixListener,
    o: DispatchOptions,
    workers: Workers,
    shutdown: CancellationToken,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    // Users pass through it to their own directory; nobody lists it.
    ensure_dir_mode(&o.users_dir, 0o711)
        .and_then(|()| repair_user_dirs(&o.users_dir, o.admin_gid))
        .map_err(|e| anyhow::anyhow!("cannot set up {}: {e}", o.users_dir.display()))?;
    let o = Arc::new(o);
    loop {
        let (conn, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let uid = match conn.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; closing the connection");
                continue;
            }
        };
        // Starting a worker reads passwd and forks: off the async workers.
        let (o2, w2) = (o.clone(), workers.clone());
        let conn = conn.into_std()?;
        let r = tokio::task::spawn_blocking(move || {
            let r = route(&o2, &w2, uid, conn.as_raw_fd());
            drop(conn);
            r
        })
        .await?;
        if let Err(e) = r {
            tracing::warn!(uid, error = %e, "connection refused");
        }
    }
    tracing::info!("dispatcher: no new connections; stopping workers");
    workers
        .shutdown(grace + std::time::Duration::from_secs(30))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_replicates_under_its_own_prefix() {
        let url = |s: &str| s.parse::<crate::remote::RemoteUrl>().unwrap();
        assert_eq!(
            user_remote(&url("s3://b/ckpt/"), "alice").to_string(),
            "s3://b/ckpt/users/alice"
        );
        assert_eq!(
            user_remote(&url("s3://b"), "bob").to_string(),
            "s3://b/users/bob"
        );
    }

    #[tokio::test]
    async fn a_passed_connection_keeps_its_peer() {
        let (ours, theirs) = channel().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_fd(ours.as_raw_fd(), b.as_raw_fd()).unwrap();
        drop(b);
        let end = CancellationToken::new();
        let mut s = incoming(theirs, end.clone(), None).unwrap();
        use tokio_stream::StreamExt;
        let got = s.next().await.unwrap().unwrap();
        assert_eq!(
            got.inner.peer_cred().unwrap().pid(),
            Some(std::process::id() as i32)
        );
        use std::io::Write;
        let mut a = a;
        a.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        got.inner.readable().await.unwrap();
        assert_eq!(got.inner.try_read(&mut buf).unwrap(), 1);
        drop(ours);
        assert!(s.next().await.is_none());
        end.cancelled().await;
    }

    #[tokio::test]
    async fn an_idle_worker_retires_only_when_its_connections_are_gone() {
        let (ours, theirs) = channel().unwrap();
        let end = CancellationToken::new();
        let idle = std::time::Duration::from_millis(1);
        let mut s = incoming(theirs, end.clone(), Some(idle)).unwrap();
        use tokio_stream::StreamExt;
        // A live connection keeps the worker up past the idle limit.
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_fd(ours.as_raw_fd(), b.as_raw_fd()).unwrap();
        let got = s.next().await.unwrap().unwrap();
        tokio::time::sleep(IDLE_CHECK * 3).await;
        assert!(!end.is_cancelled());
        send_fd(ours.as_raw_fd(), b.as_raw_fd()).unwrap();
        let second = s.next().await.unwrap().unwrap();
        // With both gone it retires: the dispatcher's next hand-over
        // fails (EPIPE), which makes it start a new worker.
        drop((got, second));
        end.cancelled().await;
        let e = send_fd(ours.as_raw_fd(), b.as_raw_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
    }

    #[test]
    fn root_and_the_admin_group_are_admins() {
        let id = |uid, gid, groups: &[u32]| Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            name: "x".into(),
            home: "/".into(),
        };
        assert!(id(0, 0, &[]).is_admin(None));
        assert!(!id(1000, 1000, &[1000]).is_admin(None));
        assert!(id(1000, 1000, &[1000, 50]).is_admin(Some(50)));
        assert!(!id(1000, 1000, &[1000]).is_admin(Some(50)));
    }
}
