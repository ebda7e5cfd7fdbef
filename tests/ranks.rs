//! Many processes, one frame, at the wire: ranks of a job open their own
//! Write streams (`OpenArchive.ranks`) and send whole tensors or slices
//! (`TensorHeader.slice`); the daemon stores the frame once every rank
//! committed it, as global tensors, or aborts it for every rank naming the
//! missing ones; bad combinations are refused naming the tensor and ranks;
//! nothing stored before is touched.

#[path = "common/daemon.rs"]
mod daemon;

use std::time::Duration;

use daemon::*;
use gtar_logd::proto::v1::{self as pb, write_request::Msg as In, DType};
use tonic::Code;

fn open(archive: &str, job: &str, rank: u32, world: u32) -> pb::OpenArchive {
    pb::OpenArchive {
        ranks: Some(pb::RankSpec {
            job: job.into(),
            rank,
            world_size: world,
        }),
        ..open_req(archive, "")
    }
}

/// The f32 global matrix of frame `f`: element i is `f * 1000 + i`.
fn global(f: u32, rows: u64, cols: u64) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| (f * 1000) as f32 + i as f32)
        .collect()
}

fn le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The messages of the box `[r0:r0+nr, c0:c0+nc]` of frame `f`'s
/// `rows` × `cols` matrix `name`, in chunks of 40 bytes.
fn slice_msgs(
    f: u32,
    name: &str,
    (rows, cols): (u64, u64),
    (r0, c0): (u64, u64),
    (nr, nc): (u64, u64),
) -> Vec<pb::WriteRequest> {
    let g = global(f, rows, cols);
    let mut data = Vec::new();
    for r in r0..r0 + nr {
        for c in c0..c0 + nc {
            data.push(g[(r * cols + c) as usize]);
        }
    }
    let mut out = vec![req(In::Tensor(pb::TensorHeader {
        group: name.into(),
        name: "weight".into(),
        dtype: DType::Float32 as i32,
        shape: vec![rows, cols],
        slice: Some(pb::TensorSlice {
            offsets: vec![r0, c0],
            shape: vec![nr, nc],
        }),
    }))];
    for c in le(&data).chunks(40) {
        out.push(req(In::Chunk(pb::Chunk {
            data: c.to_vec().into(),
        })));
    }
    out
}

fn begin(i: &str) -> pb::WriteRequest {
    req(In::Begin(pb::BeginFrame { index: i.into() }))
}

fn commit() -> pb::WriteRequest {
    req(In::Commit(pb::CommitFrame {}))
}

/// Rank `r` of `n`: its columns of `kernel` (8 × 2n), its rows of `proj`
/// (2n × 4), and (rank 0 only) the whole `bias` (3).
fn rank_part(f: u32, r: u32, n: u32) -> Vec<pb::WriteRequest> {
    let (r, n) = (r as u64, n as u64);
    let mut m = vec![begin(&f.to_string())];
    m.extend(slice_msgs(f, "kernel", (8, 2 * n), (0, 2 * r), (8, 2)));
    m.extend(slice_msgs(f, "proj", (2 * n, 4), (2 * r, 0), (2, 4)));
    if r == 0 {
        m.push(req(In::Tensor(pb::TensorHeader {
            group: "bias".into(),
            name: "weight".into(),
            dtype: DType::Float32 as i32,
            shape: vec![3],
            ..Default::default()
        })));
        m.push(req(In::Chunk(pb::Chunk {
            data: le(&global(f, 1, 3)).into(),
        })));
    }
    m.push(req(In::Scalar(pb::Scalar {
        group: "metrics".into(),
        name: "loss".into(),
        index: String::new(),
        value: 0.5,
    })));
    m.push(commit());
    m
}

async fn send_all(s: &mut Session, msgs: Vec<pb::WriteRequest>) {
    for m in msgs {
        s.send(m).await.expect("send");
    }
}

async fn open_ranks(d: &Daemon, archive: &str, job: &str, n: u32) -> Vec<Session> {
    let mut out = Vec::new();
    for r in 0..n {
        let mut c = d.uds_client().await;
        out.push(
            Session::open(&mut c, open(archive, job, r, n))
                .await
                .expect("open"),
        );
    }
    out
}

/// Frame `f` reads back as the global tensors.
async fn assert_whole(c: &mut Client, archive: &str, f: u32, n: u64) {
    let got = get_frame(c, archive, "", by_index(&f.to_string()))
        .await
        .unwrap();
    let find = |g: &str| {
        got.iter()
            .find(|t| t.info.group == g)
            .unwrap_or_else(|| panic!("no {g} in frame {f}"))
    };
    let k = find("kernel");
    assert_eq!(k.info.shape, vec![8, 2 * n]);
    assert_eq!(k.data, le(&global(f, 8, 2 * n)), "kernel of frame {f}");
    assert_eq!(
        find("proj").data,
        le(&global(f, 2 * n, 4)),
        "proj of frame {f}"
    );
    assert_eq!(find("bias").data, le(&global(f, 1, 3)));
}

