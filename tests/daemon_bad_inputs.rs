//! Malformed requests, table-driven: each gets the code of the one error
//! table (`src/service/errors.rs`: bad input → INVALID_ARGUMENT, a path that
//! leaves the data dir → PERMISSION_DENIED, unknown archive → NOT_FOUND),
//! nothing outside the data dir is touched, and the daemon keeps serving a
//! bystander stream that writes a frame between every two cases.
//!
//! Non-UTF-8 strings are sent as raw protobuf bytes. tonic itself reports a
//! message that fails to decode as INTERNAL (tonic-prost's
//! `from_decode_error`); the daemon remaps that to INVALID_ARGUMENT
//! (`errors::remap_decode*`), which is what these cases check.

#[path = "common/daemon.rs"]
mod daemon;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use daemon::*;
use gtar_logd::proto::v1::{self as pb, write_request::Msg as In, DType};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Code;

fn open(archive: &str) -> pb::WriteRequest {
    req(In::Open(open_req(archive, "")))
}
fn begin(i: &str) -> pb::WriteRequest {
    req(In::Begin(pb::BeginFrame { index: i.into() }))
}
fn tensor(name: &str, dtype: i32, shape: &[u64]) -> pb::WriteRequest {
    req(In::Tensor(pb::TensorHeader {
        group: String::new(),
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        ..Default::default()
    }))
}
fn gtensor(group: &str, name: &str) -> pb::WriteRequest {
    req(In::Tensor(pb::TensorHeader {
        group: group.into(),
        name: name.into(),
        dtype: DType::Uint8 as i32,
        shape: vec![1],
        ..Default::default()
    }))
}
fn chunk(n: usize) -> pb::WriteRequest {
    req(In::Chunk(pb::Chunk {
        data: vec![7; n].into(),
    }))
}
fn commit() -> pb::WriteRequest {
    req(In::Commit(pb::CommitFrame {}))
}
fn record(path: &str) -> pb::WriteRequest {
    req(In::Record(pb::ConstRecord {
        path: path.into(),
        data: b"x".to_vec(),
        size: 0,
    }))
}
fn scalar(name: &str, index: &str) -> pb::WriteRequest {
    req(In::Scalar(pb::Scalar {
        group: String::new(),
        name: name.into(),
        index: index.into(),
        value: 1.0,
    }))
}
/// A whole valid frame "0" of one byte.
fn ok_frame() -> Vec<pb::WriteRequest> {
    vec![
        begin("0"),
        tensor("w", DType::Uint8 as i32, &[1]),
        chunk(1),
        commit(),
    ]
}
fn with_open(archive: &str, rest: Vec<pb::WriteRequest>) -> Vec<pb::WriteRequest> {
    let mut v = vec![open(archive)];
    v.extend(rest);
    v
}

/// Run one Write stream of `msgs` to its end; the first error, if any.
async fn write_all(c: &mut Client, msgs: Vec<pb::WriteRequest>) -> Result<(), tonic::Status> {
    let mut s = c.write(tokio_stream::iter(msgs)).await?.into_inner();
    while s.message().await?.is_some() {}
    Ok(())
}

/// Every file and directory under `root` (except `skip`), with size and
/// contents, to prove nothing outside the data dir changed.
fn snapshot(root: &Path, skip: &Path) -> BTreeMap<PathBuf, (bool, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p == skip {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(p.clone(), (true, Vec::new()));
                stack.push(p);
            } else if ft.is_symlink() {
                out.insert(
                    p.clone(),
                    (
                        false,
                        std::fs::read_link(&p)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                );
            } else if ft.is_file() {
                out.insert(p.clone(), (false, std::fs::read(&p).unwrap()));
            } else {
                out.insert(p.clone(), (false, b"<socket>".to_vec()));
            }
        }
    }
    out
}

