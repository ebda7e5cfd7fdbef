//! The client against the real daemon binary, over a Unix socket and TCP.

mod support;

use gtar_logd_client::half::{bf16, f16};
use gtar_logd_client::ndarray::{
    arr0, s, Array, Array1, Array2, ArrayBase, Data, Dimension, IxDyn,
};
use gtar_logd_client::{
    blocking, Client, Code, DType, DynArray, Element, Error, FrameQuery, FrameSel, NewFrame,
    OpenMode, OpenOptions, TensorData,
};
use support::Daemon;

// ----------------------------------------------------------------- dtypes

/// Element bits, to compare floats (NaN payloads, -0.0) exactly.
trait Bits: Element {
    fn bits(&self) -> u64;
}
macro_rules! bits {
    ($($t:ty => |$x:ident| $e:expr),* $(,)?) => {
        $(impl Bits for $t { fn bits(&self) -> u64 { let $x = *self; $e } })*
    };
}
bits! {
    f32 => |x| x.to_bits() as u64,
    f64 => |x| x.to_bits(),
    f16 => |x| x.to_bits() as u64,
    bf16 => |x| x.to_bits() as u64,
    i8 => |x| x as u8 as u64,
    i16 => |x| x as u16 as u64,
    i32 => |x| x as u32 as u64,
    i64 => |x| x as u64,
    u8 => |x| x as u64,
    u16 => |x| x as u64,
    u32 => |x| x as u64,
    u64 => |x| x,
    bool => |x| x as u64,
}

fn got_bits(a: &DynArray) -> Vec<u64> {
    fn b<T: Bits>(a: &DynArray) -> Vec<u64> {
        a.as_array::<T>().unwrap().iter().map(Bits::bits).collect()
    }
    match a.dtype() {
        DType::F32 => b::<f32>(a),
        DType::F64 => b::<f64>(a),
        DType::I32 => b::<i32>(a),
        DType::I64 => b::<i64>(a),
        DType::U8 => b::<u8>(a),
        DType::U32 => b::<u32>(a),
        DType::U64 => b::<u64>(a),
        DType::F16 => b::<f16>(a),
        DType::BF16 => b::<bf16>(a),
        DType::I8 => b::<i8>(a),
        DType::I16 => b::<i16>(a),
        DType::U16 => b::<u16>(a),
        DType::Bool => b::<bool>(a),
    }
}

/// One tensor sent, and what must come back.
struct Case {
    group: String,
    name: String,
    data: TensorData<'static>,
    dtype: DType,
    shape: Vec<usize>,
    bits: Vec<u64>,
}

fn case<S, D, T>(out: &mut Vec<Case>, group: &str, name: &str, a: &ArrayBase<S, D>)
where
    S: Data<Elem = T>,
    D: Dimension,
    T: Bits,
{
    out.push(Case {
        group: group.into(),
        name: name.into(),
        data: TensorData::from(a).into_owned(),
        dtype: T::DTYPE,
        shape: a.shape().to_vec(),
        // ndarray's `iter` is logical row-major order: what must come back.
        bits: a.iter().map(Bits::bits).collect(),
    });
}

/// Every layout of one dtype: 1-D special values, 0-d, empty, strided views.
fn variants<T: Bits>(out: &mut Vec<Case>, vals: &[T]) {
    let g = format!("dtypes/{}", T::DTYPE.name());
    let cyc = |n: usize| -> Vec<T> { (0..n).map(|i| vals[i % vals.len()]).collect() };
    case(out, &g, "vec", &Array1::from(vals.to_vec()));
    case(out, &g, "scalar", &arr0(vals[vals.len() - 1]));
    case(
        out,
        &g,
        "empty",
        &Array2::<T>::from_shape_vec((0, 3), vec![]).unwrap(),
    );
    case(out, &g, "empty1", &Array1::<T>::from(vec![]));
    let m = Array2::from_shape_vec((3, 4), cyc(12)).unwrap();
    case(out, &g, "strided", &m.slice(s![..;2, ..;-1]));
    case(out, &g, "transposed", &m.t());
    let c = Array::from_shape_vec(IxDyn(&[2, 3, 2]), cyc(12)).unwrap();
    case(out, &g, "permuted", &c.view().permuted_axes(vec![2, 0, 1]));
    case(out, &g, "column", &m.column(1));
}

