//! Recovery checkpoints: an archive torn in its last frame is recovered from
//! the checkpoint plus a scan of the tail only (counted in bytes read), a
//! damaged or mismatching checkpoint is detected and the whole file scanned,
//! and libgetar appending to an archive that carries one leaves both sides
//! agreeing.
//!
//! The torn archives are real: a child process (this test binary, re-run
//! with `GTAR_CKPT_CHILD` set) writes frames through `ArchiveWriter`, fsyncs
//! some, starts one more frame and exits mid-entry without running any
//! destructor, as a crash would leave it.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use gtar::{self, Archive, ArchiveWriter, Compression, Entry, OpenMode, OpenState, ScanReport};

const CHILD_ENV: &str = "GTAR_CKPT_CHILD";
/// Frames the child fsyncs (each one a checkpoint record).
const SYNCED: u64 = 24;
/// Frames it commits after those without an fsync (in the page cache only,
/// as a `kill -9` leaves them: kept by the scan of the tail).
const UNSYNCED: u64 = 2;
const BIG: usize = 256 * 1024;

fn frame_records(n: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("frames/{n}/w.f32.uni"), det_bytes(n, BIG)),
        (
            format!("frames/{n}/b.f32.uni"),
            det_bytes(n + 1000, 4 * (n as usize + 3)),
        ),
        (format!("frames/{n}/note.txt"), det_text_bytes(n, 300)),
        ("latest.u64.uni".into(), n.to_le_bytes().to_vec()),
    ]
}

/// The child: `SYNCED` frames synced, `UNSYNCED` committed, one torn; prints
/// the committed length after each synced frame.
fn child_main(path: &Path) {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Append).expect("child: open");
    let first = w.reader().unwrap().index().frames_under(None).len() as u64;
    let mut out = std::io::stdout().lock();
    for n in first..first + SYNCED + UNSYNCED {
        let mut t = w.begin().unwrap();
        for (k, (name, data)) in frame_records(n).iter().enumerate() {
            let how = if k == 2 {
                Compression::Deflate(1)
            } else {
                Compression::Stored
            };
            t.add(name, data, how).unwrap();
        }
        t.commit().unwrap();
        if n < first + SYNCED {
            w.sync().unwrap();
            writeln!(out, "SYNCED {n} {}", w.committed_len()).unwrap();
        }
    }
    let mut t = w.begin().unwrap();
    let n = first + SYNCED + UNSYNCED;
    t.add(
        &format!("frames/{n}/b.f32.uni"),
        &[1; 64],
        Compression::Stored,
    )
    .unwrap();
    // Larger than the writer's append buffer, so part of it reaches the file.
    let torn = 8 * BIG as u64 * 4;
    let mut e = t
        .start_entry(&format!("frames/{n}/w.f32.uni"), torn)
        .unwrap();
    e.write(&det_bytes(n, torn as usize / 2)).unwrap();
    writeln!(out, "TORN {n}").unwrap();
    out.flush().unwrap();
    // A crash: no destructor runs, no tail is written, the entry stays torn.
    std::process::exit(0);
}

#[test]
fn ckpt_child() {
    if let Some(p) = std::env::var_os(CHILD_ENV) {
        child_main(Path::new(&p));
    }
}

/// Run the child on `path`; returns the committed length after each synced
/// frame.
fn crash_after_writing(path: &Path) -> Vec<u64> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ckpt_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the child");
    assert!(out.status.success(), "child failed: {:?}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("TORN"),
        "child did not reach the torn frame:\n{text}"
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("SYNCED "))
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect()
}

fn recovered(path: &Path) -> (Archive, ScanReport) {
    let a = Archive::open(path).unwrap();
    let rep = match a.state() {
        OpenState::Recovered(r) => r.clone(),
        OpenState::Clean => panic!("{}: expected a torn archive", path.display()),
    };
    (a, rep)
}

/// What a scan of the whole file finds (the checkpoint moved away).
fn full_scan(path: &Path) -> (Vec<Entry>, ScanReport) {
    let side = gtar::sidecar_path(path);
    let away = side.with_extension("away");
    let had = std::fs::rename(&side, &away).is_ok();
    let (a, rep) = recovered(path);
    if had {
        std::fs::rename(&away, &side).unwrap();
    }
    assert_eq!(rep.checkpoint, None);
    let entries = a.index().entries().to_vec();
    (entries, rep)
}

fn check_frames(a: &Archive, frames: std::ops::Range<u64>, what: &str) {
    let ix = a.index();
    assert_eq!(
        ix.frames_under(None).len() as u64,
        frames.end,
        "{what}: frames {:?}",
        ix.frames_under(None)
    );
    drop(ix);
    for n in frames {
        for (name, data) in frame_records(n) {
            if name.starts_with("latest") {
                continue;
            }
            assert!(a.read(&name).unwrap() == data, "{what}: {name}");
        }
    }
}

