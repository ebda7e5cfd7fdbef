//! Tensor bytes through a client's shared memory (`OpenArchive.shm`,
//! `shm_chunk`) against the real server on a temp Unix socket and
//! `127.0.0.1:0`: frames of every size (direct I/O and not, stored and
//! compressed) read back bit-exact; TCP and a bad region (closed, too
//! small, not sealed) are refused with a reason and the stream still works
//! with `chunk`s; a range outside the region fails its frame only, and what
//! was stored stays. The offers are hand-made (the region, its pieces and
//! bad ones are what is tested); reads, and a plain writer against a daemon
//! with shared memory off, go through the project's Rust client.

#[path = "common/daemon.rs"]
mod daemon;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use daemon::*;
use gtar_logd::proto::v1::{self as pb, write_request::Msg as In, DType};
use tonic::{Code, Status};

const REGION: u64 = 64 << 20;

/// A memfd as clients make it: sealed against shrinking unless `!sealed`.
fn memfd_with(len: u64, sealed: bool) -> File {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let fd = unsafe { libc::memfd_create(c"gtar-logd-test".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    if sealed {
        let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    f
}

fn memfd(len: u64) -> File {
    memfd_with(len, true)
}

fn open_shm(archive: &str, region: &File, size: u64) -> pb::OpenArchive {
    pb::OpenArchive {
        shm: Some(pb::SharedMemory {
            fd: region.as_raw_fd() as u32,
            size,
        }),
        ..open_req(archive, "")
    }
}

/// Sizes around the direct-I/O threshold and stage, odd ones included.
fn frame(index: &str, seed: u64) -> FrameSpec {
    let sizes: [(u64, &str); 5] = [
        (1, "one"),
        (4099, "small"),
        (1 << 20, "mib"),
        ((5 << 20) + 13, "big"),
        (0, "empty"),
    ];
    FrameSpec {
        index: index.into(),
        tensors: sizes
            .iter()
            .enumerate()
            .map(|(k, (n, name))| {
                let data = Payload::Gen {
                    seed: seed * 10 + k as u64,
                    len: *n,
                };
                TensorSpec::new("w", name, DType::Uint8, &[*n], data)
            })
            .collect(),
        records: vec![("note.txt".into(), b"through shm".to_vec())],
        scalars: vec![],
    }
}

/// Send a frame with its tensor bytes in the region from `*at` on, in
/// `shm_chunk`s of at most `piece` bytes; every other tensor as `chunk`s
/// when `mixed`.
async fn send_shm_frame(
    s: &mut Session,
    f: &FrameSpec,
    region: &File,
    at: &mut u64,
    piece: u64,
    mixed: bool,
) -> Result<(), Status> {
    s.send(req(In::Begin(pb::BeginFrame {
        index: f.index.clone(),
    })))
    .await?;
    for (k, t) in f.tensors.iter().enumerate() {
        s.send(req(In::Tensor(pb::TensorHeader {
            group: t.group.clone(),
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            ..Default::default()
        })))
        .await?;
        let bytes = t.data.to_vec();
        if mixed && k % 2 == 1 {
            for c in bytes.chunks(1 << 20) {
                s.send(req(In::Chunk(pb::Chunk {
                    data: c.to_vec().into(),
                })))
                .await?;
            }
            continue;
        }
        if piece == u64::MAX {
            // Page-aligned, as the Python client places tensors: the daemon
            // then writes whole blocks straight from the region.
            *at = at.next_multiple_of(4096);
        }
        region.write_all_at(&bytes, *at).unwrap();
        let mut off = 0;
        while off < bytes.len() as u64 {
            let length = piece.min(bytes.len() as u64 - off);
            s.send(req(In::ShmChunk(pb::ShmChunk {
                offset: *at + off,
                length,
            })))
            .await?;
            off += length;
        }
        *at += bytes.len() as u64;
    }
    for (path, data) in &f.records {
        s.send(req(In::Record(pb::ConstRecord {
            path: path.clone(),
            data: data.clone(),
            size: 0,
        })))
        .await?;
    }
    s.send(req(In::Commit(pb::CommitFrame {}))).await
}

/// Open frame `index` and in it a u8 tensor of `len` bytes, whose bytes the
/// caller sends.
async fn begin_u8_tensor(s: &mut Session, index: &str, len: u64) {
    s.send(req(In::Begin(pb::BeginFrame {
        index: index.into(),
    })))
    .await
    .unwrap();
    s.send(req(In::Tensor(pb::TensorHeader {
        group: "w".into(),
        name: "a".into(),
        dtype: DType::Uint8 as i32,
        shape: vec![len],
        ..Default::default()
    })))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_through_shared_memory_read_back_bit_exact() {
    let d = Daemon::start();
    let mut c = d.uds_client().await;
    let q = d.client().await;
    for (archive, compression) in [("shm.zip", 0), ("shm-deflate.zip", 6)] {
        let region = memfd(REGION);
        let open = pb::OpenArchive {
            compression,
            ..open_shm(archive, &region, REGION)
        };
        let mut s = Session::open(&mut c, open).await.unwrap();
        assert!(s.opened.shm_attached, "{:?}", s.opened.shm_refused);
        assert_eq!(s.opened.shm_refused, "");
        let frames: Vec<_> = (0..3).map(|i| frame(&i.to_string(), i)).collect();
        let mut at = 0;
        for (i, f) in frames.iter().enumerate() {
            // Whole tensors in one shm_chunk, in odd pieces, and mixed with
            // `chunk`s in one frame.
            let piece = [u64::MAX, 1_000_003, 4096][i];
            send_shm_frame(&mut s, f, &region, &mut at, piece, i == 2)
                .await
                .unwrap();
        }
        s.wait_durable(frames.len()).await.unwrap();
        s.finish().await.unwrap();
        for f in &frames {
            let got = q.get_frame(archive, f.index.as_str()).await.unwrap();
            assert_frame_matches(&got, f);
        }
        // The file itself, through the format library (CRCs checked).
        let a = gtar::Archive::open(d.data.join(archive)).unwrap();
        assert_eq!(a.read("note.txt").unwrap(), b"through shm");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_offered_over_tcp_or_not_openable_is_refused_and_chunks_still_work() {
    let d = Daemon::start();
    let region = memfd(1 << 20);
    let unsealed = memfd_with(1 << 20, false);
    // Above any descriptor this process has open.
    let closed_fd = 1 << 30;
    let uds = d.client().await;
    let cases = [
        (true, open_shm("t.zip", &region, 1 << 20), "Unix socket"),
        (
            false,
            pb::OpenArchive {
                shm: Some(pb::SharedMemory {
                    fd: closed_fd,
                    size: 1 << 20,
                }),
                ..open_req("t.zip", "")
            },
            "is the descriptor open",
        ),
        (
            false,
            open_shm("t.zip", &region, 2 << 20),
            "less than shm.size",
        ),
        (
            false,
            open_shm("t.zip", &unsealed, 1 << 20),
            "not sealed against shrinking",
        ),
    ];
    for (n, (over_tcp, open, why)) in (0u64..).zip(cases) {
        let mut client = if over_tcp {
            d.tcp_client().await
        } else {
            d.uds_client().await
        };
        let mut s = Session::open(&mut client, open).await.unwrap();
        assert!(!s.opened.shm_attached);
        assert!(
            s.opened.shm_refused.contains(why),
            "{}",
            s.opened.shm_refused
        );
        let f = frame(&n.to_string(), n);
        s.send_frame(&f, 1 << 20).await.unwrap();
        s.wait_durable(1).await.unwrap();
        // Without a region, a shm_chunk is refused.
        begin_u8_tensor(&mut s, "x", 4).await;
        let _ = s
            .send(req(In::ShmChunk(pb::ShmChunk {
                offset: 0,
                length: 4,
            })))
            .await;
        let st = assert_code(
            s.finish().await.map(|_| ()),
            Code::InvalidArgument,
            "shm_chunk, no region",
        );
        assert!(st.message().contains("no shared memory region"), "{st:?}");
        let got = uds.get_frame("t.zip", f.index.as_str()).await.unwrap();
        assert_frame_matches(&got, &f);
    }
    assert_eq!(uds.list_frames("t.zip", "").await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_shared_memory_off_refuses_it_and_takes_chunks() {
    let d = Daemon::start_with(|c| c.shared_memory = false);
    // The client offers a region on a Unix socket by default.
    let c = d.client().await;
    let mut w = c
        .writer("off.zip", logd::OpenOptions::append())
        .await
        .unwrap();
    assert!(!w.opened().shm_attached);
    let refused = w.opened().shm_refused.clone().unwrap_or_default();
    assert!(refused.contains("--shared-memory false"), "{refused}");
    let f = frame("0", 0);
    write_with(&mut w, std::slice::from_ref(&f)).await.unwrap();
    assert_eq!(w.shm_bytes(), 0, "tensor bytes went through the socket");
    w.close().await.unwrap();
    let got = c.get_frame("off.zip", "0").await.unwrap();
    assert_frame_matches(&got, &f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_outside_the_region_fails_its_frame_only() {
    let d = Daemon::start();
    let mut c = d.uds_client().await;
    let q = d.client().await;
    let good = frame("0", 0);

    // Out of the declared region (and an overflowing one): INVALID_ARGUMENT.
    for (offset, length) in [(REGION - 10, 11), (u64::MAX - 1, 4)] {
        let region = memfd(REGION);
        let mut s = Session::open(&mut c, open_shm("b.zip", &region, REGION))
            .await
            .unwrap();
        let mut at = 0;
        if offset == REGION - 10 {
            send_shm_frame(&mut s, &good, &region, &mut at, u64::MAX, false)
                .await
                .unwrap();
            s.wait_durable(1).await.unwrap();
        }
        begin_u8_tensor(&mut s, "9", length).await;
        let _ = s
            .send(req(In::ShmChunk(pb::ShmChunk { offset, length })))
            .await;
        let st = assert_code(
            s.finish().await.map(|_| ()),
            Code::InvalidArgument,
            "outside",
        );
        assert!(st.message().contains("outside the"), "{st:?}");
    }

    let region = memfd(REGION);
    let mut s = Session::open(&mut c, open_shm("b.zip", &region, REGION))
        .await
        .unwrap();
    let next = frame("1", 1);
    send_shm_frame(&mut s, &next, &region, &mut 0, u64::MAX, false)
        .await
        .unwrap();
    s.wait_durable(1).await.unwrap();
    s.finish().await.unwrap();
    assert_eq!(
        q.list_frames("b.zip", "").await.unwrap(),
        vec!["0".to_string(), "1".to_string()]
    );
    for f in [&good, &next] {
        let got = q.get_frame("b.zip", f.index.as_str()).await.unwrap();
        assert_frame_matches(&got, f);
    }
}
