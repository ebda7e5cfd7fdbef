//! Truncation and corruption: archives cut at every byte offset of their
//! last 64 KiB, and archives with random bytes flipped, either open/repair
//! or fail with a clear error — never a panic, never a hang.
//!
//! Each case runs `Archive::open` + reading every entry, then `gtar::repair`
//! on a copy (and reading the repaired copy), under `catch_unwind`, on worker
//! threads watched by a timeout. Files live on tmpfs (`/dev/shm`) when there
//! is one, so 65,536 cuts stay fast.

mod common;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use gtar::{self, Archive, ArchiveWriter, Compression, OpenMode, OpenState};
use rand::{Rng, SeedableRng};

const TAIL: usize = 64 * 1024;

/// A committed frame: its index, entry names, and where its bytes end.
#[derive(Clone)]
struct Frame {
    index: String,
    names: Vec<String>,
    end: u64,
}

struct Fixture {
    bytes: Vec<u8>,
    frames: Vec<Frame>,
    /// Every value written under each name (a rewritten name has several).
    written: std::collections::HashMap<String, Vec<Vec<u8>>>,
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// `many`: ~300 KiB, 300 small frames (2 entries each) and a few large ones.
/// Otherwise ~85 KiB, so that its last 64 KiB is nearly all of it: 16
/// frames, a large multi-record frame every fourth; the last 64 KiB holds
/// large frames, small frames and the central directory. Large frames mix stored, streamed and
/// deflated entries; a constant record is rewritten now and then.
fn build_fixture(dir: &Path, many: bool) -> Fixture {
    let path = dir.join("fixture.zip");
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    let mut frames = Vec::new();
    let mut written: std::collections::HashMap<String, Vec<Vec<u8>>> = Default::default();
    let count = if many { 300u64 } else { 16 };
    for n in 0..count {
        let large = if many { n % 60 == 17 } else { n % 4 == 1 };
        let mut recs: Vec<(String, Vec<u8>, u8)> = vec![(
            format!("frames/{n}/w.f32.uni"),
            det_bytes(n, 160 + (n as usize % 9) * 4),
            0,
        )];
        if many || n % 2 == 0 {
            recs.push((format!("frames/{n}/log.txt"), det_text_bytes(n, 200), 1));
        }
        if large {
            let k = if many { 24 } else { 8 };
            recs.push((
                format!("big/frames/{n}/t.f32.uni"),
                det_bytes(n + 7, k * 1024),
                2,
            ));
            recs.push((
                format!("big/frames/{n}/z.u8.uni"),
                det_text_bytes(n + 9, k / 2 * 1024),
                1,
            ));
            recs.push((
                format!("big/frames/{n}/r.f64.uni"),
                det_bytes(n + 11, k * 1024),
                0,
            ));
        }
        if n % 50 == 0 || (!many && n % 5 == 0) {
            recs.push(("latest.u64.uni".into(), n.to_le_bytes().to_vec(), 0));
        }
        let mut t = w.begin().unwrap();
        for (name, data, how) in &recs {
            match how {
                0 => t.add(name, data, Compression::Stored).unwrap(),
                1 => t.add(name, data, Compression::Deflate(6)).unwrap(),
                _ => {
                    let mut e = t.start_entry(name, data.len() as u64).unwrap();
                    for p in data.chunks(1000) {
                        e.write(p).unwrap();
                    }
                    e.finish().unwrap();
                }
            }
        }
        let c = t.commit().unwrap();
        for (name, data, _) in &recs {
            written.entry(name.clone()).or_default().push(data.clone());
        }
        frames.push(Frame {
            index: n.to_string(),
            names: recs.into_iter().map(|r| r.0).collect(),
            end: c.txn + c.bytes,
        });
    }
    w.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    Fixture {
        bytes,
        frames,
        written,
    }
}

/// Open and read everything. An entry reads back as exactly a value that
/// was written under its name, or fails as corrupt naming what (a CRC
/// mismatch, a bad header); never other bytes, never a panic. An open that
/// fails says why (`Err`).
fn open_and_read_all(fx: &Fixture, path: &Path) -> Result<(Archive, usize), String> {
    let a = Archive::open(path).map_err(|e| e.to_string())?;
    let entries: Vec<_> = a.index().entries().to_vec();
    let mut ok = 0;
    for e in &entries {
        match a.read_entry(e) {
            Ok(d) => {
                assert_eq!(d.len() as u64, e.size());
                if let Some(values) = fx.written.get(e.name()) {
                    assert!(
                        values.contains(&d),
                        "{}: read back bytes that were never written under that name",
                        e.name()
                    );
                }
                ok += 1;
            }
            // A CRC-32 mismatch, a corrupt deflate stream, data cut short:
            // corrupt, naming the entry.
            Err(gtar::Error::Corrupt(msg)) => assert!(msg.contains(e.name()), "{msg}"),
            Err(err) => panic!("{}: not a corruption error: {err:?}", e.name()),
        }
    }
    Ok((a, ok))
}

/// Which frames must survive a cut at `cut`: those whose bytes end before it.
fn frames_before(fx: &Fixture, cut: u64) -> impl Iterator<Item = &Frame> {
    fx.frames.iter().take_while(move |f| f.end <= cut)
}

/// One truncation case. Returns a description of the failure, if any.
fn truncation_case(fx: &Fixture, file: &Path, cut: usize) -> Result<(), String> {
    std::fs::write(file, &fx.bytes[..cut]).unwrap();
    // Reader: recovers in memory (or fails clearly), then all entries read.
    let r = open_and_read_all(fx, file);
    let check_frames = |a: &Archive, what: &str| -> Result<(), String> {
        let ix = a.index();
        for f in frames_before(fx, cut as u64) {
            for n in &f.names {
                if ix.get(n).is_none() {
                    return Err(format!(
                        "cut at {cut}: {what}: frame {} committed before the cut lost {n}",
                        f.index
                    ));
                }
            }
        }
        Ok(())
    };
    if let Ok((a, _)) = &r {
        check_frames(a, "reader")?;
    }
    // Repair in place (the file is already a copy), then it must be valid.
    match gtar::repair(file) {
        Ok(_) => {
            let (a, ok) = open_and_read_all(fx, file)
                .map_err(|e| format!("cut at {cut}: repaired archive does not open: {e}"))?;
            if !matches!(a.state(), OpenState::Clean) {
                return Err(format!(
                    "cut at {cut}: repaired archive still needs recovery"
                ));
            }
            if ok != a.index().entries().len() {
                return Err(format!(
                    "cut at {cut}: repaired archive has unreadable entries"
                ));
            }
            check_frames(&a, "repair")?;
            // And no partial frame: each frame has all its names or none.
            let ix = a.index();
            for f in &fx.frames {
                let have = f
                    .names
                    .iter()
                    .filter(|n| n.starts_with("frames/") || n.starts_with("big/"))
                    .filter(|n| ix.get(n).is_some())
                    .count();
                let all = f
                    .names
                    .iter()
                    .filter(|n| n.starts_with("frames/") || n.starts_with("big/"))
                    .count();
                if have != 0 && have != all {
                    return Err(format!("cut at {cut}: frame {} is partial", f.index));
                }
            }
            Ok(())
        }
        Err(e) => {
            // Only acceptable as a clear refusal; the cut archive is ours and
            // starts with a zip header, so this should not happen at all.
            Err(format!("cut at {cut}: repair failed: {e}"))
        }
    }
}

/// One corruption case: flip `flips` bytes; everything may fail, clearly.
fn flip_case(fx: &Fixture, file: &Path, seed: u64) -> Result<(), String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = fx.bytes.clone();
    let len = b.len();
    let flips = rng.gen_range(1..=6);
    for _ in 0..flips {
        // Half the flips hit the tail (central directory and end records),
        // where one byte changes how everything else is read.
        let at = if rng.gen_bool(0.5) {
            rng.gen_range(len.saturating_sub(TAIL)..len)
        } else {
            rng.gen_range(0..len)
        };
        b[at] ^= rng.gen_range(1..=255u8);
    }
    if rng.gen_bool(0.25) {
        let cut = rng.gen_range(len.saturating_sub(TAIL)..len);
        b.truncate(cut);
    }
    std::fs::write(file, &b).unwrap();
    // Whatever opens reads right or fails as corrupt (checked inside).
    let _ = open_and_read_all(fx, file);
    match gtar::repair(file) {
        Ok(_) => {
            // Whatever it kept must open without recovery; reads may still
            // fail on a flipped data byte (CRC), as corrupt, never as other
            // bytes.
            let (a, _) = open_and_read_all(fx, file)
                .map_err(|e| format!("flip seed {seed}: repaired file does not open: {e}"))?;
            if !matches!(a.state(), OpenState::Clean) {
                return Err(format!(
                    "flip seed {seed}: repaired file still needs recovery"
                ));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() {
                return Err(format!("flip seed {seed}: empty error"));
            }
        }
    }
    Ok(())
}

/// Run `cases` on two worker threads, each case under `catch_unwind`, with
/// a watchdog: no case may take more than `stall` seconds.
fn run_cases(
    name: &'static str,
    cases: Vec<u64>,
    fx: Arc<Fixture>,
    dir: PathBuf,
    case: fn(&Fixture, &Path, u64) -> Result<(), String>,
) {
    let workers = 2;
    let done = Arc::new(AtomicUsize::new(0));
    let cases = Arc::new(cases);
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    for w in 0..workers {
        let (fx, cases, done, tx) = (fx.clone(), cases.clone(), done.clone(), tx.clone());
        let file = dir.join(format!("{name}-{w}.zip"));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            for i in (w..cases.len()).step_by(workers) {
                let c = cases[i];
                match catch_unwind(AssertUnwindSafe(|| case(&fx, &file, c))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.push(e),
                    Err(p) => failures.push(format!(
                        "{name} case {c}: PANIC: {}",
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    )),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            let _ = tx.send(failures);
        });
    }
    drop(tx);
    let mut failures = Vec::new();
    let mut finished = 0;
    let mut last = 0;
    while finished < workers {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(f) => {
                failures.extend(f);
                finished += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = done.load(Ordering::Relaxed);
                assert!(
                    now > last,
                    "{name}: no case finished in 20 s after {now} cases: a hang"
                );
                last = now;
            }
            Err(e) => panic!("{name}: worker died: {e}"),
        }
    }
    assert_eq!(done.load(Ordering::Relaxed), cases.len());
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases failed; first ones:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

/// Every byte offset of the last 64 KiB of an archive whose last 64 KiB is
/// nearly all of it (each case scans the whole file twice, in a debug build,
/// so the archive is kept small); the ~300 KiB many-small-frames archive is
/// cut at sampled offsets below.
#[test]
fn cut_at_every_byte_offset_of_the_last_64_kib() {
    let dir = scratch_dir();
    let fx = Arc::new(build_fixture(dir.path(), false));
    let len = fx.bytes.len();
    assert!(len > TAIL, "fixture must be longer than 64 KiB: {len}");
    let cd_start = fx.frames.last().unwrap().end as usize;
    let in_tail = fx
        .frames
        .iter()
        .filter(|f| f.end as usize > len - TAIL)
        .count();
    assert!(
        in_tail >= 8
            && fx.frames[fx.frames.len() - in_tail..]
                .iter()
                .any(|f| f.names.len() >= 4),
        "the last 64 KiB must hold a large multi-record frame, small frames and the central directory"
    );
    let cuts: Vec<u64> = ((len - TAIL) as u64..len as u64).collect();
    assert_eq!(cuts.len(), 65536);
    let started = std::time::Instant::now();
    run_cases(
        "cut",
        cuts,
        fx.clone(),
        dir.path().to_path_buf(),
        |fx, f, c| truncation_case(fx, f, c as usize),
    );
    eprintln!(
        "65536 cuts of a {len}-byte archive ({} frames, central directory at {cd_start}) in {:.1?}",
        fx.frames.len(),
        started.elapsed()
    );
}

fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{var}={seed} (set it to replay)");
    seed
}

