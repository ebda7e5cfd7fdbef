//! Who is asking, and how much one asker may hold at once.
//!
//! Invariants:
//! * Identity comes from the kernel, never from a request: on the Unix
//!   socket, the uid (and pid) of the peer's credentials (SO_PEERCRED, taken
//!   by tonic at accept: `UdsConnectInfo::peer_cred`). TCP carries no
//!   identity, so each TCP connection is a peer of its own.
//! * Limits are per peer key (the uid, or the TCP connection), checked when a
//!   resource is taken and given back when its guard drops, so no path can
//!   leak a count. A refusal is RESOURCE_EXHAUSTED and names the limit and
//!   the flag that sets it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Classify, Kind};

/// The client at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
    Tcp(SocketAddr),
    /// Neither (an in-process transport).
    Unknown,
}

impl Peer {
    /// From the transport's connection info: the Unix socket's credentials,
    /// else the TCP peer address.
    pub fn new(ucred: Option<tokio::net::unix::UCred>, remote: Option<SocketAddr>) -> Peer {
        match (ucred, remote) {
            (Some(c), _) => Peer::Unix {
                uid: c.uid(),
                pid: c.pid(),
            },
            (None, Some(a)) => Peer::Tcp(a),
            (None, None) => Peer::Unknown,
        }
    }

    fn key(&self) -> Key {
        match self {
            Peer::Unix { uid, .. } => Key::Uid(*uid),
            Peer::Tcp(a) => Key::Tcp(*a),
            Peer::Unknown => Key::Unknown,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid, pid: Some(p) } => write!(f, "uid {uid}, pid {p}"),
            Peer::Unix { uid, pid: None } => write!(f, "uid {uid}"),
            Peer::Tcp(a) => write!(f, "the TCP connection from {a}"),
            Peer::Unknown => write!(f, "an unidentified peer"),
        }
    }
}

/// What limits are counted against: a user, or one TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Uid(u32),
    Tcp(SocketAddr),
    Unknown,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Uid(u) => write!(f, "uid {u}"),
            Key::Tcp(a) => write!(f, "the TCP connection from {a}"),
            Key::Unknown => write!(f, "an unidentified peer"),
        }
    }
}

/// Per-peer limits (daemon options; defaults in `limits`).
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Live Write streams.
    pub streams: usize,
    /// Bytes of uncommitted frames the daemon holds for the peer.
    pub bytes_in_flight: u64,
    /// Distinct archives open for writing.
    pub archives: usize,
}

impl Default for PeerLimits {
    fn default() -> PeerLimits {
        use crate::limits::*;
        PeerLimits {
            streams: DEFAULT_PEER_STREAMS,
            bytes_in_flight: DEFAULT_PEER_BYTES_IN_FLIGHT,
            archives: DEFAULT_PEER_ARCHIVES,
        }
    }
}

/// A per-peer limit was reached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{peer} has {what}; the limit is {limit} ({flag}); retry when some finish")]
pub struct QuotaError {
    peer: String,
    what: String,
    limit: u64,
    flag: &'static str,
}

impl Classify for QuotaError {
    fn kind(&self) -> Kind {
        Kind::Exhausted
    }
}

#[derive(Default)]
struct Usage {
    streams: usize,
    bytes: u64,
    archives: HashMap<PathBuf, usize>,
}

impl Usage {
    fn is_empty(&self) -> bool {
        self.streams == 0 && self.bytes == 0 && self.archives.is_empty()
    }
}

/// Usage of every peer.
pub struct Quotas {
    limits: PeerLimits,
    usage: Mutex<HashMap<Key, Usage>>,
}

impl Quotas {
    pub fn new(limits: PeerLimits) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            usage: Mutex::new(HashMap::new()),
        })
    }

    /// Count one more Write stream for `peer`.
    pub fn stream(self: &Arc<Self>, peer: &Peer) -> Result<StreamQuota, QuotaError> {
        let key = peer.key();
        let mut u = self.usage.lock().unwrap();
        let e = u.entry(key.clone()).or_default();
        if e.streams >= self.limits.streams {
            return Err(QuotaError {
                peer: key.to_string(),
                what: format!("{} Write streams open", e.streams),
                limit: self.limits.streams as u64,
                flag: "--peer-streams, GTAR_LOGD_PEER_STREAMS",
            });
        }
        e.streams += 1;
        Ok(StreamQuota {
            quotas: self.clone(),
            key,
            archive: None,
        })
    }

    fn release(&self, key: &Key, f: impl FnOnce(&mut Usage)) {
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = u.get_mut(key) {
            f(e);
            if e.is_empty() {
                u.remove(key);
            }
        }
    }
}

