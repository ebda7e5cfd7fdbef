//! Lifecycle benchmarks: compaction and snapshots against `cp` of the same
//! bytes on the same disk, in the same run. Timings are printed, never
//! asserted.
//!
//! `cargo bench --bench lifecycle` prints:
//! 1. Compaction: an archive of BENCH_ARCHIVE_MB (default 1024) in frames of
//!    BENCH_FRAME_MB (default 16), of which every 10th frame is kept
//!    (`gtar-logd compact --keep-every 10`, the real binary), against
//!    `cp` of a file holding exactly the kept bytes, followed by an fsync of
//!    the copy (`sync FILE`), as compaction fsyncs its result. Rounds are
//!    interleaved cp → compact → cp (BENCH_ROUNDS, default 3); a round's
//!    ratio is the compaction's throughput (kept bytes / time) over that of
//!    the mean of its two cp runs; the median is the `summary:` line. The
//!    archive is compacted through a hard link, so the rename replaces the
//!    link and the original stays for the next round. Every timed run starts
//!    after a `sync(2)` outside the clock.
//!    The 10 GB case of the target:
//!    `BENCH_ARCHIVE_MB=10240 BENCH_FRAME_MB=100 cargo bench --bench lifecycle`.
//! 2. Snapshot of a live archive (the daemon's `Snapshot` RPC while a Write
//!    stream holds the archive open) against `cp` + `sync FILE` of the
//!    archive, interleaved the same way. With BENCH_REFLINK_DIR set to a
//!    directory on a reflink-capable file system (e.g. a loop-mounted XFS,
//!    see the README), the same is run there too: the snapshot is a clone.
//!
//! Knobs (env): BENCH_ARCHIVE_MB, BENCH_FRAME_MB, BENCH_ROUNDS,
//! BENCH_REFLINK_DIR, BENCH_SKIP_COMPACT, BENCH_SKIP_SNAPSHOT.

mod common;
#[path = "../tests/common/daemon.rs"]
mod daemon;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{env_u64, median};
use daemon::*;
use gtar::{ArchiveWriter, Compression, OpenMode};

const MIB: u64 = 1 << 20;

fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cp src dst`, then fsync dst (coreutils `sync FILE`); the time of both.
fn cp_synced(src: &Path, dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    sync_all();
    let t0 = Instant::now();
    run(Command::new("cp").arg(src).arg(dst));
    run(Command::new("sync").arg(dst));
    let t = t0.elapsed();
    std::fs::remove_file(dst).unwrap();
    t
}

/// An archive of `frames` frames of `frame` bytes (one stored tensor each,
/// plus a small metric), and a file of the bytes of every 10th frame.
fn build(dir: &Path, frames: u64, frame: u64) -> (std::path::PathBuf, std::path::PathBuf, u64) {
    let path = dir.join("pristine.zip");
    let kept = dir.join("kept.bin");
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    w.enable_direct_io();
    let mut kept_f = std::fs::File::create(&kept).unwrap();
    let mut kept_bytes = 0;
    let mut buf = vec![0u8; frame as usize];
    for f in 0..frames {
        fill(f, 0, &mut buf);
        let mut t = w.begin().unwrap();
        t.add(
            &format!("run/w/frames/{f}/value.f32.uni"),
            &buf,
            Compression::Stored,
        )
        .unwrap();
        t.add(
            &format!("run/metrics/epoch/vars/loss.f64.uni/{f}"),
            &(f as f64).to_le_bytes(),
            Compression::Stored,
        )
        .unwrap();
        t.commit().unwrap();
        if f % 10 == 0 || f + 1 == frames {
            use std::io::Write;
            kept_f.write_all(&buf).unwrap();
            kept_bytes += frame;
        }
    }
    w.close().unwrap();
    kept_f.sync_all().unwrap();
    (path, kept, kept_bytes)
}

fn bench_compaction(dir: &Path, rounds: usize) {
    let total = env_u64("BENCH_ARCHIVE_MB", 1024) * MIB;
    let frame = env_u64("BENCH_FRAME_MB", 16) * MIB;
    let frames = (total / frame).max(2);
    eprintln!(
        "building a {} MiB archive of {frames} frames of {} MiB …",
        frames * frame / MIB,
        frame / MIB
    );
    let (pristine, kept, kept_bytes) = build(dir, frames, frame);
    let work = dir.join("work.zip");
    let copy = dir.join("copy.bin");
    let mut ratios = Vec::new();
    println!(
        "compaction keeping every 10th frame ({} MiB of {} MiB) vs cp + fsync of the kept bytes",
        kept_bytes / MIB,
        frames * frame / MIB
    );
    for r in 0..rounds {
        let cp1 = cp_synced(&kept, &copy);
        let _ = std::fs::remove_file(&work);
        std::fs::hard_link(&pristine, &work).unwrap();
        sync_all();
        let t0 = Instant::now();
        run(Command::new(daemon_bin()).args([
            "compact",
            work.to_str().unwrap(),
            "--group",
            "run",
            "--keep-every",
            "10",
        ]));
        let compact = t0.elapsed();
        let cp2 = cp_synced(&kept, &copy);
        let cp = (cp1 + cp2) / 2;
        let ratio = cp.as_secs_f64() / compact.as_secs_f64();
        println!(
            "  round {r}: compact {:.3} s ({:.0} MiB/s), cp {:.3} s / {:.3} s ({:.0} MiB/s): ratio {ratio:.2}",
            compact.as_secs_f64(),
            kept_bytes as f64 / MIB as f64 / compact.as_secs_f64(),
            cp1.as_secs_f64(),
            cp2.as_secs_f64(),
            kept_bytes as f64 / MIB as f64 / cp.as_secs_f64()
        );
        ratios.push(ratio);
    }
    println!(
        "summary: compaction at {:.2}x the speed of cp of the kept bytes (median of {rounds} rounds; target >= 0.70)",
        median(&ratios)
    );
    for p in [&pristine, &kept, &work] {
        let _ = std::fs::remove_file(p);
    }
}

fn bench_snapshot(dir: &Path, rounds: usize, what: &str) {
    let total = env_u64("BENCH_ARCHIVE_MB", 1024) * MIB;
    let frame = env_u64("BENCH_FRAME_MB", 16) * MIB;
    let frames = (total / frame).max(2);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (pristine, kept, _) = build(dir, frames, frame);
    std::fs::remove_file(&kept).unwrap();
    let live = data.join("live.zip");
    std::fs::rename(&pristine, &live).unwrap();
    let size = std::fs::metadata(&live).unwrap().len();
    let sock = dir.join("d.sock");
    let mut d = ChildDaemon::spawn(&data, &sock, None, &dir.join("daemon.log"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = format!("unix:{}", sock.display());
    let (c, w) = rt.block_on(async {
        let c = logd::Client::connect(&addr).await.unwrap();
        // A Write stream holds the archive open: the snapshot is of a live one.
        let w = c
            .writer("live.zip", logd::OpenOptions::append().group("run"))
            .await
            .unwrap();
        (c, w)
    });
    let copy = dir.join("copy.bin");
    let mut ratios = Vec::new();
    println!(
        "snapshot of a live {} MiB archive ({what}) vs cp + fsync",
        size / MIB
    );
    for r in 0..rounds {
        let cp1 = cp_synced(&live, &copy);
        let name = format!("snap-{r}.zip");
        sync_all();
        let t0 = Instant::now();
        let s = rt.block_on(c.snapshot("live.zip", &name)).unwrap();
        let snap = t0.elapsed();
        let cp2 = cp_synced(&live, &copy);
        let cp = (cp1 + cp2) / 2;
        let ratio = cp.as_secs_f64() / snap.as_secs_f64();
        println!(
            "  round {r}: snapshot {:.3} s ({} MiB reflinked), cp {:.3} s / {:.3} s: ratio {ratio:.2}",
            snap.as_secs_f64(),
            s.reflinked_bytes / MIB,
            cp1.as_secs_f64(),
            cp2.as_secs_f64()
        );
        std::fs::remove_file(data.join(&name)).unwrap();
        ratios.push((ratio, snap.as_secs_f64()));
    }
    let med = median(&ratios.iter().map(|r| r.0).collect::<Vec<_>>());
    let med_t = median(&ratios.iter().map(|r| r.1).collect::<Vec<_>>());
    println!(
        "summary: snapshot ({what}) at {med:.2}x the speed of cp, {med_t:.3} s (median of {rounds} rounds; targets: >= 0.80x without reflinks, <= 1 s of 10 GB with)"
    );
    rt.block_on(w.close()).unwrap();
    d.terminate(Duration::from_secs(60));
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    if std::env::var_os("BENCH_SKIP_COMPACT").is_none() {
        let dir = temp_root("bench-compact-");
        bench_compaction(dir.path(), rounds);
    }
    if std::env::var_os("BENCH_SKIP_SNAPSHOT").is_none() {
        let dir = temp_root("bench-snap-");
        bench_snapshot(dir.path(), rounds, "this disk");
        if let Some(r) = std::env::var_os("BENCH_REFLINK_DIR") {
            let dir = tempfile::Builder::new()
                .prefix("bench-snap-")
                .tempdir_in(r)
                .unwrap();
            bench_snapshot(dir.path(), rounds, "reflink file system");
        }
    }
}
