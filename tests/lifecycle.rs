//! The lifecycle after the save, offline: `gtar-logd compact`, `snapshot`
//! and `export` as the real binary runs them, on archives we write and on
//! archives libgetar wrote in keras_gtar's layout. Tests that need libgetar
//! are `#[ignore]`d in a plain `cargo test`; `./test.sh` runs them with
//! GTAR_ORACLE_PYTHON set. The kill -9 test replays with
//! GTAR_TEST_SEED=<seed>.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gtar::{Archive, ArchiveWriter, Compression, OpenMode, OpenState};
use rand::{Rng, SeedableRng};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gtar-logd")
}

fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run gtar-logd")
}

fn ok(args: &[&str]) -> String {
    let o = cli(args);
    assert!(
        o.status.success(),
        "gtar-logd {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = cli(args);
    assert!(!o.status.success(), "gtar-logd {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// What the training run of [`write_run`] put in an archive.
struct Run {
    /// Record name → bytes (the last value of a rewritten name).
    records: BTreeMap<String, Vec<u8>>,
    frames: Vec<String>,
}

/// A run as GTARLogger writes it, under group `run`: per frame a weight
/// tensor (large, stored), a bias (deflated), a manifest, the rewritten
/// keras_gtar shape record, and the epoch's val_loss; model.json once. Plus
/// records of another group at every frame, which compaction of `run` keeps.
fn write_run(path: &Path, frames: usize, weight_len: usize, loss: impl Fn(usize) -> f64) -> Run {
    let mut records = BTreeMap::new();
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    w.enable_direct_io();
    let mut t = w.begin().unwrap();
    t.add(
        "run/keras/model.json",
        b"{\"class_name\": \"Sequential\"}",
        Compression::Stored,
    )
    .unwrap();
    t.commit().unwrap();
    records.insert(
        "run/keras/model.json".to_string(),
        b"{\"class_name\": \"Sequential\"}".to_vec(),
    );
    for f in 0..frames {
        let mut t = w.begin().unwrap();
        let mut put = |name: String, data: Vec<u8>, c: Compression| {
            t.add(&name, &data, c).unwrap();
            records.insert(name, data);
        };
        put(
            format!("run/keras/layer/0/weight/0/frames/{f}/weight.f32.uni"),
            det_bytes(f as u64, weight_len),
            Compression::Stored,
        );
        put(
            format!("run/keras/layer/0/weight/1/frames/{f}/weight.f32.uni"),
            det_text_bytes(f as u64, 4000),
            Compression::Deflate(6),
        );
        put(
            "run/keras/layer/0/weight/0/shape.u32.uni".into(),
            ((weight_len / 4) as u32).to_le_bytes().to_vec(),
            Compression::Stored,
        );
        put(
            format!("run/gtar_logd/frames/{f}/manifest.json"),
            format!("{{\"format\":\"gtar-logd/1\",\"frame\":\"{f}\",\"tensors\":[]}}").into_bytes(),
            Compression::Stored,
        );
        put(
            format!("run/metrics/epoch/vars/val_loss.f64.uni/{f}"),
            loss(f).to_le_bytes().to_vec(),
            Compression::Stored,
        );
        put(
            format!("other/frames/{f}/x.u8.uni"),
            det_bytes(1000 + f as u64, 100),
            Compression::Stored,
        );
        t.commit().unwrap();
    }
    w.close().unwrap();
    Run {
        records,
        frames: (0..frames).map(|f| f.to_string()).collect(),
    }
}

/// Is `name` a discrete record of group `run` at a frame not in `kept`?
fn dropped(name: &str, kept: &BTreeSet<String>) -> bool {
    let rp = gtar::RecordPath::parse(name);
    rp.rtype.behavior == gtar::Behavior::Discrete
        && gtar::group_under(&rp.rtype.group, Some("run"))
        && !kept.contains(&rp.index)
}

/// The archive holds exactly `run`'s records less the dropped frames, bit
/// for bit, and opens without recovery.
fn assert_holds(path: &Path, run: &Run, kept: &BTreeSet<String>) {
    let a = Archive::open(path).unwrap();
    assert!(
        matches!(a.state(), OpenState::Clean),
        "{} needed recovery",
        path.display()
    );
    let frames: BTreeSet<String> = a.index().frames_under(Some("run")).into_iter().collect();
    assert_eq!(&frames, kept, "frames of run");
    for (name, data) in &run.records {
        match a.read(name) {
            Ok(got) => {
                assert!(!dropped(name, kept), "{name} should be gone");
                assert!(got == *data, "{name}: bytes differ");
            }
            Err(e) => assert!(dropped(name, kept), "{name}: {e}"),
        }
    }
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn compact_keeps_what_the_policies_say_bit_exact_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.zip");
    // val_loss is best at epochs 3 and 7.
    let run = write_run(&path, 20, 200_000, |f| match f {
        3 => 0.01,
        7 => 0.02,
        _ => 1.0 + f as f64,
    });
    let old = std::fs::read(&path).unwrap();
    let args = [
        "compact",
        p(&path),
        "--group",
        "run",
        "--keep-last",
        "2",
        "--keep-every",
        "5",
        "--keep-best",
        "val_loss:min:2",
    ];
    // A dry run says what it would do and changes nothing.
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let out = ok(&dry);
    assert!(out.contains("would keep\t3\tbest=0.01"), "{out}");
    assert!(out.contains("would drop\t4\n"), "{out}");
    assert!(out.contains("nothing written"), "{out}");
    assert!(std::fs::read(&path).unwrap() == old);
    let predicted: u64 = out
        .split("size would go ")
        .nth(1)
        .and_then(|s| s.split(" -> ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("predicted size");

    let out = ok(&args);
    let kept = set(&["0", "3", "5", "7", "10", "15", "18", "19"]);
    for f in &run.frames {
        let verdict = if kept.contains(f) { "keep" } else { "drop" };
        assert!(out.contains(&format!("{verdict}\t{f}")), "{f}: {out}");
    }
    assert!(out.contains("keep\t19\tnewest,last\n"), "{out}");
    assert!(out.contains("keep\t10\tevery\n"), "{out}");
    assert!(
        out.contains("frames: 8 kept, 12 dropped (36 entries)"),
        "{out}"
    );
    assert_holds(&path, &run, &kept);
    let new_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(new_len, predicted, "the dry run predicts the size exactly");
    // Reclaimed at least the dropped weights' bytes.
    assert!(
        new_len + 12 * 200_000 <= old.len() as u64,
        "{} -> {new_len}",
        old.len()
    );
    assert!(
        out.contains(&format!("size: {} -> {new_len} bytes", old.len())),
        "{out}"
    );
    // `frames` lists the kept ones; metrics of every epoch are still there.
    let listed = ok(&["frames", p(&path), "--group", "run/keras"]);
    assert_eq!(listed, "0\n3\n5\n7\n10\n15\n18\n19\n");
    let a = Archive::open(&path).unwrap();
    for f in &run.frames {
        a.read(&format!("run/metrics/epoch/vars/val_loss.f64.uni/{f}"))
            .unwrap();
    }
    // Compacting again with the same policy drops nothing and leaves the
    // file alone; nothing is left beside it.
    let again = ok(&args);
    assert!(again.contains("nothing to drop"), "{again}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), new_len);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // The daemon's writer appends to the compacted file as to any other.
    let (mut w, rep) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
    assert!(rep.is_none());
    let mut t = w.begin().unwrap();
    t.add(
        "run/keras/layer/0/weight/0/frames/20/weight.f32.uni",
        b"abcd",
        Compression::Stored,
    )
    .unwrap();
    t.commit().unwrap();
    w.close().unwrap();
    assert_eq!(
        ok(&["frames", p(&path), "--group", "run/keras"])
            .lines()
            .count(),
        9
    );
}

/// The frame `GTARLogger(monitor=...)` recorded as the best (a
/// `best.json` pointing at it) is kept by any policy; `--drop-best` lets it
/// go, and its record with it, so no record names a frame that is gone.
/// Before, `--keep-last 2` dropped it without a word and `best.json` then
/// named a frame that no longer existed.
#[test]
fn compact_keeps_the_recorded_best_frame_unless_told_to_drop_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.zip");
    let mut run = write_run(&path, 5, 4096, |f| f as f64);
    const BEST: &str = "run/gtar_logd/keras/best.json";
    let best = br#"{"format":"gtar-logd/keras-best/1","frame":"0","monitor":"val_loss","mode":"min","value":0.0,"epoch":0}"#;
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
    let mut t = w.begin().unwrap();
    t.add(BEST, best, Compression::Stored).unwrap();
    t.commit().unwrap();
    w.close().unwrap();
    run.records.insert(BEST.into(), best.to_vec());

    let out = ok(&["compact", p(&path), "--group", "run", "--keep-last", "2"]);
    assert!(out.contains("keep\t0\trecorded-best"), "{out}");
    assert_holds(&path, &run, &set(&["0", "3", "4"]));

    let out = ok(&[
        "compact",
        p(&path),
        "--group",
        "run",
        "--keep-last",
        "1",
        "--drop-best",
    ]);
    assert!(out.contains("drop\t0"), "{out}");
    assert!(out.contains(&format!("drop\t{BEST}")), "{out}");
    run.records.remove(BEST);
    assert_holds(&path, &run, &set(&["4"]));
    assert!(Archive::open(&path).unwrap().read(BEST).is_err());
}

#[test]
fn compact_refuses_what_it_cannot_judge_and_a_live_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.zip");
    write_run(&path, 4, 1000, |f| f as f64);
    let before = std::fs::read(&path).unwrap();
    let a = p(&path);
    let e = fails(&["compact", a]);
    assert!(e.contains("give at least one of --keep-last"), "{e}");
    let e = fails(&["compact", a, "--keep-best", "accuracy:max:1"]);
    assert!(
        e.contains("no metric \"accuracy\"") && e.contains("val_loss"),
        "{e}"
    );
    let e = fails(&["compact", a, "--keep-best", "val_loss:lowest:1"]);
    assert!(e.contains("METRIC:min|max:N"), "{e}");
    // gtar-logd's frames carry no write time yet: refused, not dropped.
    let e = fails(&["compact", a, "--keep-newer-than", "1h"]);
    assert!(e.contains("write time of 4 of 4 frames is unknown"), "{e}");
    let e = fails(&["compact", a, "--keep-newer-than", "soon"]);
    assert!(e.contains("--keep-newer-than \"soon\""), "{e}");
    let e = fails(&["compact", a, "--group", "nope", "--keep-last", "1"]);
    assert!(e.contains("no group \"nope\""), "{e}");
    {
        let (_w, _) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
        let e = fails(&["compact", a, "--keep-last", "1"]);
        assert!(e.contains("a writer has this archive open"), "{e}");
    }
    assert!(std::fs::read(&path).unwrap() == before, "nothing changed");
}

#[test]
fn compaction_killed_at_random_points_leaves_the_old_or_the_new_archive() {
    let seed = seed_from_env("GTAR_TEST_SEED");
    eprintln!("seed {seed} (replay with GTAR_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine.zip");
    let run = write_run(&pristine, 24, 6 << 20, |f| f as f64);
    let path = dir.path().join("run.zip");
    let args = |path: &Path| -> Vec<String> {
        [
            "compact",
            p(path),
            "--group",
            "run",
            "--keep-last",
            "3",
            "--keep-every",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let all: BTreeSet<String> = run.frames.iter().cloned().collect();
    let kept = set(&["0", "8", "16", "21", "22", "23"]);
    // How long an uninterrupted compaction takes here.
    std::fs::copy(&pristine, &path).unwrap();
    let t0 = Instant::now();
    ok(&args(&path).iter().map(String::as_str).collect::<Vec<_>>());
    let full = t0.elapsed();
    assert_holds(&path, &run, &kept);
    eprintln!("an uninterrupted compaction takes {full:?}");
    let new_len = std::fs::metadata(&path).unwrap().len();
    let temp = dir.path().join(".run.zip.compact-tmp");
    // Where to kill, in turn: after a random time; when the new file has a
    // random share of its bytes (copying); when it has all of them (fsync,
    // rename); once it was renamed into place (fsync of the directory).
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut kills, mut olds, mut news) = (0, 0, 0);
    for round in 0..120 {
        if kills >= 24 && phases.len() >= 3 {
            break;
        }
        std::fs::copy(&pristine, &path).unwrap();
        // What a killed run left is replaced by the next one (kept for the
        // rounds killed at a random time); the size-watching rounds need a
        // fresh start.
        if round % 4 != 0 {
            let _ = std::fs::remove_file(&temp);
        }
        let mut child = Command::new(bin())
            .args(args(&path))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let temp_len = || std::fs::metadata(&temp).map(|m| m.len()).ok();
        let t0 = Instant::now();
        let running = |c: &mut std::process::Child| c.try_wait().unwrap().is_none();
        let phase = match round % 4 {
            0 => {
                std::thread::sleep(full.mul_f64(rng.gen_range(0.0..1.0)));
                "at a random time"
            }
            1 => {
                let want = (new_len as f64 * rng.gen_range(0.0..1.0)) as u64;
                while running(&mut child) && temp_len().is_none_or(|n| n < want) {}
                "while copying"
            }
            2 => {
                while running(&mut child) && temp_len().is_none_or(|n| n < new_len) {}
                "with the new file complete, before the rename"
            }
            _ => {
                let mut seen = false;
                while running(&mut child) {
                    match temp_len() {
                        Some(n) if n >= new_len => seen = true,
                        Some(_) => {}
                        None if seen => break,
                        None => {}
                    }
                }
                "after the rename"
            }
        };
        let when = t0.elapsed();
        let killed = running(&mut child);
        if killed {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
            *phases.entry(phase).or_default() += 1;
        }
        child.wait().unwrap();
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
            assert_holds(&path, &run, &all);
        } else {
            news += 1;
            assert_holds(&path, &run, &kept);
        }
    }
    eprintln!("kills by phase: {phases:?}");
    eprintln!("{kills} kills: {olds} left the old archive, {news} the new one");
    assert!(
        kills >= 20,
        "only {kills} compactions were killed while running"
    );
    // A compaction after the kills cleans up what they left.
    ok(&args(&path).iter().map(String::as_str).collect::<Vec<_>>());
    assert_holds(&path, &run, &kept);
    // No temporary file is left; recovery checkpoints (sidecars) may be.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(gtar::SIDECAR_SUFFIX))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// A writer thread appending frames until stopped; `committed` counts the
/// frames committed so far.
struct LiveWriter {
    committed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    index: Arc<std::sync::RwLock<gtar::Index>>,
}

fn frame_bytes(f: usize) -> Vec<u8> {
    det_bytes(f as u64, (12_500 + 37 * f) * 4)
}

impl LiveWriter {
    fn start(path: &Path) -> LiveWriter {
        let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
        let index = w.shared_index();
        let committed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (committed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut f = 0;
            while !s.load(Ordering::SeqCst) && f < 5000 {
                let mut t = w.begin().unwrap();
                t.add(
                    &format!("frames/{f}/w.f32.uni"),
                    &frame_bytes(f),
                    Compression::Stored,
                )
                .unwrap();
                t.add(
                    &format!("frames/{f}/n.i64.uni"),
                    &(f as i64).to_le_bytes(),
                    Compression::Deflate(1),
                )
                .unwrap();
                t.commit().unwrap();
                f += 1;
                c.store(f, Ordering::SeqCst);
                if f % 8 == 0 {
                    w.sync().unwrap();
                }
            }
            w.close().unwrap();
        });
        LiveWriter {
            committed,
            stop,
            thread: Some(thread),
            index,
        }
    }

    fn wait_for(&self, n: usize) {
        while self.committed.load(Ordering::SeqCst) < n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for LiveWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// The snapshot opens cleanly and holds at least the first `n` frames, each
/// complete and bit-exact; with the oracle, libgetar agrees.
fn assert_snapshot(path: &Path, n: usize, oracle_too: bool) {
    let a = Archive::open(path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    let frames = a.index().frames_under(None);
    assert!(
        frames.len() >= n,
        "{} frames, {n} were committed",
        frames.len()
    );
    for f in &frames {
        let k: usize = f.parse().unwrap();
        assert!(a.read(&format!("frames/{f}/w.f32.uni")).unwrap() == frame_bytes(k));
        assert_eq!(
            a.read(&format!("frames/{f}/n.i64.uni")).unwrap(),
            (k as i64).to_le_bytes()
        );
    }
    if oracle_too {
        let theirs = oracle_view(path, false);
        assert_same_view(&rust_view(path, false), &theirs, "snapshot");
        assert!(theirs.iter().all(|t| t.records.len() == frames.len()));
    }
}

fn snapshot_while_writing(oracle_too: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.zip");
    let live = LiveWriter::start(&path);
    live.wait_for(20);
    // In process, as the daemon's Snapshot RPC does it: the view of the
    // writer's shared index, taken under its lock.
    let src = std::fs::File::open(&path).unwrap();
    let before = live.committed.load(Ordering::SeqCst);
    let view = gtar::CommittedView::of_index(&src, &live.index.read().unwrap()).unwrap();
    let dst = dir.path().join("snap-rpc.zip");
    let s = gtar::snapshot(&src, &view, &dst).unwrap();
    assert_eq!(s.stats.total(), s.committed);
    assert_snapshot(&dst, before, oracle_too);
    // Offline, from another process, while the writer goes on.
    live.wait_for(before + 20);
    let before = live.committed.load(Ordering::SeqCst);
    let dst = dir.path().join("snap-cli.zip");
    let out = ok(&["snapshot", p(&path), p(&dst)]);
    assert!(out.contains("entries"), "{out}");
    assert_snapshot(&dst, before, oracle_too);
    // Never over an existing file.
    let e = fails(&["snapshot", p(&path), p(&dst)]);
    assert!(e.contains("exists"), "{e}");
    drop(live);
    // Of the closed archive: every frame.
    let all = Archive::open(&path)
        .unwrap()
        .index()
        .frames_under(None)
        .len();
    let dst = dir.path().join("snap-closed.zip");
    ok(&["snapshot", p(&path), p(&dst)]);
    assert_snapshot(&dst, all, oracle_too);
    assert_eq!(
        Archive::open(&dst)
            .unwrap()
            .index()
            .frames_under(None)
            .len(),
        all
    );
}

#[test]
fn snapshot_of_an_archive_being_written_holds_every_committed_frame() {
    snapshot_while_writing(false);
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_libgetar_opens_snapshots_of_an_archive_being_written() {
    snapshot_while_writing(true);
}

/// keras_gtar's layout written by libgetar itself (`oracle keras-layout`):
/// (path → bytes) of every weight at every frame, model.json, final shapes.
fn libgetar_keras_archive(path: &Path, frames: &str) -> BTreeMap<String, Vec<u8>> {
    let out = oracle(&["keras-layout", p(path), "--frames", frames]);
    let mut recs = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "model_json" => {
                recs.insert("keras/model.json".to_string(), unhex(f[1]));
            }
            "weight" | "shape" => {
                recs.insert(f[1].to_string(), unhex(f[2]));
            }
            other => panic!("oracle line {other:?}"),
        }
    }
    recs
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_compacting_a_libgetar_keras_archive_keeps_its_records_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.zip");
    let frames: Vec<String> = (0..12).map(|f| f.to_string()).collect();
    let recs = libgetar_keras_archive(&path, &frames.join(","));
    let old_len = std::fs::metadata(&path).unwrap().len();
    let before = oracle_view(&path, true);
    // libgetar stamps entries with the time of writing: "newer than an
    // hour" keeps every frame (the time survives compaction, too).
    let out = ok(&["compact", p(&path), "--keep-newer-than", "1h"]);
    assert!(out.contains("frames: 12 kept, 0 dropped"), "{out}");
    assert_same_view(&oracle_view(&path, true), &before, "all frames kept");
    let out = ok(&["compact", p(&path), "--keep-newer-than", "1h", "--dry-run"]);
    assert!(out.contains("nothing to drop"), "{out}");

    let out = ok(&["compact", p(&path), "--keep-last", "3", "--keep-every", "4"]);
    assert!(out.contains("frames: 6 kept, 6 dropped"), "{out}");
    let kept = ["0", "4", "8", "9", "10", "11"];
    let after = oracle_view(&path, true);
    assert_same_view(&rust_view(&path, true), &after, "compacted");
    // libgetar sees the same records, less the dropped frames, bit for bit.
    let mut want = before.clone();
    for t in &mut want {
        if t.behavior == 1 {
            t.records.retain(|r| kept.contains(&r.frame.as_str()));
        }
    }
    assert_same_view(&after, &want, "libgetar after compaction");
    let a = Archive::open(&path).unwrap();
    for (name, data) in &recs {
        let rp = gtar::RecordPath::parse(name);
        let gone =
            rp.rtype.behavior == gtar::Behavior::Discrete && !kept.contains(&rp.index.as_str());
        match a.read(name) {
            Ok(got) => assert!(!gone && got == *data, "{name}"),
            Err(e) => assert!(gone, "{name}: {e}"),
        }
    }
    let new_len = std::fs::metadata(&path).unwrap().len();
    assert!(new_len < old_len / 2, "{old_len} -> {new_len}");
    // libgetar appends to the result (it is zip64), and we read that.
    oracle(&["append", p(&path), "--frame", "99"]);
    assert!(Archive::open(&path)
        .unwrap()
        .index()
        .frames_under(None)
        .contains(&"99".to_string()));
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_libgetar_opens_our_compacted_archives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.zip");
    write_run(&path, 10, 70_000, |f| 10.0 - f as f64);
    let before = oracle_view(&path, true);
    let out = ok(&[
        "compact",
        p(&path),
        "--group",
        "run",
        "--keep-best",
        "val_loss:min:2",
    ]);
    assert!(out.contains("keep\t8\tbest=2"), "{out}");
    let after = oracle_view(&path, true);
    assert_same_view(&rust_view(&path, true), &after, "compacted");
    let mut want = before;
    for t in &mut want {
        if t.behavior == 1 && t.group.starts_with("run/") {
            t.records.retain(|r| r.frame == "8" || r.frame == "9");
        }
    }
    assert_same_view(&after, &want, "libgetar after compaction");
}

#[test]
#[ignore = "needs the libgetar oracle (GTAR_ORACLE_PYTHON); run by ./test.sh"]
fn oracle_export_of_a_libgetar_keras_archive_names_layers_and_keeps_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.zip");
    let recs = libgetar_keras_archive(&path, "0,1,2");
    let out = dir.path().join("k.safetensors");
    let said = ok(&[
        "export",
        p(&path),
        "--frame",
        "1",
        "--format",
        "safetensors",
        "-o",
        p(&out),
    ]);
    assert!(said.contains("frame 1 of"), "{said}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "layer/0/weight/0",
            "layer/0/weight/1",
            "layer/2/weight/0",
            "layer/2/weight/1",
            "layer/3/weight/0"
        ]
    );
    for name in names {
        let t = st.tensor(name).unwrap();
        let (i, j) = (&name[6..7], &name[15..16]);
        let rec = &recs[&format!("keras/layer/{i}/weight/{j}/frames/1/weight.f32.uni")];
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert!(t.data() == rec.as_slice(), "{name}");
        let shape = &recs[&format!("keras/layer/{i}/weight/{j}/shape.u32.uni")];
        let shape: Vec<usize> = shape
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
    }
    // npz: one .npy per tensor, the data after a 64-byte-aligned header.
    let npz = dir.path().join("k.npz");
    ok(&["export", p(&path), "--format", "npz", "-o", p(&npz)]);
    let mut z = zip::ZipArchive::new(std::fs::File::open(&npz).unwrap()).unwrap();
    assert_eq!(z.len(), 5);
    let mut e = z.by_name("layer/0/weight/0.npy").unwrap();
    let mut npy = Vec::new();
    std::io::Read::read_to_end(&mut e, &mut npy).unwrap();
    let hl = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = String::from_utf8_lossy(&npy[10..10 + hl]).into_owned();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("(3, 5)"),
        "{header}"
    );
    assert!(npy[10 + hl..] == recs["keras/layer/0/weight/0/frames/2/weight.f32.uni"][..]);
    // A frame that is not there is named in the error.
    let e = fails(&[
        "export",
        p(&path),
        "--frame",
        "7",
        "--format",
        "npz",
        "-o",
        p(&npz),
    ]);
    assert!(
        e.contains("no frame \"7\"") && e.contains("3 frames"),
        "{e}"
    );
}

/// The Python check of exports (safetensors and numpy from PyPI), when a
/// Python with them is given: `GTAR_EXPORT_PYTHON`.
#[test]
#[ignore = "needs a Python with safetensors, numpy, ml_dtypes (GTAR_EXPORT_PYTHON); run by ./test.sh"]
fn export_python_safetensors_reads_every_dtype_bit_exact() {
    let py = std::env::var("GTAR_EXPORT_PYTHON").expect(
        "GTAR_EXPORT_PYTHON: a Python with safetensors, numpy and ml_dtypes (./test.sh sets it)",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.zip");
    // The daemon's layout for non-libgetar dtypes: raw bytes in u8 records,
    // dtype and shape in the frame's manifest.
    let dtypes = [
        ("float32", "f32", 4),
        ("float64", "f64", 8),
        ("int32", "i32", 4),
        ("int64", "i64", 8),
        ("uint8", "u8", 1),
        ("uint32", "u32", 4),
        ("uint64", "u64", 8),
        ("float16", "u8", 2),
        ("bfloat16", "u8", 2),
        ("int8", "u8", 1),
        ("int16", "u8", 2),
        ("uint16", "u8", 2),
        ("bool", "u8", 1),
    ];
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    let mut t = w.begin().unwrap();
    let mut manifest = Vec::new();
    let mut expect = String::new();
    for (k, (dt, fmt, size)) in dtypes.iter().enumerate() {
        let shape = [3usize, k + 1];
        let mut data = det_bytes(k as u64, shape[0] * shape[1] * size);
        if *dt == "bool" {
            data.iter_mut().for_each(|b| *b &= 1);
        }
        let rec = format!("tensors/t_{dt}/frames/5/value.{fmt}.uni");
        t.add(&rec, &data, Compression::Stored).unwrap();
        manifest.push(format!(
            "{{\"path\":\"{rec}\",\"dtype\":\"{dt}\",\"shape\":[{},{}]}}",
            shape[0], shape[1]
        ));
        expect.push_str(&format!("t_{dt}\t{dt}\t{}\t{}\n", shape[0], hex(&data)));
    }
    let m = format!(
        "{{\"format\":\"gtar-logd/1\",\"frame\":\"5\",\"tensors\":[{}]}}",
        manifest.join(",")
    );
    t.add(
        "gtar_logd/frames/5/manifest.json",
        m.as_bytes(),
        Compression::Stored,
    )
    .unwrap();
    t.commit().unwrap();
    w.close().unwrap();
    let want = dir.path().join("want.tsv");
    std::fs::write(&want, expect).unwrap();
    let check = r#"
import sys, numpy as np, ml_dtypes
from safetensors import safe_open
from safetensors.numpy import load_file
fmt, out, want = sys.argv[1:4]
rows = [l.split("\t") for l in open(want).read().splitlines()]
if fmt == "safetensors":
    got = load_file(out)
    with safe_open(out, framework="np") as f:
        assert sorted(f.keys()) == sorted(got), f.keys()
        for k in f.keys():
            assert f.get_tensor(k).tobytes() == got[k].tobytes()
else:
    z = np.load(out)
    got = {k: z[k] for k in z.files}
assert sorted(got) == sorted(r[0] for r in rows), sorted(got)
for name, dt, rows_, hexdata in rows:
    a = got[name]
    if fmt == "npz" and dt == "bfloat16":
        assert a.dtype == np.dtype("V2"), a.dtype
        a = a.view(ml_dtypes.bfloat16)
    assert a.dtype == (np.dtype(ml_dtypes.bfloat16) if dt == "bfloat16" else np.dtype(dt)), (name, a.dtype)
    assert a.shape == (int(rows_), a.size // int(rows_)), (name, a.shape)
    assert a.tobytes() == bytes.fromhex(hexdata), name
print("ok", len(rows))
"#;
    for fmt in ["safetensors", "npz"] {
        let out = dir.path().join(format!("d.{fmt}"));
        ok(&["export", p(&path), "--format", fmt, "-o", p(&out)]);
        let o = Command::new(&py)
            .args(["-c", check, fmt, p(&out), p(&want)])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{fmt}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok 13");
    }
}

/// Free bytes of the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(p(dir)).unwrap();
    // SAFETY: statvfs fills the struct we own from a valid C string path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        s.f_bavail * s.f_frsize
    }
}

/// Bytes of `path` in extents the file system marks shared (FIEMAP's
/// FIEMAP_EXTENT_SHARED, as `filefrag -v` prints it).
fn shared_bytes(path: &Path) -> u64 {
    let out = Command::new("filefrag")
        .args(["-v", "-b4096", p(path)])
        .output()
        .expect("filefrag (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "filefrag -v {}: {out:?}",
        path.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "   0:        0..    2047:      24576..     26623:   2048:             shared"
    text.lines()
        .filter(|l| l.contains("shared"))
        .filter_map(|l| l.split(':').nth(3)?.trim().parse::<u64>().ok())
        .sum::<u64>()
        * 4096
}

/// Snapshot and compaction on a reflink-capable file system (./test.sh makes
/// a small XFS with reflink=1 on a loop file and sets GTAR_REFLINK_DIR):
/// the copies share extents with the source (FIEMAP says so), writing to the
/// source afterwards leaves the snapshot as it was, and both stay valid.
#[test]
#[ignore = "needs GTAR_REFLINK_DIR: a directory on a reflink-capable file system; ./test.sh makes one"]
fn snapshots_and_compactions_share_extents_where_the_file_system_can() {
    let base = std::env::var_os("GTAR_REFLINK_DIR").expect(
        "GTAR_REFLINK_DIR: a directory on XFS (reflink=1) or btrfs; ./test.sh makes one on a \
         loop file",
    );
    let dir = tempfile::tempdir_in(base).unwrap();
    let path = dir.path().join("run.zip");
    let run = write_run(&path, 16, 8 << 20, |f| f as f64);
    let size = std::fs::metadata(&path).unwrap().len();
    // Snapshot: the committed prefix is cloned, not copied.
    let free = free_bytes(dir.path());
    let dst = dir.path().join("snap.zip");
    let s = gtar::snapshot_path(&path, &dst).unwrap();
    let used = free.saturating_sub(free_bytes(dir.path()));
    let shared = shared_bytes(&dst);
    eprintln!(
        "snapshot: {:?}; {used} bytes of {size} newly used; {shared} bytes in shared extents",
        s.stats
    );
    assert!(s.stats.reflinked >= s.committed - 4096, "{:?}", s.stats);
    assert!(
        shared >= size * 9 / 10,
        "only {shared} of {size} bytes of the snapshot share extents"
    );
    assert!(
        used < size / 10,
        "{used} bytes used for a {size}-byte snapshot"
    );
    assert_snapshot_of_run(&dst, &run);
    // A write to the source lands in its own blocks, not the snapshot's.
    let snap_before = std::fs::read(&dst).unwrap();
    let mid = size / 2;
    let mut saved = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.read_exact_at(&mut saved, mid).unwrap();
        f.write_all_at(&vec![0xA5; 4096], mid).unwrap();
        f.sync_all().unwrap();
        assert!(
            std::fs::read(&dst).unwrap() == snap_before,
            "the snapshot changed"
        );
        f.write_all_at(&saved, mid).unwrap();
        f.sync_all().unwrap();
    }
    // Compaction: kept tensors keep their offsets modulo 4 KiB, so the
    // kernel's copy shares their blocks too.
    let free = free_bytes(dir.path());
    ok(&["compact", p(&path), "--group", "run", "--keep-every", "2"]);
    let used = free.saturating_sub(free_bytes(dir.path()));
    let new_len = std::fs::metadata(&path).unwrap().len();
    let shared = shared_bytes(&path);
    eprintln!(
        "compaction: {size} -> {new_len} bytes; {used} bytes newly used; {shared} bytes shared"
    );
    assert!(
        shared >= new_len * 9 / 10,
        "only {shared} of {new_len} bytes of the compacted archive share extents"
    );
    assert!(
        used < new_len / 10,
        "{used} bytes used for a {new_len}-byte compaction"
    );
    assert_holds(
        &path,
        &run,
        &set(&["0", "2", "4", "6", "8", "10", "12", "14", "15"]),
    );
    assert!(
        std::fs::read(&dst).unwrap() == snap_before,
        "the snapshot changed"
    );
}

fn assert_snapshot_of_run(path: &Path, run: &Run) {
    let all: BTreeSet<String> = run.frames.iter().cloned().collect();
    assert_holds(path, run, &all);
}

#[test]
fn compacting_an_archive_left_torn_keeps_its_complete_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.zip");
    let run = write_run(&path, 6, 10_000, |f| f as f64);
    // As a kill -9 mid-frame leaves it: no central directory, and the last
    // frame cut short.
    let f = std::fs::File::open(&path).unwrap();
    let a = Archive::open(&path).unwrap();
    let last = a
        .index()
        .entries()
        .iter()
        .filter(|e| e.name().contains("/frames/5/"))
        .map(|e| e.cd.local_header_offset)
        .min()
        .unwrap();
    drop((a, f));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(last + 5000).unwrap();
    drop(file);
    let o = cli(&["compact", p(&path), "--group", "run", "--keep-last", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("recovery finds"), "{err}");
    let mut complete = run;
    complete.records.retain(|name, _| {
        let rp = gtar::RecordPath::parse(name);
        rp.index != "5" || rp.rtype.behavior == gtar::Behavior::Constant
    });
    complete.records.insert(
        "run/keras/layer/0/weight/0/shape.u32.uni".into(),
        2500u32.to_le_bytes().to_vec(),
    );
    assert_holds(&path, &complete, &set(&["0", "1", "2", "3", "4"]));
}
