//! Helpers shared by the integration tests: the libgetar oracle and a
//! comparable view of an archive as this crate and as libgetar see it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use std::collections::BTreeMap;

use gtar::{Archive, ArchiveWriter, Behavior, Compression, Format, OpenMode, Resolution};

/// The interpreter of the libgetar oracle venv. Oracle tests must not pass
/// silently without it: they are `#[ignore]`d in a plain `cargo test` and
/// run by `./test.sh`, which sets this variable.
pub fn oracle_python() -> PathBuf {
    match std::env::var_os("GTAR_ORACLE_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "GTAR_ORACLE_PYTHON is not set: this test needs the libgetar oracle \
             (a venv with numpy<2 and gtar==1.1.7). Run ./test.sh, which sets it up."
        ),
    }
}

pub fn oracle_script() -> PathBuf {
    // These helpers are compiled into this crate's tests and, by `#[path]`,
    // into the daemon's (whose manifest dir is the workspace root).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["tests/oracle/gtar_oracle.py", "crates/gtar/tests/oracle/gtar_oracle.py"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.exists())
        .expect("the oracle script crates/gtar/tests/oracle/gtar_oracle.py")
}

/// Run an oracle subcommand; panics with libgetar's stderr if it fails.
pub fn oracle(args: &[&str]) -> String {
    let py = oracle_python();
    let out = Command::new(&py)
        .arg(oracle_script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the oracle {}: {e}", py.display()));
    assert!(
        out.status.success(),
        "libgetar oracle {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("oracle output is UTF-8")
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// One record at one frame: its size, CRC-32 and (if asked) its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecView {
    pub frame: String,
    pub len: u64,
    pub crc32: u32,
    pub hex: Option<String>,
}

/// A record type with libgetar's enum integers and its frames in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeView {
    pub group: String,
    pub name: String,
    pub behavior: u8,
    pub format: u8,
    pub resolution: u8,
    pub records: Vec<RecView>,
}

pub fn behavior_int(b: Behavior) -> u8 {
    match b {
        Behavior::Constant => 0,
        Behavior::Discrete => 1,
        Behavior::Continuous => 2,
    }
}

pub fn format_int(f: Format) -> u8 {
    match f {
        Format::F32 => 0,
        Format::F64 => 1,
        Format::I32 => 2,
        Format::I64 => 3,
        Format::U8 => 4,
        Format::U32 => 5,
        Format::U64 => 6,
    }
}

pub fn resolution_int(r: Resolution) -> u8 {
    match r {
        Resolution::Text => 0,
        Resolution::Uniform => 1,
        Resolution::Individual => 2,
    }
}

/// What libgetar sees (`dump`).
pub fn oracle_view(path: &Path, with_hex: bool) -> Vec<TypeView> {
    let p = path.to_str().unwrap();
    let out = if with_hex {
        oracle(&["dump", p, "--hex"])
    } else {
        oracle(&["dump", p])
    };
    let mut types: Vec<TypeView> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "type" => types.push(TypeView {
                group: f[1].into(),
                name: f[2].into(),
                behavior: f[3].parse().unwrap(),
                format: f[4].parse().unwrap(),
                resolution: f[5].parse().unwrap(),
                records: Vec::new(),
            }),
            "record" => types
                .last_mut()
                .expect("record before type")
                .records
                .push(RecView {
                    frame: f[1].into(),
                    len: f[2].parse().unwrap(),
                    crc32: f[3].parse().unwrap(),
                    hex: (f[5] != "-").then(|| f[5].to_string()),
                }),
            other => panic!("unexpected oracle line kind {other:?}"),
        }
    }
    types
}

/// What `src/gtar` sees, in the same shape.
pub fn rust_view(path: &Path, with_hex: bool) -> Vec<TypeView> {
    let a = Archive::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let types: Vec<_> = a.index().record_types().cloned().collect();
    let mut out = Vec::new();
    for rt in types {
        let frames: Vec<String> = a
            .index()
            .frames(&rt)
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut records = Vec::new();
        for fr in frames {
            let data = a
                .read_record(&rt, &fr)
                .unwrap_or_else(|e| panic!("{}: {} at {fr:?}: {e}", path.display(), rt));
            records.push(RecView {
                frame: fr,
                len: data.len() as u64,
                crc32: crc32fast::hash(&data),
                hex: with_hex.then(|| hex(&data)),
            });
        }
        out.push(TypeView {
            group: rt.group.clone(),
            name: rt.name.clone(),
            behavior: behavior_int(rt.behavior),
            format: format_int(rt.format),
            resolution: resolution_int(rt.resolution),
            records,
        });
    }
    out
}

