//! systemd integration, checked with systemd's own tools (no running systemd
//! is needed: this runs in a container):
//!
//! - `systemd-analyze verify` on every unit. It insists that `ExecStart=`'s
//!   binary exists, so the units are copied to a temp dir with
//!   `/usr/bin/gtar-logd` rewritten to the binary cargo built; user units are
//!   verified with `--user` and a temp `XDG_RUNTIME_DIR` (the user manager
//!   needs one to resolve `%t`).
//! - `systemd-analyze security --offline=yes` on the system service: the
//!   exposure score is printed and must be ≤ 2.5.
//! - `systemd-sysusers --root` and `systemd-tmpfiles --root` apply our
//!   snippets to an empty root directory.
//! - Socket activation for real: `systemd-socket-activate` opens the Unix and
//!   TCP sockets and execs `gtar-logd serve` on the first connection; a client
//!   writes through one passed socket and reads back through the other.
//! - `sd_notify`: a test-owned `NOTIFY_SOCKET` sees `READY=1` only once the
//!   server answers health checks, `WATCHDOG=1` every `WATCHDOG_USEC / 2`, and
//!   `STOPPING=1` on SIGTERM.

#[path = "common/daemon.rs"]
mod daemon;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daemon::*;
use gtar_logd::proto::v1::DType;

/// The user units; the system instance has no TCP socket (`--multi-user`
/// serves the Unix socket only: TCP carries no identity).
const UNITS: [&str; 3] = [
    "gtar-logd.service",
    "gtar-logd.socket",
    "gtar-logd-tcp.socket",
];
const SYSTEM_UNITS: [&str; 2] = ["gtar-logd.service", "gtar-logd.socket"];

fn units_of(sub: &str) -> &'static [&'static str] {
    if sub.is_empty() {
        &SYSTEM_UNITS
    } else {
        &UNITS
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's `systemd` package (it ships {name})");
}

/// Copy the units from `systemd/{sub}` to `dst`, pointing `ExecStart=` at
/// the binary cargo built.
fn staged_units(sub: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let bin = daemon_bin();
    for u in units_of(sub) {
        let text = std::fs::read_to_string(repo().join("systemd").join(sub).join(u)).unwrap();
        assert!(
            !u.ends_with(".service") || text.contains("ExecStart=/usr/bin/gtar-logd serve"),
            "{sub}/{u}: ExecStart should run /usr/bin/gtar-logd serve"
        );
        let text = text.replace("/usr/bin/gtar-logd", bin.to_str().unwrap());
        std::fs::write(dst.join(u), text).unwrap();
    }
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let tmp = temp_root("sd-verify");
    // System units.
    let sys = tmp.path().join("system");
    staged_units("", &sys);
    let (ok, out, err) = run(Command::new(tool("systemd-analyze"))
        .arg("verify")
        .args(SYSTEM_UNITS)
        .current_dir(&sys));
    println!("systemd-analyze verify (system): ok={ok}\n{out}{err}");
    assert!(ok, "systemd-analyze verify failed:\n{out}{err}");
    assert!(
        !err.contains("gtar-logd"),
        "systemd-analyze verify complained about our units:\n{err}"
    );
    // User units (`systemctl --user`).
    let user = tmp.path().join("user");
    staged_units("user", &user);
    let xdg = tmp.path().join("xdg-runtime");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, out, err) = run(Command::new(tool("systemd-analyze"))
        .args(["--user", "verify"])
        .args(UNITS)
        .env("XDG_RUNTIME_DIR", &xdg)
        .current_dir(&user));
    println!("systemd-analyze --user verify: ok={ok}\n{out}{err}");
    assert!(ok, "systemd-analyze --user verify failed:\n{out}{err}");
    assert!(
        !err.contains("gtar-logd"),
        "systemd-analyze --user verify complained about our units:\n{err}"
    );
}

