//! The real `gtar-logd` binary as a child process on a temp Unix socket and a
//! free 127.0.0.1 port, for the client's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `target/debug` (or whatever profile dir this test binary runs from).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/daemon-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

static BUILD: Mutex<()> = Mutex::new(());

/// Build `args` with cargo unless `path` exists already (in release mode when
/// this binary is a release build, e.g. a bench, so `path` is where cargo
/// puts it).
fn ensure_built(path: &Path, args: &[&str]) -> PathBuf {
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut args = args.to_vec();
        if target_dir().ends_with("release") {
            args.push("--release");
        }
        eprintln!(
            "building {} with `cargo {}`",
            path.display(),
            args.join(" ")
        );
        let st = Command::new(cargo)
            .args(&args)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo");
        assert!(st.success(), "cargo {args:?} failed");
    }
    assert!(path.exists(), "{} is missing", path.display());
    path.to_path_buf()
}

/// The daemon binary: $GTAR_LOGD_BIN, else `target/debug/gtar-logd`, built if
/// missing.
pub fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GTAR_LOGD_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    ensure_built(
        &target_dir().join("gtar-logd"),
        &["build", "-p", "gtar-logd", "--bin", "gtar-logd"],
    )
}

/// The quickstart example binary, built if missing.
pub fn example_bin(name: &str) -> PathBuf {
    ensure_built(
        &target_dir().join("examples").join(name),
        &["build", "-p", "gtar-logd-client", "--examples"],
    )
}

/// A running daemon; killed (SIGKILL) and reaped on drop.
pub struct Daemon {
    child: Child,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub uds: PathBuf,
    pub port: u16,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// A daemon with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("cli")
            .tempdir_in(base)
            .unwrap();
        let data = dir.path().join("data");
        let uds = dir.path().join("d.sock");
        // A port picked free just now can be taken before the daemon binds it:
        // retry with another.
        for attempt in 0..5 {
            let port = free_port();
            let mut child = Command::new(daemon_bin())
                .arg("serve")
                .arg("--data-dir")
                .arg(&data)
                .arg("--uds")
                .arg(&uds)
                .arg("--tcp")
                .arg(format!("127.0.0.1:{port}"))
                .args(extra)
                .env("GTAR_LOGD_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn gtar-logd");
            let deadline = Instant::now() + Duration::from_secs(30);
            let ready = loop {
                if let Ok(Some(st)) = child.try_wait() {
                    eprintln!("gtar-logd exited early ({st}), attempt {attempt}");
                    break false;
                }
                let up = uds.exists()
                    && std::os::unix::net::UnixStream::connect(&uds).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                if up {
                    break true;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("gtar-logd did not come up within 30 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if ready {
                return Daemon {
                    child,
                    dir,
                    data,
                    uds,
                    port,
                };
            }
            let _ = std::fs::remove_file(&uds);
        }
        panic!("gtar-logd failed to start 5 times");
    }

    /// `unix:/…/d.sock`
    pub fn uds_addr(&self) -> String {
        format!("unix:{}", self.uds.display())
    }

    /// `127.0.0.1:PORT`
    pub fn tcp_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
