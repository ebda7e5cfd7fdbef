//! The offline CLI (`gtar-logd frames | ls | repair`) on the format crate's
//! fixture archives, against libgetar where the oracle is needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use gtar::Archive;

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
    assert!(out.contains("(4 complete gtar-logd commits"), "{out}");
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