/// One Write stream of a peer; given back on drop, with its archive.
pub struct StreamQuota {
    quotas: Arc<Quotas>,
    key: Key,
    archive: Option<PathBuf>,
}

impl StreamQuota {
    /// The stream writes `path`: one of the peer's open archives.
    pub fn archive(&mut self, path: &Path) -> Result<(), QuotaError> {
        let mut u = self.quotas.usage.lock().unwrap();
        let e = u.entry(self.key.clone()).or_default();
        let n = e.archives.len();
        match e.archives.get_mut(path) {
            Some(c) => *c += 1,
            None if n >= self.quotas.limits.archives => {
                return Err(QuotaError {
                    peer: self.key.to_string(),
                    what: format!("{n} archives open for writing"),
                    limit: self.quotas.limits.archives as u64,
                    flag: "--peer-archives, GTAR_LOGD_PEER_ARCHIVES",
                })
            }
            None => {
                e.archives.insert(path.to_path_buf(), 1);
            }
        }
        self.archive = Some(path.to_path_buf());
        Ok(())
    }

    /// An empty count of bytes in flight for this stream's peer.
    pub fn bytes(&self) -> BytesQuota {
        BytesQuota {
            quotas: self.quotas.clone(),
            key: self.key.clone(),
            n: 0,
        }
    }
}

impl Drop for StreamQuota {
    fn drop(&mut self) {
        let archive = self.archive.take();
        self.quotas.release(&self.key, |e| {
            e.streams -= 1;
            if let Some(a) = archive {
                if let Some(c) = e.archives.get_mut(&a) {
                    *c -= 1;
                    if *c == 0 {
                        e.archives.remove(&a);
                    }
                }
            }
        });
    }
}

/// Bytes a frame holds in the daemon, counted against its peer until drop.
pub struct BytesQuota {
    quotas: Arc<Quotas>,
    key: Key,
    n: u64,
}

impl BytesQuota {
    pub fn held(&self) -> u64 {
        self.n
    }

    /// Count `n` more bytes.
    pub fn grow(&mut self, n: u64) -> Result<(), QuotaError> {
        let mut u = self.quotas.usage.lock().unwrap();
        let e = u.entry(self.key.clone()).or_default();
        let limit = self.quotas.limits.bytes_in_flight;
        if e.bytes + n > limit {
            return Err(QuotaError {
                peer: self.key.to_string(),
                what: format!(
                    "{} bytes of uncommitted frames in flight, {n} more sent",
                    e.bytes
                ),
                limit,
                flag: "--peer-bytes-in-flight, GTAR_LOGD_PEER_BYTES_IN_FLIGHT",
            });
        }
        e.bytes += n;
        self.n += n;
        Ok(())
    }

    /// Give every byte back now.
    pub fn clear(&mut self) {
        let n = std::mem::take(&mut self.n);
        if n > 0 {
            self.quotas.release(&self.key, |e| e.bytes -= n);
        }
    }
}

impl Drop for BytesQuota {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_uid_and_given_back_on_drop() {
        let q = Quotas::new(PeerLimits {
            streams: 2,
            bytes_in_flight: 100,
            archives: 1,
        });
        let alice = Peer::Unix {
            uid: 1000,
            pid: Some(1),
        };
        let alice2 = Peer::Unix {
            uid: 1000,
            pid: Some(2),
        };
        let bob = Peer::Unix {
            uid: 1001,
            pid: None,
        };
        let mut a = q.stream(&alice).unwrap();
        let b = q.stream(&alice2).unwrap();
        let e = q.stream(&alice).err().unwrap();
        assert!(e.to_string().contains("--peer-streams"), "{e}");
        assert!(e.to_string().contains("uid 1000"), "{e}");
        let _bob = q.stream(&bob).unwrap();
        a.archive(Path::new("/d/x.zip")).unwrap();
        let mut b = b;
        assert!(b
            .archive(Path::new("/d/y.zip"))
            .unwrap_err()
            .to_string()
            .contains("--peer-archives"));
        b.archive(Path::new("/d/x.zip")).unwrap();
        let mut n = a.bytes();
        n.grow(60).unwrap();
        let mut m = b.bytes();
        assert!(m
            .grow(41)
            .unwrap_err()
            .to_string()
            .contains("--peer-bytes-in-flight"));
        drop(n);
        m.grow(41).unwrap();
        drop((a, b, m));
        let _again = q.stream(&alice).unwrap();
        assert_eq!(q.usage.lock().unwrap().len(), 2);
    }
}
