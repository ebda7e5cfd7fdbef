//! Loading the newest 100 MB frame through this crate against a plain read
//! of the same bytes from the same file (issue 16, goal 2: ≥ 0.8 ×), with the
//! page cache cold and warm, against the real daemon binary (release) on a
//! temp Unix socket.
//!
//! `cargo bench -p gtar-logd-client --bench read` writes one frame of
//! 6 × 2048×2048 f32 (100.7 MB, the Keras benchmark's model), asks the daemon
//! where its tensors lie (GetFrame with `locate`), and then times, in
//! BENCH_ROUNDS (default 9) interleaved rounds of plain → not zeroed →
//! client → client with `verify_reads` → not zeroed → plain:
//! * plain: `pread` of each tensor's bytes into a fresh `vec![0u8; n]`,
//!   nothing else — the anchor; and, printed beside it, the same into a
//!   buffer not zeroed first (the client never zeroes the arrays it reads
//!   into; `calloc` of reused heap memory writes every byte);
//! * client: `Client::get_frame(archive, FrameSel::LAST)` — GetFrame over the
//!   socket, the daemon answering with locations, the located reads from the
//!   archive file straight into each array's memory (the default, as in
//!   Python: no CRC pass, see `Client::verify_reads`);
//! * the same with `verify_reads(true)`: CRC-32 checked as it is read.
//!
//! Then `tensor_history` of one 100 KB tensor over 1,000 frames against
//! plain preads of those bytes, warm and cold, the same way.
//!
//! Cold: every timed read starts after `sync` and `echo 3 >
//! /proc/sys/vm/drop_caches` (root only; skipped, and said so, otherwise).
//! Warm: after one untimed read. A round's ratio is the plain read's time
//! (mean of the two around it) over the client's: ≥ 1 means as fast as the
//! plain read. The median of the rounds is the headline. Printed, never
//! asserted.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{env_u64, list, median};
use gtar_logd_client::ndarray::Array2;
use gtar_logd_client::proto::{frame_data::Msg, get_frame_request::Frame as Sel};
use gtar_logd_client::{proto, Client, FrameSel, NewFrame, OpenOptions};
use support::Daemon;
use tokio_stream::StreamExt;

/// Write back dirty pages and drop the page cache; false if not allowed.
fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Where each tensor of the newest frame lies: (file, offset, length).
async fn locations(c: &Client, archive: &str) -> Vec<(String, u64, u64)> {
    let s = c
        .raw()
        .get_frame(proto::GetFrameRequest {
            archive: archive.into(),
            frame: Some(Sel::Position(-1)),
            locate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    located(s).await
}

/// Where each tensor of an answer asked with `locate` (not `batch`) lies.
async fn located(mut s: tonic::Streaming<proto::FrameData>) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        if let Some(Msg::Tensor(t)) = m.unwrap().msg {
            let loc = t
                .location
                .expect("the daemon located the tensor (same user, Unix socket)");
            out.push((loc.file, loc.offset, loc.length));
        }
    }
    out
}

/// The anchor: each tensor's bytes read into a fresh buffer, zeroed first
/// (`vec![0; n]`, as plain Rust does) or not (`zeroed == false`: `pread`
/// into a vector's spare capacity, as the client reads).
fn plain_read(locs: &[(String, u64, u64)], zeroed: bool) -> Duration {
    use std::os::fd::AsRawFd;
    let t = Instant::now();
    let f = std::fs::File::open(&locs[0].0).unwrap();
    let mut total = 0;
    for (_, off, len) in locs {
        let len = *len as usize;
        let buf = if zeroed {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, *off).unwrap();
            buf
        } else {
            let mut buf = Vec::<u8>::with_capacity(len);
            // SAFETY: pread writes at most `len` bytes into the spare
            // capacity; `set_len` covers only what it wrote (checked).
            unsafe {
                let n = libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), len, *off as i64);
                assert_eq!(n, len as isize, "one pread of a tensor's bytes");
                buf.set_len(len);
            }
            buf
        };
        total += buf.len();
        std::hint::black_box(&buf);
    }
    std::hint::black_box(total);
    t.elapsed()
}

