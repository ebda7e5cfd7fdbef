//! Crash test: a child process commits frames through `src/gtar` and reports
//! each durable commit on a pipe; we `kill -9` it at random moments, repair,
//! and check that every reported frame is there bit for bit, that no frame is
//! partly visible, and that libgetar opens the repaired file.
//!
//! The child is this same test binary, re-run with `GTAR_CRASH_CHILD` set:
//! the `crash_child` test returns at once unless that variable is there, so a
//! plain `cargo test` needs no extra binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use gtar::{self, Archive, ArchiveWriter, Compression, OpenMode, OpenState};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "GTAR_CRASH_CHILD";

#[derive(Clone, Copy, Debug)]
enum How {
    Stored,
    Deflate,
    /// Written in pieces through `Txn::start_entry`.
    Streamed,
}

/// Frames 3, 8, 13, ... are large: several MiB over several records.
fn is_large(n: u64) -> bool {
    n % 5 == 3
}

/// Every record of frame `n`, deterministic from `n`. Also rewrites the
/// constant `latest.u64.uni` (last write wins).
fn frame_records(n: u64) -> Vec<(String, Vec<u8>, How)> {
    let mut v = Vec::new();
    if is_large(n) {
        for k in 0..4u64 {
            let len = (1 << 20) + (k as usize) * 131_072 + (n as usize % 7) * 4;
            let how = [How::Stored, How::Streamed, How::Stored, How::Deflate][k as usize];
            let data = if matches!(how, How::Deflate) {
                det_text_bytes(n * 16 + k, len)
            } else {
                det_bytes(n * 16 + k, len)
            };
            v.push((format!("big/frames/{n}/t{k}.f32.uni"), data, how));
        }
    }
    v.push((
        format!("frames/{n}/w.f32.uni"),
        det_bytes(n * 16 + 8, 4096 + (n as usize % 13) * 4),
        How::Stored,
    ));
    v.push((
        format!("frames/{n}/mask.u8.ind"),
        det_text_bytes(n * 16 + 9, 3000),
        How::Deflate,
    ));
    v.push((
        format!("frames/{n}/s.i64.uni"),
        det_bytes(n * 16 + 10, 8 * 64),
        How::Streamed,
    ));
    v.push((
        format!("vars/loss.f64.uni/{n}"),
        (n as f64 * 0.5).to_le_bytes().to_vec(),
        How::Stored,
    ));
    v.push((
        format!("frames/{n}/note.txt"),
        format!("frame {n}").into_bytes(),
        How::Deflate,
    ));
    v.push((
        "latest.u64.uni".into(),
        n.to_le_bytes().to_vec(),
        How::Stored,
    ));
    v
}

/// Names a frame owns (the shared `latest.u64.uni` aside).
fn frame_names(n: u64) -> BTreeSet<String> {
    frame_records(n)
        .into_iter()
        .map(|r| r.0)
        .filter(|name| name != "latest.u64.uni")
        .collect()
}

/// The child: append frames forever, print `BEGIN n` before a frame and
/// `DURABLE n` once `sync` has returned.
fn child_main(path: &Path) {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Append).expect("child: open");
    let next = {
        let r = w.reader().unwrap();
        let ix = r.index();
        ix.frames_under(None)
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let mut out = std::io::stdout().lock();
    for n in next.. {
        writeln!(out, "BEGIN {n}").unwrap();
        out.flush().unwrap();
        let mut t = w.begin().unwrap();
        for (name, data, how) in frame_records(n) {
            match how {
                How::Stored => t.add(&name, &data, Compression::Stored).unwrap(),
                How::Deflate => t.add(&name, &data, Compression::Deflate(1)).unwrap(),
                How::Streamed => {
                    let mut e = t.start_entry(&name, data.len() as u64).unwrap();
                    for piece in data.chunks(64 * 1024 + 3) {
                        e.write(piece).unwrap();
                    }
                    e.finish().unwrap();
                }
            }
        }
        t.commit().unwrap();
        w.sync().unwrap();
        writeln!(out, "DURABLE {n}").unwrap();
        out.flush().unwrap();
    }
}

/// The child's entry point: a no-op unless this binary was started as a child.
#[test]
fn crash_child() {
    if let Some(p) = std::env::var_os(CHILD_ENV) {
        child_main(Path::new(&p));
    }
}

fn spawn_child(path: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the crash child");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn kill9(child: &mut Child) {
    // SIGKILL: Child::kill sends exactly that on Unix.
    child.kill().expect("kill -9 the child");
    child.wait().unwrap();
}