async fn wait_aborted(s: &mut Session, n: usize) -> Vec<pb::FrameAborted> {
    tokio::time::timeout(Duration::from_secs(30), async {
        while s.aborted.len() < n {
            s.next().await.expect("stream").expect("an answer");
        }
    })
    .await
    .expect("no `aborted` within 30 s");
    s.aborted.clone()
}

#[tokio::test]
async fn four_ranks_store_one_frame_of_global_tensors_visible_only_when_all_committed() {
    let d = Daemon::start();
    let mut c = d.uds_client().await;
    let mut ranks = open_ranks(&d, "r/a.zip", "run1", 4).await;
    for f in 0..2u32 {
        for (r, s) in ranks.iter_mut().enumerate() {
            send_all(s, rank_part(f, r as u32, 4)).await;
            if r < 3 {
                // Not visible until the last rank committed.
                let frames = list_frames(&mut c, "r/a.zip", "").await.unwrap_or_default();
                assert!(!frames.contains(&f.to_string()), "frame {f} visible early");
            }
        }
        for s in ranks.iter_mut() {
            s.wait_durable(f as usize + 1).await.unwrap();
            let ack = s.durable.last().unwrap();
            assert_eq!(
                (ack.index.as_str(), ack.seq),
                (f.to_string().as_str(), f as u64)
            );
        }
        assert_whole(&mut c, "r/a.zip", f, 4).await;
    }
    assert_eq!(
        list_frames(&mut c, "r/a.zip", "").await.unwrap(),
        ["0", "1"]
    );
    for s in ranks {
        let s = s.finish().await.unwrap();
        assert!(s.aborted.is_empty());
    }
}

#[tokio::test]
async fn a_rank_that_goes_away_aborts_the_frame_for_all_naming_it_and_the_next_proceeds() {
    let d = Daemon::start();
    let mut c = d.uds_client().await;
    let mut ranks = open_ranks(&d, "r/b.zip", "run1", 3).await;
    for (r, s) in ranks.iter_mut().enumerate() {
        send_all(s, rank_part(0, r as u32, 3)).await;
    }
    for s in ranks.iter_mut() {
        s.wait_durable(1).await.unwrap();
    }
    // Frame 1: ranks 0 and 1 commit; rank 2 sends half and disappears.
    for (r, s) in ranks.iter_mut().enumerate().take(2) {
        send_all(s, rank_part(1, r as u32, 3)).await;
    }
    let mut dying = ranks.pop().unwrap();
    let part = rank_part(1, 2, 3);
    let half = part.len() / 2;
    send_all(&mut dying, part.into_iter().take(half).collect()).await;
    dying.abandon();
    for s in ranks.iter_mut() {
        let a = wait_aborted(s, 1).await;
        assert_eq!(a[0].index, "1");
        // Rank 2 at least; ranks 0 and 1 too if the daemon had not read
        // their commits yet (then they are told at their commit).
        assert!(a[0].missing_ranks.contains(&2), "{:?}", a[0]);
        assert!(!a[0].bad_input);
        assert!(
            a[0].reason.contains("rank 2 of job \"run1\" left"),
            "{}",
            a[0].reason
        );
    }
    assert_eq!(list_frames(&mut c, "r/b.zip", "").await.unwrap(), ["0"]);
    // Rank 2 comes back; frame 2 is stored, frame 0 untouched.
    let mut c2 = d.uds_client().await;
    ranks.push(
        Session::open(&mut c2, open("r/b.zip", "run1", 2, 3))
            .await
            .unwrap(),
    );
    for (r, s) in ranks.iter_mut().enumerate() {
        send_all(s, rank_part(2, r as u32, 3)).await;
    }
    for s in ranks.iter_mut() {
        let want = if s.aborted.is_empty() { 1 } else { 2 };
        s.wait_durable(want).await.unwrap();
        assert_eq!(s.durable.last().unwrap().index, "2");
    }
    assert_eq!(
        list_frames(&mut c, "r/b.zip", "").await.unwrap(),
        ["0", "2"]
    );
    assert_whole(&mut c, "r/b.zip", 0, 3).await;
    assert_whole(&mut c, "r/b.zip", 2, 3).await;
}