#[test]
fn service_security_exposure_at_most_2_5() {
    let tmp = temp_root("sd-security");
    staged_units("", tmp.path());
    let (ok, out, err) = run(Command::new(tool("systemd-analyze"))
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            "gtar-logd.service",
        ])
        .current_dir(tmp.path()));
    assert!(ok, "systemd-analyze security failed:\n{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{out}{err}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the score in {line:?}"));
    for l in out.lines().filter(|l| l.starts_with('✗')) {
        println!("  {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    println!("systemd-analyze security --offline=yes gtar-logd.service: {score}  ({line})");
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");
}

#[test]
fn sysusers_and_tmpfiles_snippets_apply() {
    let tmp = temp_root("sd-root");
    let root = tmp.path();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let (ok, out, err) = run(Command::new(tool("systemd-sysusers"))
        .arg(format!("--root={}", root.display()))
        .arg(repo().join("systemd/gtar-logd.sysusers")));
    assert!(ok, "systemd-sysusers failed:\n{out}{err}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("gtar-logd-admin:")),
        "group gtar-logd-admin created:\n{group}"
    );
    let unit = std::fs::read_to_string(repo().join("systemd/gtar-logd.service")).unwrap();
    assert!(unit.contains("--admin-group gtar-logd-admin"));
    let (ok, out, err) = run(Command::new(tool("systemd-tmpfiles"))
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo().join("systemd/gtar-logd.tmpfiles")));
    assert!(ok, "systemd-tmpfiles failed:\n{out}{err}");
    let md = std::fs::metadata(root.join("run/gtar-logd")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

/// The sockets of the system `.socket` units, so the tests and the units
/// agree on names and the TCP port.
#[test]
fn socket_units_name_their_fds() {
    let uds = std::fs::read_to_string(repo().join("systemd/gtar-logd.socket")).unwrap();
    assert!(uds.contains("ListenStream=/run/gtar-logd/gtar-logd.sock"));
    assert!(uds.contains(&format!(
        "FileDescriptorName={}",
        gtar_logd::listen::FDNAME_UDS
    )));
    // Every user connects; the service tells them apart by uid.
    assert!(uds.contains("SocketMode=0666"));
    let svc = std::fs::read_to_string(repo().join("systemd/gtar-logd.service")).unwrap();
    assert!(svc.contains("serve --multi-user"));
    assert!(!repo().join("systemd/gtar-logd-tcp.socket").exists());
    let tcp = std::fs::read_to_string(repo().join("systemd/user/gtar-logd-tcp.socket")).unwrap();
    assert!(tcp.contains("ListenStream=127.0.0.1:7461"));
    assert!(tcp.contains(&format!(
        "FileDescriptorName={}",
        gtar_logd::listen::FDNAME_TCP
    )));
}

// ------------------------------------------------------------ socket activation

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// SIGTERM; the daemon must exit 0 within `within`.
    fn terminate(&mut self, within: Duration) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "exit {st} after SIGTERM; log:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("no exit within {within:?} of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Proc {
        child,
        log: log.to_path_buf(),
    }
}

fn wait_for(what: &str, p: &mut Proc, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("exited early ({st}) waiting for {what}; log:\n{}", p.log());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn small_frame(index: &str, seed: u64) -> FrameSpec {
    FrameSpec {
        index: index.into(),
        tensors: vec![TensorSpec::new(
            "",
            "w",
            DType::Float32,
            &[16, 8],
            Payload::Bytes(gen(seed, 16 * 8 * 4)),
        )],
        ..Default::default()
    }
}

/// `systemd-socket-activate -l UDS -l 127.0.0.1:PORT --fdname=uds:tcp
/// gtar-logd serve`: the daemon serves on the passed sockets and binds
/// nothing of its own (its --uds/--tcp settings are ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_unix_and_tcp() {
    let tmp = temp_root("sd-act");
    let root = tmp.path();
    let uds = root.join("activated.sock");
    let own_uds = root.join("own.sock");
    let tcp = free_tcp_addr();
    let data = root.join("data");
    let mut cmd = Command::new(tool("systemd-socket-activate"));
    cmd.arg("-l")
        .arg(&uds)
        .arg("-l")
        .arg(tcp.to_string())
        .arg("--fdname=uds:tcp")
        // systemd-socket-activate gives the child only LISTEN_* and these.
        .arg(format!("--setenv=GTAR_LOGD_UDS={}", own_uds.display()))
        .arg("--setenv=GTAR_LOGD_LOG=info")
        .arg(daemon_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(&data);
    let mut p = spawn_logged(cmd, &root.join("activate.log"));
    // Like systemd with Accept=no, it execs the daemon on the first connection.
    wait_for("the activated sockets", &mut p, || uds.exists());
    let via_uds = logd::Client::connect(&format!("unix:{}", uds.display()))
        .await
        .unwrap();
    let via_tcp = logd::Client::connect(&tcp.to_string()).await.unwrap();
    assert_eq!(
        health(&uds, "")
            .await
            .expect("health over the passed Unix socket"),
        SERVING
    );

    // Write through the Unix socket, read through TCP; and the other way round.
    let a = [small_frame("1", 11), small_frame("2", 12)];
    write_client(&via_uds, "act/uds.zip", append(""), &a)
        .await
        .unwrap();
    let b = [small_frame("10", 21)];
    write_client(&via_tcp, "act/tcp.zip", append(""), &b)
        .await
        .unwrap();
    assert_eq!(
        via_tcp.list_frames("act/uds.zip", "").await.unwrap(),
        ["1", "2"]
    );
    let got = via_tcp
        .get_frame("act/uds.zip", logd::FrameSel::LAST)
        .await
        .unwrap();
    assert_frame_matches(&got, &a[1]);
    let got = via_uds.get_frame("act/tcp.zip", "10").await.unwrap();
    assert_frame_matches(&got, &b[0]);

    let log = p.log();
    assert!(
        log.contains("socket passed by systemd") && log.contains("name=uds"),
        "{log}"
    );
    assert!(log.contains("name=tcp"), "{log}");
    assert!(
        !own_uds.exists(),
        "socket-activated daemon bound its own socket too"
    );
    drop((via_uds, via_tcp));
    p.terminate(Duration::from_secs(30));
    assert!(data.join("act/uds.zip").exists());
}

/// Unnamed fds (no `--fdname`; systemd-socket-activate then names them
/// "unknown") are taken by address family: here TCP only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_unnamed_tcp_only() {
    let tmp = temp_root("sd-act1");
    let root = tmp.path();
    let tcp = free_tcp_addr();
    let mut cmd = Command::new(tool("systemd-socket-activate"));
    cmd.arg("-l")
        .arg(tcp.to_string())
        .arg(format!(
            "--setenv=GTAR_LOGD_UDS={}",
            root.join("own.sock").display()
        ))
        .arg(daemon_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(root.join("data"));
    let mut p = spawn_logged(cmd, &root.join("activate.log"));
    wait_for("the TCP listener", &mut p, || {
        std::net::TcpStream::connect(tcp).is_ok()
    });
    // That connection started the daemon; it writes its TCP token as it
    // starts, and a request sent before then is refused (UNAUTHENTICATED).
    let address: logd::Address = tcp.to_string().parse().unwrap();
    wait_for("the TCP token file", &mut p, || {
        address.token().ok().flatten().is_some()
    });
    let c = logd::Client::connect(&tcp.to_string()).await.unwrap();
    let f = [small_frame("0", 5)];
    write_client(&c, "one.zip", append(""), &f).await.unwrap();
    let got = c.get_frame("one.zip", 0i64).await.unwrap();
    assert_frame_matches(&got, &f[0]);
    assert!(!root.join("own.sock").exists());
    drop(c);
    p.terminate(Duration::from_secs(30));
}

// ------------------------------------------------------------ sd_notify

struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { sock, path }
    }

    /// The next message, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("NOTIFY_SOCKET recv: {e}"),
        }
    }
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// `gtar-logd serve` under a test-owned NOTIFY_SOCKET, with the watchdog
/// variables set the way systemd sets them (WATCHDOG_PID = the daemon's own
/// pid: the shell wrapper exports its pid, then execs the daemon).
fn notified_cmd(root: &Path, notify: &Notify, watchdog_pid: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "export WATCHDOG_PID={watchdog_pid}; exec \"$0\" \"$@\""
        ))
        .arg(daemon_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--uds")
        .arg(root.join("d.sock"))
        .args(extra)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    cmd
}