/// Check an archive after a crash: every frame in `durable` is present and
/// bit-exact, every visible frame is complete, frames are 0..=max with no
/// hole, and `latest.u64.uni` names the newest frame.
fn check_archive(a: &Archive, durable: &BTreeSet<u64>, what: &str) -> u64 {
    let ix = a.index();
    let frames: Vec<u64> = ix
        .frames_under(None)
        .iter()
        .map(|f| f.parse().expect("numeric frame"))
        .collect();
    let present: BTreeSet<u64> = frames.iter().copied().collect();
    for n in durable {
        assert!(present.contains(n), "{what}: durable frame {n} lost");
    }
    let max = frames.last().copied();
    if let Some(max) = max {
        assert_eq!(
            present,
            (0..=max).collect::<BTreeSet<u64>>(),
            "{what}: frames have a hole"
        );
    }
    drop(ix);
    for &n in &present {
        let ix = a.index();
        let mut names: BTreeSet<String> = ix
            .records_at(None, &n.to_string())
            .map(|(_, e)| e.name().to_string())
            .collect();
        drop(ix);
        names.insert(format!("vars/loss.f64.uni/{n}"));
        assert_eq!(names, frame_names(n), "{what}: frame {n} is partial");
        for (name, data, _) in frame_records(n) {
            if name == "latest.u64.uni" {
                continue;
            }
            let got = a
                .read(&name)
                .unwrap_or_else(|e| panic!("{what}: frame {n}: {name}: {e}"));
            assert!(got == data, "{what}: frame {n}: {name} is not bit-exact");
        }
    }
    match max {
        Some(max) => assert_eq!(
            a.read("latest.u64.uni").unwrap(),
            max.to_le_bytes(),
            "{what}: the last write of latest.u64.uni must be the newest frame's"
        ),
        None => assert!(a.index().is_empty(), "{what}: entries without frames"),
    }
    max.map_or(0, |m| m + 1)
}

/// What libgetar sees must be exactly what we expect of frames 0..count.
fn check_with_libgetar(path: &Path, count: u64, what: &str) {
    let mut want: BTreeMap<String, Vec<(String, u64, u32)>> = BTreeMap::new();
    for n in 0..count {
        for (name, data, _) in frame_records(n) {
            if name == "latest.u64.uni" {
                continue;
            }
            let rp = gtar::RecordPath::parse(&name);
            want.entry(rp.rtype.path_at("*")).or_default().push((
                rp.index,
                data.len() as u64,
                crc32fast::hash(&data),
            ));
        }
    }
    for v in want.values_mut() {
        v.sort_by(|a, b| gtar::index_cmp(&a.0, &b.0));
    }
    let theirs = oracle_view(path, false);
    let mut got: BTreeMap<String, Vec<(String, u64, u32)>> = BTreeMap::new();
    for t in &theirs {
        if t.name == "latest" {
            let last = &t.records[0];
            assert_eq!(last.len, 8, "{what}");
            assert_eq!(
                last.crc32,
                crc32fast::hash(&(count - 1).to_le_bytes()),
                "{what}"
            );
            continue;
        }
        let fmt = ["f32", "f64", "i32", "i64", "u8", "u32", "u64"][t.format as usize];
        let res = ["", "uni", "ind"][t.resolution as usize];
        let file = if t.resolution == 0 {
            t.name.clone()
        } else {
            format!("{}.{fmt}.{res}", t.name)
        };
        let g = if t.group.is_empty() {
            String::new()
        } else {
            format!("{}/", t.group)
        };
        let key = match t.behavior {
            1 => format!("{g}frames/*/{file}"),
            2 => format!("{g}vars/{file}/*"),
            _ => panic!("{what}: unexpected constant {g}{file}"),
        };
        got.insert(
            key,
            t.records
                .iter()
                .map(|r| (r.frame.clone(), r.len, r.crc32))
                .collect(),
        );
    }
    assert_eq!(got, want, "{what}: libgetar sees something else");
}

struct Stats {
    runs: usize,
    targeted: usize,
    torn: usize,
    frames: u64,
}

