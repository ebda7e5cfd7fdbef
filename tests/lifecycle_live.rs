//! The lifecycle on a live archive, through the real daemon: the `Compact`
//! and `Snapshot` RPCs while a stream writes, `kill -9` of the daemon at
//! random points of a live compaction, and both RPCs from grpcurl. Tests
//! that need libgetar or grpcurl are `#[ignore]`d in a plain `cargo test`;
//! `./test.sh` runs them with GTAR_ORACLE_PYTHON set. The kill test replays
//! with GTAR_TEST_SEED=<seed>.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use daemon::*;
use gtar::{Archive, ArchiveWriter, Compression, OpenMode, OpenState};
use gtar_logd::proto::v1::DType;
use rand::{Rng, SeedableRng};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Frame `i` of the streamed run: one f32 tensor `run/w` of `len` bytes.
fn frame(i: u64, len: u64) -> FrameSpec {
    FrameSpec {
        index: i.to_string(),
        tensors: vec![TensorSpec::new(
            "w",
            "value",
            DType::Float32,
            &[len / 4],
            Payload::Gen { seed: i, len },
        )],
        ..Default::default()
    }
}

/// The bytes of frame `f`'s tensor in the archive file, if it is there.
fn tensor_in(a: &Archive, f: &str) -> Option<Vec<u8>> {
    a.read(&format!("run/w/frames/{f}/value.f32.uni")).ok()
}

/// What a stream acked: frame index → when its `durable` ack came.
type Acks = Arc<Mutex<BTreeMap<u64, Instant>>>;

/// Stream frames `from..` into `archive` (group `run`) until `stop`; each
/// durable ack is recorded with its time.
async fn stream(
    c: logd::Client,
    archive: String,
    from: u64,
    len: u64,
    acks: Acks,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut w = c.writer(&archive, append("run")).await.unwrap();
    let mut i = from;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let h = w.write(frame(i, len).new_frame()).await.unwrap();
        h.durable().await.unwrap();
        acks.lock().unwrap().insert(i, Instant::now());
        i += 1;
    }
    w.close().await.unwrap();
}