fn spawn_notified(root: &Path, notify: &Notify, watchdog_pid: &str, extra: &[&str]) -> Proc {
    spawn_logged(
        notified_cmd(root, notify, watchdog_pid, extra),
        &root.join("daemon.log"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_stopping() {
    let tmp = temp_root("sd-notify");
    let root = tmp.path();
    let notify = Notify::bind(root);
    let sock = root.join("d.sock");
    let mut p = spawn_notified(root, &notify, "$$", &[]);

    // READY=1 comes first, and when it arrives the server already answers.
    let ready = notify
        .recv(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY=1 within 30 s; log:\n{}", p.log()));
    assert!(has_line(&ready, "READY=1"), "first message {ready:?}");
    let status = health(&sock, "").await;
    assert_eq!(
        status.as_ref().ok(),
        Some(&SERVING),
        "health at READY=1: {status:?}"
    );
    assert!(
        has_line(&ready, &format!("MAINPID={}", p.pid())),
        "{ready:?}"
    );
    assert!(ready.contains("STATUS=serving on unix:"), "{ready:?}");
    println!("ready: {ready:?}");

    // WATCHDOG=1 every WATCHDOG_USEC/2 = 100 ms.
    let start = Instant::now();
    let mut pings = Vec::new();
    while start.elapsed() < Duration::from_millis(1500) {
        match notify.recv(Duration::from_millis(500)) {
            Some(m) if m == "WATCHDOG=1" => pings.push(Instant::now()),
            Some(m) => panic!("unexpected notification {m:?}"),
            None => {}
        }
    }
    let mut gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    gaps.sort_unstable();
    println!(
        "watchdog: {} pings in 1.5 s, gaps (ms, sorted) {gaps:?}",
        pings.len()
    );
    assert!(
        pings.len() >= 5,
        "only {} watchdog pings in 1.5 s",
        pings.len()
    );
    let median = gaps[gaps.len() / 2];
    assert!(
        (50..200).contains(&median),
        "median watchdog gap {median} ms; expected ~100 ms (WATCHDOG_USEC=200000)"
    );

    // SIGTERM: STOPPING=1 (watchdog pings may still arrive before it), exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = notify
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no STOPPING=1 after SIGTERM; log:\n{}", p.log()));
        if has_line(&m, "STOPPING=1") {
            println!("stopping: {m:?}");
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
        assert!(Instant::now() < deadline, "no STOPPING=1 after SIGTERM");
    }
    p.terminate(Duration::from_secs(30));
}

/// WATCHDOG_PID naming another process: the watchdog is not ours, no pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pid_of_another_process_is_ignored() {
    let tmp = temp_root("sd-wdpid");
    let root = tmp.path();
    let notify = Notify::bind(root);
    let mut p = spawn_notified(root, &notify, "1", &[]);
    let ready = notify
        .recv(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY=1 within 30 s; log:\n{}", p.log()));
    assert!(has_line(&ready, "READY=1"), "{ready:?}");
    assert_eq!(notify.recv(Duration::from_millis(600)), None);
    p.terminate(Duration::from_secs(30));
}

/// `gtar-logd serve` on its own socket `sock`, data under `root`, not
/// started by systemd.
fn serve_on(root: &Path, sock: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--uds")
        .arg(sock)
        .args(args)
        .env_remove("NOTIFY_SOCKET");
    cmd
}

/// A SIGTERM the moment the socket accepts connections (systemd stopping a
/// unit it just started) is a clean stop: the handler is installed before
/// the socket is bound, so the signal's default action never kills it.
#[test]
fn sigterm_as_soon_as_the_socket_accepts_is_a_clean_stop() {
    let tmp = temp_root("sd-early");
    let root = tmp.path();
    let sock = root.join("e.sock");
    for round in 0..20 {
        let _ = std::fs::remove_file(&sock);
        let mut p = spawn_logged(
            serve_on(root, &sock, &[]),
            &root.join(format!("early{round}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        // Poll without sleeping so the signal lands as early as it can.
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "no socket; log:\n{}", p.log());
            std::thread::yield_now();
        }
        p.terminate(Duration::from_secs(30));
    }
}

/// `--socket-group` / `--socket-mode`: the daemon's own socket gets exactly
/// that mode and group; without them it is owner-only (0600).
#[test]
fn own_socket_mode_and_group() {
    let tmp = temp_root("sd-perm");
    let root = tmp.path();
    // A group other than ours (the tests run as root, who may chgrp to any).
    // SAFETY: getegid has no preconditions.
    let my_gid = unsafe { libc::getegid() };
    let gid = ["nogroup", "users"]
        .iter()
        .find_map(|g| gtar_logd::listen::resolve_group(g).ok())
        .filter(|_| my_gid == 0)
        .unwrap_or(my_gid);
    for (args, mode, want_gid) in [
        (vec![], 0o600, my_gid),
        (
            vec!["--socket-group".to_string(), gid.to_string()],
            0o660,
            gid,
        ),
        (
            vec![
                "--socket-group".to_string(),
                gid.to_string(),
                "--socket-mode".into(),
                "0620".into(),
            ],
            0o620,
            gid,
        ),
    ] {
        let sock = root.join("p.sock");
        let mut p = spawn_logged(serve_on(root, &sock, &args), &root.join("perm.log"));
        wait_for("the socket", &mut p, || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        let md = std::fs::symlink_metadata(&sock).unwrap();
        println!("{args:?}: mode {:o} gid {}", md.mode() & 0o7777, md.gid());
        assert_eq!(md.mode() & 0o7777, mode, "{args:?}");
        assert_eq!(md.gid(), want_gid, "{args:?}");
        p.terminate(Duration::from_secs(30));
    }
}

// ------------------------------------------------------------ stderr gone

/// Start `cmd` with stderr a pipe, read its first log line, then close the
/// pipe's read end (`serve 2>&1 | head -1`); the daemon goes on serving.
fn spawn_with_stderr_closed(mut cmd: Command, root: &Path, sock: &Path) -> Proc {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stderr = child.stderr.take().unwrap();
    // A thread, so a daemon that logs nothing fails the test at a deadline
    // instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let mut r = std::io::BufReader::new(stderr);
        let _ = r.read_line(&mut first);
        let _ = tx.send(first);
        // `r` dropped here: the read end is closed.
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no log line within 30 s");
    println!("first log line, then stderr closed: {first:?}");
    let mut p = Proc {
        child,
        log: root.join("no-log"),
    };
    wait_for("the socket", &mut p, || {
        std::os::unix::net::UnixStream::connect(sock).is_ok()
    });
    p
}

/// Send `signal`; `p` must exit 0 within 30 s.
fn signal_and_wait(p: &mut Proc, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.pid(), signal) };
    wait_clean_exit(p, signal);
}

fn wait_clean_exit(p: &mut Proc, signal: libc::c_int) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            assert!(st.success(), "exit {st} after signal {signal}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "signal {signal}: still running 30 s later (the daemon ignored it)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A signal stops the daemon cleanly whatever its stderr is: a pipe whose
/// reader went away after the first line (`serve 2>&1 | head -1`, a
/// journald restart), then SIGTERM or SIGINT; and stderr `/dev/full`.
/// Before, the log writer's own error report panicked in the signal task
/// and the daemon went on serving until `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_stop_the_daemon_when_stderr_is_gone() {
    let tmp = temp_root("sd-stderr");
    let root = tmp.path();
    let sock = root.join("s.sock");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut p = spawn_with_stderr_closed(serve_on(root, &sock, &[]), root, &sock);
        // Still serving with nobody reading its log.
        assert_eq!(health(&sock, "").await.ok(), Some(SERVING));
        signal_and_wait(&mut p, signal);
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut cmd = serve_on(root, &sock, &[]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(full);
    let mut p = Proc {
        child: cmd.spawn().unwrap(),
        log: root.join("no-log"),
    };
    wait_for("the socket", &mut p, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    assert_eq!(health(&sock, "").await.ok(), Some(SERVING));
    signal_and_wait(&mut p, libc::SIGTERM);
}

/// The same under systemd's eyes: watchdog on, stderr gone; SIGTERM (what
/// `systemctl stop` sends) gives STOPPING=1 and a clean exit.
#[test]
fn systemd_stop_with_watchdog_when_stderr_is_gone() {
    let tmp = temp_root("sd-stderr-wd");
    let root = tmp.path();
    let notify = Notify::bind(root);
    let sock = root.join("d.sock");
    let cmd = notified_cmd(root, &notify, "$$", &[]);
    let mut p = spawn_with_stderr_closed(cmd, root, &sock);
    let ready = notify.recv(Duration::from_secs(30)).expect("no READY=1");
    assert!(has_line(&ready, "READY=1"), "{ready:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = notify
            .recv(Duration::from_secs(5))
            .expect("no STOPPING=1 after SIGTERM with stderr gone");
        if has_line(&m, "STOPPING=1") {
            break;
        }
        assert!(Instant::now() < deadline, "no STOPPING=1 after SIGTERM");
    }
    wait_clean_exit(&mut p, libc::SIGTERM);
}
