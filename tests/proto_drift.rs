//! The generated protobuf code is committed (so a plain `cargo build` needs no
//! protoc); this test regenerates it with a vendored protoc and fails on drift.
//! Run with `GTAR_LOGD_REGEN=1 cargo test --test proto_drift` to update it.

use std::path::Path;

#[test]
fn generated_code_matches_the_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path().unwrap());
    let descriptor = out.path().join("logd_descriptor.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor chunks as `bytes::Bytes`: decoding slices them out of tonic's
        // receive buffer instead of copying, and they reach the archive writer
        // thread as they are (a client can send slices of one buffer).
        .bytes(".gtar.logd.v1.Chunk.data")
        .out_dir(out.path())
        .file_descriptor_set_path(&descriptor)
        .compile_protos(
            &[root.join("proto/gtar/logd/v1/logd.proto")],
            &[root.join("proto")],
        )
        .expect("protoc failed");
    let regen = std::env::var_os("GTAR_LOGD_REGEN").is_some();
    for name in ["gtar.logd.v1.rs", "logd_descriptor.bin"] {
        let fresh = std::fs::read(out.path().join(name)).unwrap();
        let committed_path = root.join("crates/gtar-logd-proto/src").join(name);
        if regen {
            std::fs::write(&committed_path, &fresh).unwrap();
            continue;
        }
        let committed = std::fs::read(&committed_path).unwrap_or_default();
        assert!(
            fresh == committed,
            "crates/gtar-logd-proto/src/{name} is out of date with proto/: run GTAR_LOGD_REGEN=1 cargo test --test proto_drift"
        );
    }
}
