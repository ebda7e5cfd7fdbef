//! Benchmarks of the format library against their anchors, in one run.
//!
//! (a) Writing 1 GiB of stored frames (100 frames x 10 MiB) through
//!     `ArchiveWriter`, next to `dd bs=1M` writing the same amount to the same
//!     directory (on the repo's disk: `target/bench-tmp`), with and without a
//!     sync per frame. Target: >= 0.80 of dd.
//! (b) Opening an archive of 10,000 frames x 20 records and reading the last
//!     frame's 20 records, next to libgetar's Python `GTAR(path, 'r')` +
//!     `getRecord` on the same file (timed inside Python, interpreter start-up
//!     excluded). Target: faster than libgetar.
//!
//! Prints figures and ratios; asserts nothing about time.
//! Run: `cargo bench --bench format`. Set `GTAR_BENCH_REPS` (default 2) for
//! more repetitions (best of N is reported), `GTAR_BENCH_SKIP_WRITE=1` to
//! run (b) only.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gtar::{Archive, ArchiveWriter, Behavior, Compression, OpenMode, OpenState};

const MIB: usize = 1 << 20;
const FRAMES: usize = 100;
const FRAME_BYTES: usize = 10 * MIB;
const TOTAL: f64 = (FRAMES * FRAME_BYTES) as f64;

fn bench_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&d).expect("create target/bench-tmp");
    d
}

/// Flush everything dirty, so one measurement's write-back does not land in
/// the next one's time.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(300));
}

fn mbps(secs: f64) -> f64 {
    TOTAL / secs / 1e6
}

fn best(reps: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..reps).map(|_| f()).fold(f64::INFINITY, f64::min)
}

