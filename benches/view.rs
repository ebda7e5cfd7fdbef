//! `gtar-logd view` benchmarks: the real daemon and view binaries (release),
//! files in a temp dir under target/. `cargo bench --bench view` prints:
//!
//! 1. Statistics against a plain read of the same bytes: a cold pass of the
//!    view's engine over an archive (every tensor's statistics, and the pairs
//!    against the previous and the first frame, reading each tensor once)
//!    against reading every tensor entry of the same archive with
//!    `Archive::read_entry` and nothing else. Both with the page cache warm
//!    (the plain read runs first each round). Ratio = read time ÷ statistics
//!    time, i.e. the statistics' speed as a fraction of the read's (target
//!    ≥ 0.5).
//! 2. Ingest throughput with a view open and polling as the page does
//!    (every second: the archive, a tensor and the layer overview of the
//!    archive being written) against the same ingest with no view, durable
//!    per frame, interleaved rounds without → with → without. Ratio = with ÷
//!    mean of the two without (target ≥ 0.95).
//! 3. Time from the start of `gtar-logd view FILE` (statistics kept: a
//!    previous view computed them) to the first data the page draws: the
//!    archive page's data (`/api/archive`: timeline and metric curves), then
//!    the layer overview (`/api/layers`: every frame's statistics) (target
//!    ≤ 1 s). This is the data's arrival, not the browser's paint.
//!
//! Knobs (env): BENCH_VIEW_FRAMES (frames in the archive, default 100),
//! BENCH_VIEW_FRAME_MB (MB per frame, in 4 float32 tensors, default 2: the
//! whole bench runs in about a minute), BENCH_ROUNDS (default 5),
//! BENCH_INGEST_FRAMES (frames per ingest run, default 150: several polls a
//! run). The sizes: `BENCH_VIEW_FRAME_MB=100` (100 frames of 100 MB,
//! 10 GB of disk) and `BENCH_VIEW_FRAMES=1000`. Timings are printed, never
//! asserted.

mod common;
#[path = "../tests/common/daemon.rs"]
mod daemon;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_u64, list, median};
use daemon::*;
use gtar_logd_client::blocking::Client;
use gtar_logd_client::ndarray::Array1;
use gtar_logd_client::{NewFrame, OpenOptions};

const TENSORS: usize = 4;

/// Deterministic, cheap values: a different walk per frame and tensor.
fn values(frame: usize, tensor: usize, n: usize) -> Array1<f32> {
    let mut x: u32 = (frame as u32).wrapping_mul(2_654_435_761) ^ (tensor as u32 + 1);
    Array1::from_shape_fn(n, |_| {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    })
}

fn write_frames(c: &Client, archive: &str, from: usize, to: usize, frame_bytes: usize) -> u64 {
    let n = frame_bytes / TENSORS / 4;
    let mut w = c.writer(archive, OpenOptions::append()).unwrap();
    let mut bytes = 0;
    for i in from..to {
        let ts: Vec<Array1<f32>> = (0..TENSORS).map(|k| values(i, k, n)).collect();
        let mut f =
            NewFrame::new(i.to_string()).scalar("metrics/epoch", "loss", 1.0 / (i as f64 + 1.0));
        for (k, t) in ts.iter().enumerate() {
            f = f.tensor(format!("layer{k}"), "kernel", t);
            bytes += (n * 4) as u64;
        }
        w.write(f).unwrap().durable().unwrap();
    }
    w.close().unwrap();
    bytes
}

/// `gtar-logd view ARGS` as a child, with its port and token.
struct View {
    proc: Child,
    port: u16,
    token: String,
}

impl View {
    fn start(args: &[&str], cache: &Path) -> View {
        let mut proc = Command::new(daemon_bin())
            .arg("view")
            .args(args)
            .env("XDG_CACHE_HOME", cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gtar-logd view");
        let mut out = BufReader::new(proc.stdout.take().unwrap());
        let mut line = String::new();
        for _ in 0..2 {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "view exited");
        }
        let rest = line.trim().strip_prefix("http://127.0.0.1:").unwrap();
        let (port, token) = rest.split_once("/?token=").unwrap();
        View {
            proc,
            port: port.parse().unwrap(),
            token: token.to_string(),
        }
    }

    /// GET `path` (with the token); panics unless 200.
    fn get(&self, path: &str) {
        let (ok, resp) = get(self.port, &self.token, path);
        assert!(ok, "{path}: {resp}");
    }
}

/// GET `path` with `token`: (200?, the start of the answer).
fn get(port: u16, token: &str, path: &str) -> (bool, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path}&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let head = String::from_utf8_lossy(&resp[..resp.len().min(300)]).to_string();
    (resp.starts_with(b"HTTP/1.1 200"), head)
}