async fn client_read(c: &Client, archive: &str, tensors: usize) -> Duration {
    let t = Instant::now();
    let f = c.get_frame(archive, FrameSel::LAST).await.unwrap();
    let el = t.elapsed();
    assert_eq!(f.tensors.len(), tensors);
    el
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env_u64("BENCH_ROUNDS", 9).max(1);
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let cv = c.clone().verify_reads(true);
    let archive = "bench/read.zip";
    let weights: Vec<Array2<f32>> = (0..6)
        .map(|k| Array2::from_shape_fn((2048, 2048), |(i, j)| (i * 2048 + j + k) as f32 * 1e-6))
        .collect();
    // Two frames, so the one read is the newest of several, as after a run.
    let mut w = c.writer(archive, OpenOptions::replace()).await.unwrap();
    for i in 0..2 {
        let mut f = NewFrame::new(i.to_string());
        for (k, a) in weights.iter().enumerate() {
            f.push_tensor(format!("layer/{k}"), "weight", a);
        }
        w.write(f).await.unwrap().await.unwrap();
    }
    w.close().await.unwrap();

    let locs = locations(&c, archive).await;
    assert_eq!(locs.len(), weights.len());
    let bytes: u64 = locs.iter().map(|l| l.2).sum();
    // What the client returns is what was written (checked once, untimed).
    let f = c.get_frame(archive, FrameSel::LAST).await.unwrap();
    for (k, a) in weights.iter().enumerate() {
        let got = f
            .get(&format!("layer/{k}"), "weight")
            .unwrap()
            .array
            .clone()
            .try_into_array::<f32>()
            .unwrap();
        assert_eq!(got, a.clone().into_dyn(), "layer/{k} reads back as written");
    }
    println!(
        "newest frame of {archive}: {} tensors, {:.1} MB; {rounds} rounds of plain → not zeroed → client get_frame → verified → not zeroed → plain",
        locs.len(),
        bytes as f64 / 1e6
    );

    let can_drop = drop_caches();
    let mut summary = Vec::new();
    for cold in [false, true] {
        let label = if cold { "cold" } else { "warm" };
        if cold && !can_drop {
            println!("== cold: skipped (writing /proc/sys/vm/drop_caches needs root)");
            continue;
        }
        let prep = || {
            if cold {
                drop_caches();
            }
        };
        if !cold {
            plain_read(&locs, true);
            client_read(&c, archive, locs.len()).await;
        }
        println!("== page cache {label}");
        let mut ratios = Vec::new();
        let mut unzeroed = Vec::new();
        let mut checked = Vec::new();
        let mut ours = Vec::new();
        for r in 1..=rounds {
            prep();
            let a = plain_read(&locs, true);
            prep();
            let ua = plain_read(&locs, false);
            prep();
            let m = client_read(&c, archive, locs.len()).await;
            prep();
            let v = client_read(&cv, archive, locs.len()).await;
            prep();
            let ub = plain_read(&locs, false);
            prep();
            let b = plain_read(&locs, true);
            let anchor = (a + b) / 2;
            let uanchor = (ua + ub) / 2;
            let ratio = anchor.as_secs_f64() / m.as_secs_f64();
            ratios.push(ratio);
            unzeroed.push(uanchor.as_secs_f64() / m.as_secs_f64());
            checked.push(anchor.as_secs_f64() / v.as_secs_f64());
            ours.push(m.as_secs_f64());
            println!(
                "  round {r}: plain {:.1} / {:.1} ms ({:.2} GB/s), not zeroed {:.1} / {:.1} ms; client {:.1} ms ({:.2} GB/s), ratio {ratio:.2} ({:.2} to not zeroed); with verify_reads {:.1} ms, ratio {:.2}",
                a.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                bytes as f64 / anchor.as_secs_f64() / 1e9,
                ua.as_secs_f64() * 1e3,
                ub.as_secs_f64() * 1e3,
                m.as_secs_f64() * 1e3,
                bytes as f64 / m.as_secs_f64() / 1e9,
                unzeroed[unzeroed.len() - 1],
                v.as_secs_f64() * 1e3,
                checked[checked.len() - 1],
            );
        }
        let med = median(&ratios);
        println!(
            "  client / plain read: median {med:.2} of [{}] (target ≥ 0.80){}; / a plain read into memory not zeroed first: {:.2}; with verify_reads(true) (CRC-checked): {:.2}",
            list(&ratios),
            if med >= 0.8 { "" } else { "  << BELOW TARGET" },
            median(&unzeroed),
            median(&checked),
        );
        summary.push((label, med, median(&ours)));
    }
    for (label, med, t) in summary {
        println!(
            "summary: Rust get_frame of the newest 100.7 MB frame, {label}: {med:.2} × a plain read of the same bytes (median; client {:.1} ms)",
            t * 1e3
        );
    }
    history(&c, rounds, can_drop).await;
}

/// `tensor_history` of one 100 KB tensor over 1,000 frames against plain
/// preads of those bytes (each into a fresh `vec![0u8; n]`, all kept).
async fn history(c: &Client, rounds: u64, can_drop: bool) {
    let archive = "bench/history.zip";
    let frames = 1000;
    let mut w = c.writer(archive, OpenOptions::replace()).await.unwrap();
    let mut last = None;
    for i in 0..frames {
        let a = gtar_logd_client::ndarray::Array1::from_shape_fn(25_000, |j| (i * j) as f32);
        let mut f = NewFrame::new(i.to_string());
        f.push_tensor("hist", "b", &a);
        last = Some(w.write(f).await.unwrap());
    }
    last.unwrap().await.unwrap();
    w.close().await.unwrap();
    let s = c
        .raw()
        .tensor_history(proto::TensorHistoryRequest {
            archive: archive.into(),
            group: "hist".into(),
            name: "b".into(),
            locate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let locs = located(s).await;
    assert_eq!(locs.len(), frames);
    let plain = |locs: &[(String, u64, u64)]| {
        let t = Instant::now();
        let f = std::fs::File::open(&locs[0].0).unwrap();
        let kept: Vec<Vec<u8>> = locs
            .iter()
            .map(|(_, off, len)| {
                let mut buf = vec![0u8; *len as usize];
                f.read_exact_at(&mut buf, *off).unwrap();
                buf
            })
            .collect();
        std::hint::black_box(kept);
        t.elapsed()
    };
    println!("== tensor_history of one 100 KB tensor over {frames} frames");
    for cold in [false, true] {
        if cold && !can_drop {
            continue;
        }
        let prep = || cold && drop_caches();
        let mut ratios = Vec::new();
        for _ in 0..rounds {
            prep();
            let a = plain(&locs);
            prep();
            let t = Instant::now();
            let got = c
                .tensor_history(archive, "hist", "b", 0, None)
                .await
                .unwrap();
            let m = t.elapsed();
            assert_eq!(got.len(), frames);
            prep();
            let b = plain(&locs);
            ratios.push(((a + b) / 2).as_secs_f64() / m.as_secs_f64());
        }
        let label = if cold { "cold" } else { "warm" };
        println!(
            "summary: Rust tensor_history, {label}: {:.2} × plain preads of the same bytes (median of [{}]; target ≥ 0.80)",
            median(&ratios),
            list(&ratios)
        );
    }
}