fn frame_data() -> Vec<u8> {
    // Not zeros: the bytes are checksummed (CRC-32) on the way in.
    let mut v = vec![0u8; FRAME_BYTES];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Sync {
    /// No sync at all: page cache speed (the time stops before `close`).
    None,
    /// One sync at the end (dd `conv=fdatasync`).
    End,
    /// A sync after every frame.
    PerFrame,
}

fn ours(path: &Path, data: &[u8], sync: Sync, direct: bool) -> f64 {
    let _ = std::fs::remove_file(path);
    settle();
    let t = Instant::now();
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    if direct && !w.enable_direct_io() {
        println!("  (no direct I/O on this file system: the direct column is page-cache writes)");
    }
    for i in 0..FRAMES {
        let mut txn = w.begin().unwrap();
        txn.add(
            &format!("frames/{i}/weights.f32.uni"),
            data,
            Compression::Stored,
        )
        .unwrap();
        txn.commit().unwrap();
        if sync == Sync::PerFrame {
            w.sync().unwrap();
        }
    }
    let secs = if sync == Sync::None {
        let s = t.elapsed().as_secs_f64();
        w.close().unwrap();
        s
    } else {
        w.close().unwrap(); // writes the tail and syncs
        t.elapsed().as_secs_f64()
    };
    let _ = std::fs::remove_file(path);
    secs
}

fn dd(path: &Path, sync: Sync) -> f64 {
    let _ = std::fs::remove_file(path);
    settle();
    let of = format!("of={}", path.display());
    let t = Instant::now();
    match sync {
        Sync::None | Sync::End => {
            let mut c = Command::new("dd");
            c.args(["if=/dev/zero", &of, "bs=1M", "count=1024", "status=none"]);
            if sync == Sync::End {
                c.arg("conv=fdatasync");
            }
            assert!(c.status().expect("run dd").success());
        }
        Sync::PerFrame => {
            for i in 0..FRAMES {
                let seek = format!("seek={}", i * FRAME_BYTES / MIB);
                let st = Command::new("dd")
                    .args([
                        "if=/dev/zero",
                        &of,
                        "bs=1M",
                        "count=10",
                        &seek,
                        "conv=notrunc,fdatasync",
                        "status=none",
                    ])
                    .status()
                    .expect("run dd");
                assert!(st.success());
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    secs
}

/// What dd does, in-process (no exec per chunk): 1 MiB writes, an fdatasync
/// after every 10 MiB.
fn raw_loop(path: &Path, data: &[u8]) -> f64 {
    let _ = std::fs::remove_file(path);
    settle();
    let t = Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let mut at = 0u64;
    for _ in 0..FRAMES {
        for c in data.chunks(MIB) {
            f.write_all_at(c, at).unwrap();
            at += c.len() as u64;
        }
        f.sync_data().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    secs
}

fn write_bench(reps: usize) {
    let dir = bench_dir();
    let df = Command::new("df")
        .arg("-h")
        .arg(&dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "(a) write 1 GiB: {FRAMES} frames x 10 MiB, stored, in {}",
        dir.display()
    );
    for l in df.lines() {
        println!("    {l}");
    }
    let data = frame_data();
    let ours_path = dir.join("ours.zip");
    let dd_path = dir.join("dd.bin");
    println!();
    println!(
        "  {:<34} {:>10} {:>12} {:>10} {:>8} {:>8}",
        "mode", "gtar MB/s", "gtar direct", "dd MB/s", "ratio", "direct"
    );
    for (label, sync) in [
        ("no sync (page cache)", Sync::None),
        ("one fdatasync at the end", Sync::End),
        ("fdatasync per frame", Sync::PerFrame),
    ] {
        let mut o = f64::INFINITY;
        let mut od = f64::INFINITY;
        let mut d = f64::INFINITY;
        // Interleave, so drift in the disk hits both sides alike.
        for _ in 0..reps {
            d = d.min(dd(&dd_path, sync));
            o = o.min(ours(&ours_path, &data, sync, false));
            od = od.min(ours(&ours_path, &data, sync, true));
        }
        println!(
            "  {:<34} {:>10.0} {:>12.0} {:>10.0} {:>8.2} {:>8.2}",
            label,
            mbps(o),
            mbps(od),
            mbps(d),
            d / o,
            d / od
        );
        if sync == Sync::PerFrame {
            let r = best(reps, || raw_loop(&dd_path, &data));
            println!(
                "  {:<34} {:>10.0} {:>10.0} {:>8.2}   (anchor: in-process write+fdatasync loop)",
                "fdatasync per frame",
                mbps(o),
                mbps(r),
                r / o
            );
        }
    }
    println!(
        "  ratio = gtar throughput / anchor throughput (target >= 0.80); direct = the same with\n  \
         ArchiveWriter::enable_direct_io (O_DIRECT for entries >= 1 MiB, as the daemon writes)"
    );
    settle();
}

const OPEN_FRAMES: usize = 10_000;
const RECORDS: usize = 20;

fn build_open_archive(path: &Path) {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    let rec: Vec<u8> = (0..64u32).flat_map(|k| (k as f32).to_le_bytes()).collect();
    for n in 0..OPEN_FRAMES {
        let mut t = w.begin().unwrap();
        for r in 0..RECORDS {
            t.add(
                &format!("frames/{n}/record{r:02}.f32.uni"),
                &rec,
                Compression::Stored,
            )
            .unwrap();
        }
        t.commit().unwrap();
    }
    w.close().unwrap();
}

fn oracle_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GTAR_ORACLE_PYTHON") {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        root.join(".venv-oracle/bin/python"),
        PathBuf::from("/tmp/oracle/bin/python"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Our open + read of the last frame's records, the same work as the Python
/// side: every discrete record type, read at the last frame.
fn ours_open_read(path: &Path, last: &str) -> (f64, f64, usize) {
    let t = Instant::now();
    let a = Archive::open(path).unwrap();
    let t_open = t.elapsed().as_secs_f64();
    let types: Vec<_> = a
        .index()
        .record_types()
        .filter(|rt| rt.behavior == Behavior::Discrete)
        .cloned()
        .collect();
    let mut bytes = 0;
    for rt in &types {
        bytes += a.read_record(rt, last).unwrap().len();
    }
    let total = t.elapsed().as_secs_f64();
    assert_eq!(types.len(), RECORDS);
    (t_open, total, bytes)
}

fn open_bench(reps: usize) {
    let dir = bench_dir();
    let path = dir.join("open-10000x20.zip");
    let t = Instant::now();
    build_open_archive(&path);
    let size = std::fs::metadata(&path).unwrap().len();
    println!();
    println!(
        "(b) open + read the last frame: {OPEN_FRAMES} frames x {RECORDS} records, {:.1} MB (built in {:.1?})",
        size as f64 / 1e6,
        t.elapsed()
    );
    let last = (OPEN_FRAMES - 1).to_string();
    let runs = reps.max(5);
    // Warm the page cache for both sides alike.
    let _ = ours_open_read(&path, &last);
    let mut opens = Vec::new();
    let mut totals = Vec::new();
    for _ in 0..runs {
        let (o, tot, bytes) = ours_open_read(&path, &last);
        assert_eq!(bytes, RECORDS * 256);
        opens.push(o);
        totals.push(tot);
    }
    let (ours_open, ours_total) = (median(opens), median(totals));

    // Recovery (no central directory): what the daemon pays after a crash.
    let cut = dir.join("open-10000x20-cut.zip");
    std::fs::copy(&path, &cut).unwrap();
    File::options()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(size - 22)
        .unwrap();
    let t = Instant::now();
    let a = Archive::open(&cut).unwrap();
    let scan = t.elapsed().as_secs_f64();
    assert!(matches!(a.state(), OpenState::Recovered(_)));
    assert_eq!(a.index().entries().len(), OPEN_FRAMES * RECORDS);
    drop(a);
    let _ = std::fs::remove_file(&cut);

    println!();
    println!(
        "  {:<40} {:>12} {:>12} {:>12}",
        "", "open ms", "read ms", "total ms"
    );
    println!(
        "  {:<40} {:>12.2} {:>12.3} {:>12.2}",
        "gtar-logd Archive::open + read_record",
        ours_open * 1e3,
        (ours_total - ours_open) * 1e3,
        ours_total * 1e3
    );
    match oracle_python() {
        None => println!(
            "  libgetar: no oracle python found (set GTAR_ORACLE_PYTHON or run ./test.sh once)"
        ),
        Some(py) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/gtar_oracle.py");
            let mut opens = Vec::new();
            let mut totals = Vec::new();
            for _ in 0..runs + 1 {
                let out = Command::new(&py)
                    .arg(&script)
                    .args(["bench-read", path.to_str().unwrap(), "--index", &last])
                    .output()
                    .expect("run the oracle");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let s = String::from_utf8_lossy(&out.stdout);
                let get = |k: &str| -> f64 {
                    s.lines()
                        .find_map(|l| l.strip_prefix(&format!("{k}\t")))
                        .unwrap_or_else(|| panic!("oracle printed no {k}: {s}"))
                        .parse()
                        .unwrap()
                };
                assert_eq!(get("records") as usize, RECORDS);
                opens.push(get("open_s"));
                totals.push(get("total_s"));
            }
            opens.remove(0); // the first run warms libgetar's caches
            totals.remove(0);
            let (lo, lt) = (median(opens), median(totals));
            println!(
                "  {:<40} {:>12.2} {:>12.3} {:>12.2}",
                "libgetar GTAR(path,'r') + getRecord",
                lo * 1e3,
                (lt - lo) * 1e3,
                lt * 1e3
            );
            println!(
                "  speed-up (libgetar time / gtar-logd time): open {:.2}x, open+read {:.2}x (target > 1)",
                lo / ours_open,
                lt / ours_total
            );
        }
    }
    println!(
        "  {:<40} {:>12.2}   (info: no central directory, recovered by scanning)",
        "gtar-logd Archive::open after a crash",
        scan * 1e3
    );
    println!("  medians of {runs} runs, warm page cache");
    let _ = std::fs::remove_file(&path);
}

fn main() {
    let reps = std::env::var("GTAR_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    if std::env::var_os("GTAR_BENCH_SKIP_WRITE").is_none() {
        write_bench(reps);
    }
    open_bench(reps);
}
