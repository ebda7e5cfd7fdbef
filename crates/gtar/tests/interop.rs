//! Interoperability with libgetar (PyPI `gtar` 1.1.7), both ways. (The
//! daemon's offline CLI is tested on the same archives in its `tests/cli.rs`.)
//!
//! The oracle tests are `#[ignore]`d in a plain `cargo test` and run by
//! `./test.sh`, which sets `GTAR_ORACLE_PYTHON`; without it they fail loudly.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use gtar::{self, Archive, ArchiveWriter, Compression, Format, OpenMode, OpenState};

const ORACLE: &str = "needs the libgetar oracle: run ./test.sh";

#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn libgetar_reads_what_we_write_bit_for_bit() {
    let _ = ORACLE;
    let dir = tmp();
    let path = dir.path().join("all.zip");
    let expect = write_all_types(&path);

    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    assert_reads(&a, &expect);
    assert_eq!(a.index().len(), expect.len(), "every path indexed once");
    assert_eq!(a.index().frames_under(None), GETAR_ORDER);

    let ours = rust_view(&path, true);
    let theirs = oracle_view(&path, true);
    assert_same_view(&ours, &theirs, "archive written by src/gtar");
    // Sanity: the views cover all seven types in both resolutions, text,
    // the three behaviors and a nested group.
    for f in 0..7u8 {
        for r in [1u8, 2] {
            assert!(
                theirs.iter().any(|t| t.format == f && t.resolution == r),
                "format {f} resolution {r} missing"
            );
        }
    }
    assert!(theirs.iter().any(|t| t.resolution == 0 && t.behavior == 1));
    for b in 0..3u8 {
        assert!(theirs.iter().any(|t| t.behavior == b), "behavior {b}");
    }
    assert!(theirs.iter().any(|t| t.group == "grp/sub"));
}

/// Three frames of records of awkward sizes around [`gtar::DIRECT_MIN`]
/// (stored, streamed and deflated), written to `path`. With `direct`,
/// through O_DIRECT (returns whether it stayed in effect to the end);
/// without, buffered but laid out the same way.
fn write_direct_io_frames(path: &Path, direct: bool) -> (bool, BTreeMap<String, Vec<u8>>) {
    let (mut w, _) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    if direct {
        w.enable_direct_io();
    } else {
        w.align_large_entries();
    }
    let mut expect = BTreeMap::new();
    let m = gtar::DIRECT_MIN as usize;
    for (k, fi) in ["0", "1", "2"].iter().enumerate() {
        let mut recs = Vec::new();
        for (j, n) in [5usize, m - 4, m, m + 12, 3 * m + 4093, 9 * m + 1]
            .into_iter()
            .enumerate()
        {
            let how = [How::Stored, How::Streamed, How::Deflate][(j + k) % 3];
            let data = match how {
                How::Deflate => det_text_bytes((10 * k + j) as u64, n),
                _ => det_bytes((10 * k + j) as u64, n),
            };
            // u8 records, so odd sizes (partial last blocks) are valid.
            recs.push((format!("model/frames/{fi}/w{j}.u8.uni"), data, how));
        }
        recs.push((
            format!("frames/{fi}/tiny.u8.uni"),
            array_bytes(99, Format::U8, 3),
            How::Stored,
        ));
        write_frame(&mut w, &recs);
        for (n, d, _) in recs {
            expect.insert(n, d);
        }
    }
    // Asked again at the end: a file system that takes the flag but
    // refuses the writes turns direct I/O off at the first one.
    let still_direct = direct && w.enable_direct_io();
    w.close().unwrap();
    (still_direct, expect)
}

/// Direct I/O (large entries aligned by a padding extra field, written with
/// O_DIRECT): the archive is byte for byte the one the buffered writer makes
/// with the same layout; libgetar reads every record bit for bit and appends
/// to it. O_DIRECT must be in effect here (the temp directory's file
/// system takes it): a refusal fails the test instead of testing the
/// buffered path twice.
#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn libgetar_reads_direct_io_archives_bit_for_bit() {
    let dir = tmp();
    let path = dir.path().join("direct.zip");
    let (direct, mut expect) = write_direct_io_frames(&path, true);
    assert!(
        direct,
        "O_DIRECT was refused (or turned off) on the file system of {}: this test needs one \
         that takes it (ext4, XFS, btrfs)",
        dir.path().display()
    );
    let buffered = dir.path().join("buffered.zip");
    let (_, expect_buffered) = write_direct_io_frames(&buffered, false);
    assert_eq!(expect, expect_buffered);
    let (a, b) = (
        std::fs::read(&path).unwrap(),
        std::fs::read(&buffered).unwrap(),
    );
    assert_eq!(
        a.len(),
        b.len(),
        "direct and buffered archives differ in size"
    );
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("direct and buffered archives differ first at byte {at}");
    }
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    assert_reads(&a, &expect);
    let ours = rust_view(&path, true);
    let theirs = oracle_view(&path, true);
    assert_same_view(&ours, &theirs, "archive written with direct I/O");
    // libgetar appends to it, and both still read everything.
    let out = oracle(&["append", path.to_str().unwrap(), "--frame", "7"]);
    for (p, d) in written(&out) {
        expect.insert(p, d);
    }
    let a = Archive::open(&path).unwrap();
    assert_reads(&a, &expect);
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "after libgetar appended",
    );
}

/// Parse `written PATH HEX` lines of the oracle's `append`.
fn written(out: &str) -> Vec<(String, Vec<u8>)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f[0], "written", "{l}");
            (f[1].to_string(), unhex(f[2]))
        })
        .collect()
}

