//! Recovery of an archive torn in its last frame: open (reader), open for
//! append (writer) and `repair`, against the target ≤ 50 ms + tail ÷ 1.5 GB/s
//! (tail: the bytes after the last durable commit point), and against the
//! full scan of the same file (its recovery checkpoint moved away) as the
//! anchor, in the same run.
//!
//! The archive is written through `gtar::ArchiveWriter` in 100 MiB frames,
//! each fsynced (so each is a checkpoint record), to `crates/gtar/target/bench-tmp` (the
//! repository's disk). The tear is real: a child process (this binary again,
//! `GTAR_RECOVERY_CHILD` set) opens the archive for append, writes half of
//! one more 100 MiB frame and exits without running destructors, as a crash
//! leaves it. Every timed run gets a fresh tear; the cold runs start after
//! `echo 3 > /proc/sys/vm/drop_caches` (root only; skipped otherwise).
//!
//! Run: `cargo bench -p gtar --bench recovery` (0.5 GB). Sizes in GB from
//! `BENCH_RECOVERY_GB`, e.g. `BENCH_RECOVERY_GB=1,4,16 cargo bench -p gtar --bench
//! recovery` (needs that much free disk; the file is removed afterwards);
//! `BENCH_ROUNDS` rounds per operation (default 3, medians printed).
//! Times are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gtar::{Archive, ArchiveWriter, Compression, OpenMode, OpenState, ScanReport};

const MIB: usize = 1 << 20;
const FRAME: usize = 100 * MIB;
const CHILD_ENV: &str = "GTAR_RECOVERY_CHILD";
/// The target's rate for the tail and its constant.
const TAIL_RATE: f64 = 1.5e9;
const BUDGET_S: f64 = 0.050;

fn frame_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; FRAME];
    for (i, c) in v.chunks_mut(4096).enumerate() {
        c[..8].copy_from_slice(&((n * 1_000_003 + i) as u64).to_le_bytes());
    }
    v
}

/// The child: open for append, write half of a frame, exit (a crash).
fn child(path: &Path) -> ! {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Append).expect("child open");
    let n = w.reader().unwrap().index().frames_under(None).len();
    let mut t = w.begin().unwrap();
    t.add(
        &format!("frames/{n}/b.f32.uni"),
        &[0u8; 64],
        Compression::Stored,
    )
    .unwrap();
    let mut e = t
        .start_entry(&format!("frames/{n}/w.f32.uni"), FRAME as u64)
        .unwrap();
    e.write(&frame_bytes(n)[..FRAME / 2]).unwrap();
    // No destructor: the frame stays torn, no central directory is written.
    std::process::exit(0)
}

fn tear(path: &Path) {
    let st = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, path)
        .status()
        .expect("run the tearing child");
    assert!(st.success());
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn report_of(op: &str, path: &Path) -> ScanReport {
    match op {
        "open" => match Archive::open(path).unwrap().state() {
            OpenState::Recovered(r) => r.clone(),
            OpenState::Clean => panic!("not torn"),
        },
        "append" => {
            let (w, r) = ArchiveWriter::open(path, OpenMode::Append).unwrap();
            drop(w);
            r.expect("not torn")
        }
        "repair" => gtar::repair(path).unwrap().expect("not torn"),
        _ => unreachable!(),
    }
}

