//! A frame larger than 4 GiB through the real server: one tensor of ~4.5 GiB
//! streamed in 4 MiB chunks from generated data (never held in memory),
//! then a one-byte frame behind it (zip64 offsets past 4 GiB); both read back
//! with GetFrame, streamed and compared chunk by chunk. Takes disk time, so
//! it is the only test of its size. The big frame goes through hand-made
//! streams (the client holds a whole tensor in memory, and 4.5 GiB of it is
//! what this test avoids); the frame behind it is read through the client.

#[path = "common/daemon.rs"]
mod daemon;

use daemon::*;
use gtar_logd::proto::v1::{self as pb, DType};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_4_gib_round_trips() {
    // 9 × (2^27 + 3) float32 = 4,831,838,316 bytes.
    let shape = [9u64, (1 << 27) + 3];
    let len = shape.iter().product::<u64>() * 4;
    assert!(len > 4 << 30);
    let mut d = Daemon::start();
    let mut c = d.uds_client().await;
    let big = FrameSpec {
        index: "0".into(),
        tensors: vec![
            TensorSpec::new(
                "big",
                "w",
                DType::Float32,
                &shape,
                Payload::Gen { seed: 42, len },
            ),
            TensorSpec::new(
                "small",
                "b",
                DType::Int8,
                &[3],
                Payload::Bytes(vec![1, 2, 255]),
            ),
        ],
        ..Default::default()
    };
    let tail = FrameSpec {
        index: "1".into(),
        tensors: vec![TensorSpec::new(
            "small",
            "b",
            DType::Uint8,
            &[1],
            Payload::Bytes(vec![9]),
        )],
        ..Default::default()
    };
    let s = write_frames(
        &mut c,
        open_req("big.zip", ""),
        &[big, tail.clone()],
        4 << 20,
    )
    .await
    .unwrap();
    assert!(s.durable[0].bytes >= len);

    // Stream frame 0 back without holding it: compare each chunk in place.
    let mut st = c
        .get_frame(pb::GetFrameRequest {
            archive: "big.zip".into(),
            group: String::new(),
            frame: Some(by_index("0")),
            names: vec![],
            locate: false,
            batch: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    use pb::frame_data::Msg;
    let mut current: Option<pb::TensorInfo> = None;
    let mut off = 0u64;
    let mut expect = Vec::new();
    let mut seen = Vec::new();
    while let Some(m) = st.message().await.unwrap() {
        match m.msg.unwrap() {
            Msg::Frame(f) => assert_eq!(f, "0"),
            Msg::Tensor(t) => {
                if let Some(prev) = current.take() {
                    assert_eq!(off, prev.size_bytes, "{}", prev.path);
                    seen.push(prev);
                }
                current = Some(t);
                off = 0;
            }
            Msg::Chunk(ch) => {
                let t = current.as_ref().expect("chunk after a tensor header");
                expect.resize(ch.data.len(), 0);
                if t.name == "w" {
                    fill(42, off, &mut expect);
                } else {
                    expect
                        .copy_from_slice(&[1, 2, 255][off as usize..off as usize + ch.data.len()]);
                }
                assert!(
                    ch.data == expect,
                    "{}: bytes differ at offset {off}",
                    t.path
                );
                off += ch.data.len() as u64;
            }
            Msg::Located(_) => panic!("a `located` batch, not asked for"),
        }
    }
    let last = current.unwrap();
    assert_eq!(off, last.size_bytes);
    seen.push(last);
    let w = seen.iter().find(|t| t.name == "w").unwrap();
    assert_eq!(
        (w.size_bytes, w.shape.clone(), w.dtype),
        (len, shape.to_vec(), DType::Float32 as i32)
    );
    assert!(seen
        .iter()
        .any(|t| t.name == "b" && t.dtype == DType::Int8 as i32));

    // The frame behind it, at an offset past 4 GiB.
    let q = d.client().await;
    assert_frame_matches(
        &q.get_frame("big.zip", gtar_logd_client::FrameSel::LAST)
            .await
            .unwrap(),
        &tail,
    );
    d.stop().unwrap();

    // A clean zip64 archive afterwards.
    let a = gtar::Archive::open(d.data.join("big.zip")).unwrap();
    assert!(matches!(a.state(), gtar::OpenState::Clean));
    let ix = a.index();
    assert_eq!(ix.get("big/frames/0/w.f32.uni").unwrap().size(), len);
    assert!(ix.get("small/frames/1/b.u8.uni").is_some());
}
