//! Remote storage against a local S3 server (s3s-fs), ratios against an
//! anchor in the same run, interleaved rounds, medians:
//! - replication of a 100 MB frame (durable ack → replicated ack, through the
//!   real daemon) vs a plain `object_store` multipart upload of 100 MB;
//! - GetFrame of that frame from a remote-only archive (a daemon with an
//!   empty data dir) vs a plain ranged GET of the same bytes; and the
//!   requests one remote read of the tensor makes after the first (counted
//!   by the remote reader the daemon uses, run in this process).
//!
//! - the metadata (packs and manifest) one commit uploads at 10 and at
//!   10,000 frames, computed by the daemon's own commit planner
//!   (`Manifest::push`), next to what format 1 (the whole directory per
//!   commit) uploaded.
//!
//! `cargo bench --bench remote` (GTAR_BENCH_ROUNDS, default 3).

mod common;
#[path = "../tests/common/daemon.rs"]
mod daemon;
#[path = "../tests/common/s3.rs"]
mod s3;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::median;
use daemon::*;
use futures::TryStreamExt;
use gtar_logd::proto::v1 as pb;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use s3::S3Server;

const MB100: u64 = 100_000_000;

fn frame(k: u64) -> FrameSpec {
    FrameSpec {
        index: k.to_string(),
        tensors: vec![TensorSpec::new(
            "model",
            "w",
            pb::DType::Uint8,
            &[MB100],
            Payload::Gen {
                seed: k,
                len: MB100,
            },
        )],
        ..Default::default()
    }
}

/// Metadata bytes per commit of frames of 8 tensors, averaged over commits
/// `at - window .. at` (merges included).
fn manifest_cost() {
    use gtar_logd::remote::manifest::{Manifest, RemoteEntry};
    let mut m = Manifest::new("18c0ffee000011".into());
    let mut per_commit = Vec::new();
    let mut v1 = Vec::new();
    for k in 0..10_000u64 {
        let entries: Vec<RemoteEntry> = (0..8)
            .map(|t| RemoteEntry {
                name: format!("frames/{k}/model/layer{t}/kernel.f32.uni"),
                method: 0,
                flags: 0,
                crc32: 0x1234_5678,
                csize: 1 << 20,
                usize: 1 << 20,
                offset: k * 9_000_000 + t * 1_100_000,
                data: Some(k * 9_000_000 + t * 1_100_000 + 80),
            })
            .collect();
        let c = m.push(
            format!("@seg/18c0ffee000011-{:020}", k * 9_000_000),
            9_000_000,
            entries,
            &format!("{k:x}"),
        );
        per_commit.push(c.bytes());
        if k == 9 || k == 9_999 {
            // Format 1 put the whole manifest, entries inline, every commit.
            v1.push(serde_json::to_vec(&m.entries).unwrap().len() + 64 * m.segments.len());
        }
    }
    let mean = |r: std::ops::Range<usize>| {
        per_commit[r.clone()].iter().sum::<usize>() as f64 / r.len() as f64
    };
    let (a, b) = (mean(0..10), mean(10_000 - 4096..10_000));
    println!(
        "manifest bytes uploaded per commit (8-tensor frames, merges amortized): {a:.0} at 10 frames, {b:.0} at 10,000 frames (ratio {:.2}); format 1 uploaded {} and {} (ratio {:.0})",
        b / a,
        v1[0],
        v1[1],
        v1[1] as f64 / v1[0] as f64
    );
}