fn main() {
    if let Some(p) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&p));
    }
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for a list of tests
    }
    let sizes: Vec<f64> = std::env::var("BENCH_RECOVERY_GB")
        .unwrap_or_else(|_| "0.5".into())
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_RECOVERY_GB: numbers in GB"))
        .collect();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&dir).unwrap();
    let cold_ok = drop_caches();
    if !cold_ok {
        println!("(not root: cold-cache runs skipped)");
    }
    for gb in sizes {
        let path = dir.join(format!("recovery-{gb}GB.zip"));
        let frames = ((gb * 1e9) / FRAME as f64).ceil().max(1.0) as usize;
        let t = Instant::now();
        {
            let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
            w.enable_direct_io();
            for n in 0..frames {
                let mut t = w.begin().unwrap();
                t.add(
                    &format!("frames/{n}/b.f32.uni"),
                    &[1u8; 64],
                    Compression::Stored,
                )
                .unwrap();
                t.add(
                    &format!("frames/{n}/w.f32.uni"),
                    &frame_bytes(n),
                    Compression::Stored,
                )
                .unwrap();
                t.commit().unwrap();
                w.sync().unwrap();
            }
        }
        let size = std::fs::metadata(&path).unwrap().len();
        println!(
            "\n== {:.2} GB archive ({frames} frames of 100 MiB, written in {:.1} s) ==",
            size as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
        println!(
            "{:<8} {:<5} {:>10} {:>10} {:>10} {:>9} {:>12} {:>10}",
            "op", "cache", "median_ms", "budget_ms", "ratio", "tail_MB", "read_MB", "from_ckpt"
        );
        let caches: &[&str] = if cold_ok {
            &["warm", "cold"]
        } else {
            &["warm"]
        };
        for op in ["open", "append", "repair"] {
            for &cache in caches {
                let mut times = Vec::new();
                let mut last = None;
                for _ in 0..rounds {
                    tear(&path);
                    if cache == "cold" {
                        drop_caches();
                    } else {
                        // Warm: the tail was just written; read the file
                        // once so the checkpoint's headers are cached too.
                        let _ = Archive::open(&path);
                    }
                    let t = Instant::now();
                    let r = report_of(op, &path);
                    times.push(t.elapsed().as_secs_f64());
                    last = Some(r);
                    if op == "open" {
                        // Leave a clean file for the next tear.
                        gtar::repair(&path).unwrap();
                    }
                }
                let r = last.unwrap();
                let tail = size_after(&path, &r);
                let budget = BUDGET_S + tail as f64 / TAIL_RATE;
                let m = median(times);
                println!(
                    "{op:<8} {cache:<5} {:>10.1} {:>10.1} {:>10.2} {:>9.1} {:>12.3} {:>10}",
                    m * 1e3,
                    budget * 1e3,
                    m / budget,
                    tail as f64 / 1e6,
                    r.bytes_read as f64 / 1e6,
                    r.checkpoint.is_some()
                );
            }
        }
        // The anchor: the same torn file recovered by a full scan (the
        // checkpoint moved away), warm and cold.
        for &cache in caches {
            let mut times = Vec::new();
            let mut read = 0;
            for _ in 0..rounds {
                tear(&path);
                let side = gtar::sidecar_path(&path);
                let away = side.with_extension("away");
                std::fs::rename(&side, &away).unwrap();
                if cache == "cold" {
                    drop_caches();
                } else {
                    let _ = Archive::open(&path);
                }
                let t = Instant::now();
                let r = report_of("open", &path);
                times.push(t.elapsed().as_secs_f64());
                read = r.bytes_read;
                std::fs::rename(&away, &side).unwrap();
                gtar::repair(&path).unwrap();
            }
            println!(
                "{:<8} {cache:<5} {:>10.1} {:>10} {:>10} {:>9} {:>12.3} {:>10}  (anchor: full scan, {:.2} GB/s)",
                "fullscan",
                median(times.clone()) * 1e3,
                "-",
                "-",
                "-",
                read as f64 / 1e6,
                false,
                read as f64 / median(times) / 1e9
            );
        }
        std::fs::remove_file(&path).unwrap();
        let _ = std::fs::remove_file(gtar::sidecar_path(&path));
    }
    println!("\nratio = median time / (50 ms + tail / 1.5 GB/s); target <= 1.00 (not asserted)");
}

/// Bytes after the checkpoint the recovery started from: the torn tail.
fn size_after(path: &Path, r: &ScanReport) -> u64 {
    let _ = path;
    r.end.saturating_sub(r.checkpoint.unwrap_or(0)) + r.bytes_dropped
}
