//! Reading a box of a tensor (GetFrame's `slice`): only the box's bytes,
//! streamed by the daemon (TCP) or read from the archive file by the client
//! in contiguous runs (located, on the Unix socket); both equal the box cut
//! out of the whole tensor, for many random boxes over dtypes and ranks; a
//! box that does not fit is INVALID_ARGUMENT naming the tensor, its shape
//! and the box.

#[path = "common/daemon.rs"]
mod daemon;

use daemon::*;
use gtar_logd::proto::v1 as pb;
use gtar_logd_client::ndarray::{self, ArrayD, Dimension, IxDyn};
use gtar_logd_client::{self as logd, half::f16, DynArray, OpenOptions, Slice};
use rand::{Rng, SeedableRng};
use tonic::Code;

/// The tensors of frame "0": (group, array), 0-d, 1-d and 3-d of several dtypes.
fn tensors() -> Vec<(String, DynArray)> {
    let shapes: [&[usize]; 4] = [&[], &[97], &[5, 7, 9], &[3, 1, 64]];
    let mut out = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let sh = IxDyn(shape);
        let k = |ix: IxDyn| -> i64 {
            ix.as_array_view()
                .iter()
                .fold(i as i64 + 1, |a, &x| a * 131 + x as i64)
        };
        let arrays: Vec<(&str, DynArray)> = vec![
            (
                "f32",
                ArrayD::from_shape_fn(sh.clone(), |ix| k(ix) as f32 * 0.25).into(),
            ),
            (
                "f64",
                ArrayD::from_shape_fn(sh.clone(), |ix| k(ix) as f64 / 3.0).into(),
            ),
            ("i64", ArrayD::from_shape_fn(sh.clone(), |ix| -k(ix)).into()),
            (
                "u8",
                ArrayD::from_shape_fn(sh.clone(), |ix| k(ix) as u8).into(),
            ),
            (
                "f16",
                ArrayD::from_shape_fn(sh.clone(), |ix| f16::from_f32((k(ix) % 2000) as f32)).into(),
            ),
            (
                "bool",
                ArrayD::from_shape_fn(sh.clone(), |ix| k(ix) % 3 == 0).into(),
            ),
        ];
        for (name, a) in arrays {
            out.push((format!("t{i}/{name}"), a));
        }
    }
    out
}

/// The box's bytes cut out of the whole tensor element by element.
fn cut(a: &DynArray, s: &Slice) -> Vec<u8> {
    let bytes = a.to_le_bytes();
    let item = a.dtype().itemsize();
    let global: Vec<u64> = a.shape().iter().map(|&d| d as u64).collect();
    let mut out = Vec::new();
    for e in 0..s.elems() {
        let (mut rest, mut g, mut stride) = (e, 0u64, 1u64);
        for d in (0..global.len()).rev() {
            g += (s.offsets[d] + rest % s.shape[d]) * stride;
            rest /= s.shape[d];
            stride *= global[d];
        }
        let at = g as usize * item;
        out.extend_from_slice(&bytes[at..at + item]);
    }
    out
}

/// (group, offsets, shape, what the error must say).
type Case<'a> = (&'a str, &'a [u64], &'a [u64], &'a [&'a str]);

fn random_box(rng: &mut impl Rng, shape: &[usize]) -> Slice {
    let mut s = Slice::of(&[]);
    for &g in shape {
        let o = rng.gen_range(0..=g as u64);
        let n = rng.gen_range(0..=g as u64 - o);
        s.offsets.push(o);
        s.shape.push(n);
    }
    s
}

async fn write(d: &Daemon, archive: &str) -> Vec<(String, DynArray)> {
    let c = d.client().await;
    let mut w = c.writer(archive, OpenOptions::replace()).await.unwrap();
    let ts = tensors();
    let frame = w
        .write_frame("0", ts.iter().map(|(g, a)| (g.clone(), "value", a)))
        .await
        .unwrap();
    frame.await.unwrap();
    w.close().await.unwrap();
    ts
}