/// Wait until `n` acks arrived; fails the test after 120 s instead of
/// hanging it (a stream that died stops acking).
async fn wait_acks(acks: &Acks, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got = acks.lock().unwrap().len();
        if got >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {got} of {n} acks within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn live_compact_while_streaming(oracle_too: bool) {
    let mut d = Daemon::start();
    let rt = rt();
    let name = "runs/live.zip";
    const K: u64 = 4;
    // 48 frames of 2 MiB before the stream starts: the copy of the kept
    // ones runs while the stream writes.
    let before: Vec<FrameSpec> = (0..48).map(|i| frame(i, 2 << 20)).collect();
    let (result, acks, t_compact) = rt.block_on(async {
        let c = d.client().await;
        write_client(&c, name, append("run"), &before)
            .await
            .unwrap();
        let acks: Acks = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streamer = tokio::spawn(stream(
            c.clone(),
            name.into(),
            100,
            64 << 10,
            acks.clone(),
            stop.clone(),
        ));
        wait_acks(&acks, 5).await;
        let keep = logd::KeepPolicy {
            every: Some(K),
            ..Default::default()
        };
        // A dry run first: it changes nothing.
        let dry = c.compact(name, "run", keep.clone(), true).await.unwrap();
        assert!(!dry.written && !dry.dropped.is_empty(), "{dry:?}");
        let t0 = Instant::now();
        let result = c.compact(name, "run", keep, false).await.unwrap();
        let t1 = Instant::now();
        // Acks still come after the swap: frames go to the new file.
        let n = acks.lock().unwrap().len();
        wait_acks(&acks, n + 5).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        streamer.await.unwrap();
        let acks = acks.lock().unwrap().clone();
        (result, acks, (t0, t1))
    });
    d.stop().unwrap();
    eprintln!(
        "compaction: {} kept, {} dropped, {} bytes reclaimed, {:?}; {} frames streamed",
        result.kept.len(),
        result.dropped.len(),
        result.bytes_reclaimed,
        t_compact.1 - t_compact.0,
        acks.len()
    );
    assert!(result.written);
    let during = acks
        .values()
        .filter(|&&t| t > t_compact.0 && t < t_compact.1)
        .count();
    eprintln!("{during} frames acked durable while the compaction ran");
    assert!(
        during > 0,
        "no frame was acked while the compaction ran: it held the writer"
    );
    let path = d.data.join(name);
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    let present: BTreeSet<String> = a.index().frames_under(Some("run")).into_iter().collect();
    let dropped: BTreeSet<String> = result.dropped.iter().cloned().collect();
    assert!(
        present.is_disjoint(&dropped),
        "dropped frames are still there"
    );
    let all: Vec<u64> = (0..48).chain(acks.keys().copied()).collect();
    for i in &all {
        let f = i.to_string();
        match tensor_in(&a, &f) {
            Some(b) => assert!(
                b == frame(*i, if *i < 100 { 2 << 20 } else { 64 << 10 }).tensors[0]
                    .data
                    .to_vec(),
                "frame {f}: bytes differ"
            ),
            None => {
                assert!(
                    dropped.contains(&f),
                    "frame {f} was acked, is not in `dropped`, and is gone"
                );
                assert!(i % K != 0, "frame {f}: the policy keeps it, yet it is gone");
            }
        }
    }
    // Every frame acked after the compaction returned is there.
    for (i, t) in &acks {
        if *t > t_compact.1 {
            assert!(present.contains(&i.to_string()), "frame {i}");
        }
    }
    assert!(
        std::fs::metadata(&path).unwrap().len() < 48 * (2 << 20) / 2,
        "the file did not shrink"
    );
    if oracle_too {
        let theirs = oracle_view(&path, false);
        assert_same_view(&rust_view(&path, false), &theirs, "live compaction");
    }
}

#[test]
fn live_compact_while_a_stream_writes_keeps_every_acked_frame_the_policy_keeps() {
    live_compact_while_streaming(false);
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_libgetar_opens_an_archive_compacted_while_a_stream_wrote() {
    live_compact_while_streaming(true);
}

fn snapshot_under_writes(oracle_too: bool) {
    let mut d = Daemon::start();
    let rt = rt();
    let name = "runs/snap.zip";
    let (acked_before, s) = rt.block_on(async {
        let c = d.client().await;
        let acks: Acks = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streamer = tokio::spawn(stream(
            c.clone(),
            name.into(),
            0,
            256 << 10,
            acks.clone(),
            stop.clone(),
        ));
        wait_acks(&acks, 20).await;
        let acked_before: BTreeSet<u64> = acks.lock().unwrap().keys().copied().collect();
        let s = c.snapshot(name, "snaps/copy.zip").await.unwrap();
        // The stream goes on; the source is untouched.
        let n = acks.lock().unwrap().len();
        wait_acks(&acks, n + 5).await;
        // Never over an existing archive.
        let e = c.snapshot(name, "snaps/copy.zip").await.unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        let e = c
            .snapshot("runs/none.zip", "snaps/x.zip")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(logd::Code::NotFound), "{e}");
        let e = c.snapshot(name, "../outside.zip").await.unwrap_err();
        assert_eq!(e.code(), Some(logd::Code::PermissionDenied), "{e}");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        streamer.await.unwrap();
        (acked_before, s)
    });
    d.stop().unwrap();
    let copy = d.data.join("snaps/copy.zip");
    assert_eq!(s.size_bytes, std::fs::metadata(&copy).unwrap().len());
    let a = Archive::open(&copy).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    let frames = a.index().frames_under(None);
    assert_eq!(frames.len() as u64, s.frame_count);
    for i in &acked_before {
        let got = tensor_in(&a, &i.to_string())
            .unwrap_or_else(|| panic!("frame {i} was acked durable before the snapshot"));
        assert!(
            got == frame(*i, 256 << 10).tensors[0].data.to_vec(),
            "frame {i}"
        );
    }
    if oracle_too {
        let theirs = oracle_view(&copy, false);
        assert_same_view(&rust_view(&copy, false), &theirs, "snapshot");
        let run: Vec<&TypeView> = theirs.iter().filter(|t| t.group == "run/w").collect();
        assert_eq!(run.len(), 1);
        let seen: BTreeSet<String> = run[0].records.iter().map(|r| r.frame.clone()).collect();
        for i in &acked_before {
            assert!(seen.contains(&i.to_string()), "libgetar: frame {i} missing");
        }
    }
}

#[test]
fn snapshot_rpc_under_continuous_writes_holds_every_frame_acked_before_it() {
    snapshot_under_writes(false);
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_libgetar_opens_a_snapshot_taken_under_continuous_writes() {
    snapshot_under_writes(true);
}

#[test]
fn compact_rpc_refuses_what_it_cannot_judge_and_names_the_field() {
    let d = Daemon::start();
    let rt = rt();
    rt.block_on(async {
        let c = d.client().await;
        let frames: Vec<FrameSpec> = (0..3).map(|i| frame(i, 64)).collect();
        write_client(&c, "a.zip", append("run"), &frames)
            .await
            .unwrap();
        let e = c
            .compact("a.zip", "", logd::KeepPolicy::default(), false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(logd::Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("keep"), "{e}");
        let bad = logd::KeepPolicy {
            best: "val_loss:up:2".into(),
            ..Default::default()
        };
        let e = c.compact("a.zip", "", bad, false).await.unwrap_err();
        assert!(e.to_string().contains("keep.best"), "{e}");
        let unknown = logd::KeepPolicy {
            best: "val_loss:min:2".into(),
            ..Default::default()
        };
        let e = c.compact("a.zip", "", unknown, false).await.unwrap_err();
        assert_eq!(e.code(), Some(logd::Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("val_loss"), "{e}");
        let last = logd::KeepPolicy {
            last: Some(1),
            ..Default::default()
        };
        let e = c
            .compact("missing.zip", "", last.clone(), false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(logd::Code::NotFound), "{e}");
        let e = c
            .compact("a.zip", "nope", last.clone(), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("group"), "{e}");
        // Nothing was changed by the refusals; a real run keeps the newest.
        assert_eq!(c.list_frames("a.zip", "").await.unwrap().len(), 3);
        let done = c.compact("a.zip", "", last, false).await.unwrap();
        assert_eq!(done.kept, ["2"]);
        assert_eq!(done.dropped, ["0", "1"]);
        assert_eq!(c.list_frames("a.zip", "").await.unwrap(), ["2"]);
        let f = c.get_frame("a.zip", "2").await.unwrap();
        assert_frame_matches(&f, &frame(2, 64));
    });
}

/// A run of `n` frames of `len` bytes in group `run`, written offline and
/// closed (so it has its central directory).
fn write_closed(path: &Path, n: u64, len: usize) {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    for f in 0..n {
        let mut t = w.begin().unwrap();
        t.add(
            &format!("run/w/frames/{f}/value.f32.uni"),
            &frame(f, len as u64).tensors[0].data.to_vec(),
            Compression::Stored,
        )
        .unwrap();
        t.add(
            &format!("run/metrics/epoch/vars/val_loss.f64.uni/{f}"),
            &(f as f64).to_le_bytes(),
            Compression::Stored,
        )
        .unwrap();
        t.commit().unwrap();
    }
    w.close().unwrap();
}

fn assert_frames(path: &Path, frames: &BTreeSet<String>, len: usize) {
    let a = Archive::open(path).unwrap();
    for f in frames {
        let i: u64 = f.parse().unwrap();
        let got = tensor_in(&a, f).unwrap_or_else(|| panic!("frame {f} missing"));
        assert!(
            got == frame(i, len as u64).tensors[0].data.to_vec(),
            "frame {f}"
        );
    }
}

#[test]
fn live_compaction_killed_at_random_points_leaves_the_old_or_the_new_archive() {
    let seed = seed_from_env("GTAR_TEST_SEED");
    eprintln!("seed {seed} (replay with GTAR_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = temp_root("live-kill-");
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let pristine = root.path().join("pristine.zip");
    const N: u64 = 24;
    const LEN: usize = 6 << 20;
    write_closed(&pristine, N, LEN);
    let path = data.join("run.zip");
    let temp = data.join(".run.zip.compact-tmp");
    let all: BTreeSet<String> = (0..N).map(|f| f.to_string()).collect();
    let kept: BTreeSet<String> = ["0", "8", "16", "21", "22", "23"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let uds = root.path().join("logd.sock");
    let log = root.path().join("daemon.log");
    let keep = logd::KeepPolicy {
        last: Some(3),
        every: Some(8),
        ..Default::default()
    };
    let rt = rt();
    // Start compacting through a fresh daemon; returns the daemon.
    let start = |rt: &tokio::runtime::Runtime| {
        std::fs::copy(&pristine, &path).unwrap();
        let child = ChildDaemon::spawn(&data, &uds, None, &log);
        let addr = format!("unix:{}", uds.display());
        let keep = keep.clone();
        let call = rt.spawn(async move {
            let c = logd::Client::connect(&addr).await.unwrap();
            c.compact("run.zip", "run", keep, false).await
        });
        (child, call)
    };
    // How long an uninterrupted live compaction takes here.
    let (mut child, call) = start(&rt);
    let t0 = Instant::now();
    let done = rt.block_on(call).unwrap().unwrap();
    let full = t0.elapsed();
    child.terminate(Duration::from_secs(30));
    let got: BTreeSet<String> = done.kept.iter().cloned().collect();
    assert_eq!(got, kept);
    assert_frames(&path, &kept, LEN);
    let new_len = std::fs::metadata(&path).unwrap().len();
    eprintln!("an uninterrupted live compaction takes {full:?}");
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut kills, mut olds, mut news) = (0, 0, 0);
    for round in 0..120 {
        if kills >= 24 && phases.len() >= 4 {
            break;
        }
        // What a killed run left is replaced by the next one (kept for the
        // rounds killed at a random time); the size-watching rounds need a
        // fresh start.
        if round % 4 != 0 {
            let _ = std::fs::remove_file(&temp);
        }
        let (mut child, call) = start(&rt);
        let temp_len = || std::fs::metadata(&temp).map(|m| m.len()).ok();
        let t0 = Instant::now();
        let phase = match round % 4 {
            0 => {
                std::thread::sleep(full.mul_f64(rng.gen_range(0.0..1.0)));
                "at a random time"
            }
            1 => {
                let want = (new_len as f64 * rng.gen_range(0.0..1.0)) as u64;
                while !call.is_finished() && temp_len().is_none_or(|n| n < want) {}
                "while copying"
            }
            2 => {
                while !call.is_finished() && temp_len().is_none_or(|n| n < new_len) {}
                "with the new file complete, before the rename"
            }
            _ => {
                let mut seen = false;
                while !call.is_finished() {
                    match temp_len() {
                        Some(n) if n >= new_len => seen = true,
                        None if seen => break,
                        _ => {}
                    }
                }
                "after the rename"
            }
        };
        let when = t0.elapsed();
        let killed = !call.is_finished();
        child.kill9();
        if killed {
            kills += 1;
            *phases.entry(phase).or_default() += 1;
        }
        let _ = rt.block_on(call);
        let a = Archive::open(&path).unwrap();
        assert!(
            matches!(a.state(), OpenState::Clean),
            "round {round} (killed {phase}, after {when:?}): the archive needs recovery"
        );
        let frames: BTreeSet<String> = a.index().frames_under(Some("run")).into_iter().collect();
        drop(a);
        if frames == all {
            olds += 1;
            assert!(
                !(killed && phase == "after the rename"),
                "round {round}: killed after the rename, yet the old archive is in place"
            );
            assert_frames(&path, &all, LEN);
        } else {
            news += 1;
            assert_eq!(
                frames, kept,
                "round {round}: neither the old nor the new archive"
            );
            assert_frames(&path, &kept, LEN);
        }
    }
    eprintln!("kills by phase: {phases:?}");
    eprintln!("{kills} kills: {olds} left the old archive, {news} the new one");
    assert!(
        kills >= 20,
        "only {kills} compactions were killed while running"
    );
    // A daemon started after the kills compacts and cleans up what they left.
    let (mut child, call) = start(&rt);
    rt.block_on(call).unwrap().unwrap();
    child.terminate(Duration::from_secs(30));
    assert_frames(&path, &kept, LEN);
    // No temporary file is left; the recovery checkpoint (sidecar) may be.
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(gtar::SIDECAR_SUFFIX))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

fn grpcurl_bin() -> std::path::PathBuf {
    let py = std::env::var_os("GTAR_ORACLE_PYTHON")
        .filter(|p| !p.is_empty())
        .expect("GTAR_ORACLE_PYTHON is not set: run ./test.sh (it installs grpcurl into the oracle venv)");
    std::path::PathBuf::from(py)
        .parent()
        .unwrap()
        .join("grpcurl")
}

fn grpcurl(d: &Daemon, method: &str, body: &str) -> serde_json::Value {
    let out = Command::new(grpcurl_bin())
        .args(["-plaintext", "-d", body])
        .arg(d.tcp.to_string())
        .arg(method)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl {method} {body}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[ignore = "needs grpcurl: run ./test.sh"]
fn grpcurl_calls_compact_and_snapshot() {
    let d = Daemon::start();
    let rt = rt();
    rt.block_on(async {
        let c = d.client().await;
        let frames: Vec<FrameSpec> = (0..6).map(|i| frame(i, 4096)).collect();
        write_client(&c, "runs/g.zip", append("run"), &frames)
            .await
            .unwrap();
    });
    let s = grpcurl(
        &d,
        "gtar.logd.v1.Logd/Snapshot",
        r#"{"archive":"runs/g.zip","destination":"runs/g-snap.zip"}"#,
    );
    assert_eq!(s["destination"], "runs/g-snap.zip");
    assert_eq!(s["frameCount"], "6");
    let dry = grpcurl(
        &d,
        "gtar.logd.v1.Logd/Compact",
        r#"{"archive":"runs/g.zip","keep":{"last":2},"dry_run":true}"#,
    );
    assert_eq!(dry["dropped"].as_array().unwrap().len(), 4, "{dry}");
    assert!(dry.get("written").is_none(), "{dry}");
    let done = grpcurl(
        &d,
        "gtar.logd.v1.Logd/Compact",
        r#"{"archive":"runs/g.zip","group":"run","keep":{"last":2,"every":5}}"#,
    );
    assert_eq!(done["kept"], serde_json::json!(["0", "4", "5"]), "{done}");
    assert_eq!(done["written"], true);
    let reclaimed: u64 = done["bytesReclaimed"].as_str().unwrap().parse().unwrap();
    assert!(reclaimed >= 3 * 4096, "{done}");
    rt.block_on(async {
        let c = d.client().await;
        assert_eq!(
            c.list_frames("runs/g.zip", "").await.unwrap(),
            ["0", "4", "5"]
        );
        assert_eq!(c.list_frames("runs/g-snap.zip", "").await.unwrap().len(), 6);
    });
}