/// `sequences` files, each killed `kills` times. Every third kill aims at
/// the middle of a large frame (right after its BEGIN); the others come at a
/// random moment.
fn campaign(sequences: usize, kills: usize, seed: u64, libgetar: bool) -> Stats {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut st = Stats {
        runs: 0,
        targeted: 0,
        torn: 0,
        frames: 0,
    };
    for s in 0..sequences {
        let path = dir.path().join(format!("crash-{s}.zip"));
        let mut durable: BTreeSet<u64> = BTreeSet::new();
        let mut count = 0;
        for k in 0..kills {
            let what = format!("sequence {s} kill {k} (seed {seed})");
            let (mut child, rx) = spawn_child(&path);
            // Whether this child started a frame before it was killed: a
            // child killed earlier (on a busy machine the 5 ms minimum can
            // come before its first frame) leaves the archive as it was.
            let mut began = false;
            let targeted = k % 3 == 1;
            let deadline = Instant::now() + Duration::from_millis(rng.gen_range(5..250));
            let start_by = Instant::now() + Duration::from_secs(20);
            loop {
                let wait = if targeted {
                    start_by.saturating_duration_since(Instant::now())
                } else {
                    deadline.saturating_duration_since(Instant::now())
                };
                match rx.recv_timeout(wait) {
                    Ok(line) => {
                        if let Some(n) = line.strip_prefix("DURABLE ") {
                            durable.insert(n.parse().unwrap());
                        } else if let Some(n) = line.strip_prefix("BEGIN ") {
                            began = true;
                            let n: u64 = n.parse().unwrap();
                            // Aim at a large frame, once a few frames exist.
                            if targeted && is_large(n) && n >= count + 3 {
                                std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
                                break;
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        assert!(!targeted, "{what}: child made no progress");
                        break;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        panic!("{what}: the child exited on its own: {:?}", child.wait())
                    }
                }
            }
            kill9(&mut child);
            // Lines written before the kill still sit in the pipe.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Some(n) = line.strip_prefix("DURABLE ") {
                    durable.insert(n.parse().unwrap());
                }
                began |= line.starts_with("BEGIN ");
            }
            st.runs += 1;
            st.targeted += targeted as usize;

            if !began && !path.exists() {
                continue; // killed before it even created the file
            }
            // A reader recovers in memory without touching the file ...
            let a = Archive::open(&path).unwrap_or_else(|e| panic!("{what}: open: {e}"));
            assert!(
                !began || matches!(a.state(), OpenState::Recovered(_)),
                "{what}: a writer killed inside a frame leaves no central directory"
            );
            let seen = check_archive(&a, &durable, &format!("{what}, before repair"));
            drop(a);
            // ... and repair (explicitly, or by the next writer's open)
            // keeps the same frames.
            if k % 2 == 0 {
                let rep = gtar::repair(&path).unwrap_or_else(|e| panic!("{what}: repair: {e}"));
                // A child killed before its first frame leaves the central
                // directory of the previous run in place.
                assert!(rep.is_some() || !began, "{what}: needed a repair");
                if rep.is_some_and(|r| r.bytes_dropped > 0 || r.entries_dropped > 0) {
                    st.torn += 1;
                }
                let a = Archive::open(&path).unwrap();
                assert!(matches!(a.state(), OpenState::Clean), "{what}");
                count = check_archive(&a, &durable, &format!("{what}, after repair"));
            } else {
                let (w, rep) = ArchiveWriter::open(&path, OpenMode::Append)
                    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                assert!(rep.is_some() || !began, "{what}: needed a repair");
                if rep.is_some_and(|r| r.bytes_dropped > 0 || r.entries_dropped > 0) {
                    st.torn += 1;
                }
                count = check_archive(&w.reader().unwrap(), &durable, &what);
                w.close().unwrap();
            }
            assert_eq!(count, seen, "{what}: repair changed what a reader saw");
            if libgetar && (k % 3 == 1 || k + 1 == kills) {
                check_with_libgetar(&path, count, &what);
            }
        }
        st.frames += count;
    }
    st
}

fn seed() -> u64 {
    seed_from_env("GTAR_CRASH_SEED")
}

/// The full test the issue asks for: 24 kills over 4 files, a third of them
/// in the middle of a large multi-record frame, libgetar on the results.
#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn kill9_at_random_moments_loses_no_durable_frame_and_libgetar_opens_the_repair() {
    let _ = oracle_python(); // fail loudly before any work without the oracle
    let seed = seed();
    eprintln!("crash test seed {seed} (set GTAR_CRASH_SEED to replay)");
    let st = campaign(4, 6, seed, true);
    eprintln!(
        "{} kills ({} aimed at large frames), {} left a torn frame or tail, {} frames survived",
        st.runs, st.targeted, st.torn, st.frames
    );
    assert!(st.runs >= 20);
    assert!(
        st.torn >= 1,
        "no kill landed inside a frame in {} runs (seed {seed})",
        st.runs
    );
}

/// A short version without the oracle, so a plain `cargo test` covers it.
#[test]
fn kill9_quick_without_oracle() {
    let seed = seed();
    eprintln!("crash test seed {seed} (set GTAR_CRASH_SEED to replay)");
    let st = campaign(1, 4, seed, false);
    assert_eq!(st.runs, 4);
}
