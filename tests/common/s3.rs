//! A real S3 server for the remote-storage tests: `s3s-fs` (an S3 HTTP
//! server over a directory, from crates.io), which `./test.sh` installs once
//! into `~/.cache/gtar-logd/s3s-fs` and names in `GTAR_S3S_FS`. The Python
//! tests start the same binary the same way (clients/python/tests/s3.py).
//!
//! Included with `#[path = "common/s3.rs"] mod s3;`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "gtar-test-key";
pub const SECRET_KEY: &str = "gtar-test-secret";

/// The s3s-fs binary: `$GTAR_S3S_FS`, else where test.sh installs it.
/// Panics with how to get it (these tests must not pass silently without it).
pub fn s3s_fs_bin() -> PathBuf {
    let p = match std::env::var_os("GTAR_S3S_FS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/gtar-logd/s3s-fs/bin/s3s-fs"),
    };
    assert!(
        p.exists(),
        "{} is missing: the remote-storage tests need s3s-fs. Run ./test.sh, which installs it \
         (cargo install --locked s3s-fs --version 0.14.1 --features binary --root ~/.cache/gtar-logd/s3s-fs)",
        p.display()
    );
    p
}

/// One s3s-fs process on 127.0.0.1 serving `root` (a bucket is a directory).
pub struct S3Server {
    proc: Option<Child>,
    pub root: PathBuf,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl S3Server {
    /// Start on a free port, serving `root` (created).
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root).unwrap();
        // s3s-fs takes a port number, not a listener: bind :0 to find a free
        // one, release it, and have s3s-fs bind it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut s = S3Server {
            proc: None,
            root: root.to_path_buf(),
            addr,
            log: root.with_extension("s3s-fs.log"),
        };
        s.restart();
        s
    }

    /// Create bucket `name` (a directory of the server's root).
    pub fn bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The AWS environment a client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Set the AWS environment on `cmd` (and clear what the machine may have).
    pub fn apply(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// Start (again) on the same port and directory; waits until it listens.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(s3s_fs_bin())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.addr.port().to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start s3s-fs");
        self.proc = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr).is_err() {
            if let Some(st) = self.proc.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "s3s-fs exited ({st}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "s3s-fs did not listen in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the server (the port closes; clients see connection errors).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Every object key under `bucket`, relative to it (s3s-fs keeps an
    /// object as a file of the same path; its own bookkeeping files, which
    /// start with '.', are left out).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let base = self.root.join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(&base).unwrap().to_string_lossy().to_string());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