#[tokio::test]
async fn a_rank_that_misses_the_frame_deadline_aborts_the_frame() {
    let d = Daemon::start_with(|cfg| cfg.limits.frame_deadline = Duration::from_secs(1));
    let mut c = d.uds_client().await;
    let mut ranks = open_ranks(&d, "r/c.zip", "run1", 2).await;
    send_all(&mut ranks[0], rank_part(0, 0, 2)).await;
    // Rank 1 begins and stalls (its stream stays open).
    ranks[1].send(begin("0")).await.unwrap();
    let a = wait_aborted(&mut ranks[0], 1).await;
    assert_eq!(a[0].missing_ranks, vec![1]);
    assert!(
        a[0].reason.contains("rank 1 did not commit it within"),
        "{}",
        a[0].reason
    );
    // Rank 1 finishes late: it is told too, and nothing was stored.
    send_all(&mut ranks[1], rank_part(0, 1, 2).split_off(1)).await;
    let late = wait_aborted(&mut ranks[1], 1).await;
    assert_eq!(late[0].reason, a[0].reason);
    assert!(list_frames(&mut c, "r/c.zip", "").await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_combinations_are_refused_naming_what_is_wrong_and_nothing_stored_is_lost() {
    let d = Daemon::start();
    let mut c = d.uds_client().await;
    let mut ranks = open_ranks(&d, "r/d.zip", "run1", 2).await;
    for (r, s) in ranks.iter_mut().enumerate() {
        send_all(s, rank_part(0, r as u32, 2)).await;
    }
    for s in ranks.iter_mut() {
        s.wait_durable(1).await.unwrap();
    }
    let refused = |r: Result<Session, tonic::Status>| match r {
        Ok(_) => panic!("opened"),
        Err(s) => s,
    };
    // A rank at or beyond the world size.
    let e = refused(Session::open(&mut c, open("r/d.zip", "run1", 2, 2)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("ranks.rank: 2 is not below ranks.world_size 2"),
        "{e}"
    );
    // A world size that disagrees with the connected ranks'.
    let e = refused(Session::open(&mut c, open("r/d.zip", "run1", 1, 3)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("world_size: 3 disagrees with job \"run1\""),
        "{e}"
    );
    assert!(e.message().contains("ranks (0, 1)"), "{e}");
    // A rank twice.
    let e = refused(Session::open(&mut c, open("r/d.zip", "run1", 1, 2)).await);
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("rank 1 of job \"run1\""), "{e}");
    // Another stream on the job's group without ranks: the job holds it.
    let e = refused(Session::open(&mut c, open_req("r/d.zip", "")).await);
    assert_eq!(e.code(), Code::FailedPrecondition);
    // A slice on a stream of one process.
    let mut single = Session::open(&mut c, open_req("r/other.zip", ""))
        .await
        .unwrap();
    single.send(begin("0")).await.unwrap();
    let mut msgs = slice_msgs(0, "kernel", (8, 4), (0, 0), (8, 2));
    msgs.truncate(1);
    let e = match single.send(msgs.remove(0)).await {
        Ok(()) => single.finish().await.err().expect("refused"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("tensor.slice"), "{e}");

    // Overlapping slices: both ranks are told, naming the tensor and ranks.
    send_all(&mut ranks[0], rank_part(1, 0, 2)).await;
    send_all(&mut ranks[1], rank_part(1, 0, 2)).await;
    for s in ranks.iter_mut() {
        let a = wait_aborted(s, 1).await;
        assert!(a[0].bad_input);
        // The ranks commit in either order: the later one is named first.
        let r = &a[0].reason;
        assert!(
            r.contains("tensor kernel/frames/1/weight.f32.uni: rank 1's slice [0:8, 0:2] overlaps rank 0's slice [0:8, 0:2]")
                || r.contains("tensor kernel/frames/1/weight.f32.uni: rank 0's slice [0:8, 0:2] overlaps rank 1's slice [0:8, 0:2]"),
            "{r}"
        );
    }
    // A global shape that disagrees between ranks.
    send_all(&mut ranks[0], rank_part(2, 0, 2)).await;
    let mut other = vec![begin("2")];
    other.extend(slice_msgs(2, "kernel", (8, 6), (0, 2), (8, 2)));
    other.push(commit());
    send_all(&mut ranks[1], other).await;
    for s in ranks.iter_mut() {
        let a = wait_aborted(s, 2).await;
        assert!(a[1].bad_input);
        let r = &a[1].reason;
        assert!(
            r.contains("rank 1 sent it as float32 [8, 6], rank 0 as float32 [8, 4]")
                || r.contains("rank 0 sent it as float32 [8, 4], rank 1 as float32 [8, 6]"),
            "{r}"
        );
    }
    // A hole: rank 1 sends none of its columns.
    send_all(&mut ranks[0], rank_part(3, 0, 2)).await;
    let mut holey = vec![begin("3")];
    holey.extend(slice_msgs(3, "proj", (4, 4), (2, 0), (2, 4)));
    holey.push(commit());
    send_all(&mut ranks[1], holey).await;
    let a = wait_aborted(&mut ranks[0], 3).await;
    assert!(
        a[2].reason.contains(
            "kernel/frames/3/weight.f32.uni: the slices sent by rank 0 cover 16 of its 32 elements"
        ),
        "{}",
        a[2].reason
    );
    // Nothing stored was lost, nothing partial appeared.
    assert_eq!(list_frames(&mut c, "r/d.zip", "").await.unwrap(), ["0"]);
    assert_whole(&mut c, "r/d.zip", 0, 2).await;
    // And the job goes on.
    for (r, s) in ranks.iter_mut().enumerate() {
        send_all(s, rank_part(4, r as u32, 2)).await;
    }
    for s in ranks.iter_mut() {
        s.wait_durable(2).await.unwrap();
    }
    assert_whole(&mut c, "r/d.zip", 4, 2).await;
}