fn main() {
    manifest_cost();
    let rounds: usize = std::env::var("GTAR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = temp_root("bench-remote");
    let s3 = S3Server::start(&dir.path().join("s3"));
    s3.bucket("bench");
    // This process reads the store too (anchors, request counts).
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::from_env()
            .with_bucket_name("bench")
            .build()
            .unwrap(),
    );
    let payload = bytes::Bytes::from(
        Payload::Gen {
            seed: 99,
            len: MB100,
        }
        .to_vec(),
    );

    let data = dir.path().join("node1");
    std::fs::create_dir_all(&data).unwrap();
    let uds = dir.path().join("n1.sock");
    let d1 = ChildDaemon::spawn_with(&data, &uds, None, &dir.path().join("n1.log"), |c| {
        s3.apply(c);
        c.arg("--remote").arg("s3://bench/r");
    });

    let (mut plain, mut repl) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let mut c = connect_uds(&d1.uds).await;
        let mut s = Session::open(&mut c, open_req("big.zip", ""))
            .await
            .unwrap();
        for r in 0..rounds {
            // Anchor: a plain multipart upload of the same size.
            let t = Instant::now();
            let up = store
                .put_multipart(&Key::from(format!("anchor/{r}")))
                .await
                .unwrap();
            let mut w = WriteMultipart::new_with_chunk_size(up, 16 << 20);
            for at in (0..payload.len()).step_by(16 << 20) {
                w.wait_for_capacity(4).await.unwrap();
                w.put(payload.slice(at..payload.len().min(at + (16 << 20))));
            }
            w.finish().await.unwrap();
            plain.push(t.elapsed().as_secs_f64());

            s.send_frame(&frame(r as u64), 4 << 20).await.unwrap();
            s.wait_durable(r + 1).await.unwrap();
            let t = Instant::now();
            s.wait_replicated(r + 1).await.unwrap();
            repl.push(t.elapsed().as_secs_f64());
        }
    });
    drop(d1);
    let (p, q) = (median(&plain), median(&repl));
    println!(
        "replication of a 100 MB frame: {:.0} MB/s (median of {rounds}); plain multipart upload: {:.0} MB/s; ratio {:.2} (goal >= 0.7)",
        100.0 / q,
        100.0 / p,
        p / q
    );

    // Reads: a daemon with an empty data dir, and the same reader in-process.
    let empty = dir.path().join("node2");
    std::fs::create_dir_all(&empty).unwrap();
    let uds2 = dir.path().join("n2.sock");
    let d2 = ChildDaemon::spawn_with(&empty, &uds2, None, &dir.path().join("n2.log"), |c| {
        s3.apply(c);
        c.arg("--remote").arg("s3://bench/r");
    });
    let remote =
        gtar_logd::remote::Remote::from_env("s3://bench/r".parse().unwrap(), rt.handle().clone())
            .unwrap();
    let (mut getf, mut ranged, mut reqs) = (Vec::new(), Vec::new(), Vec::new());
    let seg_key = rt.block_on(async {
        let (m, _) = remote.manifest("big.zip").await.unwrap().unwrap();
        let e = m
            .entries
            .iter()
            .find(|e| e.name.ends_with("frames/0/w.u8.uni"))
            .unwrap()
            .clone();
        let seg = m
            .segments
            .iter()
            .find(|s| s.offset <= e.offset && e.offset < s.offset + s.len)
            .unwrap();
        let start = e.data.unwrap() - seg.offset;
        (
            Key::from(format!("r/big.zip/{}", seg.key)),
            start..start + e.csize,
        )
    });
    // The first request loads and caches the index.
    rt.block_on(async {
        let mut c = connect_uds(&d2.uds).await;
        get_frame(&mut c, "big.zip", "", by_index("0"))
            .await
            .unwrap();
    });
    let _ = std::thread::scope(|sc| {
        sc.spawn(|| remote.open_read("big.zip").unwrap())
            .join()
            .unwrap()
    });
    for _ in 0..rounds {
        let t = Instant::now();
        let got = rt.block_on(async {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(seg_key.1.clone())),
                ..Default::default()
            };
            let r = store.get_opts(&seg_key.0, opts).await.unwrap();
            let mut n = 0;
            let mut st = r.into_stream();
            while let Some(b) = st.try_next().await.unwrap() {
                n += b.len();
            }
            n
        });
        ranged.push(t.elapsed().as_secs_f64());
        assert_eq!(got as u64, MB100);

        let t = Instant::now();
        let got = rt.block_on(async {
            let mut c = connect_uds(&d2.uds).await;
            get_frame(&mut c, "big.zip", "", by_index("0"))
                .await
                .unwrap()
        });
        getf.push(t.elapsed().as_secs_f64());
        assert_eq!(got[0].data.len() as u64, MB100);

        // The same read in-process, counting its requests.
        let before = remote.read_requests.load(Ordering::Relaxed);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let (a, _) = remote.open_read("big.zip").unwrap();
                let e = a
                    .index()
                    .entries()
                    .iter()
                    .find(|e| e.name().ends_with("frames/0/w.u8.uni"))
                    .unwrap()
                    .clone();
                let mut r = a.entry_reader(&e).unwrap();
                std::io::copy(&mut r, &mut std::io::sink()).unwrap();
            });
        });
        reqs.push(remote.read_requests.load(Ordering::Relaxed) - before);
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(d2);
    let (g, r) = (median(&getf), median(&ranged));
    println!(
        "GetFrame of a 100 MB frame from a remote-only archive: {:.0} MB/s (median of {rounds}); plain ranged GET: {:.0} MB/s; ratio {:.2} (goal >= 0.7)",
        100.0 / g,
        100.0 / r,
        r / g
    );
    println!("requests per read of the 100 MB tensor after the first: {reqs:?} (index cached; a manifest revalidation every 2 s adds one)");
}
