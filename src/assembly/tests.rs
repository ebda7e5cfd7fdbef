//! The assembler against a fake writer: what reaches the writer, and what
//! every rank is told.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::job::Sink;
use super::*;
use crate::layout::DType;
use crate::writer::{FrameTicket, Part, WriterError};

/// Keeps every frame submitted and acks it at once.
#[derive(Default, Clone)]
struct Fake {
    frames: Arc<Mutex<Vec<Vec<Part>>>>,
}

impl Sink for Fake {
    fn submit(&self, parts: Vec<Part>) -> Result<FrameTicket, WriterError> {
        let (rtx, received) = oneshot::channel();
        let (dtx, durable) = oneshot::channel();
        let (ptx, _) = mpsc::channel(1);
        let _ = rtx.send(Ok(gtar::Committed {
            txn: 0,
            entries: parts.len(),
            bytes: 100,
        }));
        let _ = dtx.send(Ok(()));
        self.frames.lock().unwrap().push(parts);
        Ok(FrameTicket {
            parts: ptx,
            received,
            durable,
        })
    }
}

fn key() -> JobKey {
    JobKey {
        uid: Some(1000),
        archive: "runs/a.zip".into(),
        group: "g".into(),
        job: "run1".into(),
    }
}

fn join(jobs: &Jobs<Fake>, fake: &Fake, rank: u32, world: u32) -> Result<Seat<Fake>, JobError> {
    let f = fake.clone();
    jobs.join(
        key(),
        &RankSpec {
            job: "run1".into(),
            rank,
            world,
        },
        0,
        move || Ok(f),
    )
}

const PATH: &str = "g/w/frames/5/kernel.f32.uni";

/// Rank `r` of `n`: its column block of an 4 × 2n f32 matrix whose
/// element i is i.
fn columns(r: u32, n: u32, index: &str) -> RankFrame {
    let (rows, cols) = (4u64, 2 * n as u64);
    let mut f = RankFrame::new(index.into());
    let s = Slice {
        offsets: vec![0, 2 * r as u64],
        shape: vec![rows, 2],
    };
    f.tensor(
        PATH.replace("/5/", &format!("/{index}/")),
        DType::F32,
        vec![rows, cols],
        Some(s.clone()),
        u64::MAX,
    )
    .unwrap();
    let mut bytes = Vec::new();
    for run in s.runs(&[rows, cols]) {
        for e in run.global..run.global + run.len {
            bytes.extend_from_slice(&(e as f32).to_le_bytes());
        }
    }
    f.piece("chunk.data", Seg::Bytes(Bytes::from(bytes)))
        .unwrap();
    f
}

async fn aborted(t: Tickets) -> Abort {
    match t.received.await.expect("answered") {
        Err(FrameError::Aborted(a)) => a,
        Err(FrameError::Writer(e)) => panic!("writer error {e}"),
        Ok(_) => panic!("the frame was written"),
    }
}

