//! What a 100 MB save costs through this crate, with tensor bytes through the
//! socket and through shared memory, against the real daemon binary (release)
//! on a temp Unix socket.
//!
//! `cargo bench -p gtar-logd-client --bench throughput` writes BENCH_FRAMES
//! (default 8) frames of 6 × 2048×2048 f32 (100.7 MB, the Keras benchmark's
//! model), waiting for each to be durable before the next — a checkpoint per
//! epoch — in BENCH_ROUNDS (default 3) interleaved rounds of socket → shared
//! memory → socket. Each round's shared-memory numbers are compared with the
//! mean of the two socket runs around it; the medians are the headline.
//! Per frame it prints:
//! * wall time to durable, and MB/s;
//! * the time `write` takes (the caller's stall: building the frame and
//!   handing it over, which with shared memory includes the one copy);
//! * CPU of this process and of the daemon (all threads, from /proc). On a
//!   machine busy with training, that CPU is what a save takes from it.
//!
//! Then it reads the last frame back with `get_frame` (GetFrame over the Unix
//! socket, decoded into arrays) BENCH_READS (default 5) times and prints the
//! median time and MB/s.
//!
//! Every timed run starts after a `sync(2)`, outside the clock, so dirty pages
//! from earlier work are not written back during it. Timings are printed,
//! never asserted.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{env_u64, median};
use gtar_logd_client::ndarray::Array2;
use gtar_logd_client::{Client, NewFrame, OpenOptions};
use support::Daemon;

/// user + system CPU of a process (all its threads).
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / tck)
}

/// Per-frame means of one run.
#[derive(Clone, Copy, Debug)]
struct Run {
    wall: Duration,
    write: Duration,
    me: Duration,
    daemon: Duration,
    mb: f64,
}

async fn run(c: &Client, d: &Daemon, shm: bool, frames: u64, weights: &[Array2<f32>]) -> Run {
    let archive = if shm {
        "bench/shm.zip"
    } else {
        "bench/socket.zip"
    };
    let mut w = c
        .writer(archive, OpenOptions::replace().shared_memory(shm))
        .await
        .unwrap();
    assert_eq!(w.opened().shm_attached, shm, "{:?}", w.opened());
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let (me0, d0, t0) = (cpu(std::process::id()), cpu(d.pid()), Instant::now());
    let mut write = Duration::ZERO;
    for i in 0..frames {
        let t = Instant::now();
        let mut f = NewFrame::new(i.to_string());
        for (k, a) in weights.iter().enumerate() {
            f.push_tensor(format!("layer/{k}"), "weight", a);
        }
        let h = w.write(f).await.unwrap();
        write += t.elapsed();
        h.await.unwrap();
    }
    let wall = t0.elapsed();
    let (me, dc) = (cpu(std::process::id()) - me0, cpu(d.pid()) - d0);
    w.close().await.unwrap();
    std::fs::remove_file(d.data.join(archive)).unwrap(); // keep the disk from filling
    let n = frames as u32;
    let bytes: usize = weights.iter().map(|a| a.len() * 4).sum();
    Run {
        wall: wall / n,
        write: write / n,
        me: me / n,
        daemon: dc / n,
        mb: bytes as f64 * frames as f64 / wall.as_secs_f64() / 1e6,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn show(label: &str, r: &Run) {
    println!(
        "    {label:<13}: {:6.1} ms to durable ({:5.0} MB/s), write {:5.1} ms, CPU: this process {:5.1} ms, daemon {:5.1} ms",
        ms(r.wall),
        r.mb,
        ms(r.write),
        ms(r.me),
        ms(r.daemon)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let frames = env_u64("BENCH_FRAMES", 8).max(1);
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let weights: Vec<Array2<f32>> = (0..6)
        .map(|k| Array2::from_shape_fn((2048, 2048), |(i, j)| (i * 2048 + j + k) as f32 * 1e-6))
        .collect();
    println!(
        "100.7 MB frames (6 x 2048x2048 f32), durable per frame, {frames} frames a run, {rounds} round(s) of socket -> shared memory -> socket; per frame:"
    );
    // Warm-up: page in the daemon, the region and the disk path.
    run(&c, &d, true, 1, &weights).await;
    run(&c, &d, false, 1, &weights).await;
    let mut before = run(&c, &d, false, frames, &weights).await;
    let (mut speed, mut dcpu, mut mecpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let shm = run(&c, &d, true, frames, &weights).await;
        let after = run(&c, &d, false, frames, &weights).await;
        println!("  round {round}:");
        show("socket", &before);
        show("shared memory", &shm);
        show("socket", &after);
        let mean = |f: fn(&Run) -> f64| (f(&before) + f(&after)) / 2.0;
        speed.push(shm.mb / mean(|r| r.mb));
        dcpu.push(ms(shm.daemon) / mean(|r| ms(r.daemon)));
        mecpu.push(ms(shm.me) / mean(|r| ms(r.me)));
        before = after;
    }
    println!(
        "summary: shared memory / socket, median of {rounds} round(s): throughput {:.2}x, daemon CPU per frame {:.2}x, this process's CPU per frame {:.2}x",
        median(&speed),
        median(&dcpu),
        median(&mecpu)
    );

    // Reading back: a frame written once, fetched whole and decoded.
    let mut w = c
        .writer("bench/read.zip", OpenOptions::replace())
        .await
        .unwrap();
    let mut f = NewFrame::new("0");
    for (k, a) in weights.iter().enumerate() {
        f.push_tensor(format!("layer/{k}"), "weight", a);
    }
    w.write(f).await.unwrap().await.unwrap();
    w.close().await.unwrap();
    let bytes: usize = weights.iter().map(|a| a.len() * 4).sum();
    let mut times = Vec::new();
    for _ in 0..env_u64("BENCH_READS", 5).max(1) {
        let t = Instant::now();
        let f = c.get_frame("bench/read.zip", "0").await.unwrap();
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(f.tensors.len(), weights.len());
    }
    let t = median(&times);
    println!(
        "read back: get_frame of one 100.7 MB frame, median {:.1} ms ({:.0} MB/s)",
        t * 1e3,
        bytes as f64 / t / 1e6
    );
}
