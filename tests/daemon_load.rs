//! Load, against the real binary as a child process (so its peak RSS can be
//! read from /proc): 16 clients stream to 16 archives and 4 more to one
//! shared archive, while 4 others query. Afterwards every frame that was
//! acked durable is present and bit-exact, and the daemon's peak RSS
//! (VmHWM) is printed and held to a bound. Through the project's Rust
//! client, bytes over the socket (shared memory would count in the RSS).

#[path = "common/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use daemon::*;
use gtar_logd::proto::v1::DType;
use tokio::sync::watch;
use tonic::Code;

const FRAMES: u64 = 12;
const SHARED: &str = "load/shared.zip";

fn frame(writer: u64, n: u64) -> FrameSpec {
    // Indices of the shared archive's writers do not collide: writer w
    // writes w*1000 + n.
    let index = writer * 1000 + n;
    let len = (512 << 10) + ((writer * 7919 + n * 104_729) % (1536 << 10)) / 4 * 4;
    FrameSpec {
        index: index.to_string(),
        tensors: vec![TensorSpec::new(
            "layer",
            "w",
            DType::Float32,
            &[len / 4],
            Payload::Gen {
                seed: writer << 32 | n,
                len,
            },
        )],
        records: vec![],
        scalars: vec![("m".into(), "loss".into(), n as f64)],
    }
}

fn archive_of(writer: u64) -> String {
    if writer < 16 {
        format!("load/a{writer:02}.zip")
    } else {
        SHARED.to_string()
    }
}

#[test]
fn twenty_writers_and_four_readers_lose_nothing_and_memory_stays_bounded() {
    let tmp = temp_root("load-");
    let data = tmp.path().join("data");
    let uds = tmp.path().join("logd.sock");
    let mut d = ChildDaemon::spawn(&data, &uds, None, &tmp.path().join("daemon.log"));
    let address = format!("unix:{}", uds.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    // The writers run as local tasks: `FrameWriter::write`'s future is not
    // `Send` (a watch::Ref held across an await in the client's shm_span).
    let local = tokio::task::LocalSet::new();
    let (acked, queries) = local.block_on(&rt, async {
        let (done_tx, done_rx) = watch::channel(false);
        let mut writers = Vec::new();
        for w in 0..20u64 {
            let address = address.clone();
            writers.push(tokio::task::spawn_local(async move {
                let c = logd::Client::connect(&address).await.unwrap();
                // The shared archive's writers write one group on purpose.
                let mut opts = append("");
                opts.share_group = archive_of(w) == SHARED;
                let mut s = c.writer(&archive_of(w), opts).await.unwrap();
                let mut handles = Vec::new();
                for n in 0..FRAMES {
                    handles.push(s.write(frame(w, n).new_frame()).await.unwrap());
                }
                let mut durable = Vec::new();
                for h in handles {
                    durable.push(h.durable().await.unwrap().index);
                }
                s.close().await.unwrap();
                assert_eq!(durable.len() as u64, FRAMES, "writer {w}");
                (w, durable)
            }));
        }
        let mut readers = Vec::new();
        for r in 0..4u64 {
            let address = address.clone();
            let done = done_rx.clone();
            readers.push(tokio::spawn(async move {
                let c = logd::Client::connect(&address).await.unwrap();
                let mut n = 0u64;
                let ok_or_absent = |res: logd::Result<()>, what: &str| match res {
                    Ok(()) => {}
                    Err(e) if e.code() == Some(Code::NotFound) => {}
                    Err(e) => panic!("reader {r}: {what}: {e:?}"),
                };
                while !*done.borrow() {
                    let a = archive_of((n + r) % 17); // 16 = the shared archive
                    let l = c.list_archives("").await.unwrap();
                    assert!(l.len() <= 17);
                    ok_or_absent(c.list_frames(&a, "").await.map(|_| ()), "ListFrames");
                    ok_or_absent(c.describe(&a).await.map(|_| ()), "DescribeArchive");
                    ok_or_absent(
                        c.get_frame(&a, logd::FrameSel::LAST).await.map(|_| ()),
                        "GetFrame",
                    );
                    n += 1;
                }
                n * 4
            }));
        }
        let mut acked = Vec::new();
        for w in writers {
            acked.push(w.await.unwrap());
        }
        done_tx.send(true).unwrap();
        let mut queries = 0;
        for r in readers {
            queries += r.await.unwrap();
        }
        (acked, queries)
    });
    let ingest_time = started.elapsed();
    let hwm_ingest = d.vm_hwm_kib();

    // Every acked frame is there, bit-exact, and nothing else.
    rt.block_on(async {
        let c = logd::Client::connect(&address).await.unwrap();
        for (w, indices) in &acked {
            let a = archive_of(*w);
            let listed = c.list_frames(&a, "").await.unwrap();
            for (n, i) in indices.iter().enumerate() {
                let f = frame(*w, n as u64);
                assert_eq!(*i, f.index);
                assert!(listed.contains(i), "{a}: acked frame {i} missing");
                assert_frame_matches(&c.get_frame(&a, i.as_str()).await.unwrap(), &f);
            }
        }
        let shared = c.list_frames(SHARED, "").await.unwrap();
        assert_eq!(shared.len() as u64, 4 * FRAMES);
        for k in 0..16 {
            assert_eq!(
                c.list_frames(&archive_of(k), "").await.unwrap().len() as u64,
                FRAMES
            );
        }
    });
    let hwm = d.vm_hwm_kib();
    d.terminate(Duration::from_secs(30));
    let total: u64 = (0..20)
        .flat_map(|w| (0..FRAMES).map(move |n| frame(w, n).tensors[0].data.len()))
        .sum();
    println!(
        "load: 20 writers ({} MiB in {} frames) + 4 readers ({queries} queries) in {:.1} s; daemon peak RSS (VmHWM) {} MiB during ingest, {} MiB overall",
        total >> 20,
        20 * FRAMES,
        ingest_time.as_secs_f64(),
        hwm_ingest >> 10,
        hwm >> 10
    );
    // 20 streams × (4 buffered parts + an h2 window) of ≤ 1 MiB chunks, plus
    // readers' 1 MiB chunks: far below this.
    assert!(hwm < 512 << 10, "daemon peak RSS {} MiB", hwm >> 10);
}
