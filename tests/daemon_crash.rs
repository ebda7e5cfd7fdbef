//! Crash safety end to end, with the real binary as a child process.
//!
//! A client streams frames (several tensors of up to 2 MiB each, plus a
//! continuous `loss` scalar, all part of the frame) to one archive while the
//! test `kill -9`s the daemon at a random moment. After each kill:
//! 1. the daemon is restarted and queried: every frame the client saw acked
//!    *durable* is listed and served bit-exact, every listed frame is complete
//!    (all its tensors and its scalar, exact) — no partial frame — and the
//!    listed frames are a gap-free prefix of what was sent;
//! 2. a Write stream is opened and closed (repairing the archive on open) and
//!    the daemon stopped with SIGTERM, so the file has a central directory
//!    again; then libgetar (the oracle venv) opens it and reads the newest
//!    frames, compared by CRC-32 with what was sent.
//!
//! The archive grows across the runs, so each run also exercises repair of an
//! archive that was repaired and appended to before. The client and the
//! queries are the project's Rust client (bytes over the socket).

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::*;
use gtar_logd::proto::v1::DType;
use rand::{Rng, SeedableRng};

const ARCHIVE: &str = "crash/run.zip";
const RUNS: usize = 24;
/// Stop starting new runs after this long (the runs already done must be ≥ 20).
const BUDGET: Duration = Duration::from_secs(80);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const DTYPES: [(DType, u64, &str); 4] = [
    (DType::Float32, 4, "f32"),
    (DType::Float64, 8, "f64"),
    (DType::Uint8, 1, "u8"),
    (DType::Bfloat16, 2, "u8"),
];

/// Frame `i`, deterministic: 1–3 tensors (`layer/{k}/w`), sizes 1 KiB–2 MiB.
fn spec(i: u64) -> FrameSpec {
    let n = 1 + (i % 3);
    let tensors = (0..n)
        .map(|k| {
            let (dt, item, _) = DTYPES[k as usize];
            let len = 1024 + mix(i * 8 + k) % (2 << 20);
            let elems = len / item;
            TensorSpec::new(
                &format!("layer/{k}"),
                "w",
                dt,
                &[elems],
                Payload::Gen {
                    seed: i * 8 + k,
                    len: elems * item,
                },
            )
        })
        .collect();
    FrameSpec {
        index: i.to_string(),
        tensors,
        records: vec![],
        scalars: vec![("metrics".into(), "loss".into(), 1.0 / (i as f64 + 1.0))],
    }
}

fn tensor_paths(i: u64) -> Vec<(String, Vec<u8>)> {
    spec(i)
        .tensors
        .iter()
        .enumerate()
        .map(|(k, t)| {
            (
                format!("{}/frames/{i}/w.{}.uni", t.group, DTYPES[k].2),
                t.data.to_vec(),
            )
        })
        .collect()
}

/// Check a frame through the daemon: all tensors and the scalar, exact.
async fn check_frame(c: &logd::Client, i: u64) {
    let got = c
        .get_frame(ARCHIVE, i.to_string())
        .await
        .unwrap_or_else(|e| panic!("frame {i}: {e:?}"));
    assert_frame_matches(&got, &spec(i));
    let r = c
        .read_record(ARCHIVE, &format!("metrics/vars/loss.f64.uni/{i}"))
        .await
        .unwrap_or_else(|e| panic!("frame {i}'s scalar: {e:?}"));
    assert_eq!(
        r,
        (1.0 / (i as f64 + 1.0)).to_le_bytes(),
        "frame {i}'s scalar"
    );
}

const LIBGETAR_CHECK: &str = r#"
import sys, zlib
import numpy as np
import gtar
path = sys.argv[1]
with gtar.GTAR(path, 'r') as g:
    n = 0
    for rec in g.getRecordTypes():
        if rec.getGroup() == 'layer/0' and rec.getName() == 'w':
            n += len(g.queryFrames(rec))
    print('frames', n)
    for p in sys.argv[2:]:
        v = g.readPath(p)
        if v is None:
            raise SystemExit('libgetar: no record ' + p)
        b = v.encode() if isinstance(v, str) else np.ascontiguousarray(v).tobytes()
        print('crc', p, zlib.crc32(b) & 0xffffffff, len(b))
"#;

/// libgetar opens the archive, counts `frames` frames, and reads the given
/// frames bit-exactly (CRC-32 and length).
fn libgetar_check(py: &Path, archive: &Path, frames: u64, check: &[u64]) {
    let mut want = Vec::new();
    for &i in check {
        want.extend(tensor_paths(i));
    }
    let out = Command::new(py)
        .arg("-c")
        .arg(LIBGETAR_CHECK)
        .arg(archive)
        .args(want.iter().map(|(p, _)| p))
        .output()
        .expect("run the libgetar oracle");
    assert!(
        out.status.success(),
        "libgetar failed on {}:\n{}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(format!("frames {frames}").as_str()),
        "libgetar: {text}"
    );
    for (p, bytes) in &want {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("libgetar: no line for {p}"));
        let expect = format!("crc {p} {} {}", crc32fast::hash(bytes), bytes.len());
        assert_eq!(line, expect, "libgetar read {p} differently");
    }
}

/// What one streaming client saw.
#[derive(Default)]
struct Seen {
    sent_begun: u64,
    durable: Vec<u64>,
}