#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn libgetar_appends_to_our_archive_and_we_read_it_all() {
    let dir = tmp();
    let path = dir.path().join("append.zip");
    let mut expect = write_all_types(&path);
    let p = path.to_str().unwrap();

    // libgetar appends only to zip64 archives: this is the real check.
    for (frame, group) in [("11", ""), ("12", "grp/sub")] {
        let out = oracle(&["append", p, "--frame", frame, "--group", group]);
        for (n, d) in written(&out) {
            expect.insert(n, d);
        }
    }
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    assert_reads(&a, &expect);
    assert_eq!(
        a.index().frames_under(None),
        ["0", "1", "2", "9", "10", "11", "12"]
    );
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "after libgetar appended",
    );

    // Our writer opens it for append (valid: no repair), sees everything,
    // and adds a frame after libgetar's entries.
    let (mut w, rep) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
    assert!(rep.is_none(), "a valid archive needs no repair: {rep:?}");
    assert_reads(&w.reader().unwrap(), &expect);
    let recs = frame_records(7, "13");
    write_frame(&mut w, &recs);
    for (n, d, _) in recs {
        expect.insert(n, d);
    }
    assert_reads(&w.reader().unwrap(), &expect);
    w.close().unwrap();

    // And libgetar again: reads all of it, and appends once more.
    for (n, d) in written(&oracle(&["append", p, "--frame", "14"])) {
        expect.insert(n, d);
    }
    let a = Archive::open(&path).unwrap();
    assert_reads(&a, &expect);
    assert_same_view(
        &rust_view(&path, true),
        &oracle_view(&path, true),
        "after libgetar, src/gtar, libgetar appended",
    );
}

#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn keras_gtar_layout_from_libgetar_is_read_appended_and_still_read_by_libgetar() {
    for group in ["", "run1"] {
        let dir = tmp();
        let path = dir.path().join("keras.zip");
        let k = keras_layout(&path, "0,1,2,9,10", group);
        let pre = if group.is_empty() {
            String::new()
        } else {
            format!("{group}/")
        };
        let g = (!group.is_empty()).then_some(group);

        let a = Archive::open(&path).unwrap();
        assert!(matches!(a.state(), OpenState::Clean));
        assert_eq!(
            a.read(&format!("{pre}keras/model.json")).unwrap(),
            k.model_json
        );
        for (n, d) in &k.weights {
            assert_eq!(&a.read(n).unwrap(), d, "{n}");
        }
        // Our own formula agrees with what libgetar stored.
        assert_eq!(
            a.read(&format!(
                "{pre}keras/layer/2/weight/0/frames/9/weight.f32.uni"
            ))
            .unwrap(),
            keras_weight(2, 0, 10, 9)
        );
        // shape.u32.uni was written once per frame: five entries of one
        // name, and the last one wins.
        for (n, d) in &k.shapes {
            let ix = a.index();
            let dups: Vec<_> = ix.entries().iter().filter(|e| e.name() == n).collect();
            assert_eq!(dups.len(), 5, "{n} written once per frame");
            let last = dups.iter().map(|e| e.cd.local_header_offset).max();
            assert_eq!(
                ix.get(n).map(|e| e.cd.local_header_offset),
                last,
                "{n}: the last write must win"
            );
            drop(ix);
            assert_eq!(&a.read(n).unwrap(), d, "{n}");
        }
        assert_eq!(a.index().frames_under(g), GETAR_ORDER);
        drop(a);

        // Append two frames the way keras_gtar would, through our writer.
        let (mut w, rep) = ArchiveWriter::open(&path, OpenMode::Append).unwrap();
        assert!(rep.is_none());
        let mut expect: BTreeMap<String, Vec<u8>> = k.weights.iter().cloned().collect();
        for frame in [11u32, 12] {
            let mut t = w.begin().unwrap();
            for (i, shapes) in KERAS_LAYERS.iter().enumerate() {
                for (j, shape) in shapes.iter().enumerate() {
                    let n: usize = shape.iter().product();
                    let wpath =
                        format!("{pre}keras/layer/{i}/weight/{j}/frames/{frame}/weight.f32.uni");
                    let data = keras_weight(i, j, n, frame);
                    t.add(&wpath, &data, Compression::Deflate(1)).unwrap();
                    let shape_bytes: Vec<u8> = shape
                        .iter()
                        .flat_map(|&d| (d as u32).to_le_bytes())
                        .collect();
                    t.add(
                        &format!("{pre}keras/layer/{i}/weight/{j}/shape.u32.uni"),
                        &shape_bytes,
                        Compression::Stored,
                    )
                    .unwrap();
                    expect.insert(wpath, data);
                }
            }
            t.commit().unwrap();
            w.sync().unwrap();
        }
        w.close().unwrap();

        let a = Archive::open(&path).unwrap();
        assert_reads(&a, &expect);
        for (n, d) in &k.shapes {
            assert_eq!(&a.read(n).unwrap(), d, "{n}");
        }
        assert_eq!(
            a.index().frames_under(g),
            ["0", "1", "2", "9", "10", "11", "12"]
        );
        // libgetar still reads everything, the same way we do.
        let theirs = oracle_view(&path, true);
        assert_same_view(
            &rust_view(&path, true),
            &theirs,
            "keras layout + our frames",
        );
        let w0 = theirs
            .iter()
            .find(|t| t.group == format!("{pre}keras/layer/0/weight/0") && t.name == "weight")
            .expect("weight record type");
        let frames: Vec<&str> = w0.records.iter().map(|r| r.frame.as_str()).collect();
        assert_eq!(frames, ["0", "1", "2", "9", "10", "11", "12"]);
    }
}