fn all_cases() -> Vec<Case> {
    let mut c = Vec::new();
    let f32s = [
        0x0000_0000u32,
        0x8000_0000,
        0x3fc0_0000,
        0x0000_0001,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0001,
        0xff80_0123,
        0x7f7f_ffff,
        0x7fbf_ffff,
    ];
    variants(&mut c, &f32s.map(f32::from_bits));
    let f64s = [
        0u64,
        0x8000_0000_0000_0000,
        0x7ff8_0000_0000_0001,
        0xfff0_0000_0000_0123,
        0x7ff0_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x3ff8_0000_0000_0000,
    ];
    variants(&mut c, &f64s.map(f64::from_bits));
    let f16s = [
        0x7e01u16, 0x7c01, 0xfe42, 0x8000, 0x0001, 0x7bff, 0xfc00, 0x3c00,
    ];
    variants(&mut c, &f16s.map(f16::from_bits));
    let bf16s = [0x7fc1u16, 0x7f81, 0xffc3, 0x8000, 0x0001, 0xff80, 0x3f80];
    variants(&mut c, &bf16s.map(bf16::from_bits));
    variants(&mut c, &[i8::MIN, -1, 0, 1, i8::MAX]);
    variants(&mut c, &[i16::MIN, -2, 0, 300, i16::MAX]);
    variants(&mut c, &[i32::MIN, -70000, -1, 0, i32::MAX]);
    variants(&mut c, &[i64::MIN, -1, 0, 1 << 40, i64::MAX]);
    variants(&mut c, &[0u8, 1, 127, 128, 255]);
    variants(&mut c, &[0u16, 1, 0x8000, u16::MAX]);
    variants(&mut c, &[0u32, 1, 0x8000_0000, u32::MAX]);
    variants(&mut c, &[0u64, 1, 1 << 63, u64::MAX]);
    variants(&mut c, &[true, false, true, true, false]);
    assert_eq!(
        c.iter()
            .map(|c| c.dtype)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        DType::ALL.len(),
        "every dtype is covered"
    );
    c
}