/// The archive of 300 small frames, cut at random offsets of its last 64 KiB
/// and at every offset around the start of its central directory.
#[test]
fn cut_many_small_frames_at_sampled_offsets_of_the_last_64_kib() {
    let dir = scratch_dir();
    let fx = Arc::new(build_fixture(dir.path(), true));
    let len = fx.bytes.len() as u64;
    let cd_start = fx.frames.last().unwrap().end;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("GTAR_CUT_SEED"));
    let mut cuts: BTreeSet<u64> = (0..500)
        .map(|_| rng.gen_range(len - TAIL as u64..len))
        .collect();
    cuts.extend(cd_start - 64..cd_start + 64);
    cuts.extend(len - 200..len);
    run_cases(
        "cut-many",
        cuts.into_iter().collect(),
        fx,
        dir.path().to_path_buf(),
        |fx, f, c| truncation_case(fx, f, c as usize),
    );
}

#[test]
fn random_byte_flips_never_panic_or_hang() {
    let dir = scratch_dir();
    let seed = seed("GTAR_FLIP_SEED");
    for (many, n) in [(false, 1500u64), (true, 300)] {
        let fx = Arc::new(build_fixture(dir.path(), many));
        let cases: Vec<u64> = (0..n).map(|i| seed.wrapping_add(i)).collect();
        run_cases("flip", cases, fx, dir.path().to_path_buf(), flip_case);
    }
}
