//! A well-behaved writer with and without 50 hostile clients connected, in
//! one run (`cargo bench --bench hostile`): the real daemon binary on a Unix
//! socket, a health prober on its own connection.
//!
//! Hostile clients: 25 open a frame in the well-behaved writer's own archive
//! (other groups) and stall or trickle a byte every 200 ms inside it (small
//! frames, assembled apart by the daemon); 25 stall inside a big frame
//! (5 MiB sent of 64 MiB, streaming) of another archive, holding that
//! archive's writer until the frame deadline.
//!
//! The clock of a hostile run starts one second after every hostile client
//! has sent what it sends before it stalls (its `begin`, header and first
//! bytes) — the state "50 hostile clients connected" — so their opening
//! burst (125 MiB from the 25 big frames) is not counted against the writer;
//! the 200 ms trickle keeps going through the timed run.
//!
//! BENCH_TRICKLE=0 makes every hostile client stall (none trickles).
//!
//! Rounds alternate quiet → hostile → quiet (BENCH_ROUNDS, default 5); each
//! timed run writes BENCH_FRAMES (default 24) frames of 16 MiB and waits for
//! the last `durable` ack, after a `sync(2)` outside the clock (dirty pages
//! left by earlier work are not written back during it). Per round: the
//! hostile run's throughput over the mean of its two quiet neighbours, and
//! the health-check p99 of each. The median ratio is the headline (target ≥
//! 0.9), with the medians of the health p99s. Printed, never asserted.

mod common;
#[path = "../tests/common/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use common::{env_u64, list, median};
use daemon::*;
use gtar_logd::proto::v1::{self as pb, write_request::Msg as In};
use prost::bytes::Bytes;

const FRAME: u64 = 16 << 20;

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Stall (or trickle) inside a frame until aborted.
/// `ready` is dropped once the client stalls (sent its head, or failed).
async fn hostile(
    uds: std::path::PathBuf,
    archive: String,
    group: String,
    size: u64,
    head: usize,
    trickle: bool,
    ready: tokio::sync::mpsc::Sender<()>,
) {
    let mut c = connect_uds(&uds).await;
    let Ok(mut s) = Session::open(&mut c, open_req(&archive, &group)).await else {
        return;
    };
    let msgs = [
        In::Begin(pb::BeginFrame { index: "1".into() }),
        In::Tensor(pb::TensorHeader {
            group: String::new(),
            name: "x".into(),
            dtype: pb::DType::Uint8 as i32,
            shape: vec![size],
            ..Default::default()
        }),
        In::Chunk(pb::Chunk {
            data: Bytes::from(vec![1u8; head]),
        }),
    ];
    for m in msgs {
        if s.send(req(m)).await.is_err() {
            return;
        }
    }
    drop(ready);
    loop {
        if trickle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let one = req(In::Chunk(pb::Chunk {
                data: Bytes::from_static(b"t"),
            }));
            if s.send(one).await.is_err() {
                return;
            }
        } else if s.next().await.is_err() {
            return;
        }
    }
}

/// Write `n` frames of FRAME bytes back to back; time to the last durable ack.
async fn writer(uds: &std::path::Path, archive: &str, n: u64) -> Duration {
    let mut c = connect_uds(uds).await;
    let data = Payload::Shared(Bytes::from(vec![3u8; FRAME as usize]));
    let t0 = Instant::now();
    let mut s = Session::open(&mut c, open_req(archive, "good"))
        .await
        .unwrap();
    for i in 0..n {
        let f = FrameSpec {
            index: i.to_string(),
            tensors: vec![TensorSpec::new(
                "",
                "w",
                pb::DType::Uint8,
                &[FRAME],
                data.clone(),
            )],
            ..Default::default()
        };
        s.send_frame(&f, 4 << 20).await.unwrap();
    }
    s.wait_durable(n as usize).await.unwrap();
    let t = t0.elapsed();
    s.finish().await.unwrap();
    t
}