/// Stream frames `first..` as fast as the daemon takes them until the
/// connection dies; each frame's `durable` ack is recorded the moment its
/// handle resolves.
async fn stream_until_killed(address: String, first: u64, seen: Arc<Mutex<Seen>>) {
    let Ok(c) = logd::Client::connect(&address).await else {
        return;
    };
    let Ok(mut w) = c.writer(ARCHIVE, append("")).await else {
        return;
    };
    let mut waiters = Vec::new();
    let mut i = first;
    loop {
        seen.lock().unwrap().sent_begun = i + 1;
        let Ok(h) = w.write(spec(i).new_frame()).await else {
            break;
        };
        let seen = seen.clone();
        waiters.push(tokio::spawn(async move {
            if let Ok(a) = h.durable().await {
                seen.lock().unwrap().durable.push(a.index.parse().unwrap());
            }
        }));
        i += 1;
    }
    for t in waiters {
        let _ = t.await;
    }
}

#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn kill_9_at_random_moments_loses_no_durable_frame_and_shows_no_partial_frame() {
    let py = std::env::var_os("GTAR_ORACLE_PYTHON")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .expect(
            "GTAR_ORACLE_PYTHON is not set: run ./test.sh (it sets up the libgetar oracle venv)",
        );
    let tmp = temp_root("crash-");
    let data = tmp.path().join("data");
    let uds = tmp.path().join("logd.sock");
    let log = tmp.path().join("daemon.log");
    let file = data.join(ARCHIVE);
    let address = format!("unix:{}", uds.display());
    let seed = common::seed_from_env("CRASH_SEED");
    println!("CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let started = Instant::now();
    let mut durable_ever: BTreeSet<u64> = BTreeSet::new();
    let mut checked: BTreeSet<u64> = BTreeSet::new();
    let mut next: u64 = 0;
    let mut runs = 0;
    let mut killed_mid_stream = 0;
    while runs < RUNS && (runs < 20 || started.elapsed() < BUDGET) {
        // --- stream, then kill -9 at a random moment
        let mut d = ChildDaemon::spawn(&data, &uds, None, &log);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let delay = Duration::from_millis(rng.gen_range(0..400));
        // A thread of its own: `FrameWriter::write`'s future is not `Send`
        // (a watch::Ref held across an await in the client's shm_span).
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (address2, seen2) = (address.clone(), seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(stream_until_killed(address2, next, seen2));
            let _ = done_tx.send(());
        });
        std::thread::sleep(delay);
        d.kill9();
        let _ = done_rx.recv_timeout(Duration::from_secs(10));
        let (sent, acked) = {
            let s = seen.lock().unwrap();
            (s.sent_begun, s.durable.clone())
        };
        if sent > next {
            killed_mid_stream += 1;
        }
        durable_ever.extend(acked.iter().copied());

        // --- restart: durable frames are there, nothing partial is visible
        let mut d = ChildDaemon::spawn(&data, &uds, None, &log);
        let listed: Vec<u64> = rt.block_on(async {
            let c = logd::Client::connect(&address).await.unwrap();
            let listed = match c.list_frames(ARCHIVE, "").await {
                Ok(l) => l.iter().map(|s| s.parse().unwrap()).collect(),
                Err(e) if e.code() == Some(tonic::Code::NotFound) && durable_ever.is_empty() => {
                    vec![]
                }
                Err(e) => panic!("run {runs}: ListFrames after restart: {e:?}"),
            };
            let listed: Vec<u64> = listed;
            // A gap-free prefix of what was sent (frames commit in order).
            assert!(
                listed.iter().copied().eq(0..listed.len() as u64),
                "run {runs}: listed frames are not 0..n: {listed:?}"
            );
            assert!(
                listed.len() as u64 <= sent.max(next),
                "run {runs}: more frames than sent"
            );
            for i in &durable_ever {
                assert!(
                    (*i as usize) < listed.len(),
                    "run {runs}: frame {i} was acked durable but is gone after kill -9 (listed {})",
                    listed.len()
                );
            }
            // Every frame new since the last check, plus a few old ones.
            let mut to_check: Vec<u64> = listed
                .iter()
                .copied()
                .filter(|i| !checked.contains(i))
                .collect();
            for _ in 0..3 {
                if !listed.is_empty() {
                    to_check.push(listed[rng.gen_range(0..listed.len())]);
                }
            }
            for i in to_check {
                check_frame(&c, i).await;
                checked.insert(i);
            }
            // Open for append (repairs the file) and close again.
            let w = c.writer(ARCHIVE, append("")).await.unwrap();
            assert_eq!(w.opened().existing_frames, listed.len() as u64);
            w.close().await.unwrap();
            listed
        });
        d.terminate(Duration::from_secs(20));

        // --- libgetar opens the repaired archive and reads the newest frames
        if !listed.is_empty() {
            let n = listed.len() as u64;
            let mut check: Vec<u64> = vec![n - 1];
            check.extend(acked.iter().rev().take(2));
            check.sort();
            check.dedup();
            libgetar_check(&py, &file, n, &check);
        }
        println!(
            "run {runs:>2}: killed after {:>3} ms; sent {} frames, saw {} durable; {} frames after restart",
            delay.as_millis(),
            sent.saturating_sub(next),
            acked.len(),
            listed.len() as u64 - next.min(listed.len() as u64),
        );
        next = listed.len() as u64;
        runs += 1;
    }
    println!(
        "{runs} kill -9 runs in {:.1} s ({killed_mid_stream} while streaming); {} frames in the archive, {} acked durable",
        started.elapsed().as_secs_f64(),
        next,
        durable_ever.len()
    );
    assert!(runs >= 20);
    assert!(
        killed_mid_stream >= 10,
        "the kills should mostly land mid-stream"
    );
    assert!(
        !durable_ever.is_empty(),
        "no frame ever became durable: the test proved nothing"
    );
}
