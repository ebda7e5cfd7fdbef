//! The bytes of a remote archive, read by ranges (`gtar::ReadAt`), so the
//! same reader code (`gtar::Archive`, `query`) serves local and remote
//! archives.
//!
//! A read that does not continue an earlier one starts one ranged GET from
//! its offset to the end of its segment and keeps the response as a cursor;
//! the reads that follow (an entry read in `SEND_CHUNK`s) take their bytes
//! from it. So a tensor costs one request whatever its size, the body is
//! consumed as the client takes it (memory: one HTTP body chunk), and a
//! cursor nobody continues is dropped, closing its connection.
//!
//! Invariant: called only off the async workers (it blocks on the runtime).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore};

/// Cursors kept open per archive view (concurrent readers of one archive).
const CURSORS: usize = 8;

struct Cursor {
    /// Archive offset of the next byte `pending` / `stream` yield.
    pos: u64,
    /// Archive offset where this GET's range ends.
    end: u64,
    pending: Bytes,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
}

pub struct RemoteSource {
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Handle,
    /// (offset, len, key), in offset order, contiguous from 0.
    segments: Vec<(u64, u64, Key)>,
    cursors: Mutex<Vec<Cursor>>,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl RemoteSource {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        rt: tokio::runtime::Handle,
        segments: Vec<(u64, u64, Key)>,
        requests: Arc<AtomicU64>,
    ) -> RemoteSource {
        RemoteSource {
            store,
            rt,
            segments,
            cursors: Mutex::new(Vec::new()),
            requests,
        }
    }

    fn segment(&self, offset: u64) -> Option<&(u64, u64, Key)> {
        let i = self.segments.partition_point(|s| s.0 + s.1 <= offset);
        self.segments.get(i).filter(|s| s.0 <= offset)
    }

    fn start(&self, offset: u64) -> std::io::Result<Cursor> {
        let (seg_at, seg_len, key) = self.segment(offset).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("offset {offset} is past the remote archive's end"),
            )
        })?;
        let from = offset - seg_at;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(from..*seg_len)),
            ..Default::default()
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let r = self
            .rt
            .block_on(self.store.get_opts(key, opts))
            .map_err(|e| std::io::Error::other(format!("remote segment {key}: {e}")))?;
        Ok(Cursor {
            pos: offset,
            end: seg_at + seg_len,
            pending: Bytes::new(),
            stream: r.into_stream(),
        })
    }
}

impl gtar::ReadAt for RemoteSource {
    fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if buf.is_empty() || self.segments.last().is_none_or(|s| offset >= s.0 + s.1) {
            return Ok(0);
        }
        let found = {
            let mut cs = self.cursors.lock().unwrap();
            cs.iter()
                .position(|c| c.pos == offset)
                .map(|i| cs.swap_remove(i))
        };
        let mut c = match found {
            Some(c) => c,
            None => self.start(offset)?,
        };
        if c.pending.is_empty() {
            match self.rt.block_on(c.stream.try_next()) {
                Ok(Some(b)) => c.pending = b,
                Ok(None) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "a remote segment ended early",
                    ))
                }
                Err(e) => return Err(std::io::Error::other(format!("remote read: {e}"))),
            }
        }
        let n = buf.len().min(c.pending.len());
        buf[..n].copy_from_slice(&c.pending[..n]);
        c.pending = c.pending.slice(n..);
        c.pos += n as u64;
        if c.pos < c.end {
            let mut cs = self.cursors.lock().unwrap();
            if cs.len() >= CURSORS {
                cs.remove(0);
            }
            cs.push(c);
        }
        Ok(n)
    }
}
