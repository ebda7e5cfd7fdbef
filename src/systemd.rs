//! systemd integration: `sd_notify` (readiness, stopping, status) and the
//! watchdog. (Socket activation and the socket's permissions live in
//! [`crate::listen`].)
//!
//! Synchronous and free of tokio: everything here runs on a plain OS thread,
//! and it is all no-op outside systemd.
//!
//! Invariants a caller must keep:
//! - `READY=1` ([`notify_ready`]) is sent only once the server really serves:
//!   its listeners accept and the gRPC service answers. `STOPPING=1`
//!   ([`notify_stopping`]) is sent as soon as shutdown begins.
//! - Watchdog pings ([`spawn_watchdog`]) are sent only while the liveness check
//!   says the writer threads are alive and making progress; when it fails the
//!   pings stop and systemd restarts the daemon after `WatchdogSec=`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// A running watchdog thread. Dropping it stops the pings (and waits for
/// the thread).
#[must_use = "dropping the handle stops the watchdog pings"]
pub struct WatchdogHandle {
    /// Set to end the thread's loop.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WatchdogHandle {
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
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            let mut was_healthy = true;
            while !stop2.load(Ordering::SeqCst) {
                let ok = healthy();
                if ok {
                    if let Err(e) = ping() {
                        tracing::warn!("watchdog ping failed: {e}");
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
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
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
        drop(wd);
    }
}
