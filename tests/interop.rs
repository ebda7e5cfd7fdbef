//! Interoperability with libgetar (PyPI `gtar` 1.1.7), both ways, and the
//! offline CLI on the same archives.
//!
//! The oracle tests are `#[ignore]`d in a plain `cargo test` and run by
//! `./test.sh`, which sets `GTAR_ORACLE_PYTHON`; without it they fail loudly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use gtar_logd::gtar::{self, Archive, ArchiveWriter, Compression, Format, OpenMode, OpenState};

const ORACLE: &str = "needs the libgetar oracle: run ./test.sh";

/// Frame indices in the order we commit them (not GETAR order on purpose).
const FRAMES: [&str; 5] = ["0", "1", "2", "10", "9"];
const GETAR_ORDER: [&str; 5] = ["0", "1", "2", "9", "10"];

#[derive(Clone, Copy)]
enum How {
    Stored,
    Deflate,
    Streamed,
}

/// Bytes of a binary record of `fmt` with `n` elements: random bit patterns,
/// so floats include NaNs with payloads, infinities, -0.0 and subnormals.
fn array_bytes(seed: u64, fmt: Format, n: usize) -> Vec<u8> {
    let mut b = det_bytes(seed, fmt.size() * n);
    if fmt == Format::F32 && n >= 4 {
        b[..16].copy_from_slice(
            &[f32::from_bits(0x7fc0_1234), -0.0, f32::INFINITY, 1e-45]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    if fmt == Format::F64 && n >= 3 {
        b[..24].copy_from_slice(
            &[
                f64::from_bits(0x7ff8_dead_beef_0001),
                f64::NEG_INFINITY,
                5e-324,
            ]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>(),
        );
    }
    b
}

/// Every record of frame `fi` (k = its position in FRAMES): all seven types
/// in `uni` and `ind`, a text record, groups, continuous `vars/`, and the
/// three ways of writing an entry.
fn frame_records(k: usize, fi: &str) -> Vec<(String, Vec<u8>, How)> {
    let mut out = Vec::new();
    let hows = [How::Stored, How::Deflate, How::Streamed];
    for (t, fmt) in Format::ALL.into_iter().enumerate() {
        for (r, res) in ["uni", "ind"].into_iter().enumerate() {
            let n = 5 + 3 * k + t;
            let seed = (k * 100 + t * 10 + r) as u64;
            let sfx = fmt.suffix();
            out.push((
                format!("frames/{fi}/{sfx}_{res}.{sfx}.{res}"),
                array_bytes(seed, fmt, n),
                hows[(t + r + k) % 3],
            ));
        }
    }
    out.push((
        format!("frames/{fi}/log.txt"),
        format!("frame {fi}: loss=0.{k}12 ünïcødé").into_bytes(),
        How::Deflate,
    ));
    out.push((
        format!("grp/sub/frames/{fi}/x.f32.uni"),
        array_bytes(900 + k as u64, Format::F32, 64),
        How::Stored,
    ));
    out.push((
        format!("vars/energy.f64.uni/{fi}"),
        array_bytes(950 + k as u64, Format::F64, 1),
        How::Deflate,
    ));
    out.push((
        format!("grp/vars/count.u64.ind/{fi}"),
        array_bytes(970 + k as u64, Format::U64, 3),
        How::Streamed,
    ));
    if k == 0 {
        out.push((
            "box.f32.uni".into(),
            array_bytes(1, Format::F32, 6),
            How::Stored,
        ));
        out.push((
            "params.json".into(),
            br#"{"lr": 0.001, "note": "constant text record"}"#.to_vec(),
            How::Deflate,
        ));
        out.push((
            "grp/sub/names.u8.uni".into(),
            b"alpha\0beta\0".to_vec(),
            How::Streamed,
        ));
        out.push((
            "meta/version.u32.ind".into(),
            array_bytes(2, Format::U32, 2),
            How::Stored,
        ));
    }
    out
}

fn write_frame(w: &mut ArchiveWriter, recs: &[(String, Vec<u8>, How)]) {
    let mut t = w.begin().unwrap();
    for (name, data, how) in recs {
        match how {
            How::Stored => t.add(name, data, Compression::Stored).unwrap(),
            How::Deflate => t.add(name, data, Compression::Deflate(6)).unwrap(),
            How::Streamed => {
                let mut e = t.start_entry(name, data.len() as u64).unwrap();
                for piece in data.chunks(7) {
                    e.write(piece).unwrap();
                }
                e.finish().unwrap();
            }
        }
    }
    t.commit().unwrap();
    w.sync().unwrap();
}

/// Write the all-types archive; returns what every path must contain.
fn write_all_types(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let (mut w, rep) = ArchiveWriter::open(path, OpenMode::Create).unwrap();
    assert!(rep.is_none());
    let mut expect = BTreeMap::new();
    for (k, fi) in FRAMES.iter().enumerate() {
        let recs = frame_records(k, fi);
        write_frame(&mut w, &recs);
        for (n, d, _) in recs {
            expect.insert(n, d);
        }
    }
    w.close().unwrap();
    expect
}

fn assert_reads(a: &Archive, expect: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in expect {
        let got = a
            .read(name)
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", a.path().display()));
        assert!(got == *data, "{name}: src/gtar read different bytes");
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

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

/// Direct I/O (large entries aligned by a padding extra field, written with
/// O_DIRECT): libgetar must read every record bit for bit, and append to the
/// archive afterwards.
#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn libgetar_reads_direct_io_archives_bit_for_bit() {
    let dir = tmp();
    let path = dir.path().join("direct.zip");
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    let direct = w.enable_direct_io();
    let mut expect = BTreeMap::new();
    let m = gtar::writer::DIRECT_MIN as usize;
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
    w.close().unwrap();
    eprintln!("direct I/O in effect: {direct}");
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

struct KerasLayout {
    model_json: Vec<u8>,
    weights: Vec<(String, Vec<u8>)>,
    shapes: Vec<(String, Vec<u8>)>,
}

fn keras_layout(path: &Path, frames: &str, group: &str) -> KerasLayout {
    let out = oracle(&[
        "keras-layout",
        path.to_str().unwrap(),
        "--frames",
        frames,
        "--group",
        group,
    ]);
    let mut k = KerasLayout {
        model_json: Vec::new(),
        weights: Vec::new(),
        shapes: Vec::new(),
    };
    for l in out.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        match f[0] {
            "model_json" => k.model_json = unhex(f[1]),
            "weight" => k.weights.push((f[1].into(), unhex(f[2]))),
            "shape" => k.shapes.push((f[1].into(), unhex(f[2]))),
            o => panic!("unexpected line {o}"),
        }
    }
    k
}

/// The oracle's model: per layer, the shapes of its weights.
const KERAS_LAYERS: &[&[&[usize]]] = &[&[&[3, 5], &[5]], &[], &[&[5, 2], &[2]], &[&[2]]];

/// Same values as the oracle's `keras_weight` (f32 arithmetic, same order).
fn keras_weight(i: usize, j: usize, n: usize, frame: u32) -> Vec<u8> {
    let base = (1000.0 * frame as f64 + 100.0 * i as f64 + 10.0 * j as f64) as f32;
    (0..n)
        .flat_map(|k| ((k as f32 + base) / 7.0f32).to_le_bytes())
        .collect()
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

// ---------------------------------------------------------------------------
// The offline CLI.

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gtar-logd"))
        .args(args)
        .output()
        .expect("run gtar-logd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_to(src: &Path, dst: PathBuf) -> PathBuf {
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// How `gtar-logd ls` shows a record type libgetar reported.
fn ls_line(t: &TypeView) -> String {
    let fmt = ["f32", "f64", "i32", "i64", "u8", "u32", "u64"][t.format as usize];
    let file = match t.resolution {
        0 => t.name.clone(),
        1 => format!("{}.{fmt}.uni", t.name),
        _ => format!("{}.{fmt}.ind", t.name),
    };
    let g = if t.group.is_empty() {
        String::new()
    } else {
        format!("{}/", t.group)
    };
    let (kind, shown) = match t.behavior {
        0 => ("constant", format!("{g}{file}")),
        1 => ("discrete", format!("{g}frames/*/{file}")),
        _ => ("continuous", format!("{g}vars/{file}/*")),
    };
    format!("{kind:<10}  {:>8}  {shown}", t.records.len())
}

#[test]
#[ignore = "needs the libgetar oracle: run ./test.sh"]
fn cli_frames_ls_repair_agree_with_libgetar() {
    let dir = tmp();
    let all = dir.path().join("all.zip");
    write_all_types(&all);
    let keras = dir.path().join("keras.zip");
    keras_layout(&keras, "0,1,2,9,10,100", "run1");

    // frames: GETAR order, optionally under a group.
    let o = cli(&["frames", all.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), GETAR_ORDER);
    let o = cli(&["frames", keras.to_str().unwrap(), "--group", "run1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        ["0", "1", "2", "9", "10", "100"]
    );
    let o = cli(&["frames", keras.to_str().unwrap(), "--group", "nope"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(keras.to_str().unwrap()) && stderr(&o).contains("nope"));

    // ls: one line per record type libgetar sees, same order and counts.
    for p in [&all, &keras] {
        let o = cli(&["ls", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want: Vec<String> = oracle_view(p, false).iter().map(ls_line).collect();
        assert_eq!(
            stdout(&o).lines().collect::<Vec<_>>(),
            want,
            "{}",
            p.display()
        );
    }

    // repair of a valid archive changes nothing.
    let before = std::fs::read(&all).unwrap();
    let o = cli(&["repair", all.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing to repair"), "{}", stdout(&o));
    assert_eq!(std::fs::read(&all).unwrap(), before);

    // repair of archives cut inside the central directory (ours and
    // libgetar's): every entry is kept, and libgetar opens the result.
    for src in [&all, &keras] {
        let cut = copy_to(src, dir.path().join("cut.zip"));
        let len = std::fs::metadata(&cut).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
        f.set_len(len - 30).unwrap();
        drop(f);
        let o = cli(&["ls", cut.to_str().unwrap()]);
        assert!(o.status.success(), "ls recovers in memory: {}", stderr(&o));
        assert!(stderr(&o).contains("repair"), "ls warns: {}", stderr(&o));
        let o = cli(&["repair", cut.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("repaired"), "{}", stdout(&o));
        assert_same_view(
            &rust_view(&cut, true),
            &oracle_view(&cut, true),
            "repaired by the CLI",
        );
        assert_same_view(
            &rust_view(&cut, true),
            &rust_view(src, true),
            "nothing lost by the repair",
        );
    }

    // repair of our archive cut in the middle of its last frame: that frame
    // goes, the others stay, and the CLI says so.
    let cut = copy_to(&all, dir.path().join("torn.zip"));
    let a = Archive::open(&cut).unwrap();
    let last_frame_start = a
        .index()
        .entries()
        .iter()
        .filter(|e| e.name().contains("/9/") || e.name().ends_with("/9"))
        .map(|e| e.cd.local_header_offset)
        .min()
        .unwrap();
    drop(a);
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(last_frame_start + 500).unwrap();
    drop(f);
    let o = cli(&["repair", cut.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("repaired") && out.contains("dropped"), "{out}");
    assert!(out.contains("(4 complete gtar-logd frames)"), "{out}");
    let o = cli(&["frames", cut.to_str().unwrap()]);
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        ["0", "1", "2", "10"]
    );
    assert_same_view(
        &rust_view(&cut, true),
        &oracle_view(&cut, true),
        "repaired torn frame",
    );
}

#[test]
fn cli_errors_name_the_file_and_exit_non_zero() {
    let dir = tmp();
    let missing = dir.path().join("missing.zip");
    let text = dir.path().join("notes.txt");
    let text_body = "this is a text file, not a zip archive\n".repeat(20);
    std::fs::write(&text, &text_body).unwrap();
    let empty_dir = dir.path().join("a-directory");
    std::fs::create_dir(&empty_dir).unwrap();
    for p in [&missing, &text, &empty_dir] {
        for cmd in ["frames", "ls", "repair"] {
            let o = cli(&[cmd, p.to_str().unwrap()]);
            assert!(
                !o.status.success(),
                "`gtar-logd {cmd} {}` must fail; stdout: {}",
                p.display(),
                stdout(&o)
            );
            assert!(
                stderr(&o).contains(p.to_str().unwrap()),
                "`gtar-logd {cmd}`: the error must name the file: {}",
                stderr(&o)
            );
        }
    }
    // A failed repair never damages what is there.
    assert_eq!(std::fs::read_to_string(&text).unwrap(), text_body);
    assert!(!missing.exists());
    // Usage errors too.
    let o = cli(&["frames"]);
    assert!(!o.status.success());
}

#[test]
fn cli_frames_and_ls_on_our_archive_without_oracle() {
    let dir = tmp();
    let all = dir.path().join("all.zip");
    write_all_types(&all);
    let o = cli(&["frames", all.to_str().unwrap(), "--group", "grp/sub"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), GETAR_ORDER);
    let o = cli(&["ls", all.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = Archive::open(&all).unwrap();
    assert_eq!(stdout(&o).lines().count(), a.index().record_types().count());
    assert!(stdout(&o).contains("continuous         5  grp/vars/count.u64.ind/*"));
    assert!(stdout(&o).contains("constant           1  params.json"));
    let _ = gtar::index_cmp("1", "2");
}