/// Assert both views are equal, with a readable first difference.
pub fn assert_same_view(ours: &[TypeView], theirs: &[TypeView], what: &str) {
    let names = |v: &[TypeView]| -> Vec<String> {
        v.iter()
            .map(|t| {
                format!(
                    "{}|{}|b{}f{}r{}",
                    t.group, t.name, t.behavior, t.format, t.resolution
                )
            })
            .collect()
    };
    assert_eq!(
        names(ours),
        names(theirs),
        "{what}: record types differ (left: src/gtar, right: libgetar)"
    );
    for (o, t) in ours.iter().zip(theirs) {
        let fo: Vec<&str> = o.records.iter().map(|r| r.frame.as_str()).collect();
        let ft: Vec<&str> = t.records.iter().map(|r| r.frame.as_str()).collect();
        assert_eq!(fo, ft, "{what}: frames of {}/{} differ", o.group, o.name);
        for (ro, rt) in o.records.iter().zip(&t.records) {
            assert_eq!(
                ro, rt,
                "{what}: bytes of {}/{} at frame {:?} differ",
                o.group, o.name, ro.frame
            );
        }
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so every test can
/// recompute what a record must contain.
pub fn det_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible deterministic bytes (for deflate entries).
pub fn det_text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "weight", "bias", "kernel", "gamma", "beta", "moving", "mean", "epoch",
    ];
    let r = det_bytes(seed, len / 4 + 8);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[(r[i % r.len()] & 7) as usize].as_bytes());
        out.push(b' ');
        i += 1;
    }
    out.truncate(len);
    out
}

/// The random seed of a randomized test: `$var` when set (to replay a
/// failure), else a fresh one. Callers print it.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

// ---------------------------------------------------------------------------
// Fixtures: archives with every record type, and keras_gtar's layout.

/// Frame indices in the order we commit them (not GETAR order on purpose).
pub const FRAMES: [&str; 5] = ["0", "1", "2", "10", "9"];
pub const GETAR_ORDER: [&str; 5] = ["0", "1", "2", "9", "10"];

#[derive(Clone, Copy)]
pub enum How {
    Stored,
    Deflate,
    Streamed,
}

/// Bytes of a binary record of `fmt` with `n` elements: random bit patterns,
/// so floats include NaNs with payloads, infinities, -0.0 and subnormals.
pub fn array_bytes(seed: u64, fmt: Format, n: usize) -> Vec<u8> {
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
pub fn frame_records(k: usize, fi: &str) -> Vec<(String, Vec<u8>, How)> {
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

pub fn write_frame(w: &mut ArchiveWriter, recs: &[(String, Vec<u8>, How)]) {
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
pub fn write_all_types(path: &Path) -> BTreeMap<String, Vec<u8>> {
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

pub fn assert_reads(a: &Archive, expect: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in expect {
        let got = a
            .read(name)
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", a.path().display()));
        assert!(got == *data, "{name}: src/gtar read different bytes");
    }
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub struct KerasLayout {
    pub model_json: Vec<u8>,
    pub weights: Vec<(String, Vec<u8>)>,
    pub shapes: Vec<(String, Vec<u8>)>,
}

pub fn keras_layout(path: &Path, frames: &str, group: &str) -> KerasLayout {
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
pub const KERAS_LAYERS: &[&[&[usize]]] = &[&[&[3, 5], &[5]], &[], &[&[5, 2], &[2]], &[&[2]]];

/// Same values as the oracle's `keras_weight` (f32 arithmetic, same order).
pub fn keras_weight(i: usize, j: usize, n: usize, frame: u32) -> Vec<u8> {
    let base = (1000.0 * frame as f64 + 100.0 * i as f64 + 10.0 * j as f64) as f32;
    (0..n)
        .flat_map(|k| ((k as f32 + base) / 7.0f32).to_le_bytes())
        .collect()
}