fn check_frame(frame: &gtar_logd_client::Frame, prefix: &str, cases: &[Case], via: &str) {
    assert_eq!(frame.tensors.len(), cases.len(), "{via}: tensor count");
    for c in cases {
        let group = if prefix.is_empty() {
            c.group.clone()
        } else {
            format!("{prefix}/{}", c.group)
        };
        let t = frame
            .get(&group, &c.name)
            .unwrap_or_else(|| panic!("{via}: {group}/{} missing", c.name));
        assert_eq!(t.array.dtype(), c.dtype, "{via}: {} dtype", t.path);
        assert_eq!(
            t.array.shape(),
            c.shape.as_slice(),
            "{via}: {} shape",
            t.path
        );
        assert_eq!(got_bits(&t.array), c.bits, "{via}: {} values", t.path);
        assert!(t
            .path
            .starts_with(&format!("{group}/frames/{}/{}.", frame.index, c.name)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dtype_round_trips_bit_exactly_over_uds_and_tcp() {
    let d = Daemon::start();
    let uds = Client::connect(&d.uds_addr()).await.unwrap();
    let tcp = Client::connect(&format!("http://{}", d.tcp_addr()))
        .await
        .unwrap();
    let cases = all_cases();
    for (writer, archive, prefix) in [(&uds, "via/uds.zip", "run"), (&tcp, "via/tcp.zip", "")] {
        let mut w = writer
            .writer(archive, OpenOptions::replace().group(prefix))
            .await
            .unwrap();
        assert_eq!(w.opened().existing_frames, 0);
        // Shared memory on the Unix socket; refused, with the reason, over TCP.
        let o = w.opened();
        if prefix == "run" {
            assert!(o.shm_attached && o.shm_refused.is_none(), "{o:?}");
        } else {
            assert!(!o.shm_attached, "{o:?}");
            let why = o.shm_refused.as_deref().unwrap();
            assert!(why.contains("needs the Unix socket"), "{o:?}");
        }
        let mut frame = NewFrame::new("7");
        for c in &cases {
            frame.push_tensor(c.group.clone(), c.name.clone(), c.data.clone());
        }
        let mut h = w.write(frame).await.unwrap();
        let received = h.received().await.unwrap();
        assert_eq!((received.index.as_str(), received.seq), ("7", 0));
        let durable = h.await.unwrap();
        assert_eq!(durable, received);
        let sent = w.shm_bytes();
        w.close().await.unwrap();
        let total: usize = cases.iter().map(|c| c.data.bytes().len()).sum();
        assert_eq!(sent, if prefix == "run" { total as u64 } else { 0 });
        for (reader, via) in [(&uds, "uds"), (&tcp, "tcp")] {
            let via = format!("{archive} read over {via}");
            let f = reader.get_frame(archive, "7").await.unwrap();
            assert_eq!(f.index, "7");
            check_frame(&f, prefix, &cases, &via);
            let f = reader.get_frame(archive, FrameSel::LAST).await.unwrap();
            check_frame(&f, prefix, &cases, &via);
        }
    }
    // Tensor histories decode every dtype too.
    for c in cases.iter().filter(|c| c.name == "strided") {
        let h = tcp
            .tensor_history("via/tcp.zip", &c.group, &c.name, 0, None)
            .await
            .unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].index, "7");
        assert_eq!(got_bits(&h[0].tensors[0].array), c.bits);
    }
}

/// 1 MiB + a bit per frame, distinct bits per frame.
fn shm_frame(i: u32) -> Array1<u32> {
    Array1::from_iter((0..(1 << 18) + 77).map(|k| k ^ i.rotate_left(20)))
}

/// Shared memory on a Unix socket: with a region too small for every frame
/// in flight, writes wait for room (spans are reused only once their frames
/// are durable, or the bytes read back would be a later frame's), the ring
/// wraps, compressed and empty tensors go through it too, a frame bigger than
/// the region goes through the socket, and every frame reads back
/// bit-exactly whichever way its bytes went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_waits_for_room_wraps_and_round_trips() {
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let frame_bytes = 4 * ((1u64 << 18) + 77);
    for (archive, opts) in [
        // Room for 2 frames in flight: 12 back-to-back writes must wait.
        (
            "small.zip",
            OpenOptions::replace().shm_size(2 * frame_bytes + 8192),
        ),
        // Deflated by the daemon from the shared pages.
        (
            "deflate.zip",
            OpenOptions::replace()
                .shm_size(3 * frame_bytes)
                .compression(6),
        ),
        // Smaller than one frame: all through the socket, still attached.
        ("tiny.zip", OpenOptions::replace().shm_size(4096)),
        ("off.zip", OpenOptions::replace().shared_memory(false)),
    ] {
        let on = opts.shared_memory;
        let mut w = c.writer(archive, opts).await.unwrap();
        assert_eq!(w.opened().shm_attached, on, "{archive}: {:?}", w.opened());
        assert_eq!(w.opened().shm_refused, None, "{archive}");
        let mut handles = Vec::new();
        for i in 0..12u32 {
            let f = NewFrame::new(i.to_string())
                .tensor("layer/0", "weight", shm_frame(i))
                .tensor("layer/0", "empty", Array1::<f32>::zeros(0))
                .scalar("metrics", "loss", f64::from(i));
            handles.push(w.write(f).await.unwrap());
        }
        for h in handles {
            h.await.unwrap();
        }
        let after_burst = w.shm_bytes();
        // Durable frames free their spans: one at a time, every frame fits
        // (from the start of the region again) where one fits at all.
        for i in 12..16u32 {
            let h = w
                .write_frame(i.to_string(), [("layer/0", "weight", &shm_frame(i))])
                .await
                .unwrap();
            h.await.unwrap();
        }
        let per_frame = w.shm_bytes() - after_burst;
        match archive {
            "small.zip" | "deflate.zip" => {
                assert_eq!(after_burst, 12 * frame_bytes, "{archive}");
                assert_eq!(per_frame, 4 * frame_bytes, "{archive}");
            }
            _ => assert_eq!(w.shm_bytes(), 0, "{archive}"),
        }
        w.close().await.unwrap();
        for i in 0..16u32 {
            let f = c.get_frame(archive, i.to_string()).await.unwrap();
            let t = f
                .tensors
                .iter()
                .find(|t| t.path.contains("/weight."))
                .unwrap();
            let got = t.array.as_array::<u32>().unwrap();
            assert_eq!(got, &shm_frame(i).into_dyn(), "{archive} frame {i}");
        }
    }
}

fn f32_of(frame: &gtar_logd_client::Frame, group: &str, name: &str) -> Vec<f32> {
    frame
        .get(group, name)
        .unwrap_or_else(|| panic!("{group}/{name} not in frame {}", frame.index))
        .array
        .as_array::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_positions_groups_records_scalars_and_history() {
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let a = "runs/groups.zip";
    let weight = |i: usize| Array2::from_elem((2, 3), i as f32);
    // run1: frames 0 1 2 10 (GETAR order puts 10 last), written out of order.
    let mut w = c
        .writer(a, OpenOptions::replace().group("run1"))
        .await
        .unwrap();
    let rec = w.record("model.json", b"{}".to_vec()).await.unwrap();
    assert_eq!((rec.index(), rec.seq()), ("", 0));
    let mut handles = Vec::new();
    for i in [10usize, 0, 2, 1] {
        let f = NewFrame::new(i.to_string())
            .tensor("layer/0", "weight", weight(i))
            .tensor("layer/0", "bias", Array1::from_elem(3, -(i as f64)))
            .record(format!("notes/{i}.txt"), format!("epoch {i}"))
            .scalar("metrics", "loss", i as f64 / 4.0);
        handles.push(w.write(f).await.unwrap());
    }
    w.scalar("metrics", "lr", "3", 0.5).await.unwrap();
    w.wait_durable().await.unwrap();
    // 4 frames; the record and the scalar sent outside a frame are commits,
    // not frames.
    assert_eq!((w.frames(), w.commits()), (4, 6));
    for (n, h) in handles.into_iter().enumerate() {
        let ack = h.await.unwrap();
        assert_eq!(ack.seq, n as u64 + 1);
    }
    rec.await.unwrap();
    w.close().await.unwrap();

    // run2: appended by a second stream.
    let mut w = c
        .writer(
            a,
            OpenOptions {
                mode: OpenMode::Append,
                group: "run2".into(),
                compression: 6,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(w.opened().existing_frames, 0, "run2 is new");
    for i in [5usize, 6] {
        w.write_frame(
            i.to_string(),
            [("layer/0", "weight", TensorData::from(&weight(i)))],
        )
        .await
        .unwrap();
    }
    w.close().await.unwrap();
    let w = c
        .writer(a, OpenOptions::append().group("run1"))
        .await
        .unwrap();
    assert_eq!(w.opened().existing_frames, 4);
    w.close().await.unwrap();

    assert_eq!(
        c.list_frames(a, "run1").await.unwrap(),
        ["0", "1", "2", "10"]
    );
    assert_eq!(c.list_frames(a, "run2").await.unwrap(), ["5", "6"]);
    assert_eq!(
        c.list_frames(a, "").await.unwrap(),
        ["0", "1", "2", "5", "6", "10"]
    );

    let q = |sel: FrameSel| FrameQuery::new(sel).group("run1");
    for (pos, want) in [(-1i64, "10"), (-2, "2"), (-4, "0"), (0, "0"), (3, "10")] {
        let f = c.query_frame(a, &q(FrameSel::Position(pos))).await.unwrap();
        assert_eq!(f.index, want, "position {pos}");
        let i: usize = want.parse().unwrap();
        assert_eq!(f32_of(&f, "run1/layer/0", "weight"), vec![i as f32; 6]);
        assert_eq!(
            f.get("run1/layer/0", "weight").unwrap().array.shape(),
            &[2, 3]
        );
        assert_eq!(f.tensors.len(), 2);
    }
    let f = c
        .query_frame(a, &q("1".into()).names(["bias"]))
        .await
        .unwrap();
    assert_eq!(f.tensors.len(), 1);
    assert_eq!(
        f.tensors[0]
            .array
            .as_array::<f64>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [-1.0; 3]
    );
    let f = c
        .query_frame(a, &FrameQuery::new(-2).group("run2"))
        .await
        .unwrap();
    assert_eq!(f.index, "5");
    assert_eq!(f32_of(&f, "run2/layer/0", "weight"), vec![5.0; 6]);
    // Whole archive, last frame: run1's frame 10 only.
    let f = c.get_frame(a, FrameSel::LAST).await.unwrap();
    assert_eq!(f.index, "10");
    assert!(f.tensors.iter().all(|t| t.group.starts_with("run1/")));

    // Errors carry gRPC codes.
    for sel in [
        FrameSel::Position(4),
        FrameSel::Position(-5),
        FrameSel::index("99"),
    ] {
        let e = c.query_frame(a, &q(sel.clone())).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::NotFound), "{sel:?}: {e}");
    }
    let e = c
        .get_frame("runs/missing.zip", FrameSel::LAST)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = c.list_frames(a, "run3").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = c
        .get_frame("../escape.zip", FrameSel::LAST)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(Code::InvalidArgument | Code::PermissionDenied)
        ),
        "{e}"
    );

    // Records and scalars.
    assert_eq!(c.read_record(a, "run1/model.json").await.unwrap(), b"{}");
    assert_eq!(
        c.read_record(a, "run1/notes/2.txt").await.unwrap(),
        b"epoch 2"
    );
    let loss = c
        .read_record(a, "run1/metrics/vars/loss.f64.uni/10")
        .await
        .unwrap();
    assert_eq!(f64::from_le_bytes(loss.try_into().unwrap()), 2.5);
    let lr = c
        .read_record(a, "run1/metrics/vars/lr.f64.uni/3")
        .await
        .unwrap();
    assert_eq!(f64::from_le_bytes(lr.try_into().unwrap()), 0.5);

    // Tensor history, Python-slice style.
    let hist = |start, stop| c.tensor_history(a, "run1/layer/0", "weight", start, stop);
    let h = hist(0, None).await.unwrap();
    assert_eq!(
        h.iter().map(|f| f.index.as_str()).collect::<Vec<_>>(),
        ["0", "1", "2", "10"]
    );
    for f in &h {
        let i: f32 = f.index.parse().unwrap();
        assert_eq!(f.tensors.len(), 1);
        assert_eq!(f32_of(f, "run1/layer/0", "weight"), vec![i; 6]);
    }
    let idx = |h: Vec<gtar_logd_client::Frame>| h.into_iter().map(|f| f.index).collect::<Vec<_>>();
    assert_eq!(idx(hist(-2, None).await.unwrap()), ["2", "10"]);
    assert_eq!(idx(hist(1, Some(-1)).await.unwrap()), ["1", "2"]);
    assert!(idx(hist(3, Some(1)).await.unwrap()).is_empty());
    let e = c
        .tensor_history(a, "run1/layer/0", "nope", 0, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");

    // Catalog queries.
    let archives = c.list_archives("runs/").await.unwrap();
    assert!(
        archives.iter().any(|x| x.archive == a && x.size_bytes > 0),
        "{archives:?}"
    );
    let desc = c.describe(a).await.unwrap();
    assert_eq!(desc.frame_count, 6);
    assert_eq!(
        (desc.first_frame.as_str(), desc.last_frame.as_str()),
        ("0", "10")
    );
    assert!(
        desc.groups.iter().any(|g| g == "run2/layer/0"),
        "{:?}",
        desc.groups
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_tensors_are_chunked_and_bad_input_fails_the_stream() {
    let d = Daemon::start();
    let c = Client::connect(&d.tcp_addr()).await.unwrap();
    // 3 × 4 MiB + a bit: several chunks each way.
    let n = (3 * gtar_logd_client::CHUNK_BYTES) / 4 + 12345;
    let big = Array1::from_iter((0..n).map(|i| f32::from_bits(i as u32 ^ 0x7fc0_0000)));
    let mut w = c.writer("big.zip", OpenOptions::replace()).await.unwrap();
    let h = w.write_frame("0", [("", "big", big.view())]).await.unwrap();
    let ack = h.await.unwrap();
    assert!(ack.bytes >= (n * 4) as u64, "{ack:?}");
    let open = c.list_archives("big").await.unwrap();
    assert!(
        open.iter().any(|x| x.archive == "big.zip" && x.writing),
        "{open:?}"
    );
    let f = c.get_frame("big.zip", 0).await.unwrap();
    let got = f.tensors[0].array.as_array::<f32>().unwrap();
    assert_eq!(got.len(), n);
    assert!(got
        .iter()
        .zip(big.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    // A record name with '.' is refused: INVALID_ARGUMENT from `write` (when
    // the refusal arrives while the frame is still being sent) or else on the
    // handle, and the writer reports the failure from then on.
    let e = match w
        .write_frame("1", [("", "bad.name", big.slice(s![..4]))])
        .await
    {
        Ok(h) => h.await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    let e = w
        .write_frame("2", [("", "ok", arr0(1u8))])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(w.close().await.is_err());
    // The refused frame left nothing behind.
    assert_eq!(c.list_frames("big.zip", "").await.unwrap(), ["0"]);

    // Refused on open: the error comes from `writer` itself.
    let e = c
        .writer("../outside.zip", OpenOptions::replace())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(Code::InvalidArgument | Code::PermissionDenied)
        ),
        "{e}"
    );
    let e = c
        .writer("ok.zip", OpenOptions::replace().compression(10))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");

    // Nothing listens there.
    let e = Client::connect(&format!(
        "unix:{}",
        d.dir.path().join("none.sock").display()
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.to_string().contains("gtar-logd serve"), "{e}");
}

#[test]
fn blocking_client_round_trips() {
    let d = Daemon::start();
    let c = blocking::Client::connect(&d.uds_addr()).unwrap();
    let mut w = c.writer("blocking.zip", OpenOptions::replace()).unwrap();
    let mut last = None;
    for i in 0..3u8 {
        let a = Array2::from_shape_fn((2, 2), |(r, k)| {
            f16::from_f32((i + r as u8 * 2 + k as u8) as f32)
        });
        let h = w.write_frame(i.to_string(), [("m", "w", a.t())]).unwrap();
        last = Some(a.t().to_owned());
        if i == 0 {
            h.durable().unwrap();
        }
    }
    w.wait_durable().unwrap();
    w.close().unwrap();
    let f = c.get_frame("blocking.zip", -1).unwrap();
    assert_eq!(f.index, "2");
    let got = f.tensors[0].array.as_array::<f16>().unwrap();
    assert_eq!(got, &last.unwrap().into_dyn());
    assert_eq!(c.list_frames("blocking.zip", "m").unwrap(), ["0", "1", "2"]);
    assert_eq!(
        c.tensor_history("blocking.zip", "m", "w", -1, None)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn quickstart_example_appends_over_both_transports() {
    let d = Daemon::start();
    let exe = support::example_bin("quickstart");
    let archive = "examples/quickstart.zip";
    // An archive with data of its own, which the example must not touch.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.uds_addr()).await.unwrap();
        let mut w = c
            .writer(archive, OpenOptions::append().group("mine"))
            .await
            .unwrap();
        for i in 0..5 {
            w.write_frame(i.to_string(), [("", "x", arr0(i as f64))])
                .await
                .unwrap();
        }
        w.record("notes.txt", b"keep me".to_vec()).await.unwrap();
        w.close().await.unwrap();
    });
    // Each run appends 3 frames to the group "quickstart", numbered on.
    for (run, addr) in [d.uds_addr(), d.tcp_addr()].into_iter().enumerate() {
        let out = std::process::Command::new(&exe)
            .arg(&addr)
            .arg(archive)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("quickstart OK"),
            "quickstart against {addr}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (first, last) = (run * 3, run * 3 + 2);
        for want in [
            format!("appending frames {first}..{last}"),
            "3 frames durable".to_string(),
            format!("last frame {last}:"),
        ] {
            assert!(stdout.contains(&want), "no {want:?} in:\n{stdout}");
        }
        assert!(!stdout.contains("commits"), "{stdout}");
    }
    rt.block_on(async {
        let c = Client::connect(&d.tcp_addr()).await.unwrap();
        assert_eq!(
            c.list_frames(archive, "quickstart").await.unwrap(),
            ["0", "1", "2", "3", "4", "5"]
        );
        assert_eq!(
            c.list_frames(archive, "mine").await.unwrap(),
            ["0", "1", "2", "3", "4"]
        );
        let f = c.get_frame(archive, FrameSel::index("4")).await.unwrap();
        assert_eq!(
            f.get("mine", "x").unwrap().array.as_array::<f64>().unwrap()[[]],
            4.0
        );
        assert_eq!(
            c.read_record(archive, "mine/notes.txt").await.unwrap(),
            b"keep me"
        );
    });
    // Default address from the environment.
    let out = std::process::Command::new(&exe)
        .env("GTAR_LOGD_ADDRESS", d.uds_addr())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_keeps_what_the_archive_has_and_replace_deletes_it() {
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let a = "runs/modes.zip";
    let x = |f: &gtar_logd_client::Frame, g: &str| {
        f.get(g, "x").unwrap().array.as_array::<f32>().unwrap()[[]]
    };

    // Append to a missing archive creates it.
    assert_eq!(
        c.list_frames(a, "").await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    let mut w = c
        .writer(a, OpenOptions::append().group("g1"))
        .await
        .unwrap();
    assert_eq!(w.opened().existing_frames, 0);
    for i in 0..3 {
        w.write_frame(i.to_string(), [("", "x", arr0(i as f32))])
            .await
            .unwrap();
    }
    w.record("notes.txt", b"first run".to_vec()).await.unwrap();
    w.close().await.unwrap();
    let mut w = c
        .writer(a, OpenOptions::append().group("g2"))
        .await
        .unwrap();
    w.write_frame("0", [("", "x", arr0(20f32))]).await.unwrap();
    w.close().await.unwrap();

    // Append again: the frames, the record and the other group stay.
    let mut w = c
        .writer(a, OpenOptions::append().group("g1"))
        .await
        .unwrap();
    assert_eq!(w.opened().existing_frames, 3);
    w.write_frame("3", [("", "x", arr0(3f32))]).await.unwrap();
    w.close().await.unwrap();
    assert_eq!(c.list_frames(a, "g1").await.unwrap(), ["0", "1", "2", "3"]);
    assert_eq!(c.list_frames(a, "g2").await.unwrap(), ["0"]);
    for (i, want) in [(1i64, 1f32), (3, 3.0)] {
        let f = c
            .query_frame(a, &FrameQuery::new(i).group("g1"))
            .await
            .unwrap();
        assert_eq!(x(&f, "g1"), want);
    }
    assert_eq!(
        c.read_record(a, "g1/notes.txt").await.unwrap(),
        b"first run"
    );

    // Replace: a new, empty archive with only what this stream writes; the
    // other group and the record are gone too.
    let mut w = c
        .writer(a, OpenOptions::replace().group("g1"))
        .await
        .unwrap();
    assert_eq!(w.opened().existing_frames, 0);
    w.write_frame("9", [("", "x", arr0(9f32))]).await.unwrap();
    w.close().await.unwrap();
    assert_eq!(c.list_frames(a, "").await.unwrap(), ["9"]);
    assert_eq!(c.list_frames(a, "g1").await.unwrap(), ["9"]);
    let e = c.list_frames(a, "g2").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let e = c.read_record(a, "g1/notes.txt").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    let f = c.get_frame(a, FrameSel::LAST).await.unwrap();
    assert_eq!((f.index.as_str(), x(&f, "g1")), ("9", 9.0));
}

// Single-threaded runtime: nothing drains the request queue while the write
// is being polled, so the timeout reliably cancels it mid-frame. Both ways
// tensor bytes travel: chunks, and shared memory.
#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_write_leaves_no_partial_frame() {
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    for (archive, shm) in [("cancel.zip", false), ("cancel-shm.zip", true)] {
        let opts = OpenOptions::replace().shared_memory(shm);
        let mut w = c.writer(archive, opts.clone()).await.unwrap();
        assert_eq!(w.opened().shm_attached, shm);
        w.write_frame("0", [("", "x", arr0(1.0f32))])
            .await
            .unwrap()
            .await
            .unwrap();
        // 20 tensors of 2 MiB: more messages than the request queue holds
        // either way, so the write is pending halfway through the frame when
        // the timeout cancels it.
        let big = Array1::<u8>::from_elem(2 << 20, 7);
        let mut frame = NewFrame::new("1");
        for k in 0..20 {
            frame.push_tensor("", format!("x{k}"), big.view());
        }
        let r = tokio::time::timeout(std::time::Duration::ZERO, w.write(frame)).await;
        assert!(r.is_err(), "the write should still be in progress");
        let e = w
            .write_frame("2", [("", "x", arr0(2.0f32))])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::WriterClosed(_)), "{e}");
        assert!(w.close().await.is_err());
        // Once the stream is gone the daemon drops the half-sent frame.
        assert_eq!(c.list_frames(archive, "").await.unwrap(), ["0"]);
        let opts = OpenOptions {
            mode: OpenMode::Append,
            ..opts
        };
        let mut w = c.writer(archive, opts).await.unwrap();
        assert_eq!(w.opened().existing_frames, 1);
        w.write_frame("1", [("", "x", arr0(3.0f32))])
            .await
            .unwrap()
            .await
            .unwrap();
        w.close().await.unwrap();
        let f = c.get_frame(archive, FrameSel::LAST).await.unwrap();
        assert_eq!(f.index, "1");
        assert_eq!(f.tensors[0].array.as_array::<f32>().unwrap()[[]], 3.0);
    }
}

/// Records of any size up to the daemon's limit travel both ways (in
/// chunks and in ranges), binary and UTF-8, inside a frame and on their own;
/// one over the limit is refused with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_40_mib_round_trip_and_one_over_the_limit_names_it() {
    const LIMIT: u64 = 50_000_000;
    let d = Daemon::start_with(&["--max-tensor-bytes", &LIMIT.to_string()]);
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let a = "runs/records.zip";
    let n = 40 << 20;
    // Binary: every byte value, in an order that is not periodic in 4 MiB.
    let binary: Vec<u8> = (0..n as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // UTF-8 with multi-byte characters straddling chunk boundaries.
    let text = "ünïcødé → 模型 ✓ ".repeat(n / 30).into_bytes();
    let mut w = c.writer(a, OpenOptions::append()).await.unwrap();
    let h = w.record("big/binary.u8.uni", binary.clone()).await.unwrap();
    h.durable().await.unwrap();
    let x = Array1::from_elem(3, 1.5f32);
    let frame = NewFrame::new("1")
        .tensor("t", "x", &x)
        .record("big/text.json", text.clone());
    w.write(frame).await.unwrap().durable().await.unwrap();
    let over = w
        .record("big/over.u8.uni", vec![7u8; LIMIT as usize + 1])
        .await;
    let err = match over {
        Ok(h) => h
            .durable()
            .await
            .expect_err("a record over the limit is refused"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("record.size")
            && msg.contains(&LIMIT.to_string())
            && msg.contains("--max-tensor-bytes"),
        "{msg}"
    );
    drop(w);
    assert!(c.read_record(a, "big/binary.u8.uni").await.unwrap() == binary);
    assert!(c.read_record(a, "big/text.json").await.unwrap() == text);
    assert!(c.read_record(a, "big/over.u8.uni").await.is_err());
    // Over TCP too, and the ranges are what they say.
    let t = Client::connect(&d.tcp_addr()).await.unwrap();
    assert!(t.read_record(a, "big/text.json").await.unwrap() == text);
}

/// A task that writes frames can be spawned on a multi-threaded runtime:
/// `write`'s future is `Send` (checked at compile time).
#[allow(dead_code)]
fn write_future_is_send(w: &mut gtar_logd_client::FrameWriter, f: NewFrame<'static>) {
    fn send<T: Send>(_: T) {}
    send(w.write(f));
}

/// On the Unix socket the client reads stored tensors from the archive file
/// itself: a byte flipped on disk shows up as read unless `verify_reads` is
/// on, which names the mismatch; streamed over TCP the daemon's own check
/// refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn located_reads_come_from_the_file_and_verify_reads_checks_their_crc() {
    let d = Daemon::start();
    let c = Client::connect(&d.uds_addr()).await.unwrap();
    let x = Array1::<u32>::from_iter(0..1024);
    let mut w = c.writer("rot.zip", OpenOptions::replace()).await.unwrap();
    w.write_frame("0", [("", "x", x.view())])
        .await
        .unwrap()
        .await
        .unwrap();
    w.close().await.unwrap();
    let ok = c.get_frame("rot.zip", FrameSel::LAST).await.unwrap();
    assert_eq!(
        ok.tensors[0].array.as_array::<u32>().unwrap().as_slice(),
        x.as_slice()
    );
    // Flip element 5 (value 5) in place: its 4 bytes are unique in the file.
    let path = d.data.join("rot.zip");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle: Vec<u8> = [5u32, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
    let at = bytes
        .windows(8)
        .position(|w| w == needle.as_slice())
        .unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let f = c.get_frame("rot.zip", FrameSel::LAST).await.unwrap();
    assert_eq!(f.tensors[0].array.as_array::<u32>().unwrap()[5], 5 ^ 0xff);
    let e = c
        .clone()
        .verify_reads(true)
        .get_frame("rot.zip", FrameSel::LAST)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CRC-32 mismatch"), "{e}");
    let tcp = Client::connect(&d.tcp_addr()).await.unwrap();
    let e = tcp.get_frame("rot.zip", FrameSel::LAST).await.unwrap_err();
    assert!(e.to_string().contains("CRC"), "{e}");
}