impl Drop for View {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() {
    let frames = env_u64("BENCH_VIEW_FRAMES", 100) as usize;
    let frame_bytes = (env_u64("BENCH_VIEW_FRAME_MB", 2) * 1_000_000) as usize;
    let rounds = env_u64("BENCH_ROUNDS", 5) as usize;
    let ingest_frames = env_u64("BENCH_INGEST_FRAMES", 150) as usize;
    let root = temp_root("bench-view");
    let data = root.path().join("data");
    let sock = root.path().join("d.sock");
    let cache = root.path().join("cache");
    let mut d = ChildDaemon::spawn(&data, &sock, None, &root.path().join("daemon.log"));
    let addr = format!("unix:{}", sock.display());
    let c = Client::connect(&addr).unwrap();
    if cfg!(debug_assertions) {
        println!(
            "NOTE: an unoptimised build (--profile dev): CPU-bound figures are far below release"
        );
    }
    println!(
        "view bench: {frames} frames of {:.1} MB ({TENSORS} float32 tensors), {rounds} rounds",
        frame_bytes as f64 / 1e6
    );
    let t = Instant::now();
    let stored = write_frames(&c, "big.zip", 0, frames, frame_bytes);
    println!(
        "wrote the archive: {:.0} MB in {:.1} s",
        stored as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // 2. Ingest with and without a view polling, while the daemon runs.
    let frame_mb = stored as f64 / frames as f64 / 1e6;
    let current = Arc::new(Mutex::new(String::new()));
    let ingest = |name: &str| -> f64 {
        *current.lock().unwrap() = name.to_string();
        let t = Instant::now();
        write_frames(&c, name, 0, ingest_frames, frame_bytes);
        (ingest_frames as f64 * frame_mb) / t.elapsed().as_secs_f64()
    };
    let view = View::start(&["--address", &addr], &cache);
    let polling = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (port, token) = (view.port, view.token.clone());
        let (polling, stop, current) = (polling.clone(), stop.clone(), current.clone());
        std::thread::spawn(move || {
            let mut polls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                if polling.load(Ordering::SeqCst) {
                    let name = q(&current.lock().unwrap());
                    // As the pages do, once a second each (an archive page,
                    // a tensor page and the layer overview open at once); a
                    // 404 before the archive's first frame is fine.
                    for p in [
                        format!("/api/archive?name={name}"),
                        format!("/api/tensor?name={name}&id=layer0/kernel"),
                        format!("/api/layers?name={name}"),
                    ] {
                        get(port, &token, &p);
                    }
                    polls += 1;
                }
                let left = Duration::from_secs(1).saturating_sub(t.elapsed());
                std::thread::park_timeout(left);
            }
            polls
        })
    };
    let mut ratios = Vec::new();
    let mut without_mbps = Vec::new();
    let mut with_mbps = Vec::new();
    for r in 0..rounds {
        let a = ingest(&format!("ingest-{r}-a.zip"));
        polling.store(true, Ordering::SeqCst);
        let w = ingest(&format!("ingest-{r}-view.zip"));
        polling.store(false, Ordering::SeqCst);
        let b = ingest(&format!("ingest-{r}-b.zip"));
        ratios.push(w / ((a + b) / 2.0));
        without_mbps.push((a + b) / 2.0);
        with_mbps.push(w);
    }
    stop.store(true, Ordering::SeqCst);
    poller.thread().unpark();
    let polls = poller.join().unwrap();
    drop(view);
    println!(
        "ingest, {ingest_frames} frames of {frame_mb:.1} MB durable each: without a view {:.0} MB/s, with a view polling {:.0} MB/s ({polls} polls of 3 requests)",
        median(&without_mbps),
        median(&with_mbps)
    );
    println!(
        "summary: ingest with a view open and polling = {:.2} × without (rounds {}; target ≥ 0.95)",
        median(&ratios),
        list(&ratios)
    );
    d.terminate(Duration::from_secs(30));

    // 1. Statistics vs a plain read of the same bytes.
    let file = data.join("big.zip");
    let name = file.display().to_string();
    let mut ratios = Vec::new();
    let (mut t_read, mut t_stats) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let a = gtar::Archive::open(&file).unwrap();
        let mut n = 0u64;
        let entries: Vec<gtar::Entry> = a
            .index()
            .entries()
            .iter()
            .filter(|e| e.name().contains("/frames/") && e.name().contains("kernel"))
            .cloned()
            .collect();
        for e in &entries {
            n += a.read_entry(e).unwrap().len() as u64;
        }
        let read = t.elapsed().as_secs_f64();
        assert_eq!(n, stored, "the plain read reads every tensor byte");
        let t = Instant::now();
        let src: Arc<dyn gtar_logd::view::source::Source> =
            Arc::new(gtar_logd::view::source::Offline::new(vec![file.clone()]).unwrap());
        let engine = gtar_logd::view::engine::Engine::new(src, None);
        let s = engine.series(&name).unwrap();
        let stats = t.elapsed().as_secs_f64();
        assert_eq!(s.computed, (frames * TENSORS) as u64);
        t_read.push(stored as f64 / 1e6 / read);
        t_stats.push(stored as f64 / 1e6 / stats);
        ratios.push(read / stats);
    }
    println!(
        "statistics (min, max, mean, std, L2, zeros, NaN/Inf, 9 percentiles, histogram; update ratio and cosines to the previous and first frame): {:.0} MB/s; plain read_entry of the same bytes {:.0} MB/s (page cache warm)",
        median(&t_stats),
        median(&t_read)
    );
    println!(
        "summary: statistics = {:.2} × the speed of a plain read (rounds {}; target ≥ 0.5)",
        median(&ratios),
        list(&ratios)
    );

    // 3. Start to first data, statistics kept by an earlier view.
    {
        let v = View::start(&[file.to_str().unwrap()], &cache);
        v.get(&format!("/api/layers?name={}", q(&name)));
    }
    let (mut first, mut all) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let v = View::start(&[file.to_str().unwrap()], &cache);
        v.get(&format!("/api/archive?name={}", q(&name)));
        first.push(t.elapsed().as_secs_f64());
        v.get(&format!("/api/layers?name={}", q(&name)));
        all.push(t.elapsed().as_secs_f64());
    }
    println!(
        "summary: start of `gtar-logd view` on {frames} frames (statistics kept) to the archive page's data {:.3} s (rounds {}), to every frame's statistics {:.3} s (rounds {}; target ≤ 1 s)",
        median(&first),
        list(&first),
        median(&all),
        list(&all)
    );
}
