//! Write → query round trips against the real server, in-process, on a temp
//! Unix socket and `127.0.0.1:0` at once: every dtype, frame sizes from one
//! byte up, negative positions, groups, constant and continuous records,
//! TensorHistory, NOT_FOUND / INVALID_ARGUMENT, a client that disconnects
//! mid-frame, and archives that appear under the data dir while it runs.
//!
//! Written and read through the project's Rust client (`gtar-logd-client`);
//! hand-made protobuf only where the test is about the protocol itself (odd
//! chunk sizes, half a frame, a GetFrame naming no frame, `text`).

#[path = "common/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use daemon::*;
use gtar_logd::proto::v1::{self as pb, write_request::Msg as In, DType};
use rand::{Rng, SeedableRng};
use tonic::Code;

const ALL_DTYPES: [DType; 13] = [
    DType::Float32,
    DType::Float64,
    DType::Int32,
    DType::Int64,
    DType::Uint8,
    DType::Uint32,
    DType::Uint64,
    DType::Float16,
    DType::Bfloat16,
    DType::Int8,
    DType::Int16,
    DType::Uint16,
    DType::Bool,
];

/// The daemon's storage dtype for a wire dtype (its item size and the name
/// it gives records), spelled out here as the contract says it.
fn domain(d: DType) -> gtar_logd::DType {
    use gtar_logd::DType as S;
    match d {
        DType::Float32 => S::F32,
        DType::Float64 => S::F64,
        DType::Int32 => S::I32,
        DType::Int64 => S::I64,
        DType::Uint8 => S::U8,
        DType::Uint32 => S::U32,
        DType::Uint64 => S::U64,
        DType::Float16 => S::F16,
        DType::Bfloat16 => S::BF16,
        DType::Int8 => S::I8,
        DType::Int16 => S::I16,
        DType::Uint16 => S::U16,
        DType::Bool => S::Bool,
        DType::DtypeUnspecified => panic!("no storage dtype for DTYPE_UNSPECIFIED"),
    }
}

fn item_size(d: DType) -> u64 {
    domain(d).storage().0 as u64
}