/// A torn archive like `orig` (the child is deterministic) with its own
/// checkpoint: a copied archive is another file (inode), which its
/// checkpoint refuses by design.
fn same_crash(orig: &Path, to: &Path, ends: &[u64]) {
    assert_eq!(crash_after_writing(to), ends);
    assert!(std::fs::read(orig).unwrap() == std::fs::read(to).unwrap());
}

#[test]
fn a_torn_tail_after_a_checkpoint_is_all_that_recovery_reads() {
    let dir = tmp();
    let path = dir.path().join("torn.zip");
    let ends = crash_after_writing(&path);
    let last_synced = *ends.last().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let sidecar = std::fs::metadata(gtar::sidecar_path(&path)).unwrap().len();

    let (a, rep) = recovered(&path);
    assert_eq!(rep.checkpoint, Some(last_synced), "{}", rep.checkpoint_note);
    // Every frame before the tear is there, bit for bit: the synced ones from
    // the checkpoint, the unsynced ones (still in the page cache) by the
    // scan of the tail; the torn one is not.
    check_frames(&a, 0..SYNCED + UNSYNCED, "reader");
    // What was read: the sidecar, a few sampled local headers, and the tail
    // from the checkpoint on. Not one byte of the synced frames' data.
    let tail = len - last_synced;
    let headers = (gtar::CHECKPOINT_SAMPLES * 512) as u64;
    assert!(
        rep.bytes_read <= sidecar + headers + tail,
        "read {} bytes; sidecar {sidecar}, tail {tail}",
        rep.bytes_read
    );
    assert!(rep.bytes_read < last_synced / 4, "read {}", rep.bytes_read);

    // The same entries, data offsets included, as a scan of the whole file,
    // which reads all of it.
    let (all, full) = full_scan(&path);
    assert_eq!(a.index().entries(), &all[..]);
    assert_eq!(full.end, rep.end);
    assert!(full.bytes_read >= rep.end, "{}", full.bytes_read);

    // Repair uses it too, leaves a valid archive, and starts a new chain that
    // the next crash recovers from.
    let r = gtar::repair(&path).unwrap().expect("torn: repaired");
    assert_eq!(r.checkpoint, Some(last_synced));
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    check_frames(&a, 0..SYNCED + UNSYNCED, "repaired");
    let ends2 = crash_after_writing(&path);
    let (a, rep) = recovered(&path);
    assert_eq!(rep.checkpoint, Some(*ends2.last().unwrap()));
    check_frames(&a, 0..2 * (SYNCED + UNSYNCED), "second crash");
    assert!(rep.bytes_read < ends2[0], "read {}", rep.bytes_read);
    // And the writer's own open for append.
    let (w, wrep) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
    assert_eq!(wrep.unwrap().checkpoint, rep.checkpoint);
    drop(w);
    check_frames(
        &Archive::open(&path).unwrap(),
        0..2 * (SYNCED + UNSYNCED),
        "reopened",
    );
}

/// Each damage to the checkpoint or to the bytes it describes: recovery
/// notices, says why, and scans the whole file.
#[test]
fn a_damaged_or_mismatching_checkpoint_is_refused_for_a_full_scan() {
    let dir = tmp();
    let orig = dir.path().join("orig.zip");
    let ends = crash_after_writing(&orig);
    let (truth, _) = full_scan(&orig);
    let flip = |p: &Path, at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    };
    /// What is done to a fresh torn archive, and what the refusal must say.
    type Case<'a> = (&'a str, Box<dyn Fn(&Path)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "header byte flipped",
            Box::new(move |p: &Path| flip(&gtar::sidecar_path(p), 12)),
            "header",
        ),
        (
            "first record damaged",
            Box::new(move |p: &Path| flip(&gtar::sidecar_path(p), 40)),
            "no valid record",
        ),
        (
            "sidecar of another file (archive replaced by a copy)",
            Box::new(|p: &Path| {
                let tmp = p.with_extension("new");
                std::fs::copy(p, &tmp).unwrap();
                std::fs::rename(&tmp, p).unwrap();
            }),
            "another file",
        ),
        (
            "archive shorter than the checkpoint",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            }),
            "committed",
        ),
        (
            "archive rewritten in place: first entry's name changed",
            // Offset 30 is the first byte of the first entry's name.
            Box::new(move |p: &Path| flip(p, 30)),
            "does not match",
        ),
        (
            "archive rewritten in place: last checkpointed entry's CRC changed",
            Box::new(|_p: &Path| {}),
            "does not match",
        ),
    ];
    for (k, (what, damage, why)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("case{k}.zip"));
        same_crash(&orig, &p, &ends);
        if k == 5 {
            // The CRC field (offset 14) of the local header of the last entry
            // the checkpoint holds.
            let a = Archive::open(&orig).unwrap();
            let last = a
                .index()
                .entries()
                .iter()
                .filter(|e| e.cd.local_header_offset < *ends.last().unwrap())
                .map(|e| e.cd.local_header_offset)
                .max()
                .unwrap();
            flip(&p, last + 14);
        } else {
            damage(&p);
        }
        let (a, rep) = recovered(&p);
        assert_eq!(rep.checkpoint, None, "{what}: the checkpoint was trusted");
        assert!(
            rep.checkpoint_note.contains(why),
            "{what}: note {:?}",
            rep.checkpoint_note
        );
        let (all, full) = full_scan(&p);
        assert_eq!(a.index().entries(), &all[..], "{what}");
        assert!(
            rep.bytes_read >= full.bytes_read,
            "{what}: the whole file was read"
        );
        if k <= 2 {
            // The archive itself is intact: the full scan finds every frame.
            assert_eq!(all, truth, "{what}");
        }
    }

    // A torn *last record* (a crash while the sidecar was written) is not a
    // damaged checkpoint: the chain before it holds, one frame earlier.
    let p = dir.path().join("torn-record.zip");
    same_crash(&orig, &p, &ends);
    let side = gtar::sidecar_path(&p);
    let n = std::fs::metadata(&side).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&side)
        .unwrap()
        .set_len(n - 3)
        .unwrap();
    let (a, rep) = recovered(&p);
    assert_eq!(rep.checkpoint, Some(ends[ends.len() - 2]));
    assert_eq!(a.index().entries(), &truth[..]);
}