enum Case {
    /// A Write stream of these messages fails with this code.
    Write(Vec<pb::WriteRequest>),
    /// A Write stream of raw protobuf messages.
    RawWrite(Vec<Vec<u8>>),
    ListFrames(&'static str),
    GetFrame(&'static str, &'static str),
    Describe(&'static str),
    ReadRecord(&'static str, &'static str),
    History(&'static str, &'static str),
    /// Raw bytes as a ListFrames request.
    RawListFrames(Vec<u8>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_right_code_and_touch_nothing_outside() {
    let tmp = temp_root("bad-");
    let root = tmp.path().to_path_buf();
    // Outside the data dir: a victim archive and a directory that symlinks
    // inside the data dir point to.
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim.zip"), b"not yours").unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("evil")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim.zip"), data.join("link.zip")).unwrap();
    std::os::unix::fs::symlink(outside.join("ghost.zip"), data.join("dangling.zip")).unwrap();
    std::os::unix::fs::symlink("../outside", data.join("rel")).unwrap();
    let mut d = Daemon::start_in(&root, |c| c.max_tensor_bytes = 1 << 40);
    let before = snapshot(&root, &data);
    let passwd = std::fs::read("/etc/passwd").ok();

    let mut c = d.uds_client().await;
    // A bystander with a long-lived stream on another connection (TCP).
    let mut by = d.tcp_client().await;
    let mut steady = Session::open(&mut by, open_req("steady.zip", ""))
        .await
        .unwrap();
    // One valid archive for the query cases.
    write_all(&mut c, with_open("ok.zip", ok_frame()))
        .await
        .unwrap();

    use Code::{InvalidArgument as Inv, NotFound as Nf, PermissionDenied as Perm};
    let long_index = "9".repeat(300);
    // WriteRequest{open{archive: <not UTF-8>}}, and open + begin + a
    // TensorHeader whose name is not UTF-8.
    let bad_utf8_open = vec![pb_field(1, &pb_field(1, b"ok\xff\xfe.zip"))];
    let bad_utf8_tensor = {
        use prost::Message;
        vec![
            open("s.zip").encode_to_vec(),
            begin("0").encode_to_vec(),
            pb_field(3, &pb_field(2, b"w\xc3\x28")),
        ]
    };
    let cases: Vec<(&str, Case, Code)> = vec![
        // --- archive names
        (
            "../../etc/passwd",
            Case::Write(with_open("../../etc/passwd", ok_frame())),
            Perm,
        ),
        (
            "../ escaping to a .zip",
            Case::Write(with_open("../outside/victim.zip", ok_frame())),
            Perm,
        ),
        (
            "a/../../ escaping",
            Case::Write(with_open("a/../../outside/victim.zip", ok_frame())),
            Perm,
        ),
        (
            "absolute path",
            Case::Write(with_open("/etc/passwd", ok_frame())),
            Perm,
        ),
        (
            "absolute .zip",
            Case::Write(with_open(
                &format!("{}/victim.zip", outside.display()),
                ok_frame(),
            )),
            Perm,
        ),
        (
            "symlinked dir pointing out",
            Case::Write(with_open("evil/new.zip", ok_frame())),
            Perm,
        ),
        (
            "relative symlinked dir pointing out",
            Case::Write(with_open("rel/victim.zip", ok_frame())),
            Perm,
        ),
        (
            "symlinked archive pointing out",
            Case::Write(with_open("link.zip", ok_frame())),
            Perm,
        ),
        (
            "dangling symlink pointing out",
            Case::Write(with_open("dangling.zip", ok_frame())),
            Perm,
        ),
        (
            "NUL in archive name",
            Case::Write(with_open("a\0b.zip", ok_frame())),
            Inv,
        ),
        (
            "empty archive name",
            Case::Write(with_open("", ok_frame())),
            Inv,
        ),
        (
            "not a .zip",
            Case::Write(with_open("notes.txt", ok_frame())),
            Inv,
        ),
        (
            "./ component",
            Case::Write(with_open("./a.zip", ok_frame())),
            Inv,
        ),
        ("non-UTF-8 archive name", Case::RawWrite(bad_utf8_open), Inv),
        // --- stream shape
        ("first message not open", Case::Write(ok_frame()), Inv),
        (
            "empty message",
            Case::Write(vec![open("s.zip"), pb::WriteRequest { msg: None }]),
            Inv,
        ),
        (
            "open twice",
            Case::Write(vec![open("s.zip"), open("s.zip")]),
            Inv,
        ),
        (
            "compression 10",
            Case::Write(vec![req(In::Open(pb::OpenArchive {
                compression: 10,
                ..open_req("s.zip", "")
            }))]),
            Inv,
        ),
        (
            "unknown open mode",
            Case::Write(vec![req(In::Open(pb::OpenArchive {
                mode: 7,
                ..open_req("s.zip", "")
            }))]),
            Inv,
        ),
        (
            "group with ..",
            Case::Write(vec![req(In::Open(open_req("s.zip", "a/../b")))]),
            Inv,
        ),
        (
            "group with reserved frames",
            Case::Write(vec![req(In::Open(open_req("s.zip", "a/frames")))]),
            Inv,
        ),
        (
            "tensor before begin",
            Case::Write(with_open("s.zip", vec![tensor("w", 5, &[1])])),
            Inv,
        ),
        (
            "chunk before tensor",
            Case::Write(with_open("s.zip", vec![begin("0"), chunk(1)])),
            Inv,
        ),
        (
            "commit before begin",
            Case::Write(with_open("s.zip", vec![commit()])),
            Inv,
        ),
        (
            "begin twice",
            Case::Write(with_open("s.zip", vec![begin("0"), begin("1")])),
            Inv,
        ),
        // --- frame indices
        (
            "empty index",
            Case::Write(with_open("s.zip", vec![begin("")])),
            Inv,
        ),
        (
            "index with /",
            Case::Write(with_open("s.zip", vec![begin("1/2")])),
            Inv,
        ),
        (
            "index ..",
            Case::Write(with_open("s.zip", vec![begin("..")])),
            Inv,
        ),
        (
            "NUL in index",
            Case::Write(with_open("s.zip", vec![begin("1\0")])),
            Inv,
        ),
        (
            "300-byte index",
            Case::Write(with_open("s.zip", vec![begin(&long_index)])),
            Inv,
        ),
        // --- tensor headers
        (
            "tensor name with .",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w.f32", 1, &[1])],
            )),
            Inv,
        ),
        (
            "empty tensor name",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("", 1, &[1])])),
            Inv,
        ),
        (
            "tensor name with /",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("a/b", 1, &[1])])),
            Inv,
        ),
        (
            "NUL in tensor name",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("w\0", 1, &[1])])),
            Inv,
        ),
        (
            "tensor group ../..",
            Case::Write(with_open("s.zip", vec![begin("0"), gtensor("../..", "w")])),
            Inv,
        ),
        (
            "tensor group absolute",
            Case::Write(with_open("s.zip", vec![begin("0"), gtensor("/etc", "w")])),
            Inv,
        ),
        (
            "non-UTF-8 tensor name",
            Case::RawWrite(bad_utf8_tensor),
            Inv,
        ),
        (
            "dtype unspecified",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("w", 0, &[1])])),
            Inv,
        ),
        (
            "unknown dtype 99",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("w", 99, &[1])])),
            Inv,
        ),
        (
            "negative dtype",
            Case::Write(with_open("s.zip", vec![begin("0"), tensor("w", -1, &[1])])),
            Inv,
        ),
        (
            "rank 100",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w", 1, &[1; 100])],
            )),
            Inv,
        ),
        (
            "shape overflows u64",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w", 2, &[u64::MAX, 2])],
            )),
            Inv,
        ),
        (
            "2 PiB declared, over the limit",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w", 5, &[1 << 51])],
            )),
            Inv,
        ),
        (
            "duplicate tensor",
            Case::Write(with_open(
                "s.zip",
                vec![
                    begin("0"),
                    tensor("w", 5, &[1]),
                    chunk(1),
                    tensor("w", 5, &[1]),
                ],
            )),
            Inv,
        ),
        // --- byte counts
        (
            "one byte too many",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w", 1, &[4]), chunk(17)],
            )),
            Inv,
        ),
        (
            "bytes missing at commit",
            Case::Write(with_open(
                "s.zip",
                vec![begin("0"), tensor("w", 1, &[4]), chunk(15), commit()],
            )),
            Inv,
        ),
        (
            "bytes missing at next tensor",
            Case::Write(with_open(
                "s.zip",
                vec![
                    begin("0"),
                    tensor("w", 1, &[4]),
                    chunk(8),
                    tensor("v", 1, &[1]),
                ],
            )),
            Inv,
        ),
        (
            "512 GiB declared, 1 KiB sent",
            Case::Write(with_open(
                "s.zip",
                vec![
                    begin("0"),
                    tensor("w", 5, &[1 << 39]),
                    chunk(1024),
                    commit(),
                ],
            )),
            Inv,
        ),
        // --- records and scalars
        (
            "record path ../x",
            Case::Write(with_open("s.zip", vec![record("../x")])),
            Inv,
        ),
        (
            "record path absolute",
            Case::Write(with_open("s.zip", vec![record("/etc/passwd")])),
            Inv,
        ),
        (
            "record path a//b",
            Case::Write(with_open("s.zip", vec![record("a//b")])),
            Inv,
        ),
        (
            "empty record path",
            Case::Write(with_open("s.zip", vec![record("")])),
            Inv,
        ),
        (
            "scalar outside a frame, no index",
            Case::Write(with_open("s.zip", vec![scalar("loss", "")])),
            Inv,
        ),
        (
            "scalar name with .",
            Case::Write(with_open("s.zip", vec![scalar("lo.ss", "1")])),
            Inv,
        ),
        (
            "scalar index ..",
            Case::Write(with_open("s.zip", vec![scalar("loss", "..")])),
            Inv,
        ),
        // --- queries
        (
            "query ../../etc/passwd",
            Case::ListFrames("../../etc/passwd"),
            Perm,
        ),
        ("query absolute", Case::ListFrames("/etc/passwd"), Perm),
        (
            "query symlinked dir",
            Case::GetFrame("evil/victim.zip", "0"),
            Perm,
        ),
        ("query symlinked archive", Case::Describe("link.zip"), Perm),
        (
            "query ../outside",
            Case::ReadRecord("../outside/victim.zip", "x"),
            Perm,
        ),
        ("query NUL", Case::ListFrames("a\0.zip"), Inv),
        ("query empty name", Case::Describe(""), Inv),
        ("query unknown archive", Case::ListFrames("nope.zip"), Nf),
        (
            "query unknown archive in a new dir",
            Case::GetFrame("no/such/dir.zip", "0"),
            Nf,
        ),
        (
            "GetFrame unknown frame",
            Case::GetFrame("ok.zip", "12345"),
            Nf,
        ),
        (
            "GetFrame index with NUL",
            Case::GetFrame("ok.zip", "0\0"),
            Inv,
        ),
        ("ReadRecord empty path", Case::ReadRecord("ok.zip", ""), Inv),
        (
            "ReadRecord unknown path",
            Case::ReadRecord("ok.zip", "../../etc/passwd"),
            Nf,
        ),
        ("TensorHistory no name", Case::History("ok.zip", ""), Inv),
        (
            "TensorHistory unknown name",
            Case::History("ok.zip", "nope"),
            Nf,
        ),
        (
            "non-UTF-8 ListFrames",
            Case::RawListFrames(pb_field(1, b"ok\xff.zip")),
            Inv,
        ),
    ];

    let mut seq = 0usize;
    for (name, case, want) in cases {
        let res: Result<(), tonic::Status> = match case {
            Case::Write(msgs) => write_all(&mut c, msgs).await,
            Case::RawWrite(msgs) => {
                let mut g = tonic::client::Grpc::new(
                    uds_channel(&d.uds)
                        .await
                        .expect("connect over the Unix socket"),
                );
                g.ready().await.unwrap();
                let r = g
                    .streaming(
                        tonic::Request::new(tokio_stream::iter(msgs)),
                        PathAndQuery::from_static("/gtar.logd.v1.Logd/Write"),
                        RawCodec,
                    )
                    .await;
                match r {
                    Err(s) => Err(s),
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        let mut out = Ok(());
                        loop {
                            match s.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => break,
                                Err(e) => {
                                    out = Err(e);
                                    break;
                                }
                            }
                        }
                        out
                    }
                }
            }
            Case::RawListFrames(bytes) => {
                let mut g = tonic::client::Grpc::new(
                    uds_channel(&d.uds)
                        .await
                        .expect("connect over the Unix socket"),
                );
                g.ready().await.unwrap();
                g.unary(
                    tonic::Request::new(bytes),
                    PathAndQuery::from_static("/gtar.logd.v1.Logd/ListFrames"),
                    RawCodec,
                )
                .await
                .map(|_| ())
            }
            Case::ListFrames(a) => list_frames(&mut c, a, "").await.map(|_| ()),
            Case::GetFrame(a, i) => get_frame(&mut c, a, "", by_index(i)).await.map(|_| ()),
            Case::Describe(a) => c
                .describe_archive(pb::DescribeArchiveRequest { archive: a.into() })
                .await
                .map(|_| ()),
            Case::ReadRecord(a, p) => c
                .read_record(pb::ReadRecordRequest {
                    archive: a.into(),
                    path: p.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Case::History(a, n) => match c
                .tensor_history(pb::TensorHistoryRequest {
                    archive: a.into(),
                    group: String::new(),
                    name: n.into(),
                    start: 0,
                    stop: None,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => collect_frames(s.into_inner()).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        let st = assert_code(res, want, name);
        assert!(!st.message().is_empty(), "{name}: the status says why");
        println!("{name:<40} {:?}: {}", st.code(), st.message());

        // The bystander keeps going: one more frame, durable.
        let f = FrameSpec {
            index: seq.to_string(),
            tensors: vec![TensorSpec::new(
                "",
                "w",
                DType::Uint8,
                &[64],
                Payload::Gen {
                    seed: seq as u64,
                    len: 64,
                },
            )],
            ..Default::default()
        };
        steady.send_frame(&f, 1 << 20).await.unwrap();
        seq += 1;
        steady
            .wait_durable(seq)
            .await
            .unwrap_or_else(|e| panic!("bystander after {name:?}: {e:?}"));
    }

    // Still serving: health, the bystander's frames, and the valid archive.
    assert_eq!(health(&d.uds, "").await.unwrap(), SERVING);
    let steady = steady.finish().await.unwrap();
    assert_eq!(steady.durable.len(), seq);
    assert_eq!(
        list_frames(&mut by, "steady.zip", "").await.unwrap().len(),
        seq
    );
    assert_eq!(
        get_frame(&mut c, "ok.zip", "", by_index("0"))
            .await
            .unwrap()[0]
            .data,
        vec![7]
    );
    d.stop().unwrap();

    // Nothing outside the data dir changed; /etc/passwd untouched.
    assert_eq!(
        snapshot(&root, &data),
        before,
        "files outside the data dir changed"
    );
    assert_eq!(std::fs::read("/etc/passwd").ok(), passwd);
    // The 512 GiB declaration left no large file behind.
    let mut total = 0;
    for (p, (dir, bytes)) in snapshot(&data, Path::new("/nonexistent")) {
        if !dir {
            total += bytes.len();
            assert!(
                bytes.len() < 1 << 20,
                "{} is {} bytes",
                p.display(),
                bytes.len()
            );
        }
    }
    assert!(total < 4 << 20, "data dir holds {total} bytes");
}

// ------------------------------------------------------------ raw bytes

/// A codec that sends and receives raw protobuf bytes, so tests can send
/// messages the generated types cannot express (e.g. non-UTF-8 strings).
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEnc;
struct RawDec;

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

fn varint(mut x: u64, v: &mut Vec<u8>) {
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            v.push(b);
            return;
        }
        v.push(b | 0x80);
    }
}

/// Protobuf length-delimited field `tag` holding `bytes`.
fn pb_field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    varint(((tag << 3) | 2) as u64, &mut v);
    varint(bytes.len() as u64, &mut v);
    v.extend_from_slice(bytes);
    v
}