/// A frame with every dtype in several shapes (scalar, 1-D, 3-D, empty),
/// random bytes (NaN payloads, negative zero... whatever comes up).
fn dtype_frame(index: &str, seed: u64) -> FrameSpec {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for d in ALL_DTYPES {
        for (k, shape) in [vec![], vec![7], vec![2, 3, 5], vec![4, 0]]
            .into_iter()
            .enumerate()
        {
            let n = shape.iter().product::<u64>() * item_size(d);
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if d == DType::Bool {
                bytes.iter_mut().for_each(|b| *b &= 1);
            }
            tensors.push(TensorSpec::new(
                &format!("dt/{}", domain(d).name()),
                &format!("t{k}"),
                d,
                &shape,
                Payload::Bytes(bytes),
            ));
        }
    }
    FrameSpec {
        index: index.into(),
        tensors,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dtype_round_trips_over_uds_and_tcp() {
    let mut d = Daemon::start();
    let uds = d.client().await;
    let tcp = d.tcp().await;

    // Written over one transport (the Unix socket's through shared memory),
    // read over the other, both ways.
    let a = vec![dtype_frame("0", 1), dtype_frame("1", 2)];
    let (opened, _) = write_client(&uds, "dtypes/uds.zip", logd::OpenOptions::append(), &a)
        .await
        .unwrap();
    assert!(opened.shm_attached, "{opened:?}");
    let b = vec![dtype_frame("0", 3)];
    write_client(&tcp, "dtypes/tcp.zip", append(""), &b)
        .await
        .unwrap();

    for f in &a {
        let got = tcp
            .get_frame("dtypes/uds.zip", f.index.as_str())
            .await
            .unwrap();
        assert_frame_matches(&got, f);
    }
    let got = uds
        .get_frame("dtypes/tcp.zip", logd::FrameSel::LAST)
        .await
        .unwrap();
    assert_frame_matches(&got, &b[0]);

    // libgetar's seven types are stored as themselves, the rest as u8.
    let desc = uds.describe("dtypes/uds.zip").await.unwrap();
    for r in desc.records.iter().filter(|r| r.group.starts_with("dt/")) {
        let want = match r.group.as_str() {
            "dt/float32" => "f32",
            "dt/float64" => "f64",
            "dt/int32" => "i32",
            "dt/int64" => "i64",
            "dt/uint32" => "u32",
            "dt/uint64" => "u64",
            _ => "u8",
        };
        assert_eq!(r.format, want, "{r:?}");
        assert_eq!(r.behavior, "discrete");
        assert_eq!(r.frame_count, 2);
    }
    assert_eq!(desc.frame_count, 2);
    assert_eq!(
        (desc.first_frame.as_str(), desc.last_frame.as_str()),
        ("0", "1")
    );
    d.stop().unwrap();
}

/// Chunk boundaries are the protocol's business, so the odd-sized chunks go
/// through a hand-made Write stream; the rest through the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_one_byte_up_and_odd_chunking() {
    let mut d = Daemon::start();
    let c = d.client().await;
    let mut raw = d.uds_client().await;
    let one = FrameSpec {
        index: "0".into(),
        tensors: vec![TensorSpec::new(
            "",
            "b",
            DType::Uint8,
            &[1],
            Payload::Bytes(vec![0xA5]),
        )],
        ..Default::default()
    };
    // 1 byte, then a tensor sent 7 bytes at a time, then a 20 MiB tensor
    // (chunked by the client), then many small tensors in one frame, then
    // every dtype in 5-byte chunks (cut across elements).
    let odd = FrameSpec {
        index: "1".into(),
        tensors: vec![TensorSpec::new(
            "g",
            "odd",
            DType::Float64,
            &[13, 11],
            Payload::Gen {
                seed: 5,
                len: 13 * 11 * 8,
            },
        )],
        ..Default::default()
    };
    let big = FrameSpec {
        index: "2".into(),
        tensors: vec![TensorSpec::new(
            "g",
            "big",
            DType::Float32,
            &[5, 1 << 20],
            Payload::Gen {
                seed: 6,
                len: 20 << 20,
            },
        )],
        ..Default::default()
    };
    let many = FrameSpec {
        index: "3".into(),
        tensors: (0..200)
            .map(|i| {
                TensorSpec::new(
                    &format!("m/{i}"),
                    "w",
                    DType::Int16,
                    &[i],
                    Payload::Gen {
                        seed: 100 + i,
                        len: 2 * i,
                    },
                )
            })
            .collect(),
        ..Default::default()
    };
    let dtypes = dtype_frame("4", 4);
    write_client(&c, "sizes.zip", append(""), std::slice::from_ref(&one))
        .await
        .unwrap();
    write_frames(
        &mut raw,
        open_req("sizes.zip", ""),
        std::slice::from_ref(&odd),
        7,
    )
    .await
    .unwrap();
    let (opened, acks) = write_client(&c, "sizes.zip", append(""), &[big.clone(), many.clone()])
        .await
        .unwrap();
    assert_eq!(opened.existing_frames, 2);
    assert!(acks[0].received.bytes >= 20 << 20, "{:?}", acks[0]);
    write_frames(
        &mut raw,
        open_req("sizes.zip", ""),
        std::slice::from_ref(&dtypes),
        5,
    )
    .await
    .unwrap();
    for f in [&one, &odd, &big, &many, &dtypes] {
        let got = c.get_frame("sizes.zip", f.index.as_str()).await.unwrap();
        assert_frame_matches(&got, f);
    }
    // The one-byte frame over TCP too.
    let t = d.tcp().await;
    let got = t.get_frame("sizes.zip", 0i64).await.unwrap();
    assert_eq!(got.tensors[0].array.to_le_bytes(), vec![0xA5]);
    d.stop().unwrap();
}

fn run_frame(i: u64) -> FrameSpec {
    FrameSpec {
        index: i.to_string(),
        tensors: vec![
            TensorSpec::new(
                "keras/layer/0/weight/0",
                "weight",
                DType::Float32,
                &[3, 4],
                Payload::Gen { seed: i, len: 48 },
            ),
            TensorSpec::new(
                "opt",
                "m",
                DType::Bfloat16,
                &[5],
                Payload::Gen {
                    seed: 1000 + i,
                    len: 10,
                },
            ),
        ],
        records: vec![],
        scalars: vec![("metrics".into(), "loss".into(), 1.0 / (i as f64 + 1.0))],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_groups_records_scalars_and_history() {
    let mut d = Daemon::start();
    let c = d.client().await;
    let q = d.tcp().await;
    let ar = "runs/mnist.zip";

    // run1: model.json as a record of its own, then 12 frames (so "10" and
    // "11" must sort after "9"), each with a scalar; then scalars outside any
    // frame with explicit indices.
    let model = br#"{"class_name":"Sequential"}"#.to_vec();
    let mut w = c.writer(ar, append("run1")).await.unwrap();
    let mut handles = vec![w.record("keras/model.json", model.clone()).await.unwrap()];
    let frames: Vec<FrameSpec> = (0..12).map(run_frame).collect();
    for f in &frames {
        let mut h = w.write(f.new_frame()).await.unwrap();
        // Visible to queries once `received`, before `durable`, over the
        // other transport.
        h.received().await.unwrap();
        let listed = q.list_frames(ar, "run1").await.unwrap();
        assert!(listed.contains(&f.index), "{listed:?} lacks {}", f.index);
        handles.push(h);
    }
    for step in [100u64, 101, 102] {
        handles.push(
            w.scalar("metrics", "lr", step.to_string(), step as f64 * 0.5)
                .await
                .unwrap(),
        );
    }
    // Acks come in order with their sequence numbers.
    assert_eq!(handles.len(), 1 + 12 + 3);
    for (k, h) in handles.into_iter().enumerate() {
        assert_eq!(h.durable().await.unwrap().seq, k as u64);
    }
    w.close().await.unwrap();

    // run2: three frames, overlapping indices with run1.
    let run2: Vec<FrameSpec> = (0..3).map(|i| run_frame(50 + i)).collect();
    let run2: Vec<FrameSpec> = run2
        .into_iter()
        .enumerate()
        .map(|(k, mut f)| {
            f.index = k.to_string();
            f
        })
        .collect();
    write_client(&c, ar, append("run2"), &run2).await.unwrap();

    // ListFrames, per group and overall, in GETAR order.
    let want: Vec<String> = (0..12).map(|i| i.to_string()).collect();
    assert_eq!(q.list_frames(ar, "run1").await.unwrap(), want);
    assert_eq!(
        q.list_frames(ar, "run1/keras").await.unwrap(),
        want,
        "a group below the stream's prefix"
    );
    assert_eq!(q.list_frames(ar, "run2").await.unwrap(), ["0", "1", "2"]);
    assert_eq!(q.list_frames(ar, "").await.unwrap(), want);
    assert_fails(
        q.list_frames(ar, "run3").await,
        Code::NotFound,
        "unknown group",
    );
    assert_fails(
        q.list_frames(ar, "run").await,
        Code::NotFound,
        "group prefix is whole components",
    );

    // Positions, Python style.
    let at = |frame: logd::FrameSel| logd::FrameQuery::new(frame).group("run1");
    for (pos, want) in [
        (-1i64, "11"),
        (-12, "0"),
        (0, "0"),
        (11, "11"),
        (-2, "10"),
        (9, "9"),
    ] {
        let got = q.query_frame(ar, &at(pos.into())).await.unwrap();
        assert_eq!(got.index, want, "position {pos}");
        let want_i: u64 = want.parse().unwrap();
        let mut f = run_frame(want_i);
        f.index = want.into();
        assert_frame_matches(&got, &f);
    }
    for pos in [-13i64, 12, i64::MIN, i64::MAX] {
        assert_fails(
            q.query_frame(ar, &at(pos.into())).await,
            Code::NotFound,
            &format!("position {pos}"),
        );
    }
    let got = q
        .query_frame(
            ar,
            &logd::FrameQuery::new(logd::FrameSel::LAST).group("run2"),
        )
        .await
        .unwrap();
    assert_frame_matches(&got, &run2[2]);
    // No group: frame "2" holds both runs' tensors.
    let got = q.get_frame(ar, "2").await.unwrap();
    assert_eq!(
        got.tensors.len(),
        4,
        "{:?}",
        got.tensors.iter().map(|t| &t.path).collect::<Vec<_>>()
    );
    // Missing position = last frame (a request the client never makes: it
    // always names a frame).
    let mut raw = d.tcp_client().await;
    let got = collect_frames(
        raw.get_frame(pb::GetFrameRequest {
            archive: ar.into(),
            group: "run1".into(),
            frame: None,
            names: vec![],
            locate: false,
            batch: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await
    .unwrap();
    assert!(!got.is_empty() && got.iter().all(|t| t.frame == "11"));
    // `locate`: granted on the Unix socket to the file's owner (this test
    // process), where the client reads the bytes itself; never over TCP.
    let located = |mut c: pb::logd_client::LogdClient<tonic::transport::Channel>| async move {
        let mut s = c
            .get_frame(pb::GetFrameRequest {
                archive: ar.into(),
                group: "run1".into(),
                frame: None,
                names: vec![],
                locate: true,
                batch: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut infos = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            if let Some(pb::frame_data::Msg::Tensor(t)) = m.msg {
                infos.push(t);
            }
        }
        infos
    };
    let over_uds = located(d.uds_client().await).await;
    assert!(!over_uds.is_empty());
    for t in &over_uds {
        let loc = t.location.as_ref().expect("located on the Unix socket");
        assert_eq!(loc.length, t.size_bytes);
        let f = std::fs::File::open(&loc.file).unwrap();
        let mut b = vec![0u8; loc.length as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, loc.offset).unwrap();
        assert_eq!(crc32fast::hash(&b), loc.crc32, "{}", t.path);
    }
    let over_tcp = located(d.tcp_client().await).await;
    assert!(!over_tcp.is_empty() && over_tcp.iter().all(|t| t.location.is_none()));
    // Only some names.
    let got = q
        .query_frame(ar, &at("4".into()).names(["m"]))
        .await
        .unwrap();
    assert_eq!(got.tensors.len(), 1);
    assert_eq!(got.tensors[0].path, "run1/opt/frames/4/m.u8.uni");
    assert_eq!(got.tensors[0].array.dtype(), logd::DType::BF16);
    assert_eq!(got.tensors[0].array.to_le_bytes(), gen(1004, 10));
    assert_fails(
        q.query_frame(ar, &at("12".into())).await,
        Code::NotFound,
        "frame 12",
    );
    assert_fails(
        q.query_frame(ar, &logd::FrameQuery::new("1").group("run3"))
            .await,
        Code::NotFound,
        "group run3",
    );
    assert_fails(
        q.get_frame("nope.zip", "1").await,
        Code::NotFound,
        "archive",
    );

    // Constant record and continuous records via ReadRecord.
    assert_eq!(
        q.read_record(ar, "run1/keras/model.json").await.unwrap(),
        model
    );
    // A small text record also comes back as `text` (grpcurl's convenience).
    let r = raw
        .read_record(pb::ReadRecordRequest {
            archive: ar.into(),
            path: "run1/keras/model.json".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.text.as_bytes(), &model[..]);
    for i in 0..12u64 {
        let r = q
            .read_record(ar, &format!("run1/metrics/vars/loss.f64.uni/{i}"))
            .await
            .unwrap();
        assert_eq!(r, (1.0 / (i as f64 + 1.0)).to_le_bytes());
    }
    let r = q
        .read_record(ar, "run1/metrics/vars/lr.f64.uni/101")
        .await
        .unwrap();
    assert_eq!(r, 50.5f64.to_le_bytes());
    assert_fails(
        q.read_record(ar, "run1/keras/nope.json").await,
        Code::NotFound,
        "record",
    );
    assert_fails(
        q.read_record(ar, "").await,
        Code::InvalidArgument,
        "empty path",
    );

    // DescribeArchive: groups, record types, continuous records.
    let desc = q.describe(ar).await.unwrap();
    for g in [
        "run1/keras/layer/0/weight/0",
        "run1/opt",
        "run1/metrics",
        "run2/metrics",
    ] {
        assert!(
            desc.groups.iter().any(|x| x == g),
            "{g} in {:?}",
            desc.groups
        );
    }
    let rec = |group: &str, name: &str| {
        desc.records
            .iter()
            .find(|r| r.group == group && r.name == name)
            .unwrap_or_else(|| panic!("no record {group}/{name} in {:?}", desc.records))
    };
    let loss = rec("run1/metrics", "loss");
    assert_eq!(loss.behavior, "continuous");
    assert_eq!(loss.format, "f64");
    assert_eq!(loss.frame_count, 12);
    assert_eq!(
        (loss.first_frame.as_str(), loss.last_frame.as_str()),
        ("0", "11")
    );
    let lr = rec("run1/metrics", "lr");
    assert_eq!((lr.frame_count, lr.last_frame.as_str()), (3, "102"));
    let w = rec("run1/keras/layer/0/weight/0", "weight");
    assert_eq!(
        (w.behavior.as_str(), w.format.as_str(), w.frame_count),
        ("discrete", "f32", 12)
    );
    let m = rec("run1/keras", "model.json");
    assert_eq!(
        (m.behavior.as_str(), m.resolution.as_str()),
        ("constant", "text")
    );
    assert_eq!(desc.last_frame, "11");

    // TensorHistory: one tensor over a slice of its frames.
    let group = "run1/keras/layer/0/weight/0";
    for (start, stop, want) in [
        (0, None, (0..12).collect::<Vec<u64>>()),
        (-3, None, vec![9, 10, 11]),
        (2, Some(5), vec![2, 3, 4]),
        (0, Some(-10), vec![0, 1]),
        (20, None, vec![]),
        (5, Some(2), vec![]),
    ] {
        let got = q
            .tensor_history(ar, group, "weight", start, stop)
            .await
            .unwrap();
        let frames: Vec<u64> = got.iter().map(|f| f.index.parse().unwrap()).collect();
        assert_eq!(frames, want, "history {start}..{stop:?}");
        for f in &got {
            let i: u64 = f.index.parse().unwrap();
            assert_eq!(f.tensors.len(), 1, "history frame {i}");
            let t = &f.tensors[0].array;
            assert_eq!(t.to_le_bytes(), gen(i, 48));
            assert_eq!(t.shape(), [3, 4]);
        }
    }
    assert_fails(
        q.tensor_history(ar, group, "nope", 0, None).await,
        Code::NotFound,
        "history of unknown name",
    );
    assert_fails(
        q.tensor_history(ar, group, "", 0, None).await,
        Code::InvalidArgument,
        "history without name",
    );

    // ListArchives with a prefix.
    let l = q.list_archives("runs/").await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].archive, ar);
    assert!(l[0].size_bytes > 0);
    d.stop().unwrap();
}

/// The daemon reads the next frame while the writer finishes the last one,
/// but a client that streams faster than the disk is slowed down, never
/// refused: frames back to back through an archive queue of 2 frames. Each
/// frame (one 1 MiB chunk, written with direct I/O) fits the stream's part
/// buffer, so without the daemon's per-stream bound the stream would queue
/// frames faster than the writer takes them.
/// Acks arrive in frame order, each frame's `received` before its `durable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_stream_is_slowed_down_not_refused_and_acks_stay_ordered() {
    let mut d = Daemon::start_with(|c| c.limits.queue_frames = 2);
    let n = 100u64;
    let frames: Vec<FrameSpec> = (0..n)
        .map(|i| FrameSpec {
            index: i.to_string(),
            tensors: vec![TensorSpec::new(
                "m",
                "w",
                DType::Uint8,
                &[1 << 20],
                Payload::Gen {
                    seed: i,
                    len: 1 << 20,
                },
            )],
            ..Default::default()
        })
        .collect();
    // Built up front (the client sends an owned buffer's chunks without
    // copying), so the client outpaces the writer. Bytes over the socket:
    // each 1 MiB tensor is one chunk.
    let new: Vec<logd::NewFrame> = frames.iter().map(FrameSpec::new_frame).collect();
    let c = d.client().await;
    let mut w = c.writer("fast.zip", append("")).await.unwrap();
    let mut handles = Vec::new();
    for f in new {
        handles.push(w.write(f).await.unwrap());
    }
    // The client fails the stream if an ack comes out of order, or a
    // frame's `durable` before its `received`.
    for (k, mut h) in handles.into_iter().enumerate() {
        let k = k as u64;
        assert_eq!(h.received().await.unwrap().seq, k, "received in order");
        assert_eq!(h.durable().await.unwrap().seq, k, "durable in order");
    }
    w.close().await.unwrap();
    let listed = c.list_frames("fast.zip", "").await.unwrap();
    assert_eq!(listed.len() as u64, n);
    for i in [0, 1, n / 2, n - 1] {
        let got = c.get_frame("fast.zip", i.to_string()).await.unwrap();
        assert_frame_matches(&got, &frames[i as usize]);
    }
    d.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_frame_leaves_no_trace() {
    // Buffered writes, so the file shows how far the writer got (direct I/O
    // stages 4 MiB before writing; the wait below watches the file).
    let mut d = Daemon::start_with(|c| c.limits.direct_io = false);
    let ar = "cut.zip";
    let f0 = FrameSpec {
        index: "0".into(),
        tensors: vec![TensorSpec::new(
            "",
            "w",
            DType::Uint8,
            &[1000],
            Payload::Gen { seed: 0, len: 1000 },
        )],
        ..Default::default()
    };
    let c = d.client().await;
    write_client(&c, ar, append(""), std::slice::from_ref(&f0))
        .await
        .unwrap();

    // Frame "1": 10 MiB declared, 6 MiB sent, then the client vanishes
    // (stream and connection dropped): a hand-made stream, as the client
    // never sends half a frame.
    {
        let mut cut = d.uds_client().await;
        let mut s = Session::open(&mut cut, open_req(ar, "")).await.unwrap();
        s.send(req(In::Begin(pb::BeginFrame { index: "1".into() })))
            .await
            .unwrap();
        s.send(req(In::Tensor(pb::TensorHeader {
            group: String::new(),
            name: "w".into(),
            dtype: DType::Uint8 as i32,
            shape: vec![10 << 20],
            ..Default::default()
        })))
        .await
        .unwrap();
        // 6 MiB: past SMALL_FRAME_MAX (4 MiB), below which the service
        // assembles a frame apart and the writer never sees it.
        for k in 0..6u64 {
            let mut b = vec![0u8; 1 << 20];
            fill(9, k << 20, &mut b);
            s.send(req(In::Chunk(pb::Chunk { data: b.into() })))
                .await
                .unwrap();
        }
        // The writer thread has taken the frame and is writing its parts
        // when the file grows by most of the 6 MiB sent (1 MiB parts go to
        // the file as they come): only then does the client vanish, so the
        // abort of an in-progress frame is what is tested.
        let file = d.data.join(ar);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&file).map_or(0, |m| m.len()) < 4 << 20 {
            assert!(
                Instant::now() < deadline,
                "the writer never wrote the frame's first 4 MiB"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.abandon();
        drop(cut);
    }
    // Frame "2" from another client goes through the same writer after the
    // abandoned frame, so once it is acked the abort has been handled.
    let f2 = FrameSpec {
        index: "2".into(),
        tensors: vec![TensorSpec::new(
            "",
            "w",
            DType::Uint8,
            &[1000],
            Payload::Gen { seed: 2, len: 1000 },
        )],
        ..Default::default()
    };
    let c2 = d.tcp().await;
    // The vanished stream holds the group until the server has read the
    // connection's end, which may come after this open: then the open is
    // refused as a second writer, and tried again (with a deadline).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match write_client(&c2, ar, append(""), std::slice::from_ref(&f2)).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(Code::FailedPrecondition) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("frame 2 after the vanished client: {e}"),
        }
    }
    assert_eq!(c2.list_frames(ar, "").await.unwrap(), ["0", "2"]);
    assert_fails(c2.get_frame(ar, "1").await, Code::NotFound, "aborted frame");
    assert_eq!(health(&d.uds, "").await.unwrap(), SERVING);
    assert_eq!(health(&d.uds, "gtar.logd.v1.Logd").await.unwrap(), SERVING);
    assert_frame_matches(&c2.get_frame(ar, "2").await.unwrap(), &f2);

    // After a graceful stop the file holds frames 0 and 2 and nothing of 1:
    // no entry, and no dead bytes (the archive is exactly its entries).
    let data = d.data.clone();
    d.stop().unwrap();
    let a = gtar::Archive::open(data.join(ar)).unwrap();
    assert!(matches!(a.state(), gtar::OpenState::Clean));
    let names: Vec<String> = a
        .index()
        .entries()
        .iter()
        .map(|e| e.name().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("frames/1/")), "{names:?}");
    let size = std::fs::metadata(data.join(ar)).unwrap().len();
    assert!(
        size < 64 << 10,
        "archive is {size} bytes: the aborted 6 MiB left bytes behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_appearing_under_the_data_dir_are_served() {
    let mut d = Daemon::start();
    let c = d.client().await;
    // Another program writes an archive straight into the data dir.
    let path = d.data.join("copied/in.zip");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let (mut w, _) = gtar::ArchiveWriter::open(&path, gtar::OpenMode::Create).unwrap();
        let mut t = w.begin().unwrap();
        t.add(
            "frames/7/x.f64.uni",
            &2.5f64.to_le_bytes(),
            gtar::Compression::Stored,
        )
        .unwrap();
        t.commit().unwrap();
        w.close().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = c.list_archives("").await.unwrap();
        if l.iter().any(|a| a.archive == "copied/in.zip") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "copied/in.zip never listed: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.list_frames("copied/in.zip", "").await.unwrap(), ["7"]);
    let got = c
        .get_frame("copied/in.zip", logd::FrameSel::LAST)
        .await
        .unwrap();
    assert_eq!(got.index, "7");
    assert_eq!(got.tensors[0].array.to_le_bytes(), 2.5f64.to_le_bytes());
    assert_eq!(got.tensors[0].array.dtype(), logd::DType::F64);
    d.stop().unwrap();
}

/// Frames the daemon writes carry their write time in the manifest, so
/// `gtar-logd compact --keep-newer-than` can judge them: recent frames are
/// kept, and nothing is refused as "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_carry_their_write_time_for_keep_newer_than() {
    use gtar_logd_client::{ndarray::Array1, NewFrame, OpenOptions};
    let mut d = Daemon::start();
    let c = d.client().await;
    let mut w = c
        .writer("timed.zip", OpenOptions::append().shared_memory(false))
        .await
        .unwrap();
    let x = Array1::from_elem(4, 2.5f32);
    for i in 0..3 {
        let frame = NewFrame::new(i.to_string()).tensor("t", "x", &x);
        w.write(frame).await.unwrap().durable().await.unwrap();
    }
    drop(w);
    d.stop().unwrap();
    let path = d.data.join("timed.zip");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gtar-logd"))
        .args(["compact", path.to_str().unwrap(), "--keep-newer-than", "1h"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let a = gtar::Archive::open(&path).unwrap();
    assert_eq!(a.index().frames_under(None), ["0", "1", "2"], "{text}");
}