#[tokio::test]
async fn random_boxes_read_streamed_and_located_equal_the_cut_tensor() {
    let d = Daemon::start();
    let ts = write(&d, "s.zip").await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    for (how, c) in [("located", d.client().await), ("streamed", d.tcp().await)] {
        for (group, whole) in &ts {
            for _ in 0..25 {
                let s = random_box(&mut rng, whole.shape());
                let got = c
                    .read_slice("s.zip", "0", group, "value", s.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{how} {group} {s:?}: {e}"));
                assert_eq!(got.dtype(), whole.dtype(), "{how} {group}");
                let want: Vec<usize> = s.shape.iter().map(|&n| n as usize).collect();
                assert_eq!(got.shape(), &want[..], "{how} {group} {s:?}");
                assert_eq!(got.to_le_bytes(), cut(whole, &s), "{how} {group} {s:?}");
            }
            // The whole tensor as a box is the tensor.
            let all = Slice {
                offsets: vec![0; whole.shape().len()],
                shape: whole.shape().iter().map(|&n| n as u64).collect(),
            };
            let got = c
                .read_slice("s.zip", "0", group, "value", all)
                .await
                .unwrap();
            assert_eq!(&got, whole, "{how} {group}");
        }
    }
    // As ndarray slices it: a column block of the 3-d f32 tensor.
    let (_, a) = ts.iter().find(|(g, _)| g == "t2/f32").unwrap();
    let a = a.as_array::<f32>().unwrap();
    let got = d
        .client()
        .await
        .read_slice(
            "s.zip",
            "0",
            "t2/f32",
            "value",
            Slice::of(&[1..4, 0..7, 2..5]),
        )
        .await
        .unwrap();
    let want = a.slice(ndarray::s![1..4, .., 2..5]).to_owned().into_dyn();
    assert_eq!(got.as_array::<f32>().unwrap(), &want);
}

#[tokio::test]
async fn the_answer_echoes_the_box_and_a_box_that_does_not_fit_is_named() {
    let d = Daemon::start();
    write(&d, "s.zip").await;
    let mut raw = d.tcp_client().await;
    let ask = |names: &[&str], group: &str, offsets: &[u64], shape: &[u64]| pb::GetFrameRequest {
        archive: "s.zip".into(),
        group: group.into(),
        frame: Some(pb::get_frame_request::Frame::Index("0".into())),
        names: names.iter().map(|s| s.to_string()).collect(),
        slice: Some(pb::TensorSlice {
            offsets: offsets.to_vec(),
            shape: shape.to_vec(),
        }),
        ..Default::default()
    };
    // Streamed: the header keeps the whole tensor's shape and size and
    // echoes the box; the chunks hold only the box.
    let mut st = raw
        .get_frame(ask(&["value"], "t2/i64", &[1, 2, 3], &[2, 3, 4]))
        .await
        .unwrap()
        .into_inner();
    let mut info = None;
    let mut got = 0;
    while let Some(m) = st.message().await.unwrap() {
        match m.msg.unwrap() {
            pb::frame_data::Msg::Tensor(t) => info = Some(t),
            pb::frame_data::Msg::Chunk(c) => got += c.data.len(),
            _ => {}
        }
    }
    let info = info.unwrap();
    assert_eq!(info.shape, [5, 7, 9]);
    assert_eq!(info.size_bytes, 5 * 7 * 9 * 8);
    assert_eq!(
        info.slice,
        Some(pb::TensorSlice {
            offsets: vec![1, 2, 3],
            shape: vec![2, 3, 4]
        })
    );
    assert_eq!(got, 2 * 3 * 4 * 8);

    // Out of bounds, wrong rank, malformed: INVALID_ARGUMENT, naming the
    // tensor, its shape and the box, before anything is streamed.
    let cases: [Case; 4] = [
        (
            "t2/f32",
            &[0, 5, 0],
            &[5, 3, 9],
            &[
                "t2/f32/frames/0/value.f32.uni",
                "[5, 7, 9]",
                "0:5, 5:8, 0:9",
                "dimension 1",
            ],
        ),
        (
            "t1/u8",
            &[0, 0],
            &[1, 1],
            &[
                "t1/u8/frames/0/value.u8.uni",
                "[97]",
                "2 dimensions, the tensor 1",
            ],
        ),
        ("t0/f64", &[0], &[1], &["[]", "1 dimensions, the tensor 0"]),
        ("t1/u8", &[0], &[], &["1 offsets for 0 dimensions"]),
    ];
    for (group, offsets, shape, says) in cases {
        let e = match raw.get_frame(ask(&["value"], group, offsets, shape)).await {
            Err(e) => e,
            Ok(r) => {
                let mut st = r.into_inner();
                loop {
                    match st.message().await {
                        Err(e) => break e,
                        Ok(Some(_)) => continue,
                        Ok(None) => panic!("{group} {offsets:?} {shape:?} was answered"),
                    }
                }
            }
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        for s in says {
            assert!(
                e.message().contains(s),
                "{group}: {:?} lacks {s:?}",
                e.message()
            );
        }
        assert!(e.message().starts_with("slice"), "{}", e.message());
    }
    // Every tensor of the answer must fit: a 1-d box over a frame that also
    // holds 3-d tensors is refused whole.
    let e = logd::Client::connect(&d.tcp.to_string())
        .await
        .unwrap()
        .query_frame(
            "s.zip",
            &logd::FrameQuery::new("0").slice(Slice {
                offsets: vec![0],
                shape: vec![1],
            }),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a box of tensor"), "{e}");
}