/// libgetar appends by overwriting the central directory with new entries:
/// the checkpoint (which ends at or before it) stays true, our recovery and
/// libgetar agree on the result, and libgetar appends to what we repaired.
#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn libgetar_appends_to_an_archive_with_checkpoints_and_both_sides_agree() {
    let dir = tmp();
    let path = dir.path().join("mixed.zip");
    // Our frames, synced (checkpointed), closed with a central directory.
    {
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        for n in 0..5u64 {
            let mut t = w.begin().unwrap();
            for (name, data) in frame_records(n) {
                t.add(&name, &data, Compression::Stored).unwrap();
            }
            t.commit().unwrap();
            w.sync().unwrap();
        }
        w.close().unwrap();
    }
    let ours_end = std::fs::metadata(&path).unwrap().len();
    oracle(&[
        "append",
        path.to_str().unwrap(),
        "--frame",
        "100",
        "--group",
        "lg",
    ]);
    assert!(matches!(
        Archive::open(&path).unwrap().state(),
        OpenState::Clean
    ));
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "after libgetar's append",
    );

    // libgetar's own tail torn (in place: the checkpoint names this file):
    // its entries lie after our checkpoint, which still holds; the scan of
    // the tail finds libgetar's complete entries.
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    let (a, rep) = recovered(&path);
    let ck = rep
        .checkpoint
        .unwrap_or_else(|| panic!("checkpoint refused: {}", rep.checkpoint_note));
    assert!(ck <= ours_end, "{ck} {ours_end}");
    let (all, _) = full_scan(&path);
    assert_eq!(a.index().entries(), &all[..]);
    assert!(a.index().get("lg/frames/100/appended.f64.uni").is_some());
    drop(a);
    gtar::repair(&path).unwrap().expect("repaired");
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "repaired after libgetar's torn tail",
    );
    oracle(&[
        "append",
        path.to_str().unwrap(),
        "--frame",
        "101",
        "--group",
        "lg",
    ]);
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "libgetar appended to the repair",
    );

    // Our writer again on the libgetar-appended file (a new chain that holds
    // libgetar's entries), then a crash; recovery from the checkpoint keeps
    // both sides' records, and libgetar reads and appends to the repair.
    let ends = crash_after_writing(&path);
    let (a, rep) = recovered(&path);
    assert_eq!(rep.checkpoint, Some(*ends.last().unwrap()));
    // The same entries; those the new chain took from libgetar's central
    // directory do not know their data offsets (readers look them up).
    let (all, _) = full_scan(&path);
    let cds = |es: &[Entry]| es.iter().map(|e| e.cd.clone()).collect::<Vec<_>>();
    assert!(
        cds(a.index().entries()) == cds(&all),
        "the recovered entries differ"
    );
    drop(a);
    gtar::repair(&path).unwrap().expect("repaired");
    let mut views = BTreeMap::new();
    views.insert("ours", rust_view(&path, true));
    assert_same_view(
        &views["ours"],
        &oracle_view(&path, true),
        "repaired after our crash",
    );
    oracle(&[
        "append",
        path.to_str().unwrap(),
        "--frame",
        "102",
        "--group",
        "lg",
    ]);
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "libgetar appended after our crash",
    );
}
