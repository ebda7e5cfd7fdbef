//! A rewritten frame replaces the old one as a whole, in the central
//! directory the writer writes and in what recovery rebuilds after a crash.

use gtar::{Archive, ArchiveWriter, Compression, OpenMode, OpenState};

fn frame(w: &mut ArchiveWriter, index: &str, tensors: &[(&str, &[u8])]) {
    let mut t = w.begin().unwrap();
    for (name, data) in tensors {
        t.add(
            &format!("run/keras/{name}/frames/{index}/weight.f32.uni"),
            data,
            Compression::Stored,
        )
        .unwrap();
    }
    t.add(
        &format!("run/gtar_logd/frames/{index}/manifest.json"),
        b"{}",
        Compression::Stored,
    )
    .unwrap();
    t.commit().unwrap();
}

fn names_at(a: &Archive, index: &str) -> Vec<String> {
    let ix = a.index();
    let mut v: Vec<String> = ix
        .records_at(Some("run"), index)
        .map(|(_, e)| e.name().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_rewrite_with_fewer_tensors_is_exactly_the_new_frame_after_close_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
    frame(&mut w, "5", &[("w", b"old-w..."), ("v", b"old-v...")]);
    frame(&mut w, "6", &[("w", b"six-w..."), ("v", b"six-v...")]);
    frame(&mut w, "5", &[("w", b"new-w...")]);
    let committed = w.committed_len();
    w.close().unwrap();

    let want5 = vec![
        "run/gtar_logd/frames/5/manifest.json".to_string(),
        "run/keras/w/frames/5/weight.f32.uni".to_string(),
    ];
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Clean));
    assert_eq!(names_at(&a, "5"), want5);
    assert_eq!(names_at(&a, "6").len(), 3);
    let e = a
        .index()
        .get("run/keras/w/frames/5/weight.f32.uni")
        .cloned()
        .unwrap();
    assert_eq!(a.read_entry(&e).unwrap(), b"new-w...");

    // A crash before the central directory: recovery applies the same rule.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(committed).unwrap();
    drop(f);
    let a = Archive::open(&path).unwrap();
    assert!(matches!(a.state(), OpenState::Recovered(_)));
    assert_eq!(names_at(&a, "5"), want5);
    assert_eq!(names_at(&a, "6").len(), 3);
}