fn frame_bytes(parts: &[Part], path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut on = false;
    for p in parts {
        match p {
            Part::Start { path: p, .. } => on = p == path,
            Part::Data(d) if on => out.extend_from_slice(d),
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn a_frame_is_written_once_every_rank_committed_and_each_rank_hears_it() {
    let jobs = Jobs::new(Duration::from_secs(10));
    let fake = Fake::default();
    let seats: Vec<_> = (0..4).map(|r| join(&jobs, &fake, r, 4).unwrap()).collect();
    let mut tickets = Vec::new();
    for (r, s) in seats.iter().enumerate() {
        s.begin("5");
        tickets.push(s.commit(columns(r as u32, 4, "5")).unwrap());
        if r < 3 {
            assert!(
                fake.frames.lock().unwrap().is_empty(),
                "nothing before the last rank"
            );
        }
    }
    for t in tickets {
        let c = t.received.await.unwrap().unwrap();
        assert_eq!(c.bytes, 100);
        t.durable.await.unwrap().unwrap();
    }
    let frames = fake.frames.lock().unwrap();
    assert_eq!(frames.len(), 1);
    let want: Vec<u8> = (0..32).flat_map(|e| (e as f32).to_le_bytes()).collect();
    assert_eq!(frame_bytes(&frames[0], PATH), want);
    assert!(matches!(frames[0].last(), Some(Part::Commit)));
}

#[tokio::test]
async fn a_rank_that_leaves_aborts_the_frame_for_all_and_the_next_frame_proceeds() {
    let jobs = Jobs::new(Duration::from_secs(10));
    let fake = Fake::default();
    let mut seats: Vec<_> = (0..3).map(|r| join(&jobs, &fake, r, 3).unwrap()).collect();
    for s in &seats {
        s.begin("5");
    }
    let t0 = seats[0].commit(columns(0, 3, "5")).unwrap();
    // Frame 6 is begun by rank 0 only: rank 2's leaving does not abort it.
    seats[0].begin("6");
    // Rank 2 dies while rank 1 is still sending.
    drop(seats.pop());
    let a = aborted(t0).await;
    assert_eq!(a.missing, vec![1, 2]);
    assert!(
        a.reason.contains("rank 2 of job \"run1\" left"),
        "{}",
        a.reason
    );
    assert!(!a.bad_input);
    // Rank 1 commits late: told at once, not left waiting.
    let a1 = aborted(seats[1].commit(columns(1, 3, "5")).unwrap()).await;
    assert_eq!(a1, a);
    assert!(fake.frames.lock().unwrap().is_empty(), "nothing written");
    // The rank comes back (a restarted process) and frame 6 is written.
    seats.push(join(&jobs, &fake, 2, 3).unwrap());
    let mut tickets = Vec::new();
    for (r, s) in seats.iter().enumerate() {
        s.begin("6");
        tickets.push(s.commit(columns(r as u32, 3, "6")).unwrap());
    }
    for t in tickets {
        t.received.await.unwrap().unwrap();
    }
    assert_eq!(fake.frames.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_rank_that_misses_the_deadline_aborts_the_frame() {
    let jobs = Jobs::new(Duration::from_millis(200));
    let fake = Fake::default();
    let seats: Vec<_> = (0..2).map(|r| join(&jobs, &fake, r, 2).unwrap()).collect();
    seats[0].begin("5");
    let t0 = seats[0].commit(columns(0, 2, "5")).unwrap();
    // Bytes delivered extend the deadline: 64 MiB buy a second.
    seats[0].delivered("5", 64 << 20);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut t0 = t0;
    assert!(t0.received.try_recv().is_err(), "still waiting at 0.6 s");
    let a = tokio::time::timeout(Duration::from_secs(10), aborted(t0))
        .await
        .expect("aborted within 10 s");
    assert_eq!(a.missing, vec![1]);
    assert!(
        a.reason.contains("rank 1 did not commit it within 1.2 s"),
        "{}",
        a.reason
    );
    let a1 = aborted(seats[1].commit(columns(1, 2, "5")).unwrap()).await;
    assert_eq!(a1.missing, vec![1]);
    assert!(fake.frames.lock().unwrap().is_empty());
}

#[tokio::test]
async fn parts_that_disagree_abort_the_frame_for_every_rank_naming_tensor_and_ranks() {
    let jobs = Jobs::new(Duration::from_secs(10));
    let fake = Fake::default();
    let seats: Vec<_> = (0..2).map(|r| join(&jobs, &fake, r, 2).unwrap()).collect();
    for s in &seats {
        s.begin("5");
    }
    let t0 = seats[0].commit(columns(0, 2, "5")).unwrap();
    // Rank 1 sends rank 0's columns again.
    let t1 = seats[1].commit(columns(0, 2, "5")).unwrap();
    let (a0, a1) = (aborted(t0).await, aborted(t1).await);
    assert_eq!(a0, a1);
    assert!(a0.bad_input);
    assert!(
        a0.reason.contains(
            "tensor g/w/frames/5/kernel.f32.uni: rank 1's slice [0:4, 0:2] overlaps rank 0's"
        ),
        "{}",
        a0.reason
    );
    // A hole: two ranks, rank 1 sends nothing of the tensor.
    for s in &seats {
        s.begin("6");
    }
    let t0 = seats[0].commit(columns(0, 2, "6")).unwrap();
    let t1 = seats[1].commit(RankFrame::new("6".into())).unwrap();
    let a = aborted(t0).await;
    assert!(
        a.reason.contains("cover 8 of its 16 elements"),
        "{}",
        a.reason
    );
    assert_eq!(aborted(t1).await, a);
    assert!(fake.frames.lock().unwrap().is_empty());
}

#[tokio::test]
async fn joining_checks_rank_world_size_and_one_stream_per_rank() {
    let jobs = Jobs::new(Duration::from_secs(10));
    let fake = Fake::default();
    let e = join(&jobs, &fake, 4, 4).err().unwrap();
    assert!(
        e.to_string()
            .contains("ranks.rank: 4 is not below ranks.world_size 4"),
        "{e}"
    );
    assert!(join(&jobs, &fake, 0, 0).is_err());
    let _s0 = join(&jobs, &fake, 0, 4).unwrap();
    let e = join(&jobs, &fake, 1, 8).err().unwrap();
    assert!(
        e.to_string()
            .contains("ranks.world_size: 8 disagrees with job \"run1\" on runs/a.zip, whose connected ranks (0) opened it with world_size 4"),
        "{e}"
    );
    assert_eq!(e.kind(), crate::error::Kind::BadInput);
    let e = join(&jobs, &fake, 0, 4).err().unwrap();
    assert!(e.to_string().contains("rank 0 of job \"run1\""), "{e}");
    assert_eq!(e.kind(), crate::error::Kind::Conflict);
    // Once every rank left, the job is gone: a new world size is fine.
    drop(_s0);
    join(&jobs, &fake, 1, 8).unwrap();
}

use crate::error::Classify;
