//! What the command line says when something is off (issue 17): a live
//! archive is not damage, and `serve` names the flag and path that failed.

use std::process::{Command, Output};

use gtar::{ArchiveWriter, Compression, OpenMode};

fn gtar_logd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gtar-logd"))
        .args(args)
        .env("GTAR_LOGD_LOG", "warn")
        .output()
        .expect("run gtar-logd")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_live_archive_is_shown_as_being_written_not_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.zip");
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    // A committed frame and no central directory yet: what a reader sees
    // while the daemon appends.
    let mut t = w.begin().unwrap();
    t.add("frames/1/x.f32.uni", &[0u8; 8], Compression::Stored)
        .unwrap();
    t.commit().unwrap();
    w.sync().unwrap();
    let p = path.to_str().unwrap();
    let o = gtar_logd(&["frames", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
    let err = stderr(&o);
    assert!(err.contains("being written"), "{err}");
    assert!(
        !err.contains("repair"),
        "a live archive needs no repair: {err}"
    );
    drop(w);
    // Closed, the same file is complete and nothing is said.
    let o = gtar_logd(&["frames", p]);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn serve_errors_name_the_flag_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, b"not a directory").unwrap();
    let sock = dir.path().join("d.sock");
    let (f, s) = (file.to_str().unwrap(), sock.to_str().unwrap());
    let o = gtar_logd(&["serve", "--data-dir", f, "--uds", s]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--data-dir") && err.contains(f), "{err}");
    let o = gtar_logd(&[
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--uds",
        "none",
        "--tcp",
        "no-port",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--tcp") && err.contains("no-port"), "{err}");
}