fn main() {
    let frames = env_u64("BENCH_FRAMES", 24);
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1);
    // BENCH_TRICKLE=0: every hostile client stalls, none trickles (to tell
    // the two costs apart).
    let trickle = env_u64("BENCH_TRICKLE", 1) != 0;
    let tmp = temp_root("bench-hostile-");
    let data = tmp.path().join("data");
    let uds = tmp.path().join("logd.sock");
    let log = tmp.path().join("daemon.log");
    let _d = ChildDaemon::spawn(&data, &uds, None, &log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut run_no = 0;
        // One timed run: (throughput GB/s, health p99).
        let mut run = |with_hostiles: bool| {
            run_no += 1;
            let uds = uds.clone();
            let archive = format!("good-{run_no}.zip");
            async move {
                let mut tasks = Vec::new();
                if with_hostiles {
                    let (ready, mut all_ready) = tokio::sync::mpsc::channel::<()>(1);
                    for i in 0..50u64 {
                        let (a, size, head) = if i < 25 {
                            (archive.clone(), 1 << 20, 1000)
                        } else {
                            (format!("hostile-{run_no}.zip"), 64 << 20, 5 << 20)
                        };
                        tasks.push(tokio::spawn(hostile(
                            uds.clone(),
                            a,
                            format!("h{i}"),
                            size,
                            head,
                            trickle && i % 2 == 1,
                            ready.clone(),
                        )));
                    }
                    drop(ready);
                    // Every sender dropped: all 50 sent their head (or failed).
                    // A sent message may still sit in the HTTP/2 window on
                    // its way to the daemon: a second for it to arrive.
                    let _ = all_ready.recv().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // SAFETY: sync(2) takes no arguments and cannot fail.
                unsafe { libc::sync() };
                let stop = tokio_util::sync::CancellationToken::new();
                let prober = {
                    let (uds, stop) = (uds.clone(), stop.clone());
                    tokio::spawn(async move {
                        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
                        let mut h = HealthClient::new(uds_channel(&uds).await.unwrap());
                        let mut lat = Vec::new();
                        while !stop.is_cancelled() {
                            let t0 = Instant::now();
                            let _ = h.check(HealthCheckRequest { service: String::new() }).await;
                            lat.push(t0.elapsed());
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        lat
                    })
                };
                let t = writer(&uds, &archive, frames).await;
                stop.cancel();
                let lat = prober.await.unwrap();
                for t in tasks {
                    t.abort();
                }
                let gbs = (frames * FRAME) as f64 / t.as_secs_f64() / 1e9;
                (gbs, p99(lat))
            }
        };
        println!(
            "{rounds} rounds of quiet → 50 hostile clients → quiet; {frames} frames × 16 MiB per run, durable; daemon {}",
            daemon_bin().display()
        );
        let mut ratios = Vec::new();
        let (mut quiet_p99, mut hostile_p99) = (Vec::new(), Vec::new());
        let mut before = run(false).await;
        for r in 1..=rounds {
            let hostile = run(true).await;
            let after = run(false).await;
            let quiet = (before.0 + after.0) / 2.0;
            let ratio = hostile.0 / quiet;
            println!(
                "round {r}: quiet {:.2} / {:.2} GB/s (health p99 {:.1?} / {:.1?}); with 50 hostile clients {:.2} GB/s (health p99 {:.1?}); ratio {ratio:.2}",
                before.0, after.0, before.1, after.1, hostile.0, hostile.1
            );
            ratios.push(ratio);
            quiet_p99.push(before.1.as_secs_f64() * 1e3);
            hostile_p99.push(hostile.1.as_secs_f64() * 1e3);
            before = after;
        }
        println!(
            "summary: well-behaved writer with 50 hostile clients connected: {:.2}x its throughput without them (median of {} rounds: {}; target >= 0.9); health p99 median {:.1} ms with them, {:.1} ms without (target: 100 ms)",
            median(&ratios),
            ratios.len(),
            list(&ratios),
            median(&hostile_p99),
            median(&quiet_p99),
        );
    });
}
